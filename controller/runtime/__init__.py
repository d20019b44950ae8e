"""What ships at inference: the hook (`attach`, `ControllerHandle` and the parts it is made of: the
plan, the probes, the decision and the stream state), the checkpoint format, the network and the
deployed policies, model compatibility checks, and shadow labels for the live certificate.

Imports `sparse_kernels`, `data` and the statistics of `controller.guarantee` that a deployed
controller applies (its calibrated threshold, guard, stream monitor and live risk bound); never
`controller.learning` or `controller.experiments` (`tests/test_imports.py` checks the closure).
"""
