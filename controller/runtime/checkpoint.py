"""Controller checkpoints: weights in safetensors + one JSON record, nothing executable.

Owns `export_checkpoint` (writes `model.safetensors` and `controller.json` into a temporary folder,
then renames it into place), `load_checkpoint` (validates format, feature version and names,
tensor shapes; any problem is one UserError line) and `ControllerCheckpoint` (the net, its
calibration, grid and sparse settings). The JSON record holds the feature spec and normalisation,
grid, method, block size, dense layers, threshold, alpha, delta, model fingerprint, label-store
hash and versions. Imports `data` and `controller` modules below it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.errors import UserError
from data.features import FEATURE_NAMES, FEATURE_VERSION
from data.outputs import (CHECKPOINT_EXTRAS, CHECKPOINT_FILES, check_replaceable, fresh_sibling, remove_stale_siblings,
                          unmark)

from controller.guarantee.calibrate import Calibration
from controller.runtime.net import SafetyNet

CHECKPOINT_FORMAT = 1
RECORD_FILE, WEIGHTS_FILE = CHECKPOINT_FILES


@dataclass
class ControllerCheckpoint:
    net: SafetyNet
    record: dict

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_json(self.record["calibration"])

    @property
    def levels(self) -> np.ndarray:
        return np.asarray(self.record["grid"], dtype=np.float64)

    @property
    def fingerprint(self) -> dict:
        return self.record["model"]["fingerprint"]

    @property
    def guard(self):
        """The shift guard (None for checkpoints written before it existed: no guard)."""
        from controller.guarantee.guard import ShiftGuard
        g = self.record.get("guard")
        return None if g is None else ShiftGuard.from_json(g, len(FEATURE_NAMES), self.levels)


def export_checkpoint(path: str | Path, net: SafetyNet, record: dict, texts: dict[str, str] | None = None) -> Path:
    """Write the checkpoint folder atomically: into a fresh temporary folder beside `path`, then
    renamed into place. An existing checkpoint of ours at `path` is replaced (moved aside first and
    deleted only after the new one is in place); any other non-empty folder is refused (UserError):
    the commands ask for --overwrite before they get here, this is the last line of defence.
    `texts`: extra text files (a report); their names must be ones a checkpoint of ours may hold."""
    from safetensors.torch import save_file
    path = Path(path)
    extra = sorted(set(texts or {}) - set(CHECKPOINT_EXTRAS))
    if extra:
        raise ValueError(f"a checkpoint holds no file {extra[0]!r}; add it to CHECKPOINT_EXTRAS")
    replacing = path.exists() and any(path.iterdir())
    if replacing:
        check_replaceable(path, f"checkpoint folder {path}", "checkpoint", overwrite=True)
    remove_stale_siblings(path, "export")
    tmp = fresh_sibling(path, "export")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
    (tmp / RECORD_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, **record}, indent=1, sort_keys=True))
    for name, text in (texts or {}).items():
        (tmp / name).write_text(text)
    old = None
    if replacing:
        old = fresh_sibling(path, "replaced")
        shutil.rmtree(old)
        os.replace(path, old)   # a crash from here until the next line leaves the old checkpoint in `old`
    os.replace(tmp, path)
    unmark(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _read_record(path: Path) -> dict:
    try:
        record = json.loads((path / RECORD_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:   # RecursionError: nested too deep
        raise UserError(f"checkpoint {path}: {RECORD_FILE} is unreadable ({type(e).__name__}); re-export it") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format {record.get('format') if isinstance(record, dict) else '?'}, "
                        f"this code reads format {CHECKPOINT_FORMAT}; re-export it with this version")
    if record.get("feature_version") != FEATURE_VERSION or record.get("feature_names") != list(FEATURE_NAMES):
        raise UserError(f"checkpoint {path} was trained on feature version {record.get('feature_version')}, "
                        f"this code computes version {FEATURE_VERSION}; retrain it")
    return record


REQUIRED_KEYS = ("grid", "sparse", "label_store", "model", "alpha", "delta", "split", "decision", "criterion",
                 "net", "calibration")


def _check_number(value, name: str, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < float(value) < hi:
        raise ValueError(f"{name} must be a number in ({lo:g}, {hi:g}), got {value!r}")


def validate_record(record: dict) -> None:
    """Every key a checkpoint needs, with its type and range (ValueError naming the first bad one)."""
    from sparse_kernels import BACKEND_CHOICES, METHODS, probe_layers_problem
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"{RECORD_FILE} lacks {', '.join(missing)}")
    grid = record["grid"]
    if not isinstance(grid, list) or len(grid) < 2 or any(isinstance(g, bool) or not isinstance(g, (int, float)) for g in grid):
        raise ValueError("grid must be a list of at least 2 numbers")
    if grid[0] != 0 or any(not (0 <= g < 1) for g in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"grid must start at 0, lie in [0, 1) and increase strictly, got {grid}")
    sp = record["sparse"]
    if not isinstance(sp, dict) or sp.get("method") not in METHODS or sp.get("backend") not in BACKEND_CHOICES:
        raise ValueError(f"sparse.method must be one of {sorted(METHODS)} and sparse.backend one of {list(BACKEND_CHOICES)}")
    ints = ("block_size", "sink_blocks", "local_blocks", "last_queries", "probe_window")
    if any(isinstance(sp.get(k), bool) or not isinstance(sp.get(k), int) or sp[k] < (1 if k == "block_size" else 0)
           for k in ints):
        raise ValueError(f"sparse.{'/'.join(ints)} must be non-negative integers (block_size >= 1)")
    for k in ("dense_layers", "probe_layers"):
        if not isinstance(sp.get(k), list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in sp[k]):
            raise ValueError(f"sparse.{k} must be a list of layer indices")
    problem = probe_layers_problem(sp["dense_layers"], sp["probe_layers"])
    if problem is not None or not sp["probe_layers"]:
        raise ValueError(f"sparse.probe_layers: {problem or 'empty'}")
    model = record["model"]
    fp = model.get("fingerprint") if isinstance(model, dict) else None
    if not isinstance(fp, dict) or not isinstance(fp.get("id"), str) or not isinstance(fp.get("weights_id", ""), str):
        raise ValueError("model.fingerprint must be a mapping with a string id (and a string weights_id)")
    _check_number(record["alpha"], "alpha", 0, 1)
    _check_number(record["delta"], "delta", 0, 1)
    if not isinstance(record["net"], dict) or not isinstance(record["calibration"], dict):
        raise ValueError("net and calibration must be mappings")
    _check_provenance(record)


MAX_BLOCK_SIZE = 4096   # tokens per block; larger would make one block a whole long context


def _check_provenance(record: dict) -> None:
    """The fields that name where a checkpoint came from (read by calibrate.py, eval.py and reports)."""
    if record["sparse"]["block_size"] > MAX_BLOCK_SIZE:
        raise ValueError(f"sparse.block_size must be at most {MAX_BLOCK_SIZE}, got {record['sparse']['block_size']}")
    if not isinstance(record["model"].get("name"), str) or not record["model"]["name"]:
        raise ValueError("model.name must be the model's name (a string)")
    store = record["label_store"]
    if not isinstance(store, dict) or not isinstance(store.get("path"), str):
        raise ValueError("label_store must be a mapping with a string path")
    split = record["split"]
    if not isinstance(split, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in split.values()):
        raise ValueError("split must be a mapping of numbers (train, val, calibration, seed)")
    crit = record["criterion"]
    if not isinstance(crit, dict) or not isinstance(crit.get("name"), str):
        raise ValueError("criterion must be a mapping with a string name")
    if not isinstance(record.get("calibration_data") or {}, dict):
        raise ValueError("calibration_data must be a mapping")
    sweep = record.get("sweep", [])
    if not isinstance(sweep, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in sweep):
        raise ValueError("sweep must be a list of numbers")
    if not isinstance(record["decision"], str):
        raise ValueError("decision must be a string")


def _check_weights(tensors: dict) -> None:
    import torch
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"weight {name} is {t.dtype}, expected float32")
        if not torch.isfinite(t).all():
            raise ValueError(f"weight {name} holds NaN or infinite values")
    std = tensors.get("feature_std")
    if std is not None and not (std > 0).all():
        raise ValueError("feature_std must be positive")


MAX_HEADER_BYTES = 1 << 20   # a controller's safetensors header is under 1 KB; safetensors itself allows 100 MB


def _check_header(weights: Path) -> None:
    """Refuse a weights file whose JSON header is larger than any controller's (read before parsing)."""
    import struct
    with open(weights, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or struct.unpack("<Q", head)[0] > MAX_HEADER_BYTES:
        raise ValueError(f"{WEIGHTS_FILE} has a header over {MAX_HEADER_BYTES} bytes or none (a controller's is under 1 KB)")


def load_checkpoint(path: str | Path) -> ControllerCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / RECORD_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} is not a controller checkpoint (needs {RECORD_FILE} and {WEIGHTS_FILE}); "
                        "make one with train.py")
    record = _read_record(path)
    try:
        validate_record(record)
        cfg = record["net"]
        net = SafetyNet(cfg["n_features"], cfg["n_sparse_levels"], cfg["hidden"], cfg["depth"], cfg["dropout"])
        _check_header(path / WEIGHTS_FILE)
        tensors = load_file(str(path / WEIGHTS_FILE))
        _check_weights(tensors)
        net.load_state_dict(tensors, strict=True)
        Calibration.from_json(record["calibration"])
        ControllerCheckpoint(net, record).guard
        from controller.runtime.policy import deployed_policy
        deployed_policy(net, np.asarray(record["grid"], dtype=np.float64), record)
    except (SafetensorError, RuntimeError, KeyError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or incompatible ({msg}); re-export it") from None
    if len(record["grid"]) != cfg["n_sparse_levels"] + 1:
        raise UserError(f"checkpoint {path}: grid has {len(record['grid'])} levels but the net {cfg['n_sparse_levels'] + 1}")
    return ControllerCheckpoint(net.eval(), record)
