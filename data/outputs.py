"""Where a command may write: our own artifacts recognised by their files, everything else refused.

The rule every command follows, checked before anything is written:
- an output folder is new, empty, or an artifact of the kind the command writes (a checkpoint, a
  report, a run folder, a label store), holding nothing but the files this project writes there;
- a finished artifact (a checkpoint, a report) is replaced only with `--overwrite`, and only when
  it is one of ours: a user's folder is never deleted or written into, with or without it;
- a label store is resumed, never replaced: an existing non-empty folder must be a store;
- no output is, contains or lies inside an input (checkpoint, prompts, a label store) or another
  output, and none is the current folder or one above it.
Owns `artifact_kind`, `check_disjoint`, `check_replaceable`, `check_report_target`,
`check_store_target`, `check_run_folder` and
`fresh_sibling` (a temporary folder name beside a target that no user folder can hold). Imports
only `data.errors`; never `controller`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError, check_output_folder

CHECKPOINT_FILES = ("controller.json", "model.safetensors")   # what makes a folder a checkpoint
CHECKPOINT_EXTRAS = ("calibration.md",)                        # what else a checkpoint of ours may hold
REPORT_FILES = ("report.md", "metrics.json")
REPORT_EXTRA_SUFFIXES = (".png",)
REPORT_STORE = "labels"                                        # eval.py labels RULER files / prompts here
RUN_ENTRIES = ("config.resolved.yaml", "logs", "wandb", "checkpoint", "report")
LOG_FILES = ("metrics.csv", "hparams.yaml")
STORE_FILE, LOCK_FILE = "meta.json", "LOCK"
TEMP_MARK = ".sparsity-controller-temp"                        # inside every temporary folder we make


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def is_store(path: Path) -> bool:
    return (Path(path) / STORE_FILE).is_file()


def _foreign(path: Path, kind: str) -> list[str]:
    """Entries of `path` that this project would not have written into an artifact of `kind`."""
    names = [n for n in _entries(path) if n != TEMP_MARK]   # the mark of a write killed just after its rename
    if kind == "checkpoint":
        return [n for n in names if n not in CHECKPOINT_FILES + CHECKPOINT_EXTRAS]
    if kind == "report":
        return [n for n in names if n not in REPORT_FILES and not n.endswith(REPORT_EXTRA_SUFFIXES)
                and not (n == REPORT_STORE and is_store(path / n))]
    if kind == "logs":
        return [n for n in names if n not in LOG_FILES]
    raise ValueError(kind)


def artifact_kind(path: str | Path) -> str | None:
    """'checkpoint', 'report', 'store' or None: which of our artifacts a folder is, by its files."""
    p = Path(path)
    if all((p / f).is_file() for f in CHECKPOINT_FILES):
        return "checkpoint"
    if all((p / f).is_file() for f in REPORT_FILES):
        return "report"
    return "store" if is_store(p) else None


def _is_cwd_or_above(p: Path) -> bool:
    here = Path.cwd().resolve()
    return p == here or p in here.parents


def check_not_here(path: str | Path, what: str) -> None:
    """Refuse `.`, `..`, `/` and any folder that holds the current one."""
    p = Path(path).resolve()
    if _is_cwd_or_above(p) or p == Path(p.anchor):
        raise UserError(f"{what} is the current folder or one above it; give a new folder for the output")


def relation(a: str | Path, b: str | Path) -> str | None:
    """'is', 'lies inside' or 'contains' when the paths overlap, else None."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    if ra == rb:
        return "is"
    if rb in ra.parents:
        return "lies inside"
    return "contains" if ra in rb.parents else None


def check_disjoint(path: str | Path, what: str, others: dict[str, str | Path | None]) -> None:
    """UserError when `path` is, contains or lies inside any of `others` ({description: path})."""
    for name, other in others.items():
        if other is None:
            continue
        how = relation(path, other)
        if how is not None:
            raise UserError(f"{what} {how} {name} {other}; choose a folder outside it (nothing was written)")


def check_replaceable(path: str | Path, what: str, kind: str, overwrite: bool) -> bool:
    """May a command write artifact `kind` ('checkpoint' or 'report') at `path`? True when it exists
    as one of ours and will be replaced (with `overwrite`); False when it is new or empty.
    Otherwise UserError, naming what is in the way."""
    p = Path(path)
    check_not_here(p, what)
    check_output_folder(p, what)
    if not p.exists() or not _entries(p):
        return False
    if artifact_kind(p) != kind:
        raise UserError(f"{what} exists and is not a {kind} written by this project; choose a new folder "
                        f"(--overwrite replaces only a {kind} of ours)")
    foreign = _foreign(p, kind)
    if foreign:
        raise UserError(f"{what} is a {kind} but also holds {foreign[0]!r}, which this project did not write; "
                        "move it out or choose a new folder")
    if not overwrite:
        raise UserError(f"{what} exists; pass --overwrite to replace that {kind}, or choose a new folder")
    return True


def check_report_target(path: str | Path, what: str, overwrite: bool) -> None:
    """A report folder: new, empty, an interrupted one of ours (only its label store: resumed), or a
    finished report of ours (replaced only with `overwrite`)."""
    p = Path(path)
    check_not_here(p, what)
    check_output_folder(p, what)
    if _entries(p) == [REPORT_STORE] and is_store(p / REPORT_STORE):
        return
    check_replaceable(p, what, "report", overwrite)


def check_store_target(path: str | Path, what: str) -> None:
    """A label store is written into a new or empty folder, or resumed in an existing store."""
    p = Path(path)
    check_not_here(p, what)
    check_output_folder(p, what)
    if p.exists() and not set(_entries(p)) <= {LOCK_FILE} and not is_store(p):   # a LOCK alone: a store being begun
        raise UserError(f"{what} exists and is not a label store (no {STORE_FILE}); choose a new folder for the labels")


def check_run_folder(path: str | Path, what: str, label_store: str | Path | None) -> None:
    """train.py's `out`: new, empty, or a run folder of ours (config, logs, checkpoint, report and
    perhaps the label store it labeled into); its logs folder, if any, one of ours."""
    p = Path(path)
    check_not_here(p, what)
    check_output_folder(p, what)
    mine = set(RUN_ENTRIES)
    if label_store is not None and relation(label_store, p) == "lies inside":
        mine.add(Path(label_store).resolve().relative_to(p.resolve()).parts[0])
    foreign = [n for n in _entries(p) if n not in mine]
    if not foreign and (p / "logs").is_dir():
        foreign = [f"logs/{n}" for n in _foreign(p / "logs", "logs")]
    if foreign:
        raise UserError(f"{what} holds {foreign[0]!r}, which this project did not write; choose a new folder for the run")


def fresh_sibling(target: Path, tag: str) -> Path:
    """A new, uniquely named, marked folder beside `target` (never a name a user's folder has)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    (tmp / TEMP_MARK).write_text(f"{os.getpid()}\n")
    return tmp


def _writer_alive(mark: Path) -> bool:
    try:
        pid = int(mark.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid != os.getpid()


def remove_stale_siblings(target: Path, tag: str) -> None:
    """Delete the marked temporary folders that a killed run left beside `target` (only those, and
    not one whose writer is still running)."""
    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f".{target.name}.{tag}-*"):
        if p.is_dir() and (p / TEMP_MARK).is_file() and not _writer_alive(p / TEMP_MARK):
            shutil.rmtree(p, ignore_errors=True)


def unmark(folder: Path) -> None:
    (folder / TEMP_MARK).unlink(missing_ok=True)
