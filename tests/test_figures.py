"""The length finding: bootstrap intervals, the table, and the PNG written into the store."""
import numpy as np
import pandas as pd
import pytest

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


@pytest.mark.parametrize("controller,mass,words", [
    (0.0, 0.0, "neither saves anything, so there is no ratio."),
    (0.2, 0.0, "the controller saves something where it saves nothing."),
    (0.2, 0.1, "the controller saves 2.00x as much."),
])
def test_the_mass_coverage_goal_line_is_a_sentence(controller, mass, words):
    """issue 31 item 8: with neither policy saving anything the report line ended "the controller -."."""
    from controller.learning.report import goal_lines
    policy = {"compute_saved": 0.0, "violation_rate": 0.0}
    metrics = {"alpha": 0.05, "policies": {"controller": {**policy, "compute_saved": controller}, "fixed": policy,
                                           "length_law": policy, "oracle": {**policy, "compute_saved": 0.5},
                                           "mass_coverage": {**policy, "compute_saved": mass}},
               "goals": {"controller_violation_le_alpha": True, "ratio_to_fixed": None, "share_of_oracle": None,
                         "ratio_to_mass_coverage": controller / mass if mass > 0 else None}}
    line = goal_lines(metrics)[-1]
    assert line.endswith(words) and " -." not in line, line


def test_a_long_plot_title_stays_inside_the_figure(tmp_path):
    """issue 31 item 8: one plot's title (the model header) ran off the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from data.figures import wrapped_title
    title = "Model smollm2-135m (56654efe82e4bd9c), block_topk block 64, grid [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97] " * 2
    fig, ax = plt.subplots(figsize=(7, 4.5))
    text = ax.set_title(wrapped_title(title), fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    box, frame = text.get_window_extent(), fig.bbox
    plt.close(fig)
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
    assert wrapped_title(title).replace("\n", " ") == " ".join(title.split())
