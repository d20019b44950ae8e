"""The stream monitor: few false alarms on exchangeable streams, quick alarms on shifted ones, and
the hook running every later request at the fallback once it has alarmed."""
import numpy as np
import torch

from controller.guarantee.guard import monitor_stream
from controller.runtime.hook import attach
from controller.guarantee.monitor import ShiftMonitor
from data.labeling import build_samples
from data.tasks import prompt_ids


def test_false_alarms_stay_near_one_over_the_threshold():
    rng = np.random.default_rng(11)
    alarms = [ShiftMonitor(threshold=20).run(rng.uniform(size=400)).any() for _ in range(600)]
    assert np.mean(alarms) <= 1 / 20 + 0.02   # Ville: at most 1/threshold (+ sampling error)
    super_uniform = [ShiftMonitor(threshold=20).run(np.sqrt(rng.uniform(size=400))).any() for _ in range(200)]
    assert np.mean(super_uniform) <= 0.02     # conservative p-values alarm even less


def test_small_p_values_alarm_within_a_few_dozen_requests():
    rng = np.random.default_rng(12)
    for high in (0.3, 0.5):
        at = [ShiftMonitor().run(rng.uniform(0, high, size=300)).argmax() + 1 for _ in range(20)]
        assert max(at) <= 40, (high, at)
    m = ShiftMonitor()
    m.run(np.full(50, 0.01))
    assert m.alarmed and "traffic shift" in m.reason()
    m.reset()
    assert not m.alarmed and m.seen == 0 and m.capital == 1.0


def test_offline_stream_follows_a_seeded_order(tiny_trained):
    job, store, ckpt_dir, net, _ = tiny_trained
    from controller.runtime.checkpoint import load_checkpoint
    guard = load_checkpoint(ckpt_dir).guard
    feats = store.table().query("level == 0")[[c for c in store.table().columns if c.startswith("f_")]].to_numpy()
    a, state = monitor_stream(guard, feats, seed=3)
    b, _ = monitor_stream(guard, feats, seed=3)
    assert np.array_equal(a, b) and state["seen"] == len(feats)


def test_hook_runs_every_request_at_the_fallback_after_an_alarm(tiny_lm, tiny_trained):
    job, _, ckpt, _, _ = tiny_trained
    sample = build_samples(job.data, tiny_lm.tokenizer)[0]
    ids = torch.tensor([prompt_ids(tiny_lm.tokenizer, sample, job.data.chat_template)])
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        tiny_lm.model(input_ids=ids)
        before = handle.last_decisions[0]
        assert handle.monitor.seen == 1 and "traffic shift" not in (before.fallback or "")
        handle.monitor = ShiftMonitor(threshold=1.0 + 1e-9)   # alarms on any p-value below 1/2
        handle.monitor.update(0.0)
        for _ in range(2):
            tiny_lm.model(input_ids=ids)
            d = handle.last_decisions[0]
            assert d.ood and d.level == handle.guard.fallback and "traffic shift" in d.fallback
        handle.monitor.reset()
        tiny_lm.model(input_ids=ids)
        assert handle.last_decisions[0].level == before.level


def test_a_window_of_concentrated_traffic_alarms_and_exchangeable_windows_do_not():
    from controller.guarantee.guard import two_sample_test
    rng = np.random.default_rng(13)
    reference = rng.normal(size=(600, 4))

    def monitor():
        return ShiftMonitor(window=50, window_test=lambda f: two_sample_test(reference, f)["p_value"])
    # one mode of the reference distribution: every p-value looks ordinary, the window does not
    mode = reference[reference[:, 0] > 0.8][:50] + rng.normal(scale=0.05, size=(50, 4))
    m = monitor()
    assert m.run(np.full(50, 0.6), mode)[-1] and "window 1" in m.alarm_by and "recent requests differ" in m.reason()
    false = 0
    for _ in range(5):
        m = monitor()
        false += m.run(rng.uniform(size=150), rng.normal(size=(150, 4))).any()
        assert len(m.windows) == 3
    assert false == 0


