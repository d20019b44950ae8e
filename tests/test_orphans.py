"""A killed labeling job leaves no process behind (issue 31 item 7): DDP ranks and loader workers
end with the process that started them, even on `kill -9`."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.runner import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl is Linux's")


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


_GRANDCHILD = """
import os, subprocess, sys, time
armed = sys.argv[1] == "armed"
code = ("import os, sys, time\\n"
        "from data.runner import die_with_parent\\n"
        + ("die_with_parent(os.getppid())\\n" if armed else "")
        + "print('ready', flush=True)\\ntime.sleep(120)\\n")
child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("armed", [True, False])
def test_a_helper_armed_with_die_with_parent_ends_when_its_parent_is_killed(armed):
    """The control (not armed) shows the check can fail: an unarmed grandchild outlives its parent."""
    parent = subprocess.Popen([sys.executable, "-c", _GRANDCHILD, "armed" if armed else "plain"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    helper = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    left = _wait_gone({helper}, 5.0)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert bool(left) is (not armed)


def test_die_with_parent_exits_at_once_when_the_parent_is_already_gone():
    code = "import os\nfrom data.runner import die_with_parent\ndie_with_parent(os.getppid() + 10**6)\nprint('alive')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "alive" not in done.stdout


def test_a_killed_two_rank_labeling_job_leaves_no_rank_or_worker_behind(tmp_path):
    """train.py labeling on 2 gloo ranks with a loader worker each, killed with SIGKILL once rank 1
    and the workers run: every process it started is gone within 10 s."""
    cmd = [sys.executable, "train.py", "--config", "configs/test_tiny.yaml", "labeling.devices=2",
           "labeling.strategy=ddp", "labeling.loader_workers=1", "data.samples_per_length=40",
           f"labeling.out={tmp_path / 'labels'}"]
    job = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        helpers: set[int] = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(helpers) < 3 and job.poll() is None:
            time.sleep(0.5)   # rank 1 plus a loader worker under each rank
            helpers = _descendants(job.pid)
        assert len(helpers) >= 3, f"the job did not start its ranks and workers (exit {job.poll()})"
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    left = _wait_gone(helpers, 10.0)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(helpers)} processes outlived the killed job"
