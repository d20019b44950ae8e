"""Variable tracking (RULER `vt`): chains of assignments hidden in a haystack; name every
variable that ends up holding the value. Phrasings change the assignment syntax (`VAR X = 1.`,
`let x = 1;`, `X := 1`), the variable names and the question. Imports nothing from `controller`."""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

from .base import register_task, task_rng
from .forms import CLASSIC, Form
from .words import haystack, insert_at_depths, join_units


@dataclass(frozen=True)
class AssignStyle:
    first: str      # the value's assignment: {b} the name, {v} the value
    hop: str        # a copy: {b} = {a}
    alphabet: str
    intro: str
    question: str   # {v} the value
    prefix: str     # {n} how many variables, {v} the value


STYLES = (
    AssignStyle("VAR {b} = {v}.", "VAR {b} = VAR {a}.", string.ascii_uppercase,
                "Memorize and track the chain(s) of variable assignment hidden in the following text.",
                "Question: Find all variables that are assigned the value {v} in the text above.",
                "Answer: According to the chain(s) of variable assignment in the text above, "
                "{n} variables are assigned the value {v}, they are:"),
    AssignStyle("let {b} = {v};", "let {b} = {a};", string.ascii_lowercase,
                "The text below hides a few assignment statements. Follow them.",
                "Which variables hold the value {v} once every assignment above has run?",
                "The variables holding {v} are:"),
    AssignStyle("{b} := {v}", "{b} := {a}", string.ascii_lowercase + string.digits,
                "Some lines below copy values between variables. Keep track of them.",
                "Question: List each variable that ends up equal to {v}.",
                "Answer: The {n} variables equal to {v}:"),
)


def _name(style: AssignStyle, rng: random.Random) -> str:
    if style.alphabet == string.ascii_uppercase:
        return "".join(rng.choice(style.alphabet) for _ in range(5))
    return "v_" + "".join(rng.choice(style.alphabet) for _ in range(4))


@register_task("vt")
@dataclass
class VariableTracking:
    num_chains: int = 1
    num_hops: int = 4
    task_type: str = "vt"
    metric: str = "all"
    max_new_tokens: int = 32

    def render(self, key: str, size: int, form: Form = CLASSIC):
        rng = task_rng(key)
        style = STYLES[form.phrasing]
        names: list[str] = []
        while len(names) < self.num_chains * (self.num_hops + 1):
            n = _name(style, rng)
            if n not in names:
                names.append(n)
        values = [str(rng.randint(10_000, 99_999)) for _ in range(self.num_chains)]
        inserts = []
        for c in range(self.num_chains):
            chain = names[c * (self.num_hops + 1):(c + 1) * (self.num_hops + 1)]
            depths = sorted(rng.random() for _ in chain)
            inserts.append((depths[0], style.first.format(b=chain[0], v=values[c])))
            inserts += [(d, style.hop.format(a=a, b=b)) for d, a, b in zip(depths[1:], chain, chain[1:])]
        answer = tuple(names[:self.num_hops + 1])
        text = join_units(form.filler, insert_at_depths(haystack(form.filler, key, size), inserts))
        question = style.question.format(v=values[0])
        prefix = style.prefix.format(n=len(answer), v=values[0])
        return f"{style.intro}\n\n{text}\n{question}", answer, prefix
