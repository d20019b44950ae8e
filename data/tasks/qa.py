"""Question answering over generated documents about invented people (RULER `qa` style).

Each document states facts about one invented person (birthplace, trade, founding year of the
town) among filler; one document, at a random depth, is asked about. Scored with
string-match-part. Imports nothing from `controller`."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .base import register_task, task_rng
from .forms import CLASSIC, Form
from .words import ACTIONS, NOUNS, haystack, invented_name

TRADES = ("ceramicist glassblower cartographer beekeeper clockmaker bookbinder luthier ropemaker "
          "astronomer shipwright herbalist engraver").split()
QUESTIONS = (  # per phrasing: kind -> (question, answer prefix)
    {"town": ("In which town was {name} born?", "{name} was born in"),
     "trade": ("What is the trade of {name}?", "The trade of {name} is"),
     "year": ("In which year was the home town of {name} founded?", "The home town of {name} was founded in")},
    {"town": ("Where does {name} come from?", "{name} comes from"),
     "trade": ("What does {name} do for a living?", "{name} works as a"),
     "year": ("When was the town where {name} was born founded?", "That town was founded in")},
    {"town": ("{name}: birthplace?", "Birthplace:"),
     "trade": ("{name}: occupation?", "Occupation:"),
     "year": ("{name}: founding year of the home town?", "Year:")},
)
HEADERS = ("\n\nDocument {i}:\n", "\n\nPassage {i}\n", "\n\n[{i}] ")
INTROS = ("Answer the question based on the given documents. Only give me the answer and do not output any other words.",
          "Use the passages below to answer. Reply with the answer only.",
          "Read the records and answer briefly.")


def _person(rng: random.Random) -> dict:
    return {"name": f"{invented_name(rng)} {invented_name(rng, 3)}", "town": f"{invented_name(rng)} {rng.choice(NOUNS).capitalize()}",
            "trade": rng.choice(TRADES), "year": str(rng.randint(1200, 1899)), "habit": rng.choice(ACTIONS)}


def _document_units(i: int, p: dict, body: list[str], header: str) -> list[str]:
    """A document as units: its header with the first fact, the second fact, then filler."""
    return [f"{header.format(i=i + 1)}{p['name']} was born in {p['town']}, a town founded in {p['year']}.",
            f"{p['name']} works as a {p['trade']} and once {p['habit']}.", *body]


@register_task("qa")
@dataclass
class GeneratedQA:
    """`size` units (two facts + `sentences_per_doc` filler sentences per document); one document is asked about."""
    sentences_per_doc: int = 4
    task_type: str = "qa"
    metric: str = "part"
    max_new_tokens: int = 24

    def render(self, key: str, size: int, form: Form = CLASSIC):
        rng = task_rng(key)
        target_depth = rng.random()
        questions = QUESTIONS[form.phrasing]
        kind = rng.choice(sorted(questions))
        per_doc = self.sentences_per_doc + 2
        n_docs = -(-size // per_doc)
        people = [_person(random.Random(f"{key}|person|{i}")) for i in range(n_docs)]
        asked = min(n_docs - 1, int(target_depth * n_docs))
        body = haystack(form.filler, key, n_docs * self.sentences_per_doc)
        spd = self.sentences_per_doc
        header = HEADERS[form.phrasing]
        units = [u for i, p in enumerate(people) for u in _document_units(i, p, body[i * spd:(i + 1) * spd], header)]
        question, prefix = (t.format(name=people[asked]["name"]) for t in questions[kind])
        intro = INTROS[form.phrasing]
        joiner = "\n" if form.filler in ("code", "json") else " "
        docs = joiner.join(units[:max(size, (asked * per_doc) + 2)]).replace(f"{joiner}\n\n", "\n\n")
        text = f"{intro}\n\nThe following are given documents.{docs}\n\n{intro}\n\nQuestion: {question}"
        return text, (people[asked][kind],), f"Answer: {prefix}"
