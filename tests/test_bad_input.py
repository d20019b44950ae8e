"""The bad-input corpus: every case prints exactly one `error:` line, exits with code 2 and leaves
no new file. Config values, overrides, config files, tasks, models and devices, paths."""
import os
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/test_tiny.yaml")
DEMO = str(ROOT / "configs/demo_smollm2.yaml")

LABEL_CASES = [  # (override, words in the error) on the tiny label-only config
    ("train.lr=.inf", "finite number"),
    ("labeling.loader_workers=-1", "loader_workers"),
    ("labeling.strategy=bogus", "labeling.strategy"),
    ("labeling.devices=4096", "labeling.devices"),
    ("labeling.devices=1000", "this machine has"),
    ("labeling.batch_samples=0", "batch_samples"),
    ("labeling.shard_size=0", "shard_size"),
    ("labeling.grid=[0.0, .nan]", "finite number"),
    ("labeling.grid=[0.0, .inf]", "finite number"),
    ("data.samples_per_length=1000000000000", "samples_per_length"),
    ("data.samples_per_length=0", "samples_per_length"),
    ("data.lengths=[1000000000]", "data.lengths"),
    ("data.lengths=[10]", "data.lengths"),
    (("data.lengths=[4000000]", "labeling.batch_samples=64"), "beyond tiny-random-llama's window of 8192"),
    (("labeling.batch_samples=4096", "data.samples_per_length=100000", "data.lengths=[8000]"), "needs at least"),
    (("labeling.batch_samples=4096", "data.samples_per_length=100000", "data.lengths=[8000]"), "lower the batch"),
    ("data.seed=-1", "data.seed"),
    ("data.forms=[fancy]", "data.forms"),
    ("data.forms=[]", "data.forms"),
    ("data.tasks=[{name: niah_multiquery, args: {num_keys: 1, num_queries: 3}}]", "cannot render"),
    ("data.tasks=[{name: niah_single, args: {nonsense: 1}}]", "bad args"),
    ("data.tasks=[{name: nope}]", "unknown task"),
    ("data.max_prompts=0", "max_prompts"),
    ("sparse.probe_window=0", "probe_window"),
    ("sparse.block_size=0", "block_size"),
    ("sparse.sink_blocks=-1", "sink_blocks"),
    ("sparse.dense_layers=[0, 99]", "has 4 layers"),
    ("sparse.probe_layers=[5]", "below the last probe layer must be dense"),
    ("sparse.probe_layers=[]", "name at least one layer"),
    ("sparse.backend=tpu", "sparse.backend"),
    ("model.device=tpu", "model.device"),
    ("model.device=cuda", "no CUDA device"),
    ("model.name=/nowhere/model.gguf", "does not exist"),
    ("criterion.tau=-1", "criterion.tau"),
    ("criterion.tau=.nan", "finite number"),
    ("criterion.name=vibes", "criterion.name"),
    ("labeling.grid=abc", "must be a list"),
    ("labeling.grid=[0.0, 0.5", "not valid YAML"),
    ("labeling=[1, 2]", "must be a mapping"),
    ("stages=[dance]", "stages"),
    ("nokey", "key.subkey=value"),
]

JOB_CASES = [  # on the demo controller config (committed store)
    ("train.lr=.inf", "finite number"),
    ("train.lr=0", "lr > 0"),
    ("train.weight_decay=.nan", "finite number"),
    ("train.weight_decay=-1", "weight_decay"),
    ("train.compute_weight=.nan", "finite number"),
    ("train.patience=0", "patience"),
    ("train.seed=-3", "seed"),
    ("train.task_dropout=2", "task_dropout"),
    ("net.hidden=50000000", "net needs hidden"),
    ("net.depth=0", "net needs hidden"),
    ("net.dropout=1", "net needs hidden"),
    ("split.train=0.9", "split fractions"),
    ("split.seed=-1", "split.seed"),
    ("calibration.alpha=0", "calibration.alpha"),
    ("calibration.delta=.nan", "finite number"),
    ("calibration.guard_p=1", "guard_p"),
    ("calibration.guard_warmup=-1", "calibration.guard_warmup"),
    ("calibration.fallback=0.42", "not a grid level"),
    ("calibration.decision=magic", "calibration.decision"),
    ("logging.wandb=sometimes", "logging.wandb"),
    ("labels=README.md", "does not exist"),
]


def _files(root: Path) -> set:
    return {p for p in root.rglob("*")}


def _check(capsys, tmp_path, argv, words):
    before = _files(tmp_path)
    code = train.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert words in err, err
    assert _files(tmp_path) == before, "files were written"


