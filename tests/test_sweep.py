"""Issue 30's sweep: bad inputs and faults on the surfaces added since hardening round 2 (calibrate.py,
eval.py, the holdout and benchmark commands, backfill and adopt). Each case runs a command's `main`
in this process and must give exit code 2, exactly one `error:` line on stderr, and write nothing.

The cases are `(command, argv, words in the error)`. In argv, `{ckpt}`, `{store}` and `{prompts}`
stand for a valid tiny checkpoint, label store and prompts file, `{tmp}` for the test's own folder,
and `{bad_ckpt:EDIT}` for a copy of the checkpoint with one record field edited (see `EDITS`)."""
import importlib
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/test_tiny_controller.yaml")

EDITS = {   # controller.json fields of the wrong type or range
    "grid_null": lambda r: r.__setitem__("grid", None),
    "alpha_str": lambda r: r.__setitem__("alpha", "0.05"),
    "delta_zero": lambda r: r.__setitem__("delta", 0),
    "net_list": lambda r: r.__setitem__("net", []),
    "calibration_list": lambda r: r.__setitem__("calibration", []),
    "sparse_null": lambda r: r.__setitem__("sparse", None),
    "probe_layers_empty": lambda r: r["sparse"].__setitem__("probe_layers", []),
    "decision_number": lambda r: r.__setitem__("decision", 3),
    "model_null": lambda r: r.__setitem__("model", None),
    "label_store_path_number": lambda r: r["label_store"].__setitem__("path", 7),
    "split_value_str": lambda r: r["split"].__setitem__("train", "half"),
    "sweep_of_strings": lambda r: r.__setitem__("sweep", ["a"]),
    "criterion_name_number": lambda r: r["criterion"].__setitem__("name", 1),
    "format_old": lambda r: r.__setitem__("format", 0),
    "feature_version_old": lambda r: r.__setitem__("feature_version", 1),
}

CASES = [
    # calibrate.py
    ("calibrate", ["--checkpoint", "{tmp}/none", "--prompts", "{prompts}", "--out", "{tmp}/o"], "not a controller checkpoint"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/none.jsonl", "--out", "{tmp}/o"], "does not exist"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--alpha", "0"], "alpha"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--alpha", "nan"], "alpha"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--delta", "-1"], "delta"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--max-requests", "0"],
     "--max-requests"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--devices", "0"], "--devices"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--batch-samples", "0"],
     "--batch-samples"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--length-strata", "0,5"],
     "increasing positive"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--length-strata", "-"],
     "--length-strata"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--policy", "magic"], "--policy"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--mode", "other"], "--mode"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{ckpt}/sub"], "inside the input checkpoint"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}"], "contains"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{store}"], "label store"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/o", "--labels", "{ckpt}"],
     "the input checkpoint"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{prompts}", "--out", "{tmp}/afile/o"], "lies under a file"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/empty.jsonl", "--out", "{tmp}/o"], "no samples"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/array.jsonl", "--out", "{tmp}/o"], "JSON object"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/noinput.jsonl", "--out", "{tmp}/o"], "missing field"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/blank.jsonl", "--out", "{tmp}/o"], "non-empty string"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/badlength.jsonl", "--out", "{tmp}/o"], "`length`"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/badtask.jsonl", "--out", "{tmp}/o"], "`task`"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/latin1.jsonl", "--out", "{tmp}/o"], "not UTF-8"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/nested.jsonl", "--out", "{tmp}/o"], "nested too deeply"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/surrogate.jsonl", "--out", "{tmp}/o"], "lone surrogate"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/emptydir", "--out", "{tmp}/o"], "no *.jsonl or *.txt"),
    ("calibrate", ["--checkpoint", "{ckpt}", "--prompts", "{tmp}/txtdir", "--out", "{tmp}/o"], "empty prompt"),
    # eval.py
    ("eval", ["--checkpoint", "{tmp}/none", "--labels", "{store}", "--out", "{tmp}/o"], "not a controller checkpoint"),
    ("eval", ["--checkpoint", "{ckpt}", "--labels", "{tmp}/none", "--out", "{tmp}/o"], "does not exist"),
    ("eval", ["--checkpoint", "{ckpt}", "--labels", "{store}", "--out", "{ckpt}"], "the input checkpoint"),
    ("eval", ["--checkpoint", "{ckpt}", "--labels", "{store}", "--out", "{store}/report"], "lies inside"),
    ("eval", ["--checkpoint", "{ckpt}", "--labels", "{store}", "--out", "{tmp}/userdir"], "exists"),
    ("eval", ["--checkpoint", "{ckpt}", "--labels", "{store}", "--out", "{tmp}/afile"], "is a file"),
    ("eval", ["--checkpoint", "{ckpt}", "--ruler", "{tmp}/noinput.jsonl", "--out", "{tmp}/o"], "missing field"),
    ("eval", ["--checkpoint", "{ckpt}", "--labels", "{store}", "--out", "{tmp}/o", "--timings", "{tmp}/none.json"],
     "--timings"),
    ("eval", ["--checkpoint", "{ckpt}", "--labels", "{store}", "--out", "{tmp}/o", "--timings", "{tmp}/afile"], "--timings"),
    # controller.holdout
    ("controller.holdout", ["--out", "{tmp}/h.json", "--config", "{tmp}/none.yaml"], "does not exist"),
    ("controller.holdout", ["--out", "{tmp}/h.json", "--config", "{tmp}/list.yaml"], "must be a mapping"),
    ("controller.holdout", ["--out", "{tmp}/h.json", "--groups", "nope"], "unknown family group"),
    ("controller.holdout", ["--out", "{tmp}/h.json", "--config", TINY, "labels={tmp}/none"], "does not exist"),
    # controller.benchmark (this machine has no GPU)
    ("controller.benchmark", ["--out", "{tmp}/b.json", "--shapes", "3:2:64:64"], "--shapes"),
    ("controller.benchmark", ["--out", "{tmp}/b.json", "--shapes", "x"], "--shapes"),
    ("controller.benchmark", ["--out", "{tmp}/b.json"], "needs a CUDA GPU"),
    # data.backfill
    ("data.backfill", ["--store", "{tmp}/none"], "is not a label store"),
    ("data.backfill", ["--store", "{tmp}/afile"], "afile"),
    ("data.backfill", ["--store", "{tmp}/userdir"], "userdir"),
    # data.adopt
    ("data.adopt", ["--source", "{tmp}/none", "--config", TINY, "labeling.out={tmp}/new"], "none"),
    ("data.adopt", ["--source", "{store}", "--config", "{tmp}/none.yaml"], "does not exist"),
    ("data.adopt", ["--source", "{store}", "--config", TINY, "labeling.out={store}"], "labeling.out"),
    ("data.adopt", ["--source", "{store}", "--config", TINY, "data.forms=[classic, varied]", "labeling.out={tmp}/afile"],
     "adopt into a new folder"),
    # checkpoints with a record field of the wrong type, read by calibrate.py and eval.py
    *[("calibrate", ["--checkpoint", f"{{bad_ckpt:{e}}}", "--prompts", "{prompts}", "--out", "{tmp}/o"], "checkpoint")
      for e in EDITS],
]


