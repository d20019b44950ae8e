"""Requests on natural text: the committed snapshot of Python standard-library sources
(`corpus/stdlib.json.gz`, see `corpus/build.py`), real code, comments and English docstrings that
nobody here wrote. Five tasks, each seeded by its key and sized in model tokens like the others:

- `nat_constant` (retrieval, several documents): files one after another; one excerpt of a file
  holds a module-level constant, asked for by file and name.
- `nat_docqa` (question answering on prose): an API reference of docstrings; which entry does a
  quoted description belong to.
- `nat_chat` (chat history): the files of `nat_constant` arrive in earlier user turns, each
  acknowledged by the assistant; the last turn asks.
- `nat_aggregate` (aggregation): every file shown; list the names of all of them.
- `nat_summary` (summary, several documents): one module shown without its module docstring among
  other files; say in one sentence what it is for. Scored by string match `all` against the content
  words of the docstring's first sentence that its file name does not give away (a recall of the
  words its authors chose, as ROUGE-1 recall is).

The task type is not one of `TASK_TYPES`, so the controller sees these as `unknown` tasks, as it
sees a user's traffic. Imports nothing from `controller`.
"""
from __future__ import annotations

import ast
import functools
import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .base import register_task, task_rng
from .forms import CLASSIC, Form

NATURAL_TASKS = ("nat_constant", "nat_chat", "nat_docqa", "nat_aggregate", "nat_summary")
CORPUS = Path(__file__).with_name("corpus") / "stdlib.json.gz"
HEADERS = ("### File: {name}", "----- {name} -----", "<file {name}>")
_CONSTANT_NAME = re.compile(r"[A-Z][A-Z0-9_]{2,}")
_CONTENT_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]{3,}")
_STOP_WORDS = frozenset("this that with from these those which what when where their there about into such than "
                        "then also only some more most other over under very here each them they been have "
                        "module modules file files python part used uses using provides support http https www".split())


@functools.lru_cache(maxsize=1)
def corpus_files() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(file name, its lines) for every file of the snapshot, in the snapshot's order."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        files = json.load(f)["files"]
    return tuple((f["name"], tuple(f["text"].splitlines())) for f in files)


def _module_constants(lines: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """(NAME, value as text, line index) of short int or one-line str constants at module level."""
    found = []
    for node in ast.parse("\n".join(lines)).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and _CONSTANT_NAME.fullmatch(node.targets[0].id) and isinstance(node.value, ast.Constant)):
            value = node.value.value
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                continue
            text = str(value)
            if 2 <= len(text) <= 24 and text.isprintable() and text.strip() == text and sum(map(str.isalnum, text)) >= 2 \
                    and text.lower() != node.targets[0].id.lower():
                found.append((node.targets[0].id, text, node.lineno - 1))
    return found


@functools.lru_cache(maxsize=1)
def corpus_constants() -> tuple[tuple[int, str, str, int], ...]:
    """(file index, NAME, value, line) for constants whose NAME is assigned in exactly one file."""
    per_file = [_module_constants(lines) for _, lines in corpus_files()]
    counts: dict[str, int] = {}
    for consts in per_file:
        for name in {c[0] for c in consts}:
            counts[name] = counts.get(name, 0) + 1
    return tuple((i, name, value, line) for i, consts in enumerate(per_file) for name, value, line in consts
                 if counts[name] == 1 and sum(c[0] == name for c in consts) == 1)


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    return text.split(". ")[0].rstrip(".") + "."


