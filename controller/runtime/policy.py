"""The policies that ship at inference: each turns a request's features into a grid level.

Owns the `Policy` interface: `scores(features)` -> [n, L] safety scores, non-increasing along the
grid, +inf at level 0, and `lambdas`, the thresholds ordered from conservative to aggressive; the
decision at threshold lam is the largest level whose score is >= lam (`decide`). Policies:
`LearnedPolicy` (the SafetyNet's P(safe); optionally with the task hidden), `ComputeAware` (a
wrapper for any P(safe) policy: a request moves up to level k while the attention it would save
there, level x (n / 4096)^2, is at least lam times its risk 1 - P; long requests, which hold most of
the compute, may take a little more risk than short ones), `MassCoveragePolicy` (the training-free
adaptive baseline), `AdaptedPolicy` (a refitted head on the net) and `deployed_policy` (what a
checkpoint runs). Baselines fitted offline live in `controller.learning.baselines`. Imports `data`
and `controller.runtime.net`.
"""
from __future__ import annotations

import numpy as np
import torch

from data.features import FEATURE_NAMES, TASK_FEATURES

from controller.runtime.net import SafetyNet

TASK_COLUMNS = [FEATURE_NAMES.index(n) for n in TASK_FEATURES]
UNKNOWN_COLUMN = FEATURE_NAMES.index("task_unknown")


