"""The length finding: bootstrap intervals, the table, and the PNG written into the store."""
import numpy as np
import pandas as pd

from data.figures import bootstrap_ci, label_vs_length, write_length_finding
from data.store import LabelStore


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.random(10), rng.random(1000)
    lo, hi = bootstrap_ci(small)
    assert lo <= small.mean() <= hi
    lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < hi - lo
    assert bootstrap_ci(np.array([0.5])) == (0.5, 0.5)


def test_table_pools_tasks_and_counts_samples():
    labels = pd.DataFrame({"sample_id": list("abcd"), "task": ["vt", "vt", "qa", "qa"],
                           "target_length": [512, 512, 512, 1024], "label": [0.5, 0.7, 0.9, 0.0],
                           "label_achieved": [0.4, 0.5, 0.6, 0.0]})
    t = label_vs_length(labels).set_index(["task", "target_length"])
    assert t.loc[("vt", 512), "n"] == 2 and t.loc[("vt", 512), "mean_label"] == 0.6
    assert t.loc[("all", 512), "n"] == 3 and t.loc[("all", 512), "mean_achieved_at_label"] == 0.5


def test_committed_store_gives_a_figure(tmp_path):
    import shutil
    src = LabelStore("data/labels/smollm2-135m/v1")
    shutil.copytree(src.root, tmp_path / "s")
    md, png = write_length_finding(LabelStore(tmp_path / "s"))
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "| all " in md.read_text()
