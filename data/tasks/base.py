"""Samples, the task registry, prompt building and sizing generated inputs in model tokens.

Owns `Sample` (one request with its reference outputs), `TaskSpec` (a task by `name` + `args`
as configs write it), the registry `TASKS` (adding a task = one file + one `@register_task`
line), `prompt_ids` (chat template + answer prefix) and `generate_sample`, which grows a
generator's haystack until the prompt hits the target token length (within 5%).
Imports nothing from `controller`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from ..errors import UserError
from .forms import CLASSIC, Form, form_of

TASK_TYPES = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa")
UNKNOWN_TASK = "unknown"
LENGTH_TOLERANCE = 0.05


@dataclass(frozen=True)
class Sample:
    """One request. `outputs` are the reference answers, scored by `metric` ('all' or 'part')."""
    sample_id: str
    task: str
    input: str
    outputs: tuple[str, ...]
    answer_prefix: str = ""
    target_length: int = 0
    metric: str = "all"
    max_new_tokens: int = 32
    group: str = ""
    source: str = "generated"
    form: str = ""                     # the surface form's name (data.tasks.forms), "" for read requests
    chat_template: bool | None = None  # None: the config's data.chat_template
    history: tuple[tuple[str, str], ...] = ()  # (role, content) turns before `input`, the last user turn


class TaskGenerator(Protocol):
    task_type: str
    metric: str
    max_new_tokens: int

    def render(self, key: str, size: int, form: Form = CLASSIC) -> tuple:
        """(input text, outputs, answer prefix) with `size` haystack units in `form`, seeded by `key`;
        a conversation's generator adds a fourth item, the earlier (role, content) turns."""


@dataclass(frozen=True)
class TaskSpec:
    """A task as configs name it: registry `name` plus constructor `args`."""
    name: str
    args: dict = field(default_factory=dict)


TASKS: dict[str, Callable[..., TaskGenerator]] = {}


def register_task(name: str):
    def wrap(cls):
        TASKS[name] = cls
        return cls
    return wrap


def build_task(spec: TaskSpec) -> TaskGenerator:
    if spec.name not in TASKS:
        raise UserError(f"unknown task {spec.name!r}; registered tasks: {sorted(TASKS)}")
    try:
        return TASKS[spec.name](**spec.args)
    except TypeError as e:
        raise UserError(f"bad args for task {spec.name!r}: {e}") from None


def prompt_text(tokenizer, sample: Sample, chat_template: bool = True) -> str:
    """The exact text the model is given: the chat template around the input (unless the sample or
    `chat_template` turns it off; the sample's own setting wins), then the answer prefix."""
    if sample.chat_template is not None:
        chat_template = sample.chat_template
    turns = [{"role": role, "content": content} for role, content in sample.history]
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([*turns, {"role": "user", "content": sample.input}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + sample.input + "\n"
    return text + sample.answer_prefix


def prompt_ids(tokenizer, sample: Sample, chat_template: bool = True) -> list[int]:
    return tokenizer(prompt_text(tokenizer, sample, chat_template), add_special_tokens=False)["input_ids"]


def _fit_size(count: Callable[[int], int], target: int) -> int:
    """Largest size whose token count is <= target, or the closer of it and the next one."""
    lo, hi = 1, 2
    if count(lo) > target * (1 + LENGTH_TOLERANCE):
        raise UserError(f"target length {target} is too short for this task (minimum ~{count(lo)} tokens)")
    while count(hi) <= target:
        if hi > 64 and count(hi) <= count(lo):   # doubling adds nothing: the generator has run out of text
            raise UserError(f"target length {target} is too long for this task (it stops at ~{count(hi)} tokens)")
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
    return lo if target - count(lo) <= count(hi) - target else hi


def generated_sample_id(task_name: str, target_length: int, index: int, seed: int, form_set: str = "classic") -> str:
    """The id of a generated sample, known without generating it (classic ids are those of store v1)."""
    suffix = "" if form_set == "classic" else f"-{form_set}"
    return f"{task_name}-{target_length}-{index}-s{seed}{suffix}"


_GENERATED_ID = re.compile(r"(?P<task>.+)-(?P<length>\d+)-(?P<index>\d+)-s(?P<seed>\d+)(?:-(?P<forms>[A-Za-z_]\w*))?")


def parse_generated_sample_id(sample_id: str) -> tuple[str, int, int, int, str] | None:
    """(task, target length, index, seed, form set) of a `generated_sample_id`, or None for any
    other id (RULER files, a user's prompts)."""
    m = _GENERATED_ID.fullmatch(sample_id)
    if m is None:
        return None
    return m["task"], int(m["length"]), int(m["index"]), int(m["seed"]), m["forms"] or "classic"


def generate_sample(task_name: str, gen: TaskGenerator, tokenizer, target_length: int, index: int,
                    seed: int, chat_template: bool = True, form_set: str = "classic") -> Sample:
    """A deterministic sample of `gen` whose prompt is `target_length` tokens (within 5%), in the
    surface form that `form_set` gives its key (`classic`: the one form of store v1)."""
    key = f"{seed}|{task_name}|{target_length}|{index}"
    sample_id = generated_sample_id(task_name, target_length, index, seed, form_set)
    form = form_of(form_set, key)
    if getattr(gen, "haystack", None):   # natural text: its kind is the generator's, not the form's
        form = replace(form, filler=gen.haystack)
    chat = chat_template if form.chat is None else form.chat

    def make(size: int) -> Sample:
        text, outputs, prefix, *history = gen.render(key, size, form)
        return Sample(sample_id=sample_id, task=gen.task_type, input=text, outputs=tuple(outputs),
                      answer_prefix=prefix, target_length=target_length, metric=gen.metric,
                      max_new_tokens=gen.max_new_tokens, group=sample_id, form=form.name(chat),
                      chat_template=chat, history=tuple(history[0]) if history else ())

    cache: dict[int, int] = {}

    def count(size: int) -> int:
        if size not in cache:
            cache[size] = len(prompt_ids(tokenizer, make(size), chat_template))
        return cache[size]

    return make(_fit_size(count, target_length))


def task_rng(key: str) -> random.Random:
    """The generator's own choices (needles, keys, depths); the filler has its own stream."""
    return random.Random(f"{key}|task")