def test_warmup_holds_the_first_requests_of_a_stream_at_the_fallback():
    """Probation: the first `warmup` requests (after a reset too) run at the fallback whatever their
    p-values; later ones only if the monitor has alarmed."""
    m = ShiftMonitor(warmup=3)
    held = m.run(np.full(6, 0.9))
    assert held.tolist() == [True, True, True, False, False, False] and not m.alarmed
    assert [m.step(0.9)[1] for _ in range(2)] == [None, None]
    m.reset()
    assert m.step(0.9) == (False, 1) and "probation: request 1 of the first 3" in m.probation_reason(1)
    assert ShiftMonitor().run(np.full(4, 0.9)).tolist() == [False] * 4   # no warm-up by default
    m = ShiftMonitor(threshold=1.0 + 1e-9, warmup=1)
    held = m.run(np.array([0.9, 0.0, 0.0, 0.0, 0.9]))
    assert held[0] and m.alarm_at > 1 and held[m.alarm_at - 1:].all()   # probation, then the alarm holds


def test_hook_runs_the_first_requests_of_a_stream_at_the_fallback_on_probation(tiny_lm, tiny_trained):
    job, _, ckpt, _, _ = tiny_trained
    sample = build_samples(job.data, tiny_lm.tokenizer)[0]
    ids = torch.tensor([prompt_ids(tiny_lm.tokenizer, sample, job.data.chat_template)])
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        handle.force_level = None
        tiny_lm.model(input_ids=ids)
        free = handle.last_decisions[0]
        handle.monitor = ShiftMonitor(warmup=2)
        for place in (1, 2):
            tiny_lm.model(input_ids=ids)
            d = handle.last_decisions[0]
            assert d.level == handle.guard.fallback and not d.ood and f"probation: request {place} of the first 2" in d.fallback
            assert d.p_value is not None
        tiny_lm.model(input_ids=ids)
        after = handle.last_decisions[0]
        assert "probation" not in (after.fallback or "") and after.level == free.level and after.probability == free.probability


def test_the_guard_records_its_warmup_and_older_records_have_none(tiny_trained):
    from controller.runtime.checkpoint import load_checkpoint
    from controller.guarantee.guard import ShiftGuard
    ck = load_checkpoint(tiny_trained[2])
    record = ck.guard.to_json()
    n, levels = ck.guard.reference.shape[1], ck.levels
    assert ShiftGuard.from_json({**record, "warmup": 7}, n, levels).monitor().warmup == 7
    older = {k: v for k, v in record.items() if k != "warmup"}
    assert ShiftGuard.from_json(older, n, levels).warmup == 0 and ck.guard.monitor().warmup == ck.guard.warmup


def test_the_report_says_how_many_requests_ran_on_probation(tiny_trained):
    from controller.learning.dataset import arrays_from_store
    from controller.runtime.checkpoint import load_checkpoint
    from controller.learning.pipeline import shift_report
    _, store, ckpt_dir, _, _ = tiny_trained
    ck = load_checkpoint(ckpt_dir)
    arrays, _ = arrays_from_store(str(store.root))
    assert "probation" not in shift_report(ck, arrays)["words"]
    ck.record["guard"]["warmup"] = 5
    words = shift_report(ck, arrays)["words"]
    assert f"Its first {min(5, len(arrays))} requests ran at the fallback level on probation" in words


def test_recalibration_keeps_the_warmup_and_its_certified_line_names_it(tiny_trained):
    from controller.learning.dataset import arrays_from_store
    from controller.runtime.checkpoint import load_checkpoint
    from controller.guarantee.recalibrate import certified_line, recalibrate
    from data.store import criterion_dict
    _, store, ckpt_dir, _, _ = tiny_trained
    ck = load_checkpoint(ckpt_dir)
    arrays, _ = arrays_from_store(str(store.root))
    plain = recalibrate(ck, arrays, 0.3, 0.3, criterion_dict(ck.record["criterion"]), {"source": "test"})
    assert plain.guard.warmup == 0 and "warm-up" not in certified_line(plain)
    ck.record["guard"]["warmup"] = 7
    r = recalibrate(ck, arrays, 0.3, 0.3, criterion_dict(ck.record["criterion"]), {"source": "test"})
    assert r.guard.warmup == 7 and r.record["guard"]["warmup"] == 7
    line = certified_line(r)
    assert line.startswith("certified: on traffic") and "first 7 requests of every stream (warm-up)" in line, line
