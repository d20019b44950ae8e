"""Controller: the learned sparsity controller, in four folders by role.

- `runtime`: what ships at inference (hook, checkpoint, net, deployed policies, shadow labels);
- `guarantee`: calibration, guard, monitor, live risk bounds, recalibration;
- `learning`: arrays from label stores, training, baselines, evaluation, report;
- `experiments`: the held-out study and the benchmark.

`holdout.py` and `benchmark.py` here are the commands' names (`python -m controller.holdout`,
`python -m controller.benchmark`); their code is in `experiments`. Sits on `data` and
`sparse_kernels`.
"""
