"""`python -m iota.node local` leaves no process behind: Ctrl-C stops every
child, and children stop by themselves if the parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1", "--batch", "2", "--seq-len", "16",
        "--steps", "100000", "--no-live"]


def processes_of(run_dir: Path) -> list[int]:
    """Pids of live processes whose command line names `run_dir` (every node of that run does)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().split(") ")[-1][0]
        except OSError:
            continue
        if str(run_dir).encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def start_local(run_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "iota.node", "local", "--dir", str(run_dir), *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def wait_training(run_dir: Path, parent: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until every node is up: the orchestrator, four miners and the validator have logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = list((run_dir / "logs").glob("*.log")) if (run_dir / "logs").exists() else []
        if len(logs) >= 6 and len(processes_of(run_dir)) >= 6:
            return
        assert parent.poll() is None, parent.stdout.read().decode() if parent.stdout else ""
        time.sleep(0.2)
    raise AssertionError("the local swarm did not start all its nodes in time")


def wait_gone(run_dir: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_ctrl_c_stops_every_child(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    parent = start_local(run_dir)
    try:
        wait_training(run_dir, parent)
        parent.send_signal(signal.SIGINT)
        parent.wait(timeout=60)
        assert parent.returncode == 130
        assert wait_gone(run_dir, 10) == []
    finally:
        for pid in processes_of(run_dir):
            os.kill(pid, signal.SIGKILL)


def test_children_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    parent = start_local(run_dir)
    try:
        wait_training(run_dir, parent)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_gone(run_dir, 20) == []
    finally:
        for pid in processes_of(run_dir):
            os.kill(pid, signal.SIGKILL)