@pytest.mark.parametrize("override,words", LABEL_CASES, ids=[str(c[0])[:40] for c in LABEL_CASES])
def test_label_config_bad_input(capsys, tmp_path, override, words):
    overrides = list(override) if isinstance(override, tuple) else [override]
    _check(capsys, tmp_path, ["--config", TINY, f"labeling.out={tmp_path / 'store'}", *overrides], words)


@pytest.mark.parametrize("override,words", JOB_CASES, ids=[c[0][:40] for c in JOB_CASES])
def test_controller_config_bad_input(capsys, tmp_path, override, words):
    _check(capsys, tmp_path, ["--config", DEMO, f"out={tmp_path / 'run'}", override], words)


@pytest.mark.parametrize("content,words", [
    (b"\xff\xfe\x00binary", "not UTF-8"),
    ("model: {name: caf\u00e9}".encode("latin-1"), "not UTF-8"),
    (b"- a\n- b\n", "must be a mapping"),
    (b"model: [unclosed\n", "not valid YAML"),
    (b"out: 3\nstages: label\n", "must be"),
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
], ids=["binary", "latin-1", "list", "broken yaml", "wrong types", "empty", "comment only"])
def test_bad_config_files(capsys, tmp_path, content, words):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(content)
    _check(capsys, tmp_path, ["--config", str(cfg)], words)


