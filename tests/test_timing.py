"""Time saved: decisions priced by a benchmark's measured per-length, per-level table."""
import json

import numpy as np
import pytest

import eval as eval_cli
from controller.learning.timing import TimeTable, find_timings

ROWS = [{"N": 1000, "mode": "dense", "ms": 10.0}, {"N": 4000, "mode": "dense", "ms": 100.0},
        {"N": 1000, "mode": "forced", "level": 0.5, "ms": 12.0, "ms_with_decision": 13.0},
        {"N": 4000, "mode": "forced", "level": 0.5, "ms": 70.0, "ms_with_decision": 72.0},
        {"N": 1000, "mode": "forced", "level": 0.9, "ms": 11.0},
        {"N": 4000, "mode": "forced", "level": 0.9, "ms": 40.0},
        {"N": 4000, "mode": "decided", "level": 0.9, "ms": 1.0}]   # not a forced row: ignored


def test_time_table_prices_levels_at_measured_and_other_lengths():
    t = TimeTable.from_rows(ROWS, "card", "rows")
    assert t.levels == (0.5, 0.9)
    # at measured lengths: the decision-inclusive time where measured, the forced time otherwise
    np.testing.assert_allclose(t.ms([0.0, 0.5, 0.9, 0.5], [1000, 1000, 4000, 4000]), [10.0, 13.0, 40.0, 72.0])
    # a level between measured ones is priced as the one below (never faster than measured); below
    # the lowest measured level it runs dense
    np.testing.assert_allclose(t.ms([0.7, 0.97, 0.3], [4000, 4000, 4000]), [72.0, 40.0, 100.0])
    # log-log interpolation: dense goes 10 -> 100 ms over 1000 -> 4000 tokens, so at 2000: 10 * 10**0.5
    np.testing.assert_allclose(t.dense([2000]), [10 * 10 ** 0.5])
    assert t.ms([0.9], [8000])[0] > 40.0 and t.dense([8000])[0] > 100.0   # extended beyond the table
    assert t.saved([0.0, 0.0], [1000, 4000]) == pytest.approx(0.0)
    assert t.saved([0.9, 0.9], [1000, 4000]) == pytest.approx(1 - 51.0 / 110.0)
    assert t.saved([0.5], [1000]) < 0   # a level slower than dense at that length costs time


def test_time_table_refuses_a_file_without_dense_rows(tmp_path):
    with pytest.raises(ValueError, match="no `dense`"):
        TimeTable.from_rows([r for r in ROWS if r["mode"] != "dense"], "card", "rows")


def test_committed_benchmark_is_found_for_its_model_and_shared_by_its_stretched_variant():
    doc = json.loads(open("sparse_kernels/bench/h200.json").read())
    be = doc["break_even"]
    assert find_timings({"id": be["model_id"]}) is not None
    stretched = {"id": "another-id", "weights_id": be["weights_id"], "rope": {"type": "yarn", "factor": 8.0}}
    assert find_timings(stretched) is not None
    assert find_timings({"id": "nope", "weights_id": "nope"}) is None


def test_eval_reports_time_saved_per_length_from_timings(tiny_trained, tmp_path, capsys):
    _, store, ckpt, _, _ = tiny_trained
    n = sorted(store.table()["n_tokens"].unique())
    rows = [{"N": int(n[0]), "mode": "dense", "ms": 10.0}, {"N": int(n[-1]) + 1, "mode": "dense", "ms": 20.0}]
    levels = sorted(float(x) for x in store.table()["level"].unique() if x > 0)
    rows += [{"N": r["N"], "mode": "forced", "level": lv, "ms": r["ms"] * (1 - lv / 2)} for r in rows[:2] for lv in levels]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "Test Card", "end_to_end": rows}))
    out = tmp_path / "report"
    assert eval_cli.main(["--checkpoint", str(ckpt), "--labels", str(store.root), "--timings", str(bench),
                          "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    c, oracle = metrics["policies"]["controller"], metrics["policies"]["oracle"]
    assert metrics["timings"]["device"] == "Test Card"
    assert oracle["time_saved"] > 0 and np.isfinite(c["time_saved"])
    for m in metrics["policies"].values():   # all dense saves no time; any sparse decision saves some here
        assert (m["time_saved"] == pytest.approx(0.0)) == (m["dense_requests"] == 1.0)
    assert all("time_saved" in m for m in c["per_length"].values())
    report = (out / "report.md").read_text()
    assert "**Time saved: controller" in report and "Test Card" in report and "time saved / violation rate" in report
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert eval_cli.main(["--checkpoint", str(ckpt), "--labels", str(store.root), "--timings", str(bad),
                          "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --timings") and "\n" not in err and not (tmp_path / "r2").exists()


def test_levels_below_their_break_even_are_priced_dense_as_the_hook_serves_them():
    t = TimeTable.from_rows(ROWS, "card", "rows", worth_from={"0.5": 4000, "0.9": 1000})
    np.testing.assert_allclose(t.served([0.5, 0.5, 0.9, 0.7], [1000, 4000, 1000, 1000]), [0.0, 0.5, 0.9, 0.0])
    np.testing.assert_allclose(t.ms([0.5, 0.5], [1000, 4000]), [10.0, 72.0])   # at 1000 tokens 0.5 runs dense
    assert t.saved([0.5], [1000]) == pytest.approx(0.0)


def test_the_certified_line_states_the_time_it_expects_or_why_none(tmp_path, monkeypatch):
    """issue 31 item 2: the demo report gave only compute saved (19.2%) and never said that on the
    recorded card that checkpoint runs every request dense. calibrate.py's `certified:` line now says
    what prefill time its decisions on the calibration requests would save there, or why none."""
    from controller.learning import timing
    from controller.guarantee.recalibrate import expected_time, time_words
    bench = tmp_path / "card.json"
    bench.write_text(json.dumps({"device": "Card X", "end_to_end": ROWS,
                                 "break_even": {"levels": {"0.5": 4000, "0.9": 1000}, "source": "measured"}}))
    monkeypatch.setattr(timing, "find_timings", lambda fp: bench)
    fast = expected_time({"id": "m"}, np.array([0.9, 0.9]), np.array([1000, 4000]))
    assert fast["device"] == "Card X" and fast["time_saved"] == pytest.approx(1 - 51.0 / 110.0)
    assert time_words(fast, 0.5) == f"; expected prefill time saved on Card X ({bench}): 53.6%"
    short = expected_time({"id": "m"}, np.array([0.5]), np.array([1000]))   # below 0.5's break-even: dense
    assert short["time_saved"] == pytest.approx(0.0)
    assert "no prefill time saved is expected on Card X" in time_words(short, 0.3)
    monkeypatch.setattr(timing, "find_timings", lambda fp: None)
    assert expected_time({"id": "m"}, np.array([0.9]), np.array([1000])) is None
    assert "time saved is unknown" in time_words(None, 0.3)
