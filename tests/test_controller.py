"""The controller's parts on synthetic and committed labels: net, splits, calibration, policies,
metrics, checkpoint files."""
import json
import math

import numpy as np
import pytest
import torch

from controller.guarantee.calibrate import Calibration, calibrate, violations
from controller.guarantee.arrays import LabelArrays
from controller.learning.dataset import arrays_from_store, split_groups
from controller.learning.evaluate import policy_metrics
from controller.runtime.checkpoint import export_checkpoint, load_checkpoint
from controller.runtime.net import SafetyNet
from controller.runtime.policy import ComputeAware, Policy, controller_policy, decide
from controller.learning.baselines import FixedPolicy, LengthLawPolicy
from data.errors import UserError
from data.features import FEATURE_NAMES, FEATURE_VERSION

STORE = "data/labels/smollm2-135m/v1"
LEVELS = np.array([0.0, 0.5, 0.7, 0.9])


def synthetic(n: int, rng: np.random.Generator, safe: np.ndarray | None = None) -> LabelArrays:
    L = len(LEVELS)
    feats = rng.normal(size=(n, len(FEATURE_NAMES))).astype(np.float32)
    feats[:, FEATURE_NAMES.index("log_length")] = rng.uniform(6, 9, n)
    if safe is None:
        safe = np.ones((n, L), dtype=bool)
        safe[:, 1:] = rng.uniform(size=(n, L - 1)) < 0.8
    causal = np.exp(2 * feats[:, 0].astype(np.float64))
    return LabelArrays(sample_ids=np.array([f"s{i}" for i in range(n)]), groups=np.array([f"g{i}" for i in range(n)]),
                       tasks=np.array(["qa"] * n), n_tokens=np.exp(feats[:, 0]).astype(int), target_length=np.full(n, 1024),
                       features=feats, levels=LEVELS, safe=safe, kept=causal[:, None] * (1 - LEVELS[None]),
                       causal=causal, score=np.ones((n, L)), achieved=np.tile(LEVELS, (n, 1)))


def test_net_probabilities_never_increase_with_level(gen):
    net = SafetyNet(len(FEATURE_NAMES), 8, hidden=16, depth=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=3.0, generator=gen)
    p = net.safe_probability(torch.randn(64, len(FEATURE_NAMES), generator=gen) * 5)
    assert p.shape == (64, 9) and (p[:, 0] == 1).all()
    assert (p[:, 1:] <= p[:, :-1] + 1e-7).all()


def test_label_index_is_the_monotone_closure():
    a = synthetic(3, np.random.default_rng(0), safe=np.array([[1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1]], dtype=bool))
    assert a.label_index.tolist() == [1, 3, 0]


def test_splits_are_grouped_deterministic_and_stable():
    groups = np.array([f"doc{i // 3}" for i in range(600)])  # three requests per document
    s = split_groups(groups, (0.5, 0.1, 0.2), seed=0)
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(600))
    owner = {g: name for name, idx in s.items() for g in groups[idx]}
    assert all((groups[idx] == g).sum() == 3 for name, idx in s.items() for g in set(groups[idx]))  # never split
    assert abs(len(s["train"]) / 600 - 0.5) < 0.1
    grown = split_groups(np.concatenate([groups, [f"new{i}" for i in range(50)]]), (0.5, 0.1, 0.2), seed=0)
    assert {g: name for name, idx in grown.items() for g in np.concatenate([groups, [f"new{i}" for i in range(50)]])[idx]
            if g.startswith("doc")} == owner


class NoisyOracle(Policy):
    """P(safe) = truth blurred by noise: a policy whose risk rises as the threshold falls."""
    name = "noisy"
    lambdas = np.round(np.linspace(1, 0, 101), 3)

    def __init__(self, arrays: LabelArrays, rng):
        self.p = np.clip(arrays.safe[:, 1:].astype(float) * 0.6 + rng.uniform(0, 0.4, (len(arrays), 3)), 0, 1)

    def scores(self, features):
        return np.concatenate([np.full((len(self.p), 1), np.inf), np.minimum.accumulate(self.p, axis=1)], axis=1)


