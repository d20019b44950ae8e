"""Wall-clock time saved by a policy's decisions, from a benchmark's measured per-length, per-level table.

Owns `TimeTable` (read from `sparse_kernels/bench/<card>*.json`: the `end_to_end` rows `dense`
(the best dense path) and `forced` (each level, with the decision's cost when measured)) and
`find_timings` (the bench file recorded for a model's weights). `TimeTable.ms(level, n)` is the
prefill time of one request of n tokens decided at `level`: log-log interpolation over the
measured lengths, the end segments extended beyond them; a level the benchmark did not measure
takes the measured level just below it (a lower level never runs faster there), level 0 is dense.
A decided level the bench file's break-even table does not allow at that length runs dense, as the
hook runs it (`sparse_kernels.dispatch.BreakEven.allows`, the hook's own rule). time_saved = 1 - sum of ms at the served levels / sum of dense ms, over
requests: like compute saved, long requests weigh by their cost, but the cost is measured time,
overheads included.
Imports numpy and `sparse_kernels.dispatch` (safe to ship: no training code).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse_kernels.dispatch import BENCH_DIR, BreakEven, recorded_bench


@dataclass(frozen=True)
class TimeTable:
    device: str
    source: str
    lengths: np.ndarray                 # measured N, increasing
    dense_ms: np.ndarray                # [len(lengths)]
    levels: tuple[float, ...]           # measured levels, increasing
    level_ms: np.ndarray                # [len(levels), len(lengths)], NaN where not measured
    break_even: BreakEven | None = None   # the bench file's table: which level runs from which length

    @classmethod
    def from_rows(cls, rows: list[dict], device: str, source: str, worth_from: dict | None = None) -> "TimeTable":
        dense = {int(r["N"]): float(r["ms"]) for r in rows if r.get("mode") == "dense"}
        if len(dense) < 1:
            raise ValueError(f"{source}: no `dense` end_to_end rows to time against")
        lengths = np.array(sorted(dense))
        forced = [r for r in rows if r.get("mode") == "forced" and int(r["N"]) in dense]
        levels = tuple(sorted({float(r["level"]) for r in forced}))
        table = np.full((len(levels), len(lengths)), np.nan)
        for r in forced:   # the decision's cost counts when it was measured (the controller pays it)
            table[levels.index(float(r["level"])), int(np.searchsorted(lengths, int(r["N"])))] = \
                float(r.get("ms_with_decision") or r["ms"])
        table_be = None if worth_from is None else BreakEven.from_json({"levels": worth_from, "source": source})
        return cls(device, source, lengths, np.array([dense[n] for n in lengths]), levels, table, table_be)

    @classmethod
    def load(cls, path: str | Path) -> "TimeTable":
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        worth = (doc.get("break_even") or {}).get("levels")
        root, where = BENCH_DIR.resolve().parents[1], Path(path).resolve()
        shown = str(where.relative_to(root)) if where.is_relative_to(root) else str(path)   # the repo's own: relative
        return cls.from_rows(doc.get("end_to_end", []), str(doc.get("device", "unknown card")), shown, worth)

    def served(self, levels, n_tokens) -> np.ndarray:
        """The levels the hook runs: a decided level below its break-even length runs dense (the
        hook's veto of levels slower than dense there; no table: as decided)."""
        levels, n = np.asarray(levels, dtype=float).copy(), np.asarray(n_tokens)
        if self.break_even is not None:
            levels[[not self.break_even.allows(lv, int(t)) for lv, t in zip(levels, n)]] = 0.0
        return levels

    def _interp(self, ms: np.ndarray, n: np.ndarray) -> np.ndarray:
        ok = np.isfinite(ms)
        x, y = np.log(self.lengths[ok].astype(float)), np.log(ms[ok])
        if len(x) == 1:
            return np.full(len(n), float(np.exp(y[0]))) * (n / self.lengths[ok][0]) ** 2
        ln = np.log(np.maximum(n, 1).astype(float))
        out = np.interp(ln, x, y)
        lo, hi = ln < x[0], ln > x[-1]
        out[lo] = y[0] + (ln[lo] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
        out[hi] = y[-1] + (ln[hi] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
        return np.exp(out)

    def dense(self, n_tokens) -> np.ndarray:
        return self._interp(self.dense_ms, np.asarray(n_tokens))

    def ms(self, levels, n_tokens) -> np.ndarray:
        """Prefill ms of each request at its decided level, as the hook serves it (`served`)."""
        levels, n = self.served(levels, n_tokens), np.asarray(n_tokens)
        out = self.dense(n)
        for i, level in enumerate(self.levels):
            below_next = levels < (self.levels[i + 1] if i + 1 < len(self.levels) else np.inf)
            rows = (levels >= level) & below_next & (levels > 0)
            if rows.any() and np.isfinite(self.level_ms[i]).any():
                out[rows] = self._interp(self.level_ms[i], n[rows])
        return out

    def saved(self, levels, n_tokens) -> float:
        """1 - time at these decisions / dense time, summed over the requests."""
        n = np.asarray(n_tokens)
        if len(n) == 0:
            return float("nan")
        return float(1.0 - self.ms(levels, n).sum() / self.dense(n).sum())


def find_timings(model_fp: dict, bench_dir: Path = BENCH_DIR) -> Path | None:
    """The newest bench file whose break-even table names this model's weights (a RoPE-stretched
    variant runs the same kernels at the same lengths, so it shares its base model's timings)."""
    found = recorded_bench(model_fp, None, bench_dir)
    return found[0] if found is not None else None
