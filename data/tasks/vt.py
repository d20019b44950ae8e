"""Variable tracking (RULER `vt`): chains of assignments hidden in a haystack; name every
variable that ends up holding the value. Imports nothing from `controller`."""
from __future__ import annotations

import string
from dataclasses import dataclass

from .base import register_task, task_rng
from .words import filler, insert_at_depths


@register_task("vt")
@dataclass
class VariableTracking:
    num_chains: int = 1
    num_hops: int = 4
    task_type: str = "vt"
    metric: str = "all"
    max_new_tokens: int = 32

    def render(self, key: str, size: int):
        rng = task_rng(key)
        names: list[str] = []
        while len(names) < self.num_chains * (self.num_hops + 1):
            n = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if n not in names:
                names.append(n)
        values = [str(rng.randint(10_000, 99_999)) for _ in range(self.num_chains)]
        inserts = []
        for c in range(self.num_chains):
            chain = names[c * (self.num_hops + 1):(c + 1) * (self.num_hops + 1)]
            depths = sorted(rng.random() for _ in chain)
            inserts.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
            inserts += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(depths[1:], chain, chain[1:])]
        answer = tuple(names[:self.num_hops + 1])
        text = " ".join(insert_at_depths(filler(key, size), inserts))
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
        question = f"Question: Find all variables that are assigned the value {values[0]} in the text above."
        prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
                  f"{len(answer)} variables are assigned the value {values[0]}, they are:")
        return f"{intro}\n\n{text}\n{question}", answer, prefix