def test_learn_then_test_guarantee_holds_over_repeated_draws():
    """P(test violation rate > alpha) must stay <= delta (plus sampling slack) across calibration draws."""
    rng = np.random.default_rng(1)
    alpha, delta, failures, trials = 0.1, 0.2, 0, 150
    for _ in range(trials):
        cal, test = synthetic(200, rng), synthetic(4000, rng)
        c = calibrate(NoisyOracle(cal, rng), cal, alpha, delta)
        risk = violations(test, c.decide(NoisyOracle(test, rng).scores(test.features))).mean()
        failures += risk > alpha
    assert failures / trials <= delta + 0.05


def test_no_passing_threshold_falls_back_to_dense():
    a = synthetic(100, np.random.default_rng(2))
    a.safe[:, 1:] = False
    c = calibrate(FixedPolicy(LEVELS), a, 0.05, 0.1)
    assert not c.passed and math.isinf(c.threshold)
    assert (c.decide(FixedPolicy(LEVELS).scores(a.features)) == 0).all()
    assert Calibration.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_policies_are_monotone_and_decide_as_documented():
    a = synthetic(50, np.random.default_rng(3))
    law = LengthLawPolicy(LEVELS).fit(a)
    net = SafetyNet(len(FEATURE_NAMES), 3)
    for policy in (FixedPolicy(LEVELS), law, controller_policy(net, LEVELS, "threshold"),
                   ComputeAware(controller_policy(net, LEVELS, "threshold"), LEVELS)):
        s = policy.scores(a.features)
        assert s.shape == (50, 4) and np.isinf(s[:, 0]).all() and (np.diff(s, axis=1) <= 1e-12).all()
        chosen = [decide(s, lam) for lam in policy.lambdas]
        assert (np.diff(np.stack(chosen), axis=0) >= 0).all(), policy.name  # conservative -> aggressive
    assert decide(FixedPolicy(LEVELS).scores(a.features), 1 - 0.7).tolist() == [2] * 50


def test_compute_saved_counts_kept_blocks_over_dense_blocks():
    a = synthetic(2, np.random.default_rng(4))
    a.causal[:] = [100.0, 300.0]
    a.kept[:] = [[100, 50, 30, 10], [300, 150, 90, 30]]
    a.safe[:] = True
    m = policy_metrics(a, np.array([1, 3]))
    assert m["compute_saved"] == pytest.approx(1 - (50 + 30) / 400)
    assert m["violation_rate"] == 0 and m["mean_level"] == pytest.approx(0.7)


