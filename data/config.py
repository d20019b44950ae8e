"""Typed, frozen config dataclasses for labeling, and the YAML/override loader for all configs.

Owns ModelConfig, SparseConfig, DataConfig, CriterionConfig, LabelingConfig, LabelJobConfig
(YAML files in configs/ are instances) and `load_config(cls, path, overrides)`: strict keys (a
typo is a UserError naming the known keys), dotted `a.b=value` overrides parsed as YAML values,
validation in __post_init__. Imports `sparse_kernels` and `data.tasks`; never `controller`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sparse_kernels import BACKEND_CHOICES, METHODS, SelectionSpec, probe_layers_problem

from .errors import UserError
from .rope import RopeScaling
from .tasks import TaskSpec, build_task
from .tasks.forms import FORM_SETS

DEFAULT_GRID = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


MAX_LENGTH = 1 << 22          # tokens per generated request (4M): far beyond any model window we label
MAX_SAMPLES = 1_000_000       # per (task, length)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"
    dtype: str = "auto"    # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"   # auto, cpu or cuda
    rope_scaling: RopeScaling | None = None   # e.g. {type: yarn, factor: 8}; part of the fingerprint

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"model.device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise UserError("model.device is cuda but this machine has no CUDA device; use device: auto or cpu")


@dataclass(frozen=True)
class SparseConfig:
    method: str = "block_topk"                   # block selection: block_topk or vertical_slash
    block_size: int = 64                         # tokens per block (a power of two >= 16)
    sink_blocks: int = 1                         # first key blocks always kept
    local_blocks: int = 1                        # blocks ending at the diagonal always kept
    last_queries: int = 64                       # vertical_slash: final queries that estimate the pattern
    dense_layers: tuple[int, ...] = (0, 1)       # layers that always run dense
    probe_layers: tuple[int, ...] = (0, 1)       # probed before their attention; all layers below the last must be dense
    probe_window: int = 64                       # last queries the probe statistics read
    backend: str = "auto"                        # auto, triton, flex or reference

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"sparse.method {self.method!r} is unknown; choose one of {sorted(METHODS)}")
        if self.backend not in BACKEND_CHOICES:
            raise UserError(f"sparse.backend {self.backend!r} is unknown; choose one of {list(BACKEND_CHOICES)}")
        if min(self.block_size, self.last_queries, self.probe_window) < 1 or min(self.sink_blocks, self.local_blocks) < 0 \
                or min((*self.dense_layers, 0)) < 0:
            raise UserError("sparse.block_size, last_queries and probe_window must be >= 1, sink_blocks, local_blocks "
                            "and layer indices >= 0")
        problem = probe_layers_problem(self.dense_layers, self.probe_layers)
        if problem is not None or not self.probe_layers:
            raise UserError(f"sparse.probe_layers: {problem or 'name at least one layer'}; e.g. dense_layers: [0] "
                            "with probe_layers: [0, 1] (layer 1 probed, then run at the decided level)")
        try:
            self.selection()
        except ValueError as e:
            raise UserError(f"sparse: {e}") from None

    def selection(self) -> SelectionSpec:
        return SelectionSpec(self.method, self.block_size, self.sink_blocks, self.local_blocks, self.last_queries)


@dataclass(frozen=True)
class DataConfig:
    tasks: tuple[TaskSpec, ...] = ()
    lengths: tuple[int, ...] = (512, 1024, 2048)
    samples_per_length: int = 2
    seed: int = 0
    ruler: tuple[str, ...] = ()       # RULER JSONL files or folders, labeled as they are
    prompts: tuple[str, ...] = ()     # prompts without answers (JSONL or .txt folders; see data.tasks.prompts)
    max_prompts: int | None = None    # label only this many of the prompts (a seeded choice)
    chat_template: bool = True
    forms: tuple[str, ...] = ("classic",)   # surface forms per (task, length, index): classic and/or varied

    def __post_init__(self):
        if not self.forms or any(f not in FORM_SETS for f in self.forms) or len(set(self.forms)) != len(self.forms):
            raise UserError(f"data.forms must list some of {list(FORM_SETS)} once each, got {list(self.forms)}")
        if not self.tasks and not self.ruler and not self.prompts:
            raise UserError("data.tasks is empty and no data.ruler or data.prompts path is given; list at least "
                            "one task, e.g. tasks: [{name: niah_single}]")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UserError(f"data.max_prompts must be >= 1 (or null for all), got {self.max_prompts}")
        for spec in self.tasks:
            _dry_render(spec)
        if self.tasks and (not self.lengths or min(self.lengths) < 64):
            raise UserError(f"data.lengths must be token counts >= 64, got {list(self.lengths)}")
        if not 1 <= self.samples_per_length <= MAX_SAMPLES:
            raise UserError(f"data.samples_per_length must lie in 1..{MAX_SAMPLES}, got {self.samples_per_length}")
        if self.tasks and max(self.lengths) > MAX_LENGTH:
            raise UserError(f"data.lengths must be at most {MAX_LENGTH} tokens, got {max(self.lengths)}")
        if self.seed < 0:
            raise UserError(f"data.seed must be >= 0, got {self.seed}")


def _dry_render(spec: TaskSpec) -> None:
    """Build the task and render a tiny instance, so impossible arguments fail here, in one line."""
    gen = build_task(spec)
    try:
        gen.render("validate", 8)
    except (ValueError, IndexError, TypeError, ZeroDivisionError, OverflowError, MemoryError) as e:
        raise UserError(f"task {spec.name!r} cannot render with args {spec.args}: {e}") from None


def data_identity(cfg: DataConfig) -> dict:
    """The data section of a store's identity: what its samples are, not how many (more samples
    extend a store). Classic-only stores omit `forms` (they were written before form sets existed)."""
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for k in ("samples_per_length", "max_prompts"):
        data.pop(k)
    if data["forms"] == ["classic"]:
        data.pop("forms")
    return data


def stored_data_identity(data: dict) -> dict:
    """A stored data identity with the fields it predates filled with their defaults."""
    return {**data_identity(DataConfig(tasks=(TaskSpec("niah_single"),))), "tasks": [], "lengths": [],
            **{k: v for k, v in data.items()}}


CRITERIA = ("gold", "fidelity", "divergence")


@dataclass(frozen=True)
class CriterionConfig:
    """safe(request, s); `data.criteria` says each in full. `gold` (needs reference outputs): the task
    score is not below dense (if `require_score`) and the NLL of `nll_reference` rises by at most
    tau. `fidelity` (label-free): the sparse greedy answer equals the dense one after the task's
    normalisation and the dense answer's NLL rises by at most tau. `divergence` (label-free):
    `measure` of the sparse row against the dense row, along the dense answer, within the
    `null_quantile` quantile of the dense-vs-dense noise floor (or within `threshold`, if set)."""
    tau: float = 0.1
    nll_reference: str = "gold"     # gold: the task's reference answer; dense: the dense model's answer
    require_score: bool = True
    name: str = "gold"              # gold, fidelity or divergence
    measure: str = "kl_mean"        # divergence: kl_mean, kl_max, gap_max, top1_agree or agree_prefix
    threshold: float | None = None  # divergence: None = from the labels' noise floor
    null_quantile: float = 0.999    # divergence: the noise floor's quantile that bounds a safe row

    def __post_init__(self):
        from .criteria import MEASURES
        if self.name not in CRITERIA:
            raise UserError(f"criterion.name must be one of {list(CRITERIA)}, got {self.name!r}")
        if self.nll_reference not in ("gold", "dense"):
            raise UserError(f"criterion.nll_reference must be 'gold' or 'dense', got {self.nll_reference!r}")
        if not self.tau >= 0:
            raise UserError(f"criterion.tau must be >= 0, got {self.tau}")
        if self.measure not in MEASURES:
            raise UserError(f"criterion.measure must be one of {sorted(MEASURES)}, got {self.measure!r}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UserError(f"criterion.threshold must be a finite number or null, got {self.threshold}")
        if not 0.5 <= self.null_quantile <= 1:
            raise UserError(f"criterion.null_quantile must lie in [0.5, 1], got {self.null_quantile}")


STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_false")


@dataclass(frozen=True)
class LabelingConfig:
    grid: tuple[float, ...] = DEFAULT_GRID
    out: str = "runs/labels"
    shard_size: int = 8
    progress: bool = True
    devices: int = 1          # Lightning devices (ranks); the accelerator follows model.device
    strategy: str = "auto"    # Lightning strategy: auto (ddp for several devices), ddp, ddp_spawn
    loader_workers: int = 0   # DataLoader workers generating samples while the model labels
    batch_samples: int = 1    # samples decoded together (rows = batch_samples x levels)
    null_share: float = 0.0   # seeded share of samples whose dense reference is also computed alone (the noise floor)
    null_answers: bool = True  # the floor also decodes the alone answer (fidelity/gold nulls; most of its cost)
    sparse_answers: bool = True  # decode every level's greedy answer (gold, fidelity); false: the dense row's only

    def __post_init__(self):
        bad = [g for g in self.grid if not (0.0 <= g < 1.0) or math.isnan(g)]
        if not self.grid or bad:
            raise UserError(f"labeling.grid levels must lie in [0, 1); bad: {bad or 'empty grid'}")
        if list(self.grid) != sorted(set(self.grid)):
            raise UserError(f"labeling.grid must be strictly increasing, got {list(self.grid)}")
        if self.shard_size < 1 or self.devices < 1 or self.batch_samples < 1:
            raise UserError("labeling.shard_size, labeling.devices and labeling.batch_samples must be >= 1")
        if not 0 <= self.loader_workers <= 64:
            raise UserError(f"labeling.loader_workers must lie in 0..64, got {self.loader_workers}")
        if not 0.0 <= self.null_share <= 1.0:
            raise UserError(f"labeling.null_share must lie in [0, 1], got {self.null_share}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"labeling.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.devices > 1024 or self.batch_samples > 4096 or self.shard_size > 1_000_000:
            raise UserError("labeling.devices (<= 1024), batch_samples (<= 4096) or shard_size (<= 1e6) is implausibly large")

    @property
    def levels(self) -> tuple[float, ...]:
        """The grid with the dense level 0 first (every sample's reference row)."""
        return self.grid if self.grid[0] == 0.0 else (0.0, *self.grid)


@dataclass(frozen=True)
class LabelJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(tasks=(TaskSpec("niah_single"),)))
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)


