"""Natural-text requests (issue 29 item 5): the standard-library snapshot, its four tasks, and
label stores joined for a leave-one-group-out run with a natural-text group."""
import ast
import re

import numpy as np
import pytest

from data.errors import UserError
from data.features import PROBE_STATS, TASK_FEATURES, compute_features
from data.tasks import TaskSpec, build_task, generate_sample, prompt_text
from data.tasks.natural import (NATURAL_TASKS, corpus_constants, corpus_entries, corpus_files, corpus_summaries)


def test_the_snapshot_parses_and_its_constants_and_entries_are_unambiguous():
    files = corpus_files()
    assert len(files) >= 80 and all(name.endswith(".py") for name, _ in files)
    for _, lines in files:
        ast.parse("\n".join(lines))   # cut at statement boundaries
    names = [c[1] for c in corpus_constants()]
    assert len(names) >= 30 and len(set(names)) == len(names)
    for file_index, name, value, line in corpus_constants():
        assigned = [i for _, lines in files for i, text in enumerate(lines) if re.match(rf"{name}\s*=", text)]
        assert len(assigned) == 1 and value in files[file_index][1][line]
    firsts = [e[2] for e in corpus_entries()]
    assert len(corpus_entries()) >= 500 and len(set(firsts)) == len(firsts)


@pytest.mark.parametrize("name", NATURAL_TASKS)
@pytest.mark.parametrize("form_set", ["classic", "varied"])
def test_natural_requests_are_deterministic_and_carry_their_answer(tokenizer, name, form_set):
    gen = build_task(TaskSpec(name))
    a = generate_sample(name, gen, tokenizer, 2048, 4, seed=0, form_set=form_set)
    assert a == generate_sample(name, gen, tokenizer, 2048, 4, seed=0, form_set=form_set)
    assert a.input != generate_sample(name, gen, tokenizer, 2048, 5, seed=0, form_set=form_set).input
    text = prompt_text(tokenizer, a)
    if name == "nat_summary":   # the answer is not in the prompt: the docstring it is scored against was removed
        assert a.outputs and all(o == o.lower() and len(o) >= 4 for o in a.outputs)
    else:
        assert a.outputs and all(o in text for o in a.outputs)
    assert a.form.split("/")[0] == gen.haystack
    if name == "nat_chat":   # files arrive as earlier turns, each acknowledged
        assert [r for r, _ in a.history[:4]] == ["user", "assistant", "user", "assistant"]
        assert all(c in text for _, c in a.history)


def test_a_constant_request_asks_for_the_one_assignment_of_its_name(tokenizer):
    for index in range(6):
        s = generate_sample("nat_constant", build_task(TaskSpec("nat_constant")), tokenizer, 1024, index, seed=0)
        name = s.answer_prefix.removeprefix("Answer: ").removesuffix(" =")
        assignments = re.findall(rf"^{name}\s*=\s*(.+)$", s.input, flags=re.M)
        assert len(assignments) == 1 and s.outputs[0] in assignments[0]


def test_an_aggregation_request_lists_every_file_shown(tokenizer):
    counts = []
    for index in range(4):
        s = generate_sample("nat_aggregate", build_task(TaskSpec("nat_aggregate")), tokenizer, 8000, index, seed=0)
        shown = re.findall(r"^### File: (\S+)$", s.input, flags=re.M)
        assert tuple(shown) == s.outputs
        counts.append(len(shown))
    assert max(counts) >= 2


def test_a_summary_request_shows_its_module_without_the_docstring_it_is_scored_on(tokenizer):
    import ast as _ast
    files = dict(corpus_files())
    seen = set()
    for index in range(8):
        s = generate_sample("nat_summary", build_task(TaskSpec("nat_summary")), tokenizer, 2048, index, seed=0)
        name = s.answer_prefix.removeprefix("Answer: ").removesuffix(" is")
        seen.add(name)
        doc = _ast.get_docstring(_ast.parse("\n".join(files[name])))
        first = " ".join(doc.split("\n\n")[0].split())
        assert f"### File: {name}" in s.input and name in s.input.rsplit("\n", 1)[-1]
        assert first[:40] not in " ".join(s.input.split())   # its summary is not shown
        assert all(w in first.lower() and w not in name.lower() for w in s.outputs)
    assert len(seen) >= 4
    assert len(corpus_summaries()) >= 50


def test_a_length_beyond_the_text_is_refused_in_one_line(tokenizer):
    """The docstring reference holds ~30K tokens: a 64K request is refused (the labeler skips it
    with a warning), not grown forever."""
    with pytest.raises(UserError, match="too long for this task"):
        generate_sample("nat_docqa", build_task(TaskSpec("nat_docqa")), tokenizer, 64000, 0, seed=0)


def test_the_controller_sees_natural_requests_as_unknown_tasks(tokenizer):
    s = generate_sample("nat_docqa", build_task(TaskSpec("nat_docqa")), tokenizer, 512, 0, seed=0)
    feats = compute_features(tokenizer(s.input)["input_ids"], {k: 0.0 for k in PROBE_STATS}, s.task)
    assert [k for k in TASK_FEATURES if feats[k] == 1.0] == ["task_unknown"]


def _natural_store(tiny_lm, root, overrides=()):
    from controller.learning.config import ControllerJobConfig
    from data.config import load_config
    from data.runner import run_labeling
    job = load_config(ControllerJobConfig, "configs/test_tiny_controller.yaml",
                      [f"labeling.out={root}", "data.tasks=[{name: nat_constant}, {name: nat_aggregate}]",
                       "data.lengths=[512]", "data.samples_per_length=3", *overrides])
    return run_labeling(job.label_job(), tiny_lm)


def test_stores_labeled_alike_join_and_others_are_refused(tiny_lm, tiny_trained, tmp_path):
    from controller.learning.dataset import arrays_from_stores
    from controller.experiments.holdout import in_group
    base = str(tiny_trained[1].root)
    natural = _natural_store(tiny_lm, tmp_path / "natural")
    arrays, _ = arrays_from_stores([base, str(natural.root)])
    assert len(arrays) == len(tiny_trained[1].done_ids()) + len(natural.done_ids())
    assert in_group(arrays, "family", "natural").sum() == len(natural.done_ids())
    other = _natural_store(tiny_lm, tmp_path / "other", ["labeling.grid=[0.0, 0.5]"])
    with pytest.raises(UserError, match="labeled differently"):
        arrays_from_stores([base, str(other.root)])
    with pytest.raises(UserError, match="share requests"):
        arrays_from_stores([base, base])
