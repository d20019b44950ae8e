"""The label store: raw per-(sample, level) measurements in parquet shards + a metadata record.

Layout of a store directory:
  meta.json                 identity (model fingerprint, sparse settings, levels, data config,
                            feature version), default criterion, versions, git sha, timestamps
  shards/part-rRRR-NNNNN.parquet  one file per batch of finished samples of rank RRR; a
                            sample's rows are all in one shard; written to a temporary name, renamed
  runs.jsonl                one line per labeling run (devices, card, samples, seconds, rates)
Owns `LabelStore` (create / resume with identity check / write shards / read), `apply_criterion`
(raw columns -> `safe`), `sample_labels` (monotone closure -> largest safe level per sample) and
`safe_fraction_table`. Imports nothing from `controller`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .criteria import apply_criterion, criterion_dict, describe_criterion, missing_outputs  # noqa: F401 (re-exported)
from .errors import UserError

STORE_VERSION = 1
META_FILE = "meta.json"
SHARD_DIR = "shards"
RUNS_FILE = "runs.jsonl"
# A swap of every shard (backfill) in steps that a rerun finishes after a kill at any point:
# build BUILD_DIR -> rename it to NEW_DIR (the commit point) -> shards to OLD_DIR -> NEW_DIR to shards
# -> meta.json from shards/SWAP_META -> delete OLD_DIR. `finish_swap` reads which step was reached.
BUILD_DIR, NEW_DIR, OLD_DIR, SWAP_META = "shards.backfill.tmp", "shards.new", "shards.old", "meta.pending.json"


@contextlib.contextmanager
def atomic_target(path: str | Path, suffix: str = ".tmp"):
    """THE atomic write: yields a temporary path beside `path` to write; when the block succeeds it is
    renamed into place, when it fails it is removed (a crash mid-write never leaves a half file)."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    with atomic_target(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _identity_changes(old: dict, new: dict) -> list[str]:
    """Fields of a store identity that differ; the model is the same when its fingerprint names
    the same weights (`same_weights`: a store written before weight ids resumes unchanged)."""
    from .models import same_weights
    rest = lambda d: {k: v for k, v in d.items() if k != "model"}  # noqa: E731
    model_same = same_weights(old.get("model") or {}, new.get("model") or {})
    return _diff(rest(old), rest(new)) + ([] if model_same else ["model"])


class LabelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def meta_path(self) -> Path:
        return self.root / META_FILE

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARD_DIR

    def meta(self) -> dict:
        if not self.meta_path.is_file():
            raise UserError(f"{self.root} is not a label store (no {META_FILE}); run labeling first")
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{self.meta_path} is corrupt ({type(e).__name__}); restore it from version control "
                            "or relabel into a new folder") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("identity"), dict) or "criterion" not in meta:
            raise UserError(f"{self.meta_path} lacks the store's identity or criterion; restore it or relabel")
        ident = meta["identity"]
        bad = [k for k, ok in (("model", isinstance(ident.get("model"), dict) and isinstance(ident["model"].get("id"), str)),
                               ("sparse", isinstance(ident.get("sparse"), dict)),
                               ("levels", isinstance(ident.get("levels"), list))) if not ok]
        if bad:
            raise UserError(f"{self.meta_path} is corrupt (identity.{bad[0]} is malformed); restore it from version "
                            "control or relabel into a new folder")
        return meta

    @classmethod
    def open_for_writing(cls, root: str | Path, meta: dict, rank: int = 0) -> "LabelStore":
        """Create a store, or resume one whose identity equals meta['identity'] (else UserError).

        Every rank of a distributed run may call this; only rank 0 writes the metadata."""
        store = cls(root)
        if rank == 0:
            finish_swap(store.root)   # a backfill killed mid-swap: its writer is dead (we hold the lock)
        if store.meta_path.is_file():
            old = store.meta()
            identity = json.loads(json.dumps(meta["identity"], default=str))  # tuples -> lists
            changed = _identity_changes(old.get("identity", {}), identity)
            if changed:
                raise UserError(f"{store.root} holds labels made with other settings ({', '.join(changed[:4])}); "
                                "use another labeling.out or delete that folder")
        elif rank == 0:
            store.shard_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(store.meta_path, {"store_version": STORE_VERSION, **meta})
        store.shard_dir.mkdir(parents=True, exist_ok=True)
        for stale in store.shard_dir.glob(f"part-r{rank:03d}-*.tmp"):
            stale.unlink()
        return store

    def shards(self) -> list[Path]:
        if swap_pending(self.root):
            raise UserError(f"{self.root}: a backfill was interrupted while swapping in new shards; rerun "
                            f"`python -m data.backfill --store {self.root}` (or a labeling run) to finish it")
        return sorted(self.shard_dir.glob("part-*.parquet"))

    def done_ids(self) -> set[str]:
        done: set[str] = set()
        for f in self.shards():
            done.update(_read_shard(f, ["sample_id"]).column("sample_id").to_pylist())
        return done

    def write_shard(self, records: list[dict], rank: int = 0) -> Path:
        """Write one shard of `rank` atomically (a temporary name, then rename); returns its path."""
        own = sorted(self.shard_dir.glob(f"part-r{rank:03d}-*.parquet"))
        index = int(own[-1].stem.rsplit("-", 1)[1]) + 1 if own else 0
        path = self.shard_dir / f"part-r{rank:03d}-{index:05d}.parquet"
        with atomic_target(path) as tmp:
            pq.write_table(pa.Table.from_pylist(records), tmp, compression="zstd")
        return path

    def append_run(self, record: dict) -> None:
        """Append one line to runs.jsonl (how a labeling run went: devices, rates, card)."""
        with open(self.root / RUNS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True, default=str) + "\n")

    def runs(self) -> list[dict]:
        path = self.root / RUNS_FILE
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []

    def table(self) -> pd.DataFrame:
        shards = self.shards()
        if not shards:
            raise UserError(f"{self.root} has no labeled samples yet")
        df = pd.concat([_read_shard(f).to_pandas() for f in shards], ignore_index=True)
        dup = df.duplicated(["sample_id", "level"])
        if dup.any():
            raise UserError(f"{self.root}: {int(dup.sum())} duplicated (sample, level) rows, e.g. "
                            f"{df.loc[dup, 'sample_id'].iloc[0]}; the store was written by overlapping runs")
        return _with_forms(df, self.meta()).sort_values(["sample_id", "level"], kind="stable").reset_index(drop=True)


LOCK_FILE = "LOCK"


def swap_pending(root: str | Path) -> bool:
    """A backfill's shard swap was interrupted (or is running) in this store."""
    r = Path(root)
    return (r / NEW_DIR).exists() or (r / OLD_DIR).exists() or (r / SHARD_DIR / SWAP_META).exists()


def swap_in_shards(root: str | Path, build: Path, meta: dict) -> None:
    """Make the complete shards in `build` (a folder inside the store) the store's, with `meta`, in
    steps that `finish_swap` completes after a kill at any point. Refused, with nothing changed,
    when the store's shards are not the ones `build` replaces (a writer ignored the lock)."""
    r = Path(root)
    have = sorted(p.name for p in (r / SHARD_DIR).glob("part-*.parquet"))
    built = sorted(p.name for p in build.glob("part-*.parquet"))
    if have != built:
        extra = sorted(set(have) - set(built))
        shutil.rmtree(build)
        raise UserError(f"{r}: shards changed while the backfill ran ({(extra or have)[0]}); rerun it when no labeling runs")
    write_json_atomic(build / SWAP_META, meta)
    os.replace(build, r / NEW_DIR)   # the commit point: from here a rerun finishes the swap
    finish_swap(r)


