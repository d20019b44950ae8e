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
    assert committed["identity"]["model"] == fp


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
