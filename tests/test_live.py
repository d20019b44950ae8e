"""The certificate on live traffic: anytime-valid bounds on the violation rate from shadow labels,
a fallback on harm (not on change), and shadow labels that equal the labeler's own measurements."""
import numpy as np
import pytest
import torch

from controller.guarantee.risk import BettingBounds, LiveRisk

ALPHA, DELTA = 0.05, 0.1


def _labels_to_alarm(rate: float, seed: int, n: int) -> int | None:
    risk, rng = LiveRisk(ALPHA, DELTA, p=1.0), np.random.default_rng(seed)
    for i, x in enumerate(rng.uniform(size=n) < rate):
        if risk.observe(bool(x)):
            return i + 1
    return None


def test_false_alarm_rate_on_streams_at_alpha_is_at_most_delta():
    """The worst exchangeable stream the promise allows: violations at exactly alpha, 200 seeded
    streams of 1,000 shadow labels each. Ville's inequality bounds the share that ever alarms."""
    alarms = [_labels_to_alarm(ALPHA, seed, 1000) is not None for seed in range(200)]
    assert np.mean(alarms) <= DELTA
    safe = [_labels_to_alarm(ALPHA / 2, seed, 1000) is not None for seed in range(100)]
    assert np.mean(safe) <= np.mean(alarms)   # a safer stream alarms no more often


def test_a_stream_at_twice_alpha_falls_back():
    waits = [_labels_to_alarm(2 * ALPHA, 1000 + seed, 5000) for seed in range(30)]
    assert all(w is not None for w in waits)
    assert np.median(waits) < 600   # ~170 labels measured; at p = 0.05 about 3,400 requests


def test_bounds_hold_the_stream_mean_and_tighten():
    rng = np.random.default_rng(7)
    b = BettingBounds(DELTA)
    widths = []
    for i, x in enumerate(rng.uniform(size=3000) < 0.2):
        b.update(float(x))
        if i in (99, 999, 2999):
            widths.append(b.upper - b.lower)
            assert b.lower <= b.mean <= b.upper
    assert widths[0] > widths[1] > widths[2] and widths[2] < 0.07   # 0.059 measured (CLT: 0.024)
    with pytest.raises(ValueError):
        BettingBounds(0.0)


def test_sampling_is_seeded_by_request_and_hits_its_share():
    risk = LiveRisk(ALPHA, DELTA, p=0.05, seed=3)
    picks = [risk.sampled(f"req-{i}") for i in range(20000)]
    assert 0.04 < np.mean(picks) < 0.06 and risk.requests == 20000
    assert picks[:50] == [LiveRisk(ALPHA, DELTA, p=0.05, seed=3).sampled(f"req-{i}") for i in range(50)]
    assert picks[:500] != [LiveRisk(ALPHA, DELTA, p=0.05, seed=4).sampled(f"req-{i}") for i in range(500)]


def test_shadow_measurements_equal_the_labelers_rows(tiny_lm, tiny_trained):
    """A shadow label measures what the labeler stored for the same request at the same level."""
    from controller.runtime.hook import attach
    from controller.runtime.shadow import shadow_measurements
    from data.labeling import DIVERGENCE_COLUMNS, build_samples
    from data.tasks import prompt_ids
    job, store, ckpt, _, _ = tiny_trained
    table = store.table().set_index(["sample_id", "level"])
    for i in (0, 7):
        sample = build_samples(job.data, tiny_lm.tokenizer)[i]
        ids = prompt_ids(tiny_lm.tokenizer, sample, job.data.chat_template)
        with attach(tiny_lm, ckpt, break_even=None) as handle:
            m = shadow_measurements(handle, ids, 0.9, max_new=sample.max_new_tokens)
        row = table.loc[(sample.sample_id, 0.9)]
        for k in DIVERGENCE_COLUMNS:
            np.testing.assert_allclose(m[k], row[k], rtol=1e-3, atol=1e-6, err_msg=k)
        with attach(tiny_lm, ckpt, break_even=None) as handle:
            assert shadow_measurements(handle, ids, 0.0, max_new=8)["kl_max"] == pytest.approx(0.0, abs=1e-6)


