"""Needle in a haystack, RULER style: single, multi-key, multi-value and multi-query.

Needles are "One of the special magic numbers for <key> is: <7 digits>." at random depths in a
filler haystack; the question asks for the numbers of one or more keys. Imports nothing from
`controller`."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_task, task_rng
from .words import ADJECTIVES, NOUNS, filler, insert_at_depths

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.")


@dataclass
class Niah:
    """`num_keys` keys with needles, `num_values` numbers per key, `num_queries` keys asked."""
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

    def render(self, key: str, size: int):
        rng = task_rng(key)
        keys = self._keys(rng)
        values = {k: [str(rng.randint(1_000_000, 9_999_999)) for _ in range(self.num_values)] for k in keys}
        needles = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.")
                   for k in keys for v in values[k]]
        asked = rng.sample(keys, self.num_queries)
        haystack = " ".join(insert_at_depths(filler(key, size), needles))
        query = ", ".join(asked)
        question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
        outputs = tuple(v for k in asked for v in values[k])
        prefix = f"The special magic numbers for {query} mentioned in the provided text are:"
        return f"{INTRO}\n{haystack}\n{question}", outputs, prefix


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
