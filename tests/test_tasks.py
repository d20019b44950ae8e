"""Generators (deterministic, sized in tokens, answers present), scoring, RULER reader."""
import json

import pytest

from data.errors import UserError
from data.tasks.natural import NATURAL_TASKS
from data.tasks import (TASK_TYPES, TASKS, TaskSpec, build_task, generate_sample, prompt_ids, read_ruler, score,
                        task_type_of, write_ruler)
from data.tasks.scoring import string_match_all, string_match_part


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic_per_seed(tokenizer, name):
    g = build_task(TaskSpec(name))
    a = generate_sample(name, g, tokenizer, 512, 0, seed=7)
    b = generate_sample(name, build_task(TaskSpec(name)), tokenizer, 512, 0, seed=7)
    c = generate_sample(name, g, tokenizer, 512, 0, seed=8)
    assert a == b
    assert a.input != c.input


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("length", [512, 1000, 2048, 8000])
def test_generators_hit_target_length_within_5_percent(tokenizer, name, length):
    s = generate_sample(name, build_task(TaskSpec(name)), tokenizer, length, 1, seed=0)
    n = len(prompt_ids(tokenizer, s))
    assert abs(n - length) <= 0.05 * length, f"{name}: {n} tokens for target {length}"
    assert s.task in (*TASK_TYPES, *NATURAL_TASKS) and s.outputs


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_are_recoverable_from_the_input(tokenizer, name):
    s = generate_sample(name, build_task(TaskSpec(name)), tokenizer, 1024, 2, seed=1)
    if name == "fwe":  # the answer is a count, not a string in one place
        assert all(s.input.count(f" {w} ") >= s.input.count(" ....") // 20 for w in s.outputs)
    else:   # a conversation's documents are in its earlier turns
        assert all(o in s.input + "".join(content for _, content in s.history) for o in s.outputs)
    assert score(s.metric, " " + ", ".join(s.outputs), s.outputs) == 1.0


def test_scoring_matches_ruler():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("Only 123\nhere", ["123", "456"]) == 0.5
    assert string_match_all("nothing", ["123"]) == 0.0
    assert string_match_part("It is PARIS.", ["paris", "rome"]) == 1.0
    assert string_match_part("It is Berlin.", ["paris", "rome"]) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_ruler_round_trip(tokenizer, tmp_path):
    samples = [generate_sample(n, build_task(TaskSpec(n)), tokenizer, 300, 0, 0) for n in ("niah_single", "vt", "qa")]
    folder = tmp_path / "ruler"
    for s in samples:
        (folder / s.task).mkdir(parents=True)
        write_ruler([s], folder / s.task / "validation.jsonl")
    back = {s.task: s for s in read_ruler(folder)}
    for s in samples:
        r = back[s.task]
        assert (r.input, r.outputs, r.answer_prefix, r.target_length, r.metric) == \
               (s.input, s.outputs, s.answer_prefix, s.target_length, s.metric)
        assert r.sample_id == f"ruler:{s.task}/validation.jsonl:1"


def test_ruler_keys_by_file_and_line_and_ignores_extra_fields(tmp_path):
    f = tmp_path / "niah_multikey_2.jsonl"
    rows = [{"index": 0, "input": "a", "outputs": ["1"], "length": 10, "extra": 1},
            {"index": 0, "input": "b", "outputs": ["2"], "length": 12, "answer_prefix": "A:"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = read_ruler(f)
    assert [s.sample_id for s in samples] == ["ruler:niah_multikey_2.jsonl:1", "ruler:niah_multikey_2.jsonl:2"]
    assert {s.task for s in samples} == {"niah_multikey"} and samples[1].answer_prefix == "A:"


@pytest.mark.parametrize("line,msg", [
    ("{not json", "not valid JSON"),
    ('{"input": "x", "length": 3}', "missing field"),
    ('{"input": "x", "outputs": [], "length": 3}', "non-empty list"),
    ('{"input": "x", "outputs": ["a"], "length": "3"}', "must be an integer"),
    ("[1, 2]", "JSON object"),
])
def test_malformed_ruler_lines_name_file_and_line(tmp_path, line, msg):
    f = tmp_path / "vt.jsonl"
    f.write_text('{"input": "ok", "outputs": ["a"], "length": 3}\n' + line + "\n")
    with pytest.raises(UserError, match=f"vt.jsonl:2: .*{msg}"):
        read_ruler(f)


@pytest.mark.parametrize("path,task", [("x/niah_single_1/validation.jsonl", "niah_single"), ("x/vt/validation.jsonl", "vt"),
                                       ("cwe.jsonl", "cwe"), ("a/qa_2/validation.jsonl", "qa"),
                                       ("x/fwe/test.jsonl", "fwe"), ("x/mystery/data.jsonl", "unknown")])
def test_task_type_from_ruler_paths(path, task):
    from pathlib import Path
    assert task_type_of(Path(path)) == task


def test_unknown_task_and_too_short_target(tokenizer):
    with pytest.raises(UserError, match="unknown task"):
        build_task(TaskSpec("nope"))
    with pytest.raises(UserError, match="too short"):
        generate_sample("qa", build_task(TaskSpec("qa")), tokenizer, 40, 0, 0)


def test_openai_style_messages_lines_keep_the_whole_conversation(tmp_path, tokenizer):
    """issue 31 item 8: `calibrate.py --prompts` accepts OpenAI-style `messages` JSONL; the chat
    template is applied to the whole conversation, the last user turn being the request."""
    import json as _json

    from data.errors import UserError
    from data.tasks import read_prompts
    from data.tasks.base import prompt_text
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    f = tmp_path / "chat.jsonl"
    f.write_text(_json.dumps({"messages": turns}) + "\n")
    (s,) = read_prompts(f)
    assert s.input == "What is 2+2?" and s.history == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))
    assert prompt_text(tokenizer, s) == tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    for bad, words in ((turns[:-1], "must be the user's turn"), ([{"role": "robot", "content": "x"}], "role one of"),
                       ([], "non-empty list")):
        f.write_text(_json.dumps({"messages": bad}) + "\n")
        with pytest.raises(UserError, match=words):
            read_prompts(f)
