"""Surface forms: how a generated request looks, apart from what it asks.

A `Form` is (haystack kind, phrasing index, chat template on/off). The first generators had one
form per family (`CLASSIC`: prose filler, phrasing 0, the config's chat template), which let
"family + length" stand in for what a request tolerates. `FORM_SETS` names what a config asks
for: `classic` (that one form) or `varied` (each sample's form drawn from its own key, so every
family comes in every haystack kind, phrasing and template setting). Imports nothing from
`controller`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

FILLERS = ("prose", "repeat", "code", "json")   # for list tasks (cwe, fwe): the list's layout
PHRASINGS = 3
FORM_SETS = ("classic", "varied")


@dataclass(frozen=True)
class Form:
    filler: str = "prose"
    phrasing: int = 0
    chat: bool | None = None    # None: the config's data.chat_template

    def name(self, default_chat: bool = True) -> str:
        """e.g. 'code/p2/chat': the haystack kind, the phrasing and whether the chat template is on."""
        chat = default_chat if self.chat is None else self.chat
        return f"{self.filler}/p{self.phrasing}/{'chat' if chat else 'plain'}"


CLASSIC = Form()
FORM_DIMENSIONS = ("filler", "phrasing", "chat")


def draw_form(key: str) -> Form:
    """The form of a `varied` sample, from its own key (so it is known before the text exists)."""
    rng = random.Random(f"{key}|form")
    return Form(rng.choice(FILLERS), rng.randrange(PHRASINGS), rng.random() < 0.5)


def form_of(form_set: str, key: str) -> Form:
    if form_set not in FORM_SETS:
        raise ValueError(f"unknown form set {form_set!r}; choose one of {list(FORM_SETS)}")
    return CLASSIC if form_set == "classic" else draw_form(key)


def form_part(form_name: str, dimension: str) -> str:
    """One dimension of a form name ('code/p2/chat', 'phrasing') -> 'p2'; '' for requests without one."""
    parts = (form_name or "").split("/")
    i = FORM_DIMENSIONS.index(dimension)
    return parts[i] if len(parts) == len(FORM_DIMENSIONS) else ""