def _inputs(tmp: Path, tiny_trained) -> dict:
    (tmp / "afile").write_text("x")
    (tmp / "userdir").mkdir()
    (tmp / "userdir" / "mine.txt").write_text("keep")
    (tmp / "emptydir").mkdir()
    (tmp / "txtdir").mkdir()
    (tmp / "txtdir" / "p.txt").write_text("   \n")
    (tmp / "list.yaml").write_text("- a\n")
    (tmp / "empty.jsonl").write_text("")
    lines = {"array": "[1, 2]", "noinput": '{"prompt": "hi"}', "blank": '{"input": "  "}',
             "badlength": '{"input": "hi", "length": -3}', "badtask": '{"input": "hi", "task": 5}',
             "nested": "[" * 100_000 + "]" * 100_000, "surrogate": '{"input": "a \\udc80 b"}'}
    for name, line in lines.items():
        (tmp / f"{name}.jsonl").write_text(line + "\n")
    (tmp / "latin1.jsonl").write_bytes('{"input": "caf\u00e9"}\n'.encode("latin-1"))
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": f"Tell me about item {i}."}) + "\n" for i in range(3)))
    return {"ckpt": str(tiny_trained[2]), "store": str(tiny_trained[1].root), "prompts": str(prompts), "tmp": str(tmp)}


def _bad_checkpoint(tiny_trained, tmp: Path, edit: str) -> str:
    out = tmp / f"bad_{edit}"
    shutil.copytree(tiny_trained[2], out)
    record = json.loads((out / "controller.json").read_text())
    EDITS[edit](record)
    (out / "controller.json").write_text(json.dumps(record))
    return str(out)


def _snapshot(paths) -> dict:
    return {str(p): p.stat().st_mtime_ns for root in paths for p in Path(root).rglob("*")}


@pytest.mark.parametrize("command,argv,words", CASES, ids=[f"{i:02d}-{c[0]}" for i, c in enumerate(CASES)])
def test_each_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_trained, command, argv, words):
    values = _inputs(tmp_path, tiny_trained)
    args = []
    for a in argv:
        if a.startswith("{bad_ckpt:"):
            args.append(_bad_checkpoint(tiny_trained, tmp_path, a[len("{bad_ckpt:"):-1]))
        else:
            args.append(a.format(**values))
    watched = [tmp_path, tiny_trained[2], tiny_trained[1].root]
    before = _snapshot(watched)
    module = importlib.import_module(command)
    try:
        code = module.main(args)
    except SystemExit as e:   # argparse's own refusals (a bad choice) exit through the parser
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert _snapshot(watched) == before, "a refused command wrote something"
