"""Never destroy a user's data: output folders, interrupted backfills and adoptions, concurrent
attach, memory checks. Each test fails on the code before this rule was enforced."""
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import calibrate as calibrate_cli
import eval as eval_cli
import train
from controller.runtime.checkpoint import export_checkpoint, load_checkpoint
from data.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo_smollm2.yaml")


def tree(path: Path) -> dict:
    """{relative path: bytes} of every file under `path` (what must survive a refused command)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert all(n in err for n in needles), err
    return err


@pytest.fixture
def workspace(tiny_trained, tiny_lm, tmp_path):
    """A user's folder holding a run (with the input checkpoint), prompts, a store and notes."""
    from tests.test_trust import write_prompts
    _, store, ckpt, _, _ = tiny_trained
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent, run, ignore=shutil.ignore_patterns("report"))
    (run / "notes.txt").write_text("my notes")
    prompts = tmp_path / "prompts" / "p.jsonl"
    prompts.parent.mkdir()
    write_prompts(tiny_lm.tokenizer, prompts, 24)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    return {"run": run, "ckpt": run / "checkpoint", "prompts": prompts, "store": Path(store.root), "mine": mine,
            "root": tmp_path}


def test_calibrate_never_writes_into_a_folder_it_did_not_make(workspace, capsys, monkeypatch):
    w = workspace
    before = tree(w["root"])
    cases = [([], w["mine"], "exists and is not a checkpoint"),
             ([], w["run"], "contains the input checkpoint"),
             ([], w["prompts"].parent, "contains the prompts"),
             ([], w["store"], "the checkpoint's training label store"),
             ([], w["ckpt"] / "sub", "lies inside the input checkpoint"),
             (["--overwrite"], w["mine"], "exists and is not a checkpoint"),
             (["--overwrite"], w["run"], "contains the input checkpoint"),
             (["--labels", str(w["root"] / "new")], w["root"] / "new", "the label store"),
             (["--labels", str(w["mine"])], w["root"] / "c2", "is not a label store"),
             (["--labels", str(w["ckpt"])], w["root"] / "c2", "is the input checkpoint"),
             (["--labels", str(w["store"])], w["root"] / "c2", "is the checkpoint's training label store")]
    for extra, out, needle in cases:
        code = calibrate_cli.main(["--checkpoint", str(w["ckpt"]), "--prompts", str(w["prompts"]), "--out", str(out),
                                   *extra])
        one_line_error(capsys, code, needle)
        assert tree(w["root"]) == before, (extra, out)
    monkeypatch.chdir(w["mine"])
    for out in (".", "..", "/"):
        code = calibrate_cli.main(["--checkpoint", str(w["ckpt"]), "--prompts", str(w["prompts"]), "--out", out])
        one_line_error(capsys, code, "current folder or one above it")
    assert tree(w["root"]) == before


def test_calibrate_replaces_only_its_own_checkpoint_and_only_with_overwrite(workspace, capsys):
    w = workspace
    out = w["root"] / "c2"
    args = ["--checkpoint", str(w["ckpt"]), "--prompts", str(w["prompts"]), "--out", str(out), "--policy", "controller"]
    assert calibrate_cli.main(args) == 0
    capsys.readouterr()   # that run's output (progress lines included): the refusals below print one line each
    first = (out / "controller.json").read_text()
    one_line_error(capsys, calibrate_cli.main(args), "pass --overwrite")
    assert (out / "controller.json").read_text() == first
    assert calibrate_cli.main([*args, "--overwrite", "--alpha", "0.3"]) == 0   # the store is resumed, not relabeled
    capsys.readouterr()
    assert load_checkpoint(out).record["alpha"] == 0.3
    (out / "mine.txt").write_text("keep")
    one_line_error(capsys, calibrate_cli.main([*args, "--overwrite"]), "mine.txt", "did not write")
    assert (out / "mine.txt").read_text() == "keep" and load_checkpoint(out).record["alpha"] == 0.3
    assert not [p for p in w["root"].iterdir() if p.name.startswith(".")]


def test_export_never_replaces_or_deletes_a_users_folder(tiny_trained, tmp_path):
    ckpt = load_checkpoint(tiny_trained[2])
    target = tmp_path / "ckpt"
    for beside in (".tmp", ".old"):   # the names the old export deleted without looking
        (tmp_path / f"ckpt{beside}").mkdir()
        (tmp_path / f"ckpt{beside}" / "data.csv").write_text("mine")
    export_checkpoint(target, ckpt.net, ckpt.record)
    export_checkpoint(target, ckpt.net, ckpt.record)   # replacing our own is fine
    assert load_checkpoint(target).record["alpha"] == ckpt.record["alpha"]
    assert all((tmp_path / f"ckpt{b}" / "data.csv").read_text() == "mine" for b in (".tmp", ".old"))
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.txt").write_text("mine")
    with pytest.raises(UserError, match="not a checkpoint"):
        export_checkpoint(user, ckpt.net, ckpt.record)
    assert tree(user) == {"a.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.old", "ckpt.tmp", "user"]


