"""Aggregation tasks (RULER `cwe` and `fwe`): find the most common words of a long list, or the
most frequent coded words of a Zipf-distributed text. Imports nothing from `controller`."""
from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass

from .base import register_task, task_rng
from .words import COMMON_WORDS


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

    def render(self, key: str, size: int):
        rng = task_rng(key)
        vocab = list(COMMON_WORDS)
        rng.shuffle(vocab)
        common = vocab[:self.num_common]
        rare_pool = vocab[self.num_common:]
        rare = [rare_pool[i % len(rare_pool)] + ("" if i < len(rare_pool) else str(i // len(rare_pool)))
                for i in range(size)]
        words = common * self.common_freq + rare * self.rare_freq
        random.Random(f"{key}|order|{size}").shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.")
        question = f"Question: What are the {self.num_common} most common words in the above list?"
        prefix = f"Answer: The top {self.num_common} words that appear most often in the list are:"
        return f"{intro}\n{listing}\n{question}", tuple(common), prefix


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

    def render(self, key: str, size: int):
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
        text = " ".join(" ".join(stream[i:i + 8]) + " ...." for i in range(0, len(stream), 8))
        intro = ("Read the following coded text and track the frequency of each coded word. Find the "
                 f"{self.top} most frequently appeared coded words.")
        question = (f"Question: Do not provide any explanation. Please ignore the dots '....'. What are the "
                    f"{self.top} most frequently appeared words in the above coded text?")
        prefix = (f"Answer: According to the coded text above, the {self.top} most frequently appeared "
                  "words are:")
        return f"{intro} {text}\n{question}", top, prefix
