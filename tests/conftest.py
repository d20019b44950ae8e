import dataclasses
import json
import os
import zlib

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Lightning gives its loggers a handler on the stderr of the moment it is first imported: imported
# inside a test that captures stderr, later tests would log into that closed capture.
import lightning.pytorch  # noqa: E402,F401


@pytest.fixture(scope="session")
def tokenizer():
    from data.tiny import embedded_tokenizer
    return embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():
    from data.models import load_model
    return load_model("tiny-random-llama", dtype="float32", device="cpu")


@pytest.fixture
def gen(request):
    """A seeded generator per test: the seed is a hash of the test's id, so inputs differ between
    tests and a failing case replays exactly (the seed is also in the test's report properties)."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0xFFFF
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_trained(tiny_lm, tmp_path_factory):
    """A controller trained on a tiny-model label store; its threshold is then moved to the median
    score so that decisions are mixed (the tiny model's labels are noise; this tests mechanics)."""
    from controller.learning.config import ControllerJobConfig
    from controller.runtime.checkpoint import RECORD_FILE
    from controller.learning.pipeline import train_controller
    from controller.runtime.policy import controller_policy
    from data.config import load_config
    from data.features import FEATURE_NAMES
    from data.runner import run_labeling
    root = tmp_path_factory.mktemp("tiny_controller")
    job = load_config(ControllerJobConfig, "configs/test_tiny_controller.yaml",
                      [f"labeling.out={root / 'labels'}", f"out={root / 'run'}"])
    store = run_labeling(job.label_job(), tiny_lm)
    trained = train_controller(dataclasses.replace(job, labels=str(store.root)))
    table = store.table()
    feats = table[table["level"] == 0][[f"f_{n}" for n in FEATURE_NAMES]].to_numpy(np.float32)
    policy = controller_policy(trained.net, np.array(job.labeling.levels), job.calibration.decision)
    scores = policy.scores(feats)[:, 1:]
    threshold = float(np.median(scores[np.isfinite(scores)]))
    record = json.loads((trained.checkpoint / RECORD_FILE).read_text())
    record["calibration"].update(threshold=threshold, passed=True)
    (trained.checkpoint / RECORD_FILE).write_text(json.dumps(record))
    calibration = dataclasses.replace(trained.calibration, threshold=threshold, passed=True)
    return job, store, trained.checkpoint, trained.net, calibration


@pytest.fixture
def tiny_gemma3():
    """make(window) -> a LoadedModel of a tiny random Gemma 3 with that sliding window."""
    from data.models import LoadedModel, fingerprint, state_dict_sha256
    from data.tiny import tiny_random_gemma3

    def make(window: int) -> LoadedModel:
        model, tok = tiny_random_gemma3(window)
        return LoadedModel(model, tok, fingerprint(model, state_dict_sha256(model)), "tiny-gemma3")
    return make