def mask_task(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Copy of `features` with the task one-hot of `rows` (bool [B]) set to `unknown` (training's task
    dropout and the deployed policy of a controller that ignores tasks use this one function)."""
    out = features.clone()
    out[rows.nonzero(as_tuple=True)[0][:, None], torch.tensor(TASK_COLUMNS)] = 0.0
    out[rows, UNKNOWN_COLUMN] = 1.0
    return out

LOG_LENGTH = FEATURE_NAMES.index("log_length")
PROBABILITY_LAMBDAS = np.round(np.linspace(1.0, 0.0, 201), 4)


def decide(scores: np.ndarray, lam: float) -> np.ndarray:
    """[n] level index: the largest level whose score clears `lam` (level 0 always does)."""
    return (scores >= lam).sum(axis=1) - 1


def with_dense(p: np.ndarray) -> np.ndarray:
    """Prepend +inf for level 0 and force non-increasing scores along the grid."""
    return np.concatenate([np.full((len(p), 1), np.inf), np.minimum.accumulate(p, axis=1)], axis=1)


class Policy:
    name: str
    lambdas: np.ndarray

    def scores(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, features: np.ndarray) -> np.ndarray | None:
        """[B, 1 + K] P(safe) at every grid level, or None for a policy that does not estimate it
        (mass coverage decides on the probe's estimated kept mass)."""
        return None

    def per_request(self) -> "Policy":
        """The part of this policy that depends on each request alone: what a threshold is calibrated
        on (a stream monitor's warm-up and alarms depend on a request's place in a stream)."""
        return self


class LearnedPolicy(Policy):
    def __init__(self, net: SafetyNet, name: str = "controller", hide_task: bool = False):
        self.net, self.name, self.hide_task = net.eval(), name, hide_task
        self.lambdas = PROBABILITY_LAMBDAS

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """[B, 1 + K] the net's P(safe) at every grid level (1 at level 0), float64."""
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        if self.hide_task:
            x = mask_task(x, torch.ones(len(x), dtype=torch.bool))
        with torch.inference_mode():
            return self.net.safe_probability(x).numpy().astype(np.float64)

    def scores_from(self, p: np.ndarray, features: np.ndarray) -> np.ndarray:
        return with_dense(p[:, 1:])

    def scores(self, features: np.ndarray) -> np.ndarray:
        return self.scores_from(self.probabilities(features), features)


class ComputeAware(Policy):
    """score_k = min over j <= k of saved_j / (1 - P_j): a knapsack-like ratio of compute saved to
    risk taken, made non-increasing; lam is scanned geometrically from conservative to aggressive."""
    REFERENCE_TOKENS = 4096

    def __init__(self, base: Policy, levels: np.ndarray, name: str | None = None):
        self.base, self.levels = base, np.asarray(levels, dtype=np.float64)
        self.name = name or f"{base.name}_compute_aware"
        self.lambdas = np.logspace(3, -4, 4481)

    def _from_base(self, base_scores: np.ndarray, features: np.ndarray) -> np.ndarray:
        p = base_scores[:, 1:]
        n2 = np.exp(2 * (np.asarray(features)[:, LOG_LENGTH].astype(np.float64) - np.log(self.REFERENCE_TOKENS)))
        saved = self.levels[None, 1:] * n2[:, None]
        return with_dense(saved / np.maximum(1.0 - p, 1e-6))

    def scores(self, features: np.ndarray) -> np.ndarray:
        return self._from_base(self.base.scores(features), features)

    def probabilities(self, features: np.ndarray) -> np.ndarray | None:
        """The base's P(safe) (None for mass coverage): with `scores_from`, one net pass serves both."""
        return self.base.probabilities(features)

    def scores_from(self, p: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self._from_base(self.base.scores_from(p, features), features)


DECISION_RULES = ("compute_aware", "threshold")


def under_rule(policy: Policy, levels: np.ndarray, rule: str) -> Policy:
    """`policy` under a decision rule: wrapped in `ComputeAware`, or as it is for `threshold`."""
    if rule not in DECISION_RULES:
        raise ValueError(f"unknown decision rule {rule!r}; choose one of {DECISION_RULES}")
    return ComputeAware(policy, levels, policy.name) if rule == "compute_aware" else policy


def controller_policy(net: SafetyNet, levels: np.ndarray, rule: str, hide_task: bool = False,
                      name: str = "controller") -> Policy:
    """The controller as deployed: its net under the decision rule its checkpoint records."""
    return under_rule(LearnedPolicy(net, name, hide_task), levels, rule)


def recall_columns(levels: np.ndarray) -> list[int] | None:
    """Feature columns of the probe's mass recall at each sparse grid level (None if a level has none)."""
    names = [f"probe_recall{round(float(lv) * 100)}_mean" for lv in np.asarray(levels)[1:]]
    return [FEATURE_NAMES.index(n) for n in names] if all(n in FEATURE_NAMES for n in names) else None


class MassCoveragePolicy(Policy):
    """The training-free adaptive baseline (Twilight's top-p, FlexPrefill's gamma, XAttention's tau):
    per request, the sparsest level whose estimated kept share of the attention mass (the probe's
    mass recall of the same block selection, at query blocks spread over the prompt) is at least p;
    p is the calibrated parameter, scanned from 1 (dense) down."""
    name = "mass_coverage"

    def __init__(self, levels: np.ndarray):
        self.columns = recall_columns(levels)
        if self.columns is None:
            raise ValueError(f"no mass-recall feature for every level of the grid {list(levels)}")
        self.lambdas = np.round(np.linspace(1.0, 0.0, 401), 4)

    def scores(self, features: np.ndarray) -> np.ndarray:
        return with_dense(np.asarray(features, dtype=np.float64)[:, self.columns])


def kept_mass(policy: Policy, features: np.ndarray) -> np.ndarray:
    """[B, L] the probe's estimated kept share of the attention mass at every level (1 at dense), of a
    mass-coverage policy, bare or under a decision rule."""
    while not isinstance(policy, MassCoveragePolicy):
        policy = policy.base
    mass = np.asarray(features, dtype=np.float64)[:, policy.columns]
    return np.concatenate([np.ones((len(mass), 1)), mass], axis=1)


class Named(Policy):
    """A policy under another name (reports call the deployed policy `controller`)."""

    def __init__(self, base: Policy, name: str):
        self.base, self.name, self.lambdas = base, name, base.lambdas

    def scores(self, features: np.ndarray) -> np.ndarray:
        return self.base.scores(features)


class AdaptedPolicy(Policy):
    """The controller with a head refitted on a user's labeled prompts (`controller.learning.adapt`): per sparse
    level, a logistic model on the standardised non-task features and the net's logit at that level.
    The head is plain numbers in the checkpoint's JSON; this runs in numpy at inference."""
    name = "adapted"

    def __init__(self, base: LearnedPolicy, head: dict):
        self.base, self.lambdas = base, PROBABILITY_LAMBDAS
        self.columns = np.asarray(head["columns"], dtype=np.int64)
        self.mean, self.std = np.asarray(head["mean"], np.float64), np.asarray(head["std"], np.float64)
        self.coef, self.intercept = np.asarray(head["coef"], np.float64), np.asarray(head["intercept"], np.float64)
        k = base.net.head.out_features
        if (self.coef.shape != (k, len(self.columns) + 1) or self.intercept.shape != (k,)
                or self.mean.shape != self.std.shape or self.mean.shape != (len(self.columns),)):
            raise ValueError("the adapted head's shapes do not match the net and its columns")

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        p = self.base.probabilities(features)
        x = head_inputs(features, p, self.columns, self.mean, self.std)            # [B, K, F + 1]
        z = np.einsum("bkf,kf->bk", x, self.coef) + self.intercept
        return np.concatenate([np.ones((len(p), 1)), 1.0 / (1.0 + np.exp(-z))], axis=1)

    def scores_from(self, p: np.ndarray, features: np.ndarray) -> np.ndarray:
        return with_dense(p[:, 1:])

    def scores(self, features: np.ndarray) -> np.ndarray:
        return self.scores_from(self.probabilities(features), features)


def head_inputs(features: np.ndarray, p: np.ndarray, columns, mean, std) -> np.ndarray:
    """[B, K, F + 1]: the standardised feature columns, and the net's logit of P(safe) at each level."""
    x = (np.asarray(features, np.float64)[:, columns] - mean) / std
    q = np.clip(p[:, 1:], 1e-6, 1 - 1e-6)
    logit = np.log(q / (1 - q))
    return np.concatenate([np.repeat(x[:, None, :], logit.shape[1], axis=1), logit[:, :, None]], axis=2)


DEPLOYABLE = ("controller", "mass_coverage", "adapted")


def ignores_task(record: dict) -> bool:
    """A controller trained with task_dropout 1 never saw a task name: it is always shown `unknown`."""
    return float(record.get("training", {}).get("task_dropout", 0.0)) >= 1.0


def deployed_policy(net: SafetyNet, levels: np.ndarray, record: dict) -> Policy:
    """The policy a checkpoint deploys (`record["policy"]`, default the controller): the net under
    its decision rule (`record["decision"]`), or the mass-coverage rule or adapted head that a
    recalibration found to save more, under `record["policy_decision"]` (`threshold` when absent,
    as recalibrations before it was recorded ran them)."""
    kind = record.get("policy", "controller")
    if kind not in DEPLOYABLE:
        raise ValueError(f"unknown deployed policy {kind!r}; one of {DEPLOYABLE}")
    if kind == "controller":
        return controller_policy(net, levels, record["decision"], hide_task=ignores_task(record))
    base = (MassCoveragePolicy(levels) if kind == "mass_coverage"
            else AdaptedPolicy(LearnedPolicy(net, "controller", ignores_task(record)), record["adapter"]))
    return under_rule(base, levels, record.get("policy_decision", "threshold"))
