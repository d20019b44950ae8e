"""Scoring as RULER does: string match `all` (share of references found in the prediction) and
`part` (1 if any reference is found). Case-insensitive; the prediction is cleaned of control
characters and newlines first. Imports nothing from this project."""
from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(text: str) -> str:
    return _CONTROL.sub("", text.replace("\n", " ")).strip()


def string_match_all(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    pred = clean_prediction(prediction).lower()
    if not references:
        raise ValueError("a sample needs at least one reference output")
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    pred = clean_prediction(prediction).lower()
    if not references:
        raise ValueError("a sample needs at least one reference output")
    return float(max(r.lower() in pred for r in references))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(metric: str, prediction: str, references) -> float:
    return METRICS[metric](prediction, references)
