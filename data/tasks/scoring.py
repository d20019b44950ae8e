"""Scoring as RULER does: string match `all` (share of references found in the prediction) and
`part` (1 if any reference is found). Case-insensitive; the prediction is cleaned of control
characters and newlines first. Also `normalise_answer`, the task's normalisation that the
label-free `fidelity` criterion compares a sparse answer with the dense one under.
Imports nothing from this project."""
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


_WORD = re.compile(r"[^\W_]+")
_ENUMERATOR = re.compile(r"(?<!\S)(?:\d{1,3}[.)]|[-*+\u2022])(?=\s|$)")   # "1." "2)" "-" "*" list markers
# tasks whose answer is a collection of items scored by string match `all` (needles, variables, words)
SET_ANSWER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
SEQUENCE_ANSWER_TASKS = ("qa",)


def normalise_answer(task: str, text: str):
    """What two greedy answers must share to count as the same answer for `task`:
    - item tasks (niah_*, vt, cwe, fwe): the set of lower-cased words after dropping list markers
      ("1.", "2)", "-", "*"); punctuation, order and repeats do not matter (equal sets score equally
      under string match `all` for any one-word reference);
    - qa: the sequence of lower-cased words (SQuAD-style: punctuation and spacing dropped);
    - any other task (`unknown` included): the exact text, stripped of surrounding whitespace."""
    if task in SET_ANSWER_TASKS:
        return frozenset(_WORD.findall(_ENUMERATOR.sub(" ", text.lower())))
    if task in SEQUENCE_ANSWER_TASKS:
        return tuple(_WORD.findall(text.lower()))
    return text.strip()


METRICS = {"all": string_match_all, "part": string_match_part}


def score(metric: str, prediction: str, references) -> float:
    return METRICS[metric](prediction, references)