def test_checkpoint_round_trip_and_bad_files(tmp_path, gen):
    net = SafetyNet(len(FEATURE_NAMES), 3, hidden=8, depth=1)
    record = {"feature_version": FEATURE_VERSION, "feature_names": list(FEATURE_NAMES), "grid": LEVELS.tolist(),
              "decision": "threshold", "alpha": 0.05, "delta": 0.1, "split": {"train": 0.5, "val": 0.1,
              "calibration": 0.2, "seed": 0}, "criterion": {"name": "gold", "tau": 0.1}, "model": {"name": "tiny", "fingerprint": {"id": "0" * 16}},
              "label_store": {"path": "x"}, "sparse": {"method": "block_topk", "block_size": 32, "sink_blocks": 1,
              "local_blocks": 1, "last_queries": 64, "probe_window": 64, "dense_layers": [0], "probe_layers": [0],
              "backend": "auto"},
              "net": {"n_features": len(FEATURE_NAMES), "n_sparse_levels": 3, "hidden": 8, "depth": 1, "dropout": 0.1},
              "calibration": Calibration(0.5, True, 0.05, 0.1, 10, 0.0, 3).to_json()}
    path = export_checkpoint(tmp_path / "ckpt", net, record)
    x = torch.randn(5, len(FEATURE_NAMES), generator=gen)
    assert torch.equal(load_checkpoint(path).net.safe_probability(x), net.eval().safe_probability(x))
    assert not list(tmp_path.glob("*.tmp"))
    raw = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt or incompatible"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(raw)
    (path / "controller.json").write_text(json.dumps({**json.loads((path / "controller.json").read_text()), "feature_version": 0}))
    with pytest.raises(UserError, match="feature version"):
        load_checkpoint(path)
    (path / "controller.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="not a controller checkpoint"):
        load_checkpoint(tmp_path)


def test_committed_store_loads_as_arrays():
    a, meta = arrays_from_store(STORE)
    assert len(a) == 2000 and a.levels.tolist() == list(meta["identity"]["levels"])
    assert a.safe[:, 0].all() and (a.kept[:, 0] == a.causal).all()
    with pytest.raises(UserError, match="does not exist"):
        arrays_from_store("data/labels/nope")


def test_a_store_of_another_feature_version_is_refused_with_the_backfill_command(tmp_path):
    import shutil
    root = tmp_path / "old"
    shutil.copytree(STORE, root)
    meta = json.loads((root / "meta.json").read_text())
    meta["identity"]["feature_version"] = FEATURE_VERSION - 1
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"feature version {FEATURE_VERSION - 1}, this code computes version "
                                        f"{FEATURE_VERSION}; bring its features up to date with "
                                        f"`python -m data.backfill --store {root}`"):
        arrays_from_store(root)


def test_training_is_seeded_and_deterministic_on_cpu(tmp_path):
    from dataclasses import replace

    from controller.learning.config import ControllerJobConfig
    from controller.learning.lit import LabelDataModule, fit_net
    a, _ = arrays_from_store(STORE)
    splits = split_groups(a.groups, (0.5, 0.1, 0.2), seed=0)
    job = ControllerJobConfig()
    job = replace(job, train=replace(job.train, max_epochs=2))
    nets = [fit_net(job, LabelDataModule(a, splits, 64, 0), str(tmp_path / f"run{i}"))[0] for i in range(2)]
    for (name, x), (_, y) in zip(nets[0].state_dict().items(), nets[1].state_dict().items()):
        assert torch.equal(x, y), name


def test_one_net_pass_gives_the_same_decision_as_two():
    """The hook's decision reads the scores and the reported P(safe) off one pass of the net."""
    torch.manual_seed(0)
    net = SafetyNet(len(FEATURE_NAMES), len(LEVELS) - 1)
    x = np.random.default_rng(0).normal(size=(16, len(FEATURE_NAMES))).astype(np.float32)
    for rule in ("threshold", "compute_aware"):
        policy = controller_policy(net, LEVELS, rule)
        p = policy.probabilities(x)
        assert np.allclose(policy.scores_from(p, x), policy.scores(x))
        assert np.allclose(p, net.safe_probability(torch.from_numpy(x)).detach().numpy(), atol=1e-7)


def test_mass_coverage_baseline_is_monotone_in_p():
    from controller.runtime.policy import MassCoveragePolicy, recall_columns
    levels = np.array([0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97])
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(300, len(FEATURE_NAMES))).astype(np.float32)
    recall = np.sort(rng.uniform(0.2, 1.0, (300, 8)), axis=1)[:, ::-1]   # less mass kept at sparser levels
    feats[:, recall_columns(levels)] = recall
    policy = MassCoveragePolicy(levels)
    chosen = np.stack([decide(policy.scores(feats), p) for p in policy.lambdas])   # p from 1 down to 0
    assert (np.diff(chosen, axis=0) >= 0).all() and (chosen[0] == 0).all() and (chosen[-1] == 8).all()
    i = 7
    lvl = decide(policy.scores(feats[i:i + 1]), 0.6)[0]
    assert lvl == 0 or recall[i, lvl - 1] >= 0.6
    assert lvl == 8 or recall[i, lvl] < 0.6
    with pytest.raises(ValueError, match="no mass-recall feature"):
        MassCoveragePolicy(np.array([0.0, 0.55]))
