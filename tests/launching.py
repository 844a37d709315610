"""Script subprocesses (`accelerate launch`, training scripts, snippets) for the tests, such that a hang names itself.

`subprocess.run(..., timeout=...)` kills only the process it started: the torchrun workers of a 2-process launch run
in sessions of their own (torch's elastic agent starts them with `start_new_session`), so they outlive it, hang on
holding a core, and the test fails with a bare TimeoutExpired and none of their output. `run` instead makes every
Python process of the tree print the stacks of all its threads on timeout (faulthandler, on SIGABRT), kills the whole
tree, and fails the test with that output: a deadlocked collective shows where each rank waits.
"""

import os
import signal
import subprocess
import time

import psutil
import pytest


# seconds the processes of a timed-out run get to print their stacks before they are killed
STACK_DUMP_SECONDS = 10


def run(
    command: list[str], *, env: dict[str, str], timeout: float, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)`, failing the test with the stacks
    of every process of the tree if it has not ended after `timeout` seconds."""
    process = subprocess.Popen(
        command,
        env={**env, "PYTHONFAULTHANDLER": "1"},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(process.pid)
        tree = launcher.children(recursive=True) + [launcher]
        # Frozen first, so that no launcher reacts to a worker's death by killing its siblings without a word; then
        # one process at a time, workers first, because processes sharing a stderr pipe that dump at once interleave
        # their stacks line by line (faulthandler writes in many small pieces).
        for member in tree:
            signal_quietly(member, signal.SIGSTOP)
        for member in tree:
            signal_quietly(member, signal.SIGABRT)
            signal_quietly(member, signal.SIGCONT)
            wait_for_end(member, timeout=STACK_DUMP_SECONDS)
        for member in tree:
            signal_quietly(member, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{' '.join(map(str, command))}\ndid not end within {timeout} s; its processes' stacks and output (the "
            f"last 20000 characters of stderr):\n{stderr[-20000:]}\nstdout:\n{stdout[-3000:]}"
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def signal_quietly(member: psutil.Process, signum: signal.Signals):
    """Send `signum` to `member` unless it has ended already (a worker may exit while its siblings are signalled)."""
    try:
        member.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


def wait_for_end(member: psutil.Process, timeout: float):
    """Wait until `member` has ended, or at most `timeout` seconds. An ended worker stays a zombie while its frozen
    parent does not reap it, which `psutil.Process.wait` would take for alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if member.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)
