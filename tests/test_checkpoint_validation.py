"""A corrupt or tampered checkpoint is refused at load with one line, never accepted silently."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from controller.runtime.checkpoint import RECORD_FILE, WEIGHTS_FILE, load_checkpoint
from data.errors import UserError

RECORD_CASES = [
    ("missing grid", lambda r: r.pop("grid"), "lacks grid"),
    ("missing criterion", lambda r: r.pop("criterion"), "lacks criterion"),
    ("missing label_store", lambda r: r.pop("label_store"), "lacks label_store"),
    ("missing decision", lambda r: r.pop("decision"), "lacks decision"),
    ("NaN in grid", lambda r: r["grid"].__setitem__(1, float("nan")), "grid"),
    ("grid level 1", lambda r: r["grid"].__setitem__(-1, 1.0), "grid"),
    ("grid not increasing", lambda r: r["grid"].reverse(), "grid"),
    ("grid of strings", lambda r: r.__setitem__("grid", ["0", "0.5"]), "grid"),
    ("bad sparse method", lambda r: r["sparse"].__setitem__("method", "magic"), "sparse.method"),
    ("bad backend", lambda r: r["sparse"].__setitem__("backend", "gpu9"), "sparse.backend"),
    ("negative block", lambda r: r["sparse"].__setitem__("block_size", -64), "sparse."),
    ("alpha 2", lambda r: r.__setitem__("alpha", 2.0), "alpha"),
    ("delta NaN", lambda r: r.__setitem__("delta", float("nan")), "delta"),
    ("layers not a list", lambda r: r["sparse"].__setitem__("dense_layers", "0,1"), "dense_layers"),
    ("fingerprint not a mapping", lambda r: r["model"].__setitem__("fingerprint", "abc"), "model.fingerprint"),
    ("weights_id a number", lambda r: r["model"]["fingerprint"].__setitem__("weights_id", 7), "model.fingerprint"),
    ("strata without parts", lambda r: r["calibration"].update(edges=[1000], parts=[dict(r["calibration"])]),
     "one calibration per length stratum"),
    ("strata not increasing", lambda r: r["calibration"].update(edges=[2000, 1000], parts=[dict(r["calibration"])] * 3),
     "one calibration per length stratum"),
    ("stratum missing a key", lambda r: r["calibration"].update(
        edges=[1000], parts=[dict(r["calibration"]), {"threshold": 0.5}]), "corrupt or incompatible"),
    ("negative guard warmup", lambda r: r["guard"].__setitem__("warmup", -1), "warmup >= 0"),
    # issue 30, outside sweep: fields of the wrong type gave tracebacks in calibrate.py and eval.py
    ("label_store a string", lambda r: r.__setitem__("label_store", "x"), "label_store must be a mapping"),
    ("split a string", lambda r: r.__setitem__("split", "x"), "split must be a mapping"),
    ("calibration_data a string", lambda r: r.__setitem__("calibration_data", "x"), "calibration_data must be a mapping"),
    ("criterion a string", lambda r: r.__setitem__("criterion", "x"), "criterion must be a mapping"),
    ("sweep a string", lambda r: r.__setitem__("sweep", "x"), "sweep must be a list"),
    ("model.name missing", lambda r: r["model"].pop("name"), "model.name"),
    ("block size 2^40", lambda r: r["sparse"].__setitem__("block_size", 2 ** 40), "block_size must be at most"),
]

WEIGHT_CASES = [
    ("NaN weight", lambda w: w[next(k for k in w if "weight" in k)].fill_(float("nan")), "NaN"),
    ("float64 weight", lambda w: w.__setitem__(next(k for k in w if "weight" in k), w[next(k for k in w if "weight" in k)].double()), "float32"),
    ("missing normalisation", lambda w: w.pop("feature_mean"), "corrupt"),
    ("zero std", lambda w: w["feature_std"].zero_(), "feature_std"),
]


def _copy(tiny_trained, tmp_path):
    ckpt = tiny_trained[2]
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    return out


@pytest.mark.parametrize("name,edit,words", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_a_tampered_record_is_refused_in_one_line(tiny_trained, tmp_path, name, edit, words):
    out = _copy(tiny_trained, tmp_path)
    record = json.loads((out / RECORD_FILE).read_text())
    edit(record)
    (out / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match=words) as e:
        load_checkpoint(out)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,edit,words", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_tampered_weights_are_refused_in_one_line(tiny_trained, tmp_path, name, edit, words):
    from safetensors.torch import load_file, save_file
    out = _copy(tiny_trained, tmp_path)
    weights = load_file(str(out / WEIGHTS_FILE))
    edit(weights)
    save_file(weights, str(out / WEIGHTS_FILE))
    with pytest.raises(UserError, match=words) as e:
        load_checkpoint(out)
    assert "\n" not in str(e.value)


def test_the_untampered_copy_loads(tiny_trained, tmp_path):
    ck = load_checkpoint(_copy(tiny_trained, tmp_path))
    assert torch.isfinite(ck.net.feature_std).all()


def test_corrupt_store_files_are_named_in_one_line(tiny_trained, tmp_path, capsys):
    from data.store import LabelStore
    store = tiny_trained[1]
    copy = tmp_path / "store"
    shutil.copytree(store.root, copy)
    shard = sorted((copy / "shards").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])   # truncated
    for call in (lambda: LabelStore(copy).table(), lambda: LabelStore(copy).done_ids()):
        with pytest.raises(UserError, match=shard.name) as e:
            call()
        assert "\n" not in str(e.value) and "delete it" in str(e.value)
    (copy / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is corrupt"):
        LabelStore(copy).meta()


def test_eval_refuses_a_store_made_with_other_sparse_settings(tiny_lm, tiny_trained, tmp_path, capsys):
    import eval as eval_cli
    from controller.learning.config import ControllerJobConfig
    from data.config import load_config
    from data.runner import run_labeling
    job = load_config(ControllerJobConfig, "configs/test_tiny.yaml",
                      [f"labeling.out={tmp_path / 'other'}", "sparse.block_size=16"]).label_job()
    run_labeling(job, tiny_lm)
    out = tmp_path / "report"
    code = eval_cli.main(["--checkpoint", str(tiny_trained[2]), "--labels", str(tmp_path / "other"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "other sparse settings" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["identity"].__setitem__("model", "zzz"), "identity.model is malformed"),
    (lambda m: m["identity"]["model"].update(id="0" * 16, weights_id="1" * 16), "labeled with model 0000"),
], ids=["malformed model", "another model"])
def test_eval_refuses_a_store_of_another_or_a_malformed_model(tiny_trained, tmp_path, capsys, edit, words):
    import json

    import eval as eval_cli
    copy = tmp_path / "store"
    shutil.copytree(tiny_trained[1].root, copy)
    meta = json.loads((copy / "meta.json").read_text())
    edit(meta)
    (copy / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "report"
    code = eval_cli.main(["--checkpoint", str(tiny_trained[2]), "--labels", str(copy), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and words in err and "\n" not in err, err
    assert not out.exists()


def test_an_output_folder_the_file_system_refuses_is_one_line(tmp_path):
    """/proc passes a permission check for root but refuses new folders: found before anything runs."""
    from data.errors import check_output_folder
    target = Path("/proc/no-such-process/report")
    with pytest.raises(UserError, match="cannot create folders|is not writable|lies under"):
        check_output_folder(target, f"--out {target}")


def test_a_record_nested_too_deep_is_refused_in_one_line(tiny_trained, tmp_path):
    """issue 30: json.loads raised RecursionError on a deeply nested record."""
    out = _copy(tiny_trained, tmp_path)
    (out / RECORD_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="unreadable") as e:
        load_checkpoint(out)
    assert "\n" not in str(e.value)


def test_a_weights_file_with_a_huge_header_is_refused(tiny_trained, tmp_path):
    """issue 30: a safetensors file whose metadata header is megabytes long was accepted."""
    from safetensors.torch import load_file, save_file
    out = _copy(tiny_trained, tmp_path)
    weights = load_file(str(out / WEIGHTS_FILE))
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"pad": "x" * (2 << 20)})
    with pytest.raises(UserError, match="header over") as e:
        load_checkpoint(out)
    assert "\n" not in str(e.value)
