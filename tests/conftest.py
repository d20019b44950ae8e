import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from data.tiny import embedded_tokenizer
    return embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():
    from data.models import load_model
    return load_model("tiny-random-llama", dtype="float32", device="cpu")


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (inputs differ between tests, repeatable per test)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))