def _divergence_checkpoint(ckpt_dir, tmp_path, threshold: float):
    """The tiny checkpoint as if calibrated by calibrate.py (divergence, a recorded threshold)."""
    import json
    import shutil
    from controller.runtime.checkpoint import RECORD_FILE
    out = tmp_path / "div_ckpt"
    shutil.copytree(ckpt_dir, out)
    record = json.loads((out / RECORD_FILE).read_text())
    record["criterion"] = {**record["criterion"], "name": "divergence", "measure": "kl_mean", "null_quantile": 0.999,
                           "threshold": threshold}
    (out / RECORD_FILE).write_text(json.dumps(record))
    return out


def test_the_hook_falls_back_on_harm_and_only_warns_on_change(tiny_lm, tiny_trained, tmp_path):
    """With the live certificate on: sampled requests are shadow-labeled; a stream whose labels
    show violations above alpha sends every later request dense and says why; a shift alarm alone
    only raises the labeled share."""
    from controller.runtime.hook import attach
    from controller.runtime.shadow import certify_live
    from data.errors import UserError
    job, store, ckpt_dir, _, _ = tiny_trained
    with attach(tiny_lm, ckpt_dir, break_even=None) as handle:
        with pytest.raises(UserError, match="divergence"):   # a gold checkpoint has no label-free threshold
            certify_live(handle)
    ckpt = _divergence_checkpoint(ckpt_dir, tmp_path, threshold=0.0)   # every sparse row a violation
    ids = torch.arange(5, 300)[None]
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        handle.monitor.warmup = 0
        risk = certify_live(handle, p=1.0, p_shift=1.0)
        handle.force_level = 0.9             # every request served sparse, so every label is a violation
        served = 0
        while not risk.harmful and served < 60:
            tiny_lm.model(input_ids=ids + served % 7)
            handle.shadow.drain()
            served += 1
        assert risk.harmful and risk.bounds.total == risk.bounds.n   # all labels were violations
        handle.force_level = None
        tiny_lm.model(input_ids=ids)
        d = handle.last_decisions[0]
        assert d.level == 0.0 and "live violation rate is above alpha" in d.fallback
    ckpt = _divergence_checkpoint(ckpt_dir, tmp_path / "b", threshold=1e9)   # nothing is a violation
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        handle.monitor.warmup = 0
        risk = certify_live(handle, p=0.05, p_shift=0.5)
        handle.monitor.alarm_at, handle.monitor.alarm_by = 1, "a test alarm"   # the traffic "changed"
        tiny_lm.model(input_ids=ids)
        d = handle.last_decisions[0]
        assert risk.shift_warned and risk.p == 0.5 and not risk.harmful
        assert d.fallback is None or "live violation" not in d.fallback
        assert not (d.fallback or "").startswith("a test alarm")   # a change alone sends nothing dense


def _ladder_run(rates, seed, labels=2500, alpha=0.05, delta=0.1, offsets=(0.0, 0.05, 0.2), switch=None):
    """A ladder fed nested Bernoulli violations (a request unsafe at a rung is unsafe at every more
    aggressive one); `switch` = (label, rates): the rates change there. Returns the rungs deployed."""
    from controller.guarantee.risk import ThresholdLadder
    rng = np.random.default_rng(seed)
    ladder, deployed = ThresholdLadder(offsets, alpha, delta), []
    for t in range(labels):
        now = switch[1] if switch is not None and t >= switch[0] else rates
        u = rng.uniform()
        deployed.append(ladder.observe([u < r for r in now]))
    return np.array(deployed), ladder


def test_the_ladder_moves_more_aggressive_only_when_certified():
    """Rung 1 is safe (3% < alpha 5%), rung 2 is not (12%): over 40 seeded streams rung 2 is never
    deployed, and rung 1 is reached in most of them within 2,500 shadow labels."""
    runs = [_ladder_run((0.01, 0.03, 0.12), seed)[0] for seed in range(40)]
    assert not any((d == 2).any() for d in runs)
    assert np.mean([(d == 1).any() for d in runs]) >= 0.9


def test_a_rung_at_exactly_alpha_is_deployed_in_at_most_delta_of_streams():
    runs = [_ladder_run((0.01, 0.05, 0.3), seed)[0] for seed in range(40)]
    assert np.mean([(d >= 1).any() for d in runs]) <= 0.1


