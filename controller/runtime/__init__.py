"""What ships at inference: the hook (`attach`, `ControllerHandle` and the parts it is made of: the
plan, the probes, the decision and the stream state), the checkpoint format, the network and the
deployed policies, model compatibility checks, and shadow labels for the live certificate.

Imports `sparse_kernels`, `data` and the statistics of `controller.guarantee` that a deployed
controller applies (its calibrated threshold, guard, stream monitor and live risk bound); never
`controller.learning` or `controller.experiments` (`tests/test_imports.py` checks the closure).
"""

# the public names, loaded on first use (PEP 562): `from controller.runtime import attach`
_PUBLIC = {"attach": "hook", "ControllerHandle": "hook", "Decision": "decision", "load_checkpoint": "checkpoint",
           "ControllerCheckpoint": "checkpoint", "certify_live": "shadow"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'controller.runtime' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"controller.runtime.{_PUBLIC[name]}"), name)
