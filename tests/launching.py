"""Script subprocesses (`accelerate launch`, training scripts, snippets) for the tests, such that a hang names itself.

`subprocess.run(..., timeout=...)` kills only the process it started: the torchrun workers of a 2-process launch run
in sessions of their own (torch's elastic agent starts them with `start_new_session`), so they outlive it, hang on
holding a core, and the test fails with a bare TimeoutExpired and none of their output. `run` instead makes every
Python process of the tree print the stacks of all its threads on timeout (faulthandler, on SIGABRT), kills the whole
tree, and fails the test with that output: a deadlocked collective shows where each rank waits. The output ends with
a few lines that say where each process was, because reports of long output (CI's among them) keep only its head and
tail, and the stacks lie in between.
"""

import os
import re
import signal
import subprocess
import time

import psutil
import pytest


# seconds the processes of a timed-out run get to print their stacks before they are killed
STACK_DUMP_SECONDS = 10
# seconds a tiny training launch may take: the slowest takes about 15 s alone on one core (`--durations`), so this is
# 16x that, and a hung launch costs the suite 4 minutes, not 10 (the suite takes about 7 of its 15)
LAUNCH_TIMEOUT = 240
# how faulthandler starts a report, and a thread's stack in it (innermost frame first)
REPORT_HEADER = "Fatal Python error: Aborted"
THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):\n((?:  .*\n)*)", re.MULTILINE)
FRAME = re.compile(r'  File "(.*)", line (\d+) in (.*)')


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
        names = [process_name(member) for member in tree]
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
            f"last 20000 characters of stderr):\n{stderr[-20000:]}\nstdout:\n{stdout[-3000:]}\n"
            f"{where_they_were(names, stderr)}"
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


def process_name(member: psutil.Process) -> str:
    """`pid N` and, for a torchrun worker, its rank (from its environment)."""
    try:
        rank = member.environ().get("RANK")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        rank = None
    return f"pid {member.pid}" + (f", rank {rank}" if rank is not None else "")


def where_they_were(names: list[str], stderr: str) -> str:
    """One line per faulthandler report in `stderr`: the innermost frame of the interrupted thread and, when that lies
    in a library, the innermost frame of the process's own code (outside site-packages and the standard library).
    When the signal landed on a thread without Python frames (gloo's, for one), the main thread stands in for it:
    faulthandler lists it last.

    Args:
        names: the processes in the order they were made to report (`process_name`); a report is named after its
            process only when every process reported, since a missing report would shift the pairing.
        stderr: their shared stderr.
    """
    reports = stderr.split(REPORT_HEADER)[1:]
    if len(reports) != len(names):
        names = [f"report {index + 1} of {len(reports)} ({len(names)} processes)" for index in range(len(reports))]
    lines = ["Where each process was (innermost frame first; the whole stacks are above):"]
    for name, report in zip(names, reports):
        stacks = [(kind, FRAME.findall(stack)) for kind, stack in THREAD.findall(report)]
        with_frames = [(kind, frames) for kind, frames in stacks if frames]
        if not with_frames:
            lines.append(f"  {name}: no Python frame")
            continue
        kind, frames = with_frames[0] if with_frames[0][0] == "Current thread" else with_frames[-1]
        own = [frame for frame in frames if not re.search(r"site-packages|/lib/python3|^<frozen", frame[0])]
        shown = [frames[0]] + (own[:1] if own and own[0] != frames[0] else [])
        where = " <- ".join(f"{os.path.basename(path)}:{line} in {function}" for path, line, function in shown)
        lines.append(f"  {name}: {where}" + ("" if kind == "Current thread" else " (main thread)"))
    return "\n".join(lines)