def test_out_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    _check(capsys, tmp_path, ["--config", DEMO, f"out={f}"], "is a file")


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_output_folders_that_cannot_be_folders(capsys, tmp_path, where, tiny_trained):
    import calibrate as calibrate_cli
    import eval as eval_cli
    f = tmp_path / "afile"
    f.write_text("x")
    bad = f if where == "file" else f / "sub" / "dir"
    words = "is a file" if where == "file" else "lies under a file"
    _check(capsys, tmp_path, ["--config", DEMO, f"out={bad}"], words)
    _check(capsys, tmp_path, ["--config", TINY, f"labeling.out={bad}"], words)
    for cli in (eval_cli, calibrate_cli):
        before = _files(tmp_path)
        code = cli.main(["--checkpoint", str(tiny_trained[2]), "--prompts", str(f), "--out", str(bad)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err and words in err, err
        assert _files(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_folder_that_is_not_writable(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _check(capsys, tmp_path, ["--config", DEMO, f"out={ro / 'run'}"], "is not writable")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("module,argv", [
    ("train", ["--nope"]),
    ("train", []),
    ("eval", ["--checkpoint", "c", "--labels", "a", "--ruler", "b", "--out", "o"]),
    ("eval", ["--checkpoint", "c", "--labels", "s", "--out", "o", "--criterion", "vibes"]),
    ("calibrate", ["--checkpoint", "c", "--prompts", "p", "--out", "o", "--alpha", "abc"]),
    ("data.backfill", []),
    ("data.adopt", ["--source"]),
    ("controller.benchmark", ["--e2e-lengths"]),
    ("controller.holdout", ["--by", "colour"]),
], ids=["unknown flag", "no config", "two sources", "bad criterion", "alpha not a number", "backfill no store",
        "adopt no value", "benchmark no value", "holdout bad choice"])
def test_command_line_mistakes_are_one_line(capsys, module, argv):
    """argparse's own errors print a usage block; every command prints one `error:` line instead."""
    import importlib
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err and "--help" in err, err


def test_a_store_too_small_for_the_splits_is_refused_before_anything_is_written(capsys, tmp_path, tiny_trained):
    """At these split fractions the tiny store's calibration split would get fewer than the
    2 requests the shift guard needs. Refused in one line, with no run folder written."""
    store = str(tiny_trained[1].root)
    _check(capsys, tmp_path, ["--config", str(ROOT / "configs/test_tiny_controller.yaml"), f"labels={store}",
                              f"out={tmp_path / 'run'}", "split.train=0.9", "split.val=0.05", "split.calibration=0.01"],
           "too few for train/val/calibration/test")


@pytest.mark.parametrize("switch", ["SPARSE_FUSED_TOPK", "SPARSE_FUSED_PROBE", "SPARSE_KERNEL_LOOP"])
def test_a_bad_environment_switch_is_refused_up_front(capsys, tmp_path, monkeypatch, tiny_lm, tiny_trained, switch):
    """A switch with a value it refuses: one line from each command, UserError from attach; nothing
    runs and no file is written (before, a typo surfaced mid-forward, where the hook runs dense)."""
    import controller.experiments.benchmark as benchmark
    from controller.runtime.hook import attach
    from data.errors import UserError
    monkeypatch.setenv(switch, "bogus")
    _check(capsys, tmp_path, ["--config", TINY, f"labeling.out={tmp_path / 'store'}"], switch)
    before = _files(tmp_path)
    assert benchmark.main(["--out", str(tmp_path / "bench.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and switch in err, err
    assert _files(tmp_path) == before
    with pytest.raises(UserError, match=switch):
        attach(tiny_lm, tiny_trained[2], break_even=None)


@pytest.mark.parametrize("argv,words", [
    (["--out", "{tmp}/h.json", "--repeats", "-1"], "--repeats must be >= 0"),
    (["--out", "{tmp}/h.json", "--calibration-requests", "0"], "--calibration-requests >= 1"),
    (["--out", "{tmp}", "--by", "family"], "is a folder"),
    (["--out", "{tmp}/afile/h.json"], "lies under a file"),
    (["--out", "{tmp}/h.json", "--config", "{tmp}/nolabels.yaml"], "names no label store"),
    (["--out", "{tmp}/h.json", "--config", "{tmp}/list.yaml"], "must be a mapping of sections"),
    (["--out", "{tmp}/h.json", "--config", "{tmp}/tiny.yaml", "--calibration-requests", "100000"], "need more than"),
], ids=["negative repeats", "no calibration requests", "out a folder", "out under a file", "no label store",
        "config a list", "groups too small"])
def test_holdout_mistakes_are_one_line_before_any_training(capsys, tmp_path, tiny_trained, argv, words):
    """issue 30: each of these gave a traceback (some after training a group's controller)."""
    from controller.experiments import holdout
    (tmp_path / "afile").write_text("x")
    (tmp_path / "nolabels.yaml").write_text("model: {name: smollm2-135m}\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "tiny.yaml").write_text(f"labels: {tiny_trained[1].root}\n")
    code = holdout.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "h.json").exists() and not (tmp_path / "h.md").exists()


def _prompt_oddities(tmp_path):
    """issue 30's prompt files: each gave a traceback or a MemoryError."""
    import json
    from data.tasks.ruler import MAX_PROMPT_BYTES
    (tmp_path / "surrogate.jsonl").write_text('{"input": "a \\ud800 b"}\n', encoding="utf-8")
    (tmp_path / "huge.jsonl").write_text(json.dumps({"input": "w " * (MAX_PROMPT_BYTES // 2 + 8)}) + "\n")
    (tmp_path / "huge_txt").mkdir()
    (tmp_path / "huge_txt" / "p.txt").write_text("w " * (MAX_PROMPT_BYTES // 2 + 8))
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "broken.jsonl").symlink_to(tmp_path / "nowhere")
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    return {"surrogate.jsonl": "lone surrogate", "huge.jsonl": "longer than any model's context",
            "huge_txt": "longer than any model's context", "folder.jsonl": r"no \*.jsonl or \*.txt files",
            "broken.jsonl": "does not exist", "zero.jsonl": "does not exist"}


def test_odd_prompt_files_are_one_line(tmp_path):
    from data.errors import UserError
    from data.tasks.prompts import read_prompts
    for name, words in _prompt_oddities(tmp_path).items():
        with pytest.raises(UserError, match=words) as e:
            read_prompts(tmp_path / name)
        assert "\n" not in str(e.value), name


def _disk_full(*args, **kwargs):
    import errno
    raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/file")


def test_a_full_disk_while_labeling_is_one_line_and_keeps_no_partial_shard(capsys, tmp_path, monkeypatch):
    """issue 30: a file-system fault met while a command runs (here: the disk fills up at the first
    shard) gave an OSError traceback; now one line saying what to do, and nothing half-written."""
    from data.store import LabelStore
    monkeypatch.setattr(LabelStore, "write_shard", _disk_full)
    store = tmp_path / "labels"
    code = train.main(["--config", str(ROOT / "configs/test_tiny.yaml"), f"labeling.out={store}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: No space left on device (/full/disk/file); free disk space") and "\n" not in err, err
    assert not list(store.rglob("*.parquet"))


def test_a_full_disk_while_writing_a_report_is_one_line(capsys, tmp_path, monkeypatch, tiny_trained):
    import eval as eval_cli
    from controller.learning import pipeline
    monkeypatch.setattr(pipeline, "write_report", _disk_full)
    code = eval_cli.main(["--checkpoint", str(tiny_trained[2]), "--labels", str(tiny_trained[1].root),
                          "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: No space left on device") and "\n" not in err, err


def test_a_full_disk_while_adopting_is_one_line(capsys, tmp_path, monkeypatch, tiny_trained):
    import shutil

    from data import adopt
    monkeypatch.setattr(shutil, "copyfile", _disk_full)
    code = adopt.main(["--source", str(tiny_trained[1].root), "--config", str(ROOT / "configs/test_tiny_controller.yaml"),
                       "data.forms=[classic, varied]", f"labeling.out={tmp_path / 'new'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: No space left on device") and "\n" not in err, err
    assert not (tmp_path / "new").exists()