def test_eval_never_writes_into_a_folder_it_did_not_make(workspace, capsys, monkeypatch):
    w = workspace
    before = tree(w["root"])
    base = ["--checkpoint", str(w["ckpt"])]
    cases = [(["--prompts", str(w["prompts"])], w["mine"], "exists and is not a report"),
             (["--prompts", str(w["prompts"]), "--overwrite"], w["mine"], "exists and is not a report"),
             (["--prompts", str(w["prompts"])], w["ckpt"] / "eval", "lies inside the input checkpoint"),
             (["--prompts", str(w["prompts"])], w["run"], "contains the input checkpoint"),
             (["--prompts", str(w["prompts"])], w["prompts"].parent, "contains the --prompts input"),
             (["--labels", str(w["store"])], w["store"] / "eval", "lies inside"),
             (["--labels", str(w["store"])], w["store"], "is the checkpoint's training label store")]
    for extra, out, needle in cases:
        one_line_error(capsys, eval_cli.main([*base, *extra, "--out", str(out)]), needle)
        assert tree(w["root"]) == before, (extra, out)
    monkeypatch.chdir(w["mine"])
    one_line_error(capsys, eval_cli.main([*base, "--labels", str(w["store"]), "--out", "."]), "current folder")
    monkeypatch.undo()
    report = w["root"] / "report"
    assert eval_cli.main([*base, "--labels", str(w["store"]), "--out", str(report)]) == 0
    capsys.readouterr()
    one_line_error(capsys, eval_cli.main([*base, "--labels", str(w["store"]), "--out", str(report)]), "pass --overwrite")
    assert eval_cli.main([*base, "--labels", str(w["store"]), "--out", str(report), "--overwrite"]) == 0
    assert tree(w["root"] / "mine") == {"thesis.tex": b"years of work"}


def test_train_never_writes_into_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "stock.csv").write_text("1,2")
    before = tree(tmp_path)
    cases = [([f"out={mine}"], "thesis.tex"),
             ([f"out={mine}", "--overwrite"], "thesis.tex"),
             ([f"out={tmp_path / 'r'}", "labels=null", f"labeling.out={tmp_path / 'r' / 'checkpoint'}"],
              "the run's checkpoint folder"),
             ([f"out={tmp_path / 'r'}", "labels=null", f"labeling.out={tmp_path / 'shop'}"], "is not a label store")]
    for args, needle in cases:
        one_line_error(capsys, train.main(["--config", DEMO, *args]), needle)
        assert tree(tmp_path) == before, args
    one_line_error(capsys, train.main(["--config", DEMO, f"out={ROOT / 'data/labels/smollm2-135m/v2/run'}"]),
                   "lies inside the label store")


def _tiny_job(tmp_path, name="s", extra=()):
    from controller.learning.config import ControllerJobConfig
    from data.config import load_config
    return load_config(ControllerJobConfig, "configs/test_tiny.yaml", [f"labeling.out={tmp_path / name}", *extra]).label_job()


class Killed(BaseException):
    """A kill between two file-system steps (nothing in the code under test catches it)."""


def kill_at(monkeypatch, step: int) -> list:
    """Make the `step`-th rename or tree deletion raise Killed before it happens; returns the log."""
    import os
    calls = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def counted(real, name):
        def f(*a, **k):
            calls.append((name, str(a[0])))
            if len(calls) - 1 == step:
                raise Killed(name)
            return real(*a, **k)
        return f
    monkeypatch.setattr(os, "replace", counted(real_replace, "replace"))
    monkeypatch.setattr(shutil, "rmtree", counted(real_rmtree, "rmtree"))
    return calls


def _rows(root) -> "object":
    from data.store import LabelStore
    t = LabelStore(root).table()
    return t.drop(columns=[c for c in t.columns if c.startswith("f_")]).sort_values(["sample_id", "level"]).reset_index(drop=True)