def test_a_deployed_rung_that_turns_harmful_is_revoked_at_once_and_for_good():
    deployed, ladder = _ladder_run((0.0, 0.01, 0.3), 0, labels=3000, switch=(1000, (0.0, 0.4, 0.5)))
    up = int(np.argmax(deployed == 1))
    assert 0 < up < 1000 and (deployed[up:1000] == 1).all()   # no false step back while the rung is safe
    back = 1000 + int(np.argmax(deployed[1000:] == 0))
    assert deployed[back] == 0 and (deployed[back:] == 0).all() and ladder.revoked[1]
    assert back - 1000 <= 40   # at a 40% rate the detector reaches its bound in ~15 labels
    with pytest.raises(ValueError, match="start at 0"):
        _ladder_run((0.0, 0.1), 0, offsets=(0.1, 0.2))


def test_the_hook_moves_its_threshold_only_after_the_ladder_certifies_a_rung(tiny_lm, tiny_trained, tmp_path):
    """With `certify_live(ladder=...)` every sampled request is judged at each rung's level; once the
    live labels certify a rung (here nothing is ever a violation), decisions use the lowered
    threshold, and `Decision.threshold` says so. Shadow labels at several levels equal one-level ones."""
    from controller.runtime.hook import attach
    from controller.runtime.shadow import certify_live, shadow_measurements, shadow_measurements_at
    from data.errors import UserError
    _, _, ckpt_dir, _, _ = tiny_trained
    ckpt = _divergence_checkpoint(ckpt_dir, tmp_path, threshold=1e9)
    ids = torch.arange(5, 300)[None]
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        with pytest.raises(UserError, match="start at 0"):
            certify_live(handle, ladder=(0.1, 0.2))
        many = shadow_measurements_at(handle, ids[0].tolist(), [0.5, 0.9], max_new=8)
        assert many[0.9] == pytest.approx(shadow_measurements(handle, ids[0].tolist(), 0.9, max_new=8))
        handle.monitor.warmup = 0
        certify_live(handle, p=1.0, p_shift=1.0, ladder=(0.0, 0.5))
        ladder, served = handle.ladder, 0
        base = []
        while ladder.deployed == 0 and served < 400:
            tiny_lm.model(input_ids=(ids + served) % 1000)
            handle.shadow.drain()
            d = handle.last_decisions[0]
            base.append(d.threshold)
            served += 1
        assert ladder.deployed == 1 and ladder.bounds[1].n == served and ladder.bounds[1].total == 0
        tiny_lm.model(input_ids=(ids + served) % 1000)
        d = handle.last_decisions[0]
        assert d.fallback is None and base[-1] is not None and d.threshold == pytest.approx(base[-1] - 0.5)


def test_the_ladder_replay_serves_the_certified_rung_and_never_an_unsafe_one():
    from controller.guarantee.risk import simulate_ladder
    n = 2000
    levels = np.stack([np.zeros(n, int), np.ones(n, int), np.full(n, 2)], axis=1)   # rung k chooses level index k
    labels = np.ones(n, int)                                                         # level 1 safe, level 2 never
    served, state = simulate_ladder(levels, labels, ALPHA, DELTA, p=1.0, offsets=(0.0, 0.1, 0.2))
    assert served.max() == 1 and state["deployed"] == 1 and (served == 1).sum() > n / 2
    assert (served[:state["moves"][0][0]] == 0).all()   # dense until the first certified move


def test_the_step_back_detector_keeps_its_mean_time_to_a_false_alarm_and_sees_harm_fast():
    """ECusum at a rate of exactly alpha: mean labels to a (false) alarm >= its arl of 1,000, over
    40 seeded streams capped at 20,000 labels; at 40% it alarms within a few dozen labels."""
    from controller.guarantee.risk import ECusum

    def labels_to_alarm(rate, seed, cap=20_000):
        det, rng = ECusum(ALPHA, 1000.0), np.random.default_rng(seed)
        for i, x in enumerate(rng.uniform(size=cap) < rate):
            if det.update(float(x)):
                return i + 1
        return cap
    assert np.mean([labels_to_alarm(ALPHA, seed) for seed in range(40)]) >= 1000
    assert max(labels_to_alarm(0.4, 100 + seed) for seed in range(20)) <= 60
