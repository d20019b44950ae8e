"""Needle in a haystack, RULER style: single, multi-key, multi-value and multi-query.

Needles ("One of the special magic numbers for <key> is: <7 digits>." in the classic phrasing)
sit at random depths in a haystack; the question asks for the values of one or more keys. Other
phrasings change the needle's wording, the kind of value (numbers, hex codes, words), the intro,
question and answer prefix; the form's filler picks the haystack. Imports nothing from
`controller`."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .base import register_task, task_rng
from .forms import CLASSIC, Form
from .words import ADJECTIVES, COMMON_WORDS, NOUNS, haystack, insert_at_depths, join_units


@dataclass(frozen=True)
class NeedleStyle:
    intro: str
    needle: str
    question: str
    prefix: str
    value: str   # number, code or word


STYLES = (
    NeedleStyle("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.",
                "One of the special magic numbers for {k} is: {v}.",
                "What are all the special magic numbers for {q} mentioned in the provided text?",
                "The special magic numbers for {q} mentioned in the provided text are:", "number"),
    NeedleStyle("A few access codes are scattered through the document below. Read it carefully; you will be "
                "asked for some of them.",
                "Note: the access code assigned to {k} is {v}.",
                "List every access code that the document assigns to {q}.",
                "Access codes assigned to {q}:", "code"),
    NeedleStyle("Read the notes below. Some of them pair a name with a secret word.",
                "Remember that {k} is paired with the word '{v}'.",
                "Which secret words are paired with {q} in the notes above? Answer with the words only.",
                "The words paired with {q} are:", "word"),
)


def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "code":
        return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"
    return rng.choice(COMMON_WORDS)


@dataclass
class Niah:
    """`num_keys` keys with needles, `num_values` values per key, `num_queries` keys asked."""
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    task_type: str = "niah_single"
    metric: str = "all"
    max_new_tokens: int = 32

    def _keys(self, rng) -> list[str]:
        keys: list[str] = []
        while len(keys) < self.num_keys:
            k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if k not in keys:
                keys.append(k)
        return keys

    def _values(self, style: NeedleStyle, keys: list[str], rng: random.Random) -> dict[str, list[str]]:
        values: dict[str, list[str]] = {}
        used: set[str] = set()
        for k in keys:
            values[k] = []
            while len(values[k]) < self.num_values:
                v = _value(style.value, rng)
                if v not in used or style.value == "number":   # numbers: the classic draw, kept as it was
                    values[k].append(v)
                    used.add(v)
        return values

    def render(self, key: str, size: int, form: Form = CLASSIC):
        rng = task_rng(key)
        style = STYLES[form.phrasing]
        keys = self._keys(rng)
        values = self._values(style, keys, rng)
        needles = [(rng.random(), style.needle.format(k=k, v=v)) for k in keys for v in values[k]]
        asked = rng.sample(keys, self.num_queries)
        text = join_units(form.filler, insert_at_depths(haystack(form.filler, key, size), needles))
        query = ", ".join(asked)
        outputs = tuple(v for k in asked for v in values[k])
        return f"{style.intro}\n{text}\n{style.question.format(q=query)}", outputs, style.prefix.format(q=query)


@register_task("niah_single")
def niah_single(**kw) -> Niah:
    return Niah(**{"task_type": "niah_single", **kw})


@register_task("niah_multikey")
def niah_multikey(num_keys: int = 4, **kw) -> Niah:
    return Niah(**{"num_keys": num_keys, "task_type": "niah_multikey", **kw})


@register_task("niah_multivalue")
def niah_multivalue(num_values: int = 4, **kw) -> Niah:
    return Niah(**{"num_values": num_values, "task_type": "niah_multivalue", "max_new_tokens": 64, **kw})


@register_task("niah_multiquery")
def niah_multiquery(num_keys: int = 4, num_queries: int = 2, **kw) -> Niah:
    return Niah(**{"num_keys": num_keys, "num_queries": num_queries, "task_type": "niah_multiquery",
                   "max_new_tokens": 64, **kw})
