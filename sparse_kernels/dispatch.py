"""Break-even dispatch: from which prompt length a sparsity level's sparse prefill beats dense, for
one model on one card, as the benchmark measured it.

Owns `BreakEven` (per measured level, the shortest length from which the hooked prefill at that
level, decision included, ran faster than dense SDPA at that length and at every longer measured
length) and `recorded_break_even`, which finds the table the benchmark wrote for a (model, card)
under `sparse_kernels/bench/*.json` (key `break_even`). Below its break-even a level is not worth
running: the hook runs dense there and says why. Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).parent / "bench"
# a level wins at a length when its time, decision included, is at most this share of dense's: 0.98
# over 1.25, because the host's speed drifts by up to a quarter within one process (16K, level 0.9:
# 33.1 to 41.1 ms within a minute; docs/results/h200_host_studies.json) and below 32K the sparse
# path is bound by the host. With 0.98 the three full H200 runs of 2026-11-29 disagreed at 16K
# (break-even 16K, 32K, 16K); with 0.78 all three give the same table.
WIN_MARGIN = 0.78


@dataclass(frozen=True)
class BreakEven:
    """levels: ((level, tokens), ...) ascending by level; a level absent from it never won."""
    levels: tuple[tuple[float, int], ...]
    source: str
    # models with sliding-window layers: the shortest length from which a dense plan (those layers
    # over their window only, no probe, no decision) beat unhooked SDPA; None: never, or not measured
    window_from: int | None = None

    def runs_window(self, n_tokens: int) -> bool:
        """True when a request of `n_tokens` that runs dense is faster with the window path."""
        return self.window_from is not None and n_tokens >= self.window_from

    def tokens_for(self, level: float) -> int | None:
        """Break-even of `level`: that of the largest measured level at or below it (a sparser level
        is never slower, so this is conservative); None when no measured level at or below it won."""
        best = None
        for lv, tokens in self.levels:
            if lv <= level + 1e-9:
                best = tokens
        return best

    def allows(self, level: float, n_tokens: int) -> bool:
        """True when `level` is dense (0) or its measured break-even is at most `n_tokens`."""
        if level <= 0:
            return True
        tokens = self.tokens_for(level)
        return tokens is not None and n_tokens >= tokens

    def shortest(self) -> float:
        """The shortest length from which some level is worth running (inf when none is)."""
        return min((t for _, t in self.levels), default=math.inf)

    def why_dense(self, level: float, n_tokens: int) -> str:
        tokens = self.tokens_for(level)
        where = f"below {tokens} tokens" if tokens is not None else "at every measured length"
        return f"level {level:g} runs slower than dense {where} here ({n_tokens} tokens; {self.source}); ran dense"

    @classmethod
    def from_rows(cls, rows: list[dict], source: str, margin: float = WIN_MARGIN,
                  window_rows: list[dict] = ()) -> "BreakEven":
        """From end-to-end rows {N, level, ms_with_decision (or ms), ms_dense} of one model and card,
        and (models with sliding-window layers) rows {N, ms, ms_dense} of the dense window path. A
        level wins against the dense path the hook would run without it: the window path from
        `window_from` on, else unhooked SDPA (so a sparse level never buys less than the window
        path already gives)."""
        window = _wins_from([(int(r["N"]), r["ms"] <= margin * r["ms_dense"]) for r in window_rows])
        window_ms = {int(r["N"]): float(r["ms"]) for r in window_rows if window is not None and int(r["N"]) >= window}
        by_level: dict[float, list[tuple[int, bool]]] = {}
        for r in rows:
            ms, dense = r.get("ms_with_decision", r["ms"]), window_ms.get(int(r["N"]), r["ms_dense"])
            by_level.setdefault(float(r["level"]), []).append((int(r["N"]), ms <= margin * dense))
        levels = [(level, start) for level, points in sorted(by_level.items())
                  if (start := _wins_from(points)) is not None]
        return cls(tuple(levels), source, window)

    def to_json(self) -> dict:
        d = {"levels": {f"{lv:g}": t for lv, t in self.levels}, "source": self.source}
        return d if self.window_from is None else {**d, "window_from": self.window_from}

    @classmethod
    def from_json(cls, d: dict) -> "BreakEven":
        window = d.get("window_from")
        return cls(tuple(sorted((float(k), int(v)) for k, v in d["levels"].items())), str(d["source"]),
                   None if window is None else int(window))


def _wins_from(points: list[tuple[int, bool]]) -> int | None:
    """The shortest length of the run of wins down from the longest measured length (None: the
    longest did not win)."""
    start = None
    for n, won in sorted(points, reverse=True):
        if not won:
            break
        start = n
    return start


def _same_model(table: dict, model: str | dict) -> bool:
    fp = model if isinstance(model, dict) else {"id": model}
    if table.get("model_id") is not None and table.get("model_id") == fp.get("id"):
        return True
    return table.get("weights_id") is not None and table.get("weights_id") == fp.get("weights_id")


def recorded_bench(model: str | dict, device_name: str | None = None,
                   directory: Path = BENCH_DIR) -> tuple[Path, dict] | None:
    """(path, contents) of the newest benchmark file whose break-even table names this model (a
    fingerprint, matched by its id or its weights id, or a fingerprint id), on this card (None: any
    card); None when there is none."""
    found = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        table = d.get("break_even") if isinstance(d, dict) else None
        if isinstance(table, dict) and _same_model(table, model) and device_name in (None, d.get("device")):
            found.append((str(d.get("started", "")), path.name, path, d))
    if not found:
        return None
    *_, path, d = max(found, key=lambda f: f[:2])
    return path, d


def recorded_break_even(model: str | dict, device_name: str, directory: Path = BENCH_DIR) -> BreakEven | None:
    """The newest table the benchmark recorded for this model on this card, or None. `model`: a
    fingerprint (matched by its id or its weights id) or a fingerprint id."""
    found = recorded_bench(model, device_name, directory)
    if found is None:
        return None
    path, d = found
    return BreakEven.from_json({**d["break_even"], "source": f"measured on {device_name}, {path.name} ({d.get('started', '')})"})