def test_a_kill_at_any_step_of_backfill_then_a_rerun_keeps_every_row(tiny_lm, tmp_path, monkeypatch):
    import pandas as pd

    from data.backfill import backfill_store
    from data.features import FEATURE_VERSION
    from data.runner import run_labeling
    from data.store import LabelStore
    pristine = run_labeling(_tiny_job(tmp_path), tiny_lm).root
    want = _rows(pristine)
    quiet = dict(log=lambda *_: None, text_only=True)
    step = 0
    while True:
        root = tmp_path / f"k{step}"
        shutil.copytree(pristine, root)
        with monkeypatch.context() as m:
            calls = kill_at(m, step)
            try:
                backfill_store(str(root), "cpu", "float32", **quiet)
                killed = False
            except Killed:
                killed = True
        if killed:   # the store may be mid-swap now: a rerun finishes or undoes it
            backfill_store(str(root), "cpu", "float32", **quiet)
        pd.testing.assert_frame_equal(_rows(root), want)
        meta = LabelStore(root).meta()
        assert meta["identity"]["feature_version"] == FEATURE_VERSION and meta["features_backfilled"]
        assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in Path(pristine).iterdir()), step
        if not killed:
            break
        step += 1
    assert step >= 4 and [c[0] for c in calls].count("replace") >= 3   # every rename of the swap was a kill point


def test_a_store_left_mid_swap_by_the_old_backfill_is_recovered_not_relabeled(tiny_lm, tmp_path, capsys):
    """The old code, killed between its two renames, left the rows only in shards.old/."""
    import pandas as pd

    from data.backfill import main as backfill_main
    from data.runner import run_labeling
    from data.store import LabelStore
    root = run_labeling(_tiny_job(tmp_path), tiny_lm).root
    want = _rows(root)
    (root / "shards").rename(root / "shards.old")
    (root / "shards.backfill.tmp").mkdir()
    with pytest.raises(UserError, match="rerun `python -m data.backfill"):
        LabelStore(root).table()
    assert backfill_main(["--store", str(root), "--text-only"]) == 0
    pd.testing.assert_frame_equal(_rows(root), want)
    (root / "shards").rename(root / "shards.old")   # a labeling run finishes it too, and labels nothing anew
    job = _tiny_job(tmp_path)
    run_labeling(job, tiny_lm)
    pd.testing.assert_frame_equal(_rows(root), want)


def test_backfill_and_adopt_honour_a_live_lock_and_a_writer_that_ignored_it(tiny_lm, tmp_path, capsys):
    from data.adopt import main as adopt_main
    from data.backfill import main as backfill_main
    from data.runner import run_labeling
    from data.store import BUILD_DIR, StoreLock, swap_in_shards
    root = run_labeling(_tiny_job(tmp_path), tiny_lm).root
    before = tree(root)
    with StoreLock(root):   # this process is alive: its lock is live
        one_line_error(capsys, backfill_main(["--store", str(root), "--text-only"]), "is being written by pid")
        code = adopt_main(["--source", str(root), "--config", "configs/test_tiny.yaml",
                           f"labeling.out={tmp_path / 'v2'}", "data.forms=[classic,varied]"])
        one_line_error(capsys, code, "is being written by pid")
    assert tree(root) == before and not (tmp_path / "v2").exists()
    build = root / BUILD_DIR
    shutil.copytree(root / "shards", build)
    late = root / "shards" / "part-r000-99999.parquet"   # a labeler's shard that landed meanwhile
    shutil.copyfile(next((root / "shards").glob("*.parquet")), late)
    with pytest.raises(UserError, match="shards changed while the backfill ran"):
        swap_in_shards(root, build, json.loads((root / "meta.json").read_text()))
    assert late.is_file() and not build.exists()