# ---------------------------------------------------------------- YAML -> dataclass


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if tp is TaskSpec and isinstance(value, str):
            return TaskSpec(value)
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _convert(next(a for a in typing.get_args(tp) if a is not type(None)), value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise UserError(f"{where} must be {tp.__name__}, got {value!r}")
    if tp is dict and not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping, got {value!r}")
    return value


def from_dict(cls, data, where: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are UserErrors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {where or 'config'}; known keys: {names}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return data


def load_config(cls, path: str | Path | None, overrides: list[str] = (), only_known: bool = False):
    """Read YAML `path` (or start empty), apply overrides, build and validate `cls`. `only_known`
    reads just `cls`'s sections of a larger job file (a controller job's labeling part)."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist; see configs/ for examples")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"config file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if data is None:   # an empty file would silently run every default
            raise UserError(f"config file {p} is empty; see configs/ for examples")
        if not isinstance(data, dict):   # a top-level list or scalar: overrides and sections need a mapping
            raise UserError(f"config file {p} must be a mapping of sections (model:, data:, ...), not a YAML "
                            f"{type(data).__name__}; see configs/ for examples")
    data = apply_overrides(data, list(overrides))
    if only_known and isinstance(data, dict):
        data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _field_comments(cls) -> dict[str, str]:
    """{field: the comment on its line in the class source} (the config's documentation)."""
    import inspect
    import re
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = (re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line) for line in source.splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def config_keys(cls, prefix: str = "", defaults=None) -> list[tuple[str, str, str]]:
    """[(dotted key, default, comment)] of every leaf of a config dataclass, for --help."""
    comments, out = _field_comments(cls), []
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out += config_keys(type(value), f"{prefix}{f.name}.", value)
        else:
            shown = json.dumps(to_dict(value) if dataclasses.is_dataclass(value) else
                               [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
                               if isinstance(value, tuple) else value)
            out.append((prefix + f.name, shown, comments.get(f.name, "")))
    return out


def config_keys_help(cls) -> str:
    """The config keys as a text block: `key = default  # comment`, one per line."""
    rows = config_keys(cls)
    width = min(max(len(f"{k} = {d}") for k, d, _ in rows), 52)
    return "\n".join(f"  {f'{k} = {d}':<{width}}  {('# ' + c) if c else ''}".rstrip() for k, d, c in rows)