def _documented(tree: ast.Module):
    """(qualified name within the module, node) of public functions, classes and their methods."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                yield from ((f"{node.name}.{m.name}", m) for m in node.body
                            if isinstance(m, ast.FunctionDef) and not m.name.startswith("_"))


@functools.lru_cache(maxsize=1)
def corpus_entries() -> tuple[tuple[str, str, str], ...]:
    """(qualified name, reference entry text, first sentence) of documented functions, classes and
    methods whose first sentence is 40-200 characters and unique in the corpus."""
    entries = []
    for name, lines in corpus_files():
        module = name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for qualname, node in _documented(ast.parse("\n".join(lines))):
            doc = ast.get_docstring(node)
            if doc:
                body = " ".join(doc.strip().split("\n\n")[0].split())[:600]
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                entries.append((f"{module}.{qualname}", f"{module}.{qualname} ({kind}): {body}", _first_sentence(doc)))
    firsts: dict[str, int] = {}
    for _, _, s in entries:
        firsts[s] = firsts.get(s, 0) + 1
    return tuple(e for e in entries if 40 <= len(e[2]) <= 200 and firsts[e[2]] == 1)


def _file_lines(index: int, header: str) -> list[str]:
    name, lines = corpus_files()[index]
    return ["", header.format(name=name), *lines]


def _documents(rng: random.Random, size: int, header: str, skip: int = -1) -> list[tuple[int, list[str]]]:
    """(file index, lines) of whole files in a seeded order (never `skip`) until `size` lines, the last one cut."""
    order = [i for i in range(len(corpus_files())) if i != skip]
    rng.shuffle(order)
    docs, total = [], 0
    for i in order:
        doc = _file_lines(i, header)[:size - total]
        docs.append((i, doc))
        total += len(doc)
        if total >= size:
            break
    return docs


def _excerpt(file_index: int, line: int, header: str, rng: random.Random) -> list[str]:
    name, lines = corpus_files()[file_index]
    start = max(0, line - rng.randint(3, 12))
    return ["", header.format(name=name) + " (excerpt)", *lines[start:line + rng.randint(3, 12)]]


def _among_files(key: str, size: int, header: str, placed: list[str], skip: int, rng: random.Random) -> list[list[str]]:
    """Whole files in the key's seeded order (never `skip`) around `placed`, which goes in at a seeded
    depth: `size` lines in all (at least one line of other files)."""
    docs = [doc for _, doc in _documents(random.Random(f"{key}|docs"), max(1, size - len(placed)), header, skip=skip)]
    docs.insert(round(rng.random() * len(docs)), placed)
    return docs


def _constant_documents(key: str, size: int, form: Form):
    """The documents of a constant request (the excerpt at a seeded depth, between files) and its question."""
    rng = task_rng(key)
    file_index, const, value, line = rng.choice(corpus_constants())
    header = HEADERS[form.phrasing]
    docs = _among_files(key, size, header, _excerpt(file_index, line, header, rng), file_index, rng)
    name = corpus_files()[file_index][0]
    question = (f"In the file {name}, what value is assigned to {const}?",
                f"What is {const} set to in {name}?", f"{name}: value of {const}?")[form.phrasing]
    return docs, question, value, f"Answer: {const} ="


@register_task("nat_constant")
@dataclass
class NaturalConstant:
    """`size` lines of standard-library files; one excerpt holds the constant asked for."""
    haystack: str = "code"   # the form name's first part: natural text of this kind
    task_type: str = "nat_constant"
    metric: str = "all"
    max_new_tokens: int = 24

    def render(self, key: str, size: int, form: Form = CLASSIC):
        docs, question, value, prefix = _constant_documents(key, size, form)
        body = "\n".join(line for doc in docs for line in doc)
        text = f"Below are Python source files.\n{body}\n\nAnswer from the files above. {question}"
        return text, (value,), prefix


@register_task("nat_chat")
@dataclass
class NaturalChat(NaturalConstant):
    """`nat_constant` as a conversation: each file is an earlier user turn the assistant acknowledged."""
    task_type: str = "nat_chat"

    def render(self, key: str, size: int, form: Form = CLASSIC):
        docs, question, value, prefix = _constant_documents(key, size, form)
        history = []
        for doc in docs:
            history += [("user", "Please read this file." + "\n".join(doc)), ("assistant", "Done, I have read it.")]
        return f"Thanks. {question}", (value,), prefix, tuple(history)


@register_task("nat_docqa")
@dataclass
class NaturalDocQA:
    """`size` reference entries (docstrings of the corpus); one is asked for by its description."""
    haystack: str = "prose"   # the form name's first part: natural text of this kind
    task_type: str = "nat_docqa"
    metric: str = "all"
    max_new_tokens: int = 24

    def render(self, key: str, size: int, form: Form = CLASSIC):
        rng = task_rng(key)
        picked = random.Random(f"{key}|entries").sample(corpus_entries(), min(size, len(corpus_entries())))
        asked = picked[rng.randrange(len(picked))]
        reference = "\n\n".join(e[1] for e in picked)
        question = (f'Which entry above is described as: "{asked[2]}"?',
                    f'Name the function or class whose documentation says: "{asked[2]}"',
                    f'Entry described as "{asked[2]}": name?')[form.phrasing]
        short = asked[0].rsplit(".", 1)[-1]   # scored on the last part: "weekday" for datetime.date.weekday
        return (f"API reference of the Python standard library.\n\n{reference}\n\n{question}", (short,),
                "Answer: The entry is")


@register_task("nat_aggregate")
@dataclass
class NaturalAggregate:
    """`size` lines of whole files; the answer lists every file's name (string match `all`)."""
    haystack: str = "code"   # the form name's first part: natural text of this kind
    task_type: str = "nat_aggregate"
    metric: str = "all"
    max_new_tokens: int = 48

    def render(self, key: str, size: int, form: Form = CLASSIC):
        header = HEADERS[form.phrasing]
        docs = _documents(random.Random(f"{key}|docs"), size, header)
        names = tuple(corpus_files()[i][0] for i, _ in docs)
        body = "\n".join(line for _, doc in docs for line in doc)
        question = ("List the names of all the files shown above.", "Which files were shown? Name every one.",
                    "All file names above?")[form.phrasing]
        return f"Below are Python source files.\n{body}\n\n{question}", names, "Answer: The files are"


