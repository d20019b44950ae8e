"""model.rope_scaling: a stretched window is another model (fingerprint), built the way transformers
builds it natively, and refused where it cannot apply."""
import pytest
import torch

from data.config import LabelJobConfig, load_config
from data.errors import UserError
from data.models import TINY_NAME, load_model, model_fingerprint, same_weights
from data.rope import LONG_ALIASES, RopeScaling, apply_rope_scaling, resolve_alias, rope_identity


@pytest.fixture(scope="module")
def native():
    return load_model(TINY_NAME, "float32", "cpu")


@pytest.fixture(scope="module")
def yarn8():
    return load_model(TINY_NAME, "float32", "cpu", RopeScaling("yarn", 8.0))


def test_scaling_widens_the_window_and_is_part_of_the_fingerprint(native, yarn8):
    assert native.model.config.max_position_embeddings == 8192
    assert yarn8.model.config.max_position_embeddings == 65536
    assert "rope" not in native.fingerprint           # native ids are what they were before scaling existed
    assert yarn8.fingerprint["rope"] == {"type": "yarn", "factor": 8.0, "original_window": 8192}
    assert yarn8.fingerprint["id"] != native.fingerprint["id"]
    assert yarn8.fingerprint["weights_id"] == native.fingerprint["weights_id"]   # same weights...
    assert not same_weights(yarn8.fingerprint, native.fingerprint)               # ...but not the same model
    linear = load_model(TINY_NAME, "float32", "cpu", {"type": "linear", "factor": 8})
    assert not same_weights(linear.fingerprint, yarn8.fingerprint)
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(native.model(ids).logits, yarn8.model(ids).logits, atol=1e-4)


def test_scaled_model_equals_transformers_native_yarn(native, yarn8):
    """A user who loads the model with YaRN in its config (transformers' own way) has our model:
    same logits, same fingerprint."""
    from transformers import LlamaForCausalLM
    cfg = native.model.config.__class__.from_dict(native.model.config.to_dict())   # the native config...
    cfg.max_position_embeddings = 65536
    cfg.rope_parameters = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                                  "rope_theta": native.model.config.rope_parameters["rope_theta"]}   # ...set to YaRN by hand
    theirs = LlamaForCausalLM(cfg).eval()
    theirs.load_state_dict(yarn8.model.state_dict())
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs(ids).logits, yarn8.model(ids).logits)
    assert rope_identity(theirs) == yarn8.fingerprint["rope"]
    fp, recorded = model_fingerprint(theirs)
    assert not recorded and same_weights(fp, yarn8.fingerprint)


def test_long_alias_and_bad_settings_are_refused_in_one_line():
    base, scaling = resolve_alias("smollm2-135m-64k", None)
    assert (base, scaling) == LONG_ALIASES["smollm2-135m-64k"]
    with pytest.raises(UserError, match="already sets rope_scaling"):
        resolve_alias("smollm2-135m-64k", {"type": "linear", "factor": 8})
    for bad, match in ((["model.rope_scaling={type: dynamic, factor: 8}"], "must be one of"),
                       (["model.rope_scaling={type: yarn, factor: 0.5}"], r"in \(1, 64\]"),
                       (["model.rope_scaling={type: yarn, factr: 8}"], "unknown key")):
        with pytest.raises(UserError, match=match) as e:
            load_config(LabelJobConfig, None, bad)
        assert "\n" not in str(e.value)
    scaled = load_model(TINY_NAME, "float32", "cpu", RopeScaling("yarn", 2.0)).model
    with pytest.raises(UserError, match="already uses yarn"):   # stretching twice would compound silently
        apply_rope_scaling(scaled, RopeScaling("yarn", 2.0))


def test_models_with_per_layer_rope_are_refused():
    from data.tiny import tiny_random_gemma3
    model, _ = tiny_random_gemma3(window=64)
    with pytest.raises(UserError, match="one RoPE for all layers"):
        apply_rope_scaling(model, RopeScaling("yarn", 4.0))
