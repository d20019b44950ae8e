"""Aggregation tasks (RULER `cwe` and `fwe`): find the most common words of a long list, or the
most frequent coded words of a Zipf-distributed text. The form's filler picks the list's layout
(numbered, comma-separated, one per line, JSON) and its phrasing the wording. Imports nothing from
`controller`."""
from __future__ import annotations

import json
import random
import string
from collections import Counter
from dataclasses import dataclass

from .base import register_task, task_rng
from .forms import CLASSIC, Form
from .words import COMMON_WORDS

CWE_PHRASES = (
    ("Below is a numbered list of words. In these words, some appear more often than others. "
     "Memorize the ones that appear most often.",
     "Question: What are the {n} most common words in the above list?",
     "Answer: The top {n} words that appear most often in the list are:"),
    ("Here is a long list of words, some of them repeated many times.",
     "Which {n} words occur most often in that list?", "The {n} most frequent words are:"),
    ("Count the words in the list that follows.",
     "Question: Name the {n} words that are repeated the most, without explanation.",
     "Answer: The {n} most repeated words:"),
)
FWE_PHRASES = (
    ("Read the following coded text and track the frequency of each coded word. Find the "
     "{n} most frequently appeared coded words.",
     "Question: Do not provide any explanation. Please ignore the dots '....'. What are the "
     "{n} most frequently appeared words in the above coded text?",
     "Answer: According to the coded text above, the {n} most frequently appeared words are:"),
    ("The text below is made of invented words. Some invented words are used far more than others.",
     "Which {n} invented words are used most often above? Give only the words.",
     "The {n} most used invented words are:"),
    ("Scan this stream of coded tokens and keep a tally.",
     "Question: What are the {n} most frequent coded tokens in the stream?",
     "Answer: The {n} most frequent tokens are:"),
)


def cwe_listing(layout: str, words: list[str]) -> str:
    if layout == "prose":
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    if layout == "repeat":
        return ", ".join(words)
    if layout == "code":
        return "\n".join(f"- {w}" for w in words)
    return json.dumps(words)


def fwe_text(layout: str, stream: list[str]) -> str:
    groups = [stream[i:i + 8] for i in range(0, len(stream), 8)]
    if layout == "prose":
        return " ".join(" ".join(g) + " ...." for g in groups)
    if layout == "repeat":
        return "\n".join(" ".join(g) for g in groups)
    if layout == "code":
        return " | ".join(" ".join(g) for g in groups)
    return "\n".join(json.dumps(g) for g in groups)


@register_task("cwe")
@dataclass
class CommonWords:
    """`num_common` words appear `common_freq` times each; every other word `rare_freq` times."""
    num_common: int = 10
    common_freq: int = 6
    rare_freq: int = 2
    task_type: str = "cwe"
    metric: str = "all"
    max_new_tokens: int = 96

    def render(self, key: str, size: int, form: Form = CLASSIC):
        rng = task_rng(key)
        vocab = list(COMMON_WORDS)
        rng.shuffle(vocab)
        common = vocab[:self.num_common]
        rare_pool = vocab[self.num_common:]
        rare = [rare_pool[i % len(rare_pool)] + ("" if i < len(rare_pool) else str(i // len(rare_pool)))
                for i in range(size)]
        words = common * self.common_freq + rare * self.rare_freq
        random.Random(f"{key}|order|{size}").shuffle(words)
        intro, question, prefix = (p.format(n=self.num_common) for p in CWE_PHRASES[form.phrasing])
        return f"{intro}\n{cwe_listing(form.filler, words)}\n{question}", tuple(common), prefix


@register_task("fwe")
@dataclass
class FrequentWords:
    """Coded words drawn from a Zipf(alpha) law over `vocab_size` words; ask the top 3."""
    alpha: float = 2.0
    vocab_size: int = 200
    top: int = 3
    task_type: str = "fwe"
    metric: str = "all"
    max_new_tokens: int = 48

    def render(self, key: str, size: int, form: Form = CLASSIC):
        rng = task_rng(key)
        vocab: list[str] = []
        while len(vocab) < self.vocab_size:
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
            if w not in vocab:
                vocab.append(w)
        weights = [1.0 / (r + 1) ** self.alpha for r in range(self.vocab_size)]
        stream = random.Random(f"{key}|stream").choices(vocab, weights=weights, k=size * 8)
        counts = Counter(stream).most_common()
        top = tuple(w for w, _ in counts[:self.top])
        intro, question, prefix = (p.format(n=self.top) for p in FWE_PHRASES[form.phrasing])
        return f"{intro} {fwe_text(form.filler, stream)}\n{question}", top, prefix
