"""Question answering over generated documents about invented people (RULER `qa` style).

Each document states facts about one invented person (birthplace, trade, founding year of the
town) among filler; one document, at a random depth, is asked about. Scored with
string-match-part. Imports nothing from `controller`."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .base import register_task, task_rng
from .words import ACTIONS, NOUNS, filler, invented_name

TRADES = ("ceramicist glassblower cartographer beekeeper clockmaker bookbinder luthier ropemaker "
          "astronomer shipwright herbalist engraver").split()
QUESTIONS = {
    "town": ("In which town was {name} born?", "{name} was born in"),
    "trade": ("What is the trade of {name}?", "The trade of {name} is"),
    "year": ("In which year was the home town of {name} founded?", "The home town of {name} was founded in"),
}


def _person(rng: random.Random) -> dict:
    return {"name": f"{invented_name(rng)} {invented_name(rng, 3)}", "town": f"{invented_name(rng)} {rng.choice(NOUNS).capitalize()}",
            "trade": rng.choice(TRADES), "year": str(rng.randint(1200, 1899)), "habit": rng.choice(ACTIONS)}


def _document_units(i: int, p: dict, body: list[str]) -> list[str]:
    """A document as units: its header with the first fact, the second fact, then filler."""
    return [f"\n\nDocument {i + 1}:\n{p['name']} was born in {p['town']}, a town founded in {p['year']}.",
            f"{p['name']} works as a {p['trade']} and once {p['habit']}.", *body]


@register_task("qa")
@dataclass
class GeneratedQA:
    """`size` units (two facts + `sentences_per_doc` filler sentences per document); one document is asked about."""
    sentences_per_doc: int = 4
    task_type: str = "qa"
    metric: str = "part"
    max_new_tokens: int = 24

    def render(self, key: str, size: int):
        rng = task_rng(key)
        target_depth = rng.random()
        kind = rng.choice(sorted(QUESTIONS))
        per_doc = self.sentences_per_doc + 2
        n_docs = -(-size // per_doc)
        people = [_person(random.Random(f"{key}|person|{i}")) for i in range(n_docs)]
        asked = min(n_docs - 1, int(target_depth * n_docs))
        body = filler(key, n_docs * self.sentences_per_doc)
        spd = self.sentences_per_doc
        units = [u for i, p in enumerate(people) for u in _document_units(i, p, body[i * spd:(i + 1) * spd])]
        question, prefix = (t.format(name=people[asked]["name"]) for t in QUESTIONS[kind])
        intro = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
        docs = " ".join(units[:max(size, (asked * per_doc) + 2)]).replace(" \n\n", "\n\n")
        text = f"{intro}\n\nThe following are given documents.{docs}\n\n{intro}\n\nQuestion: {question}"
        return text, (people[asked][kind],), f"Answer: {prefix}"