def _reference_words(sentence: str, name: str, most: int = 6) -> tuple[str, ...]:
    """Up to `most` distinct content words of `sentence` (4+ letters, no stop word, none that the file
    name `name` holds), lower-cased, in order."""
    given = set(re.findall(r"[a-z0-9]+", name.lower()))
    words: list[str] = []
    for w in (m.lower() for m in _CONTENT_WORD.findall(sentence)):
        if w not in _STOP_WORDS and w not in given and w not in words:
            words.append(w)
    return tuple(words[:most])


@functools.lru_cache(maxsize=1)
def corpus_summaries() -> tuple[tuple[int, tuple[str, ...], tuple[str, ...]], ...]:
    """(file index, the file's lines without its module docstring, reference words) of every file whose
    docstring's first sentence is 25-200 characters and leaves at least two reference words."""
    out = []
    for index, (name, lines) in enumerate(corpus_files()):
        tree = ast.parse("\n".join(lines))
        doc = ast.get_docstring(tree)
        if not doc:
            continue
        first = _first_sentence(doc)
        words = _reference_words(first, name)
        if 25 <= len(first) <= 200 and len(words) >= 2:
            node = tree.body[0]
            out.append((index, lines[:node.lineno - 1] + lines[node.end_lineno:], words))
    return tuple(out)


@register_task("nat_summary")
@dataclass
class NaturalSummary:
    """`size` lines of files; one module, shown without its docstring, is to be summed up in a sentence."""
    haystack: str = "code"   # the form name's first part: natural text of this kind
    task_type: str = "nat_summary"
    metric: str = "all"
    max_new_tokens: int = 40
    answer_in_prompt = False   # scored on the docstring the prompt leaves out (not a config field)

    def render(self, key: str, size: int, form: Form = CLASSIC):
        rng = task_rng(key)
        index, lines, words = rng.choice(corpus_summaries())
        header, name = HEADERS[form.phrasing], corpus_files()[index][0]
        target = ["", header.format(name=name), *lines][:max(size, 12)]
        docs = _among_files(key, size, header, target, index, rng)
        body = "\n".join(line for doc in docs for line in doc)
        question = (f"In one sentence, what is the file {name} for?", f"Summarize the purpose of {name} in one sentence.",
                    f"{name}: its purpose, in one sentence?")[form.phrasing]
        return f"Below are Python source files.\n{body}\n\n{question}", words, f"Answer: {name} is"
