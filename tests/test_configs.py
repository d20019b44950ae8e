"""Every YAML in configs/ is an instance of the typed config; overrides and typos behave."""
from pathlib import Path

import pytest

from controller.learning.config import ControllerJobConfig
from data.config import LabelJobConfig, load_config
from data.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(ControllerJobConfig, path)
    assert cfg.labeling.levels[0] == 0.0 and cfg.data.tasks
    assert isinstance(cfg.label_job(), LabelJobConfig)
    if "train" in cfg.stages and cfg.labels is not None:  # a reused store must match the config
        from controller.learning.pipeline import resolve_labels
        assert resolve_labels(cfg) == cfg.labels


def _guide_config_rows() -> dict[str, str]:
    guide = (Path(__file__).resolve().parents[1] / "docs" / "GUIDE.md").read_text()
    rows = [line for line in guide.splitlines() if line.startswith("| `configs/")]
    return {line.split("`")[1]: line for line in rows}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_guide_config_table_names_every_config_and_its_store(path):
    """The GUIDE's table lists every file in configs/, and any store path a row names is the one
    the file reads (`labels`) or writes (`labeling.out`)."""
    rows = _guide_config_rows()
    key = f"configs/{path.name}"
    assert key in rows, f"docs/GUIDE.md's config table has no row for {key}"
    cfg = load_config(ControllerJobConfig, path)
    stores = {str(s) for s in (cfg.labels, cfg.labeling.out) if s}
    named = [w.strip("`") for w in rows[key].split() if w.strip("`(),;").startswith(("data/labels/", "runs/labels/"))]
    for store in named:
        assert store.strip("(),;") in stores, f"{key}: the GUIDE names {store}, the config uses {sorted(stores)}"


@pytest.mark.parametrize("override,needle", [
    ("calibration.alpha=1.5", "calibration.alpha must lie in (0, 1)"),
    ("calibration.delta=0", "calibration.delta must lie in (0, 1)"),
    ("split.train=0.9", "split fractions"),
    ("stages=[fit]", "stages must be"),
    ("train.task_dropout=2", "task_dropout"),
    ("calibration.decision=magic", "calibration.decision"),
])
def test_controller_settings_are_validated(override, needle):
    with pytest.raises(UserError) as e:
        load_config(ControllerJobConfig, CONFIGS[0], [override])
    assert needle in str(e.value)


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(ControllerJobConfig, CONFIGS[0], ["data.seed=3", "labeling.grid=[0, 0.5]", "sparse.block_size=32"])
    assert cfg.data.seed == 3 and cfg.labeling.grid == (0.0, 0.5) and cfg.sparse.block_size == 32


def test_wrong_types_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="data.seed must be int"):
        load_config(ControllerJobConfig, CONFIGS[0], ["data.seed=abc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(ControllerJobConfig, bad)


def test_the_last_probe_layer_may_run_sparse_and_no_probe_may_read_a_sparse_layer():
    from data.config import SparseConfig
    SparseConfig(dense_layers=(0,), probe_layers=(0, 1))   # layer 1 probed, then run at the decided level
    SparseConfig(dense_layers=(), probe_layers=(0,))
    with pytest.raises(UserError, match=r"read layers \[1\]"):
        SparseConfig(dense_layers=(0,), probe_layers=(0, 2))