def test_a_kill_at_any_step_of_adopt_then_a_rerun_keeps_every_row(tiny_lm, tmp_path, monkeypatch):
    import pandas as pd

    from data.adopt import adopt_store
    from data.runner import run_labeling
    source = run_labeling(_tiny_job(tmp_path, "v1", ["data.forms=[classic]"]), tiny_lm).root
    before, want = tree(source), _rows(source)
    for step in range(8):
        job = _tiny_job(tmp_path, f"v2_{step}", ["data.forms=[classic, varied]"])
        with monkeypatch.context() as m:
            kill_at(m, step)
            try:
                adopt_store(source, job)
                killed = False
            except Killed:
                killed = True
        store = adopt_store(source, job)   # a rerun completes it, or reports the finished adoption
        assert tree(source) == before
        got = _rows(store.root)
        assert len(got) == len(want) and set(got["sample_id"]) == set(want["sample_id"])
        if not killed:
            break
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_concurrent_attach_on_one_model_one_wins_and_detach_restores_it(tiny_lm, tiny_trained, gen):
    from controller.runtime.hook import attach
    model = tiny_lm.model
    ids = torch.randint(0, 1000, (1, 300), generator=gen)
    unhooked = model(input_ids=ids).logits
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    impl = model.config._attn_implementation
    for trial in range(4):
        start, handles, errors = threading.Barrier(6), [], []

        def go():
            start.wait()
            try:
                handles.append(attach(tiny_lm, tiny_trained[2], break_even=None))
            except UserError as e:
                errors.append(str(e))
        threads = [threading.Thread(target=go) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(handles) == 1 and len(errors) == 5 and all("already has a controller" in e for e in errors), trial
        handles[0].detach()
        handles[0].detach()
        assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
        assert model.config._attn_implementation == impl
        assert torch.equal(model(input_ids=ids).logits, unhooked)


def _prompt_file(path: Path, words: int, n: int) -> Path:
    """`n` prompts of `words` words (about 2.9 tokens each)."""
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(f"w{(i * 7 + j) % 97}" for j in range(words))
            f.write(json.dumps({"input": text, "answer_prefix": "Answer:"}) + "\n")
    return path


def test_prompts_count_in_the_memory_floor_and_beyond_the_window_are_refused(tiny_lm, tiny_trained, tmp_path,
                                                                              capsys, monkeypatch):
    from data import runner
    from data.config import DataConfig, LabelJobConfig, LabelingConfig
    ckpt = tiny_trained[2]
    long = _prompt_file(tmp_path / "long.jsonl", 1700, n=24)
    job = LabelJobConfig(data=DataConfig(tasks=(), prompts=(str(long),)),
                         labeling=LabelingConfig(grid=(0.0, 0.5, 0.9), batch_samples=16, out=str(tmp_path / "x")))
    lengths = [n for n, _ in runner.request_lengths(job, tiny_lm, runner.plan_samples(job.data))]
    assert 4500 < min(lengths) and max(lengths) < 8192
    weights = sum(p.numel() * p.element_size() for p in tiny_lm.model.parameters())
    kv = 3 * sum(lengths[:16]) * 2 * 4 * 2 * 16 * 4   # rows x tokens x (k, v) x layers x kv heads x head dim x fp32
    assert runner.labeling_bytes(job, tiny_lm, lengths) >= weights + kv
    monkeypatch.setattr(runner, "device_memory_bytes", lambda dev: weights + kv // 2)   # less than that floor
    out = tmp_path / "c"
    code = calibrate_cli.main(["--checkpoint", str(ckpt), "--prompts", str(long), "--out", str(out),
                               "--batch-samples", "16"])
    one_line_error(capsys, code, "needs at least", "batch")
    monkeypatch.undo()
    huge = _prompt_file(tmp_path / "huge.jsonl", 3200, n=24)
    code = calibrate_cli.main(["--checkpoint", str(ckpt), "--prompts", str(huge), "--out", str(out)])
    one_line_error(capsys, code, "longer than", "window of 8192 tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.jsonl", "long.jsonl"]


@pytest.mark.parametrize("oom", [
    torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    RuntimeError("Triton Error [CUDA]: out of memory (simulated)"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` (simulated)")],
    ids=["torch", "triton", "cublas"])
def test_a_batch_out_of_memory_is_halved_and_one_sample_that_never_fits_stops_in_one_line(tiny_lm, tmp_path,
                                                                                           monkeypatch, capsys, oom):
    """issue 30 item 2: a Triton launch or cuBLAS out of memory is a plain RuntimeError, which escaped
    the halving (calibrate.py --batch-samples 16 died with a CUDA out-of-memory traceback)."""
    import pandas as pd

    from data.labeling import Labeler
    from data.runner import run_labeling
    from data.store import LabelStore
    want = _rows(run_labeling(_tiny_job(tmp_path, "one", ["labeling.batch_samples=1"]), tiny_lm).root)
    real = Labeler._decode
    sizes = []

    def small_memory(self, pre):
        sizes.append(len(pre))
        if len(pre) > 1:
            raise oom
        return real(self, pre)
    monkeypatch.setattr(Labeler, "_decode", small_memory)
    got = _rows(run_labeling(_tiny_job(tmp_path, "four", ["labeling.batch_samples=4"]), tiny_lm).root)
    pd.testing.assert_frame_equal(got[["sample_id", "level"]], want[["sample_id", "level"]])
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}   # halved once, then batches that fit
    calls = []

    def one_fits(self, pre):
        calls.append(len(pre))
        if len(calls) > 1:
            raise oom
        return real(self, pre)
    monkeypatch.setattr(Labeler, "_decode", one_fits)
    code = train.main(["--config", "configs/test_tiny.yaml", f"labeling.out={tmp_path / 'oom'}",
                       "labeling.batch_samples=1", "labeling.shard_size=100"])
    one_line_error(capsys, code, "ran out of", "alone")
    assert LabelStore(tmp_path / "oom").done_ids() and len(LabelStore(tmp_path / "oom").done_ids()) == 1


def test_a_runtime_error_that_is_not_memory_is_not_taken_for_one(tiny_lm, tmp_path, monkeypatch):
    from data.labeling import Labeler
    from data.runner import run_labeling

    def broken(self, pre):
        raise RuntimeError("shape mismatch (simulated)")
    monkeypatch.setattr(Labeler, "_decode", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_labeling(_tiny_job(tmp_path, "broken", ["labeling.batch_samples=2"]), tiny_lm)
