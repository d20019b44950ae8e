"""Command line: bad input gets one line on stderr, exit code 2, and no output left behind."""
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args):
    code = train.main(["--config", str(ROOT / "configs/test_tiny.yaml"), *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("override,needle", [
    ("model.name=no-such-model", "unknown model 'no-such-model'"),
    ("model.name=/nowhere/x.gguf", "does not exist"),
    ("labeling.grid=[0.0, 0.5, 1.0]", "must lie in [0, 1)"),
    ("labeling.grid=[0.5, 0.2]", "strictly increasing"),
    ("data.tasks=[]", "data.tasks is empty"),
    ("data.lenghts=[512]", "unknown key(s) ['lenghts']"),
    ("sparse.method=magic", "sparse.method 'magic' is unknown"),
    ("criterion.nll_reference=oracle", "nll_reference"),
])
def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, override, needle):
    out = tmp_path / "out"
    code, err = run(capsys, f"labeling.out={out}", override)
    assert code == 2
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not out.exists()


def test_malformed_ruler_line_leaves_nothing(capsys, tmp_path):
    bad = tmp_path / "vt.jsonl"
    bad.write_text('{"input": "x", "outputs": ["a"], "length": 5}\n{"input": \n')
    out = tmp_path / "out"
    code, err = run(capsys, f"labeling.out={out}", f"data.ruler=[{bad}]")
    assert code == 2 and "vt.jsonl:2" in err and "\n" not in err
    assert not out.exists()


def test_missing_config_file(capsys, tmp_path):
    code = train.main(["--config", str(tmp_path / "none.yaml")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_good_run_prints_the_store_path_last(capsys, tmp_path):
    out = tmp_path / "ok"
    code = train.main(["--config", str(ROOT / "configs/test_tiny.yaml"), f"labeling.out={out}",
                       "data.tasks=[{name: niah_single}]", "data.samples_per_length=1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[-1] == str(out) and (out / "meta.json").is_file()


DEMO = str(ROOT / "configs/demo_smollm2.yaml")


@pytest.mark.parametrize("override,needle", [
    ("labels=data/labels/missing", "label store data/labels/missing does not exist"),
    ("calibration.alpha=1.5", "calibration.alpha must lie in (0, 1)"),
    ("trian.lr=0.1", "unknown key(s) ['trian']"),
    ("sparse.block_size=32", "other sparse settings or grid"),
    ("model.name=tiny-random-llama", "was labeled for model 'smollm2-135m'"),
])
def test_controller_job_bad_input_one_line_exit_2(capsys, tmp_path, override, needle):
    out = tmp_path / "out"
    code = train.main(["--config", DEMO, f"out={out}", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and needle in err and "\n" not in err
    assert not out.exists()


def test_controller_job_on_the_committed_store_prints_the_report_folder_last(capsys, tmp_path):
    import json
    out = tmp_path / "run"
    assert train.main(["--config", DEMO, f"out={out}", "train.max_epochs=3", "calibration.sweep=[0.1]"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out / "report")
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["alpha"] == 0.05 and metrics["delta"] == 0.1
    assert {"controller", "fixed", "length_law", "oracle", "sklearn_logistic", "sklearn_gbm"} <= set(metrics["policies"])
    for m in metrics["policies"].values():
        assert {"violation_rate", "compute_saved", "mean_level", "accuracy_vs_dense", "n"} <= set(m)
        assert 0 <= m["compute_saved"] <= 1 and m["n"] == metrics["n"] > 300
    assert metrics["policies"]["oracle"]["violation_rate"] == 0
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "logs" / "metrics.csv").is_file()


def test_an_existing_checkpoint_is_replaced_only_with_overwrite_and_only_when_ours(capsys, tmp_path):
    """A folder of the user's where the checkpoint goes is never replaced, even with --overwrite; a
    checkpoint this project wrote is replaced only with --overwrite."""
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code = train.main(["--config", DEMO, f"out={out}", "train.max_epochs=1", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "--overwrite" in err and "\n" not in err
        assert (out / "checkpoint" / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["checkpoint"]
    (out / "checkpoint" / "keep.txt").unlink()   # an empty folder is taken as it is
    assert train.main(["--config", DEMO, f"out={out}", "train.max_epochs=1", "calibration.sweep=[0.1]"]) == 0
    capsys.readouterr()
    code = train.main(["--config", DEMO, f"out={out}", "train.max_epochs=2", "calibration.sweep=[0.1]"])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert train.main(["--config", DEMO, f"out={out}", "train.max_epochs=2", "calibration.sweep=[0.1]", "--overwrite"]) == 0
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporary folder left beside it
    import yaml
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["train"]["max_epochs"] == 2 and resolved["labels"] == "data/labels/smollm2-135m/v2"


def test_labeling_on_two_ranks_then_training_in_one_command(tmp_path):
    """train.py with labeling on 2 gloo ranks (Lightning's subprocess DDP launcher) and training:
    every rank labels its share, rank 1 then exits cleanly and rank 0 trains and evaluates."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "train.py", "--config", "configs/test_tiny_controller.yaml", "stages=[train, evaluate]",
           "labels=null", "labeling.devices=2", "labeling.strategy=ddp", f"labeling.out={tmp_path / 'labels'}",
           f"out={tmp_path / 'run'}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in log and "Error" not in log, log[-3000:]
    # issue 30: Lightning's inventory, advertisements and internal notices are not the user's business
    assert not any(noise in log for noise in ("GPU available", "Tip:", "LeafSpec", "transfer_batch_to_device")), log[:3000]
    shards = sorted(p.name for p in (tmp_path / "labels" / "shards").iterdir())
    assert any(n.startswith("part-r000-") for n in shards) and any(n.startswith("part-r001-") for n in shards)
    assert (tmp_path / "run" / "checkpoint" / "controller.json").is_file()
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "run" / "report")


def test_a_checkpoint_moved_with_its_store_still_finds_it(tiny_trained, tmp_path, capsys):
    """The record keeps the store's path relative to the checkpoint: moving both keeps eval working;
    with the store gone too, one line names both places it looked."""
    import json
    import shutil

    import eval as eval_cli
    _, store, ckpt, _, _ = tiny_trained
    moved = tmp_path / "moved"
    shutil.copytree(store.root, moved / "labels")
    shutil.copytree(ckpt, moved / "run" / "checkpoint")
    record_file = moved / "run" / "checkpoint" / "controller.json"
    record = json.loads(record_file.read_text())
    assert record["label_store"]["path_from_checkpoint"] == "../../labels"
    record["label_store"]["path"] = record["calibration_data"]["label_store"] = str(tmp_path / "gone")
    record_file.write_text(json.dumps(record))
    args = ["--checkpoint", str(moved / "run" / "checkpoint"), "--labels", str(moved / "labels")]
    assert eval_cli.main([*args, "--out", str(tmp_path / "e1")]) == 0
    capsys.readouterr()
    shutil.rmtree(moved / "labels")
    assert eval_cli.main(["--checkpoint", str(moved / "run" / "checkpoint"), "--labels", str(store.root),
                          "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(tmp_path / "gone") in err and "labels" in err


def test_help_lists_every_config_key_with_its_default(capsys):
    from controller.learning.config import ControllerJobConfig
    from data.config import config_keys
    with pytest.raises(SystemExit) as done:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    keys = [k for k, _, _ in config_keys(ControllerJobConfig)]
    assert len(keys) > 50 and all(f"  {k} = " in out for k in keys)
    assert "calibration.alpha = 0.05" in out and "# tokens per block" in out


@pytest.mark.parametrize("module", ["train", "calibrate", "eval", "controller.benchmark", "controller.holdout",
                                    "data.backfill", "data.adopt"])
def test_help_describes_the_command_in_whole_sentences(module, capsys):
    """issue 31 item 8: `--help` showed the docstring's first line only, cut mid-sentence."""
    import importlib
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]   # after the usage block
    assert done.value.code == 0 and description.rstrip()[-1] in ".?", description