def finish_swap(root: str | Path) -> str | None:
    """Complete (or undo, before its commit point) an interrupted shard swap; the caller holds the
    store's lock. Returns 'finished', 'rolled back' or None when there was nothing to do."""
    r = Path(root)
    shards, new, old, build = r / SHARD_DIR, r / NEW_DIR, r / OLD_DIR, r / BUILD_DIR
    done = None
    if build.exists():   # killed while building: the store itself was not touched yet
        shutil.rmtree(build)
        done = "rolled back"
    if new.exists():
        if shards.exists():
            if old.exists():   # the shards of a swap before this one, half deleted
                shutil.rmtree(old)
            os.replace(shards, old)
        os.replace(new, shards)
    elif old.exists() and not shards.exists():   # nothing new to swap in (a store left by older code)
        os.replace(old, shards)
        return "rolled back"
    pending = shards / SWAP_META
    if pending.exists():
        write_text_atomic(r / META_FILE, pending.read_text(encoding="utf-8"))
        pending.unlink()
        done = "finished"
    if old.exists():
        shutil.rmtree(old)
        done = done or "finished"
    return done


def _read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One shard, or a UserError naming it (labeling refuses a store with a corrupt shard rather than
    guessing which rows it held)."""
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"shard {path} is corrupt ({type(e).__name__}); delete it and rerun labeling, which "
                        "relabels its samples") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """One writing run per store: `LOCK` holds the writer's pid, host and start time. A second run
    is refused with one line; a lock left by a dead process on this host is taken over. Only the
    launching process (local rank 0 of node 0) takes it; the other ranks of its run write under it."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK_FILE
        self.held = self.created = False

    def __enter__(self) -> "StoreLock":
        if int(os.environ.get("LOCAL_RANK", 0)) != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:
            return self
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"{self.path.parent}: could not take the store's lock {self.path}; retry")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, -1, socket.gethostname()   # unreadable: a crash while writing it
        if host == socket.gethostname() and (pid <= 0 or not _pid_alive(pid)):   # kill(-1, 0) means "any process"
            self.path.unlink(missing_ok=True)   # its writer is dead
            return
        raise UserError(f"label store {self.path.parent} is being written by pid {pid} on {host} since "
                        f"{holder.get('started', '?')}; wait for that run, or delete {self.path} if it is dead")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()   # a run that failed before writing leaves nothing behind


def _with_forms(df: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Rows written before surface forms were recorded: generated ones were classic, read ones have none."""
    from .tasks.forms import CLASSIC
    classic = CLASSIC.name(meta.get("identity", {}).get("data", {}).get("chat_template", True))
    form = df["form"] if "form" in df else pd.Series([None] * len(df), index=df.index, dtype=object)
    missing = form.isna()
    df["form"] = form.where(~missing, np.where(df["source"] == "generated", classic, ""))
    return df


def load_labels(root: str | Path, criterion=None) -> tuple[pd.DataFrame, dict]:
    """All rows of a store with `safe` derived by `criterion` (default: the store's own)."""
    store = LabelStore(root)
    meta = store.meta()
    crit = criterion if criterion is not None else meta["criterion"]
    return apply_criterion(store.table(), crit), meta


def sample_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Per sample: `label` = largest level such that every level <= it is safe, and
    `label_achieved` = the sparsity actually achieved at that level (short inputs saturate)."""
    rows = []
    for sid, g in df.sort_values("level").groupby("sample_id", sort=True):
        unsafe = g.loc[~g["safe"], "level"]
        first_unsafe = unsafe.min() if len(unsafe) else np.inf
        label = g.loc[g["level"] < first_unsafe, "level"].max()
        first = g.iloc[0]
        achieved = g.loc[g["level"] == label, "achieved_sparsity"].iloc[0] if "achieved_sparsity" in g else np.nan
        rows.append({"sample_id": sid, "task": first["task"], "target_length": first["target_length"],
                     "n_tokens": first["n_tokens"], "label": float(label), "label_achieved": float(achieved),
                     "form": first.get("form", "")})
    return pd.DataFrame(rows)


def safe_fraction_table(df: pd.DataFrame) -> pd.DataFrame:
    """Safe fraction per level (rows) and length bucket (columns), plus the sample count."""
    table = df.pivot_table(index="level", columns="target_length", values="safe", aggfunc="mean")
    table.columns = [f"len {c}" for c in table.columns]
    return table
