"""The tests' script runner (tests/launching.py): a hung process tree is reported with its stacks and leaves nothing
behind, as a hung 2-process `accelerate launch` must."""

import os
import re
import subprocess
import sys
import textwrap

import launching
import psutil
import pytest


# A launcher in miniature: the parent starts two workers in sessions of their own (as torch's elastic agent starts its
# ranks), and all wait forever, each worker 40 calls deep in a function whose name the report must show. The deep
# stacks make simultaneous dumps interleave, as they did in CI before the dumps were taken one at a time. Each worker
# prints its pid in a single write, since print's separate writes interleave as well.
HUNG_TREE = textwrap.dedent(
    """
    import subprocess, sys
    WORKER = (
        "import os, time\\n"
        "def wait_for_peer(depth):\\n"
        "    return wait_for_peer(depth - 1) if depth else time.sleep(600)\\n"
        "os.write(1, b'%d\\\\n' % os.getpid())\\n"
        "wait_for_peer(40)"
    )
    workers = [subprocess.Popen([sys.executable, "-c", WORKER], start_new_session=True) for rank in range(2)]
    for worker in workers:
        worker.wait()
    """
)
# one whole faulthandler report of a worker: its header, then its 41 frames and nothing in between
WORKER_STACK = re.compile(
    r"Fatal Python error: Aborted\n\nCurrent thread 0x[0-9a-f]+ \(most recent call first\):\n"
    r'(  File "<string>", line 3 in wait_for_peer\n){41}  File "<string>", line 5 in <module>\n'
)


def test_a_finished_run_returns_its_output_and_exit_code():
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    result = launching.run([sys.executable, "-c", code], env=dict(os.environ), timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_a_hung_run_fails_with_the_stacks_of_every_process_and_kills_the_detached_worker():
    with pytest.raises(pytest.fail.Exception) as failure:
        launching.run([sys.executable, "-c", HUNG_TREE], env=dict(os.environ), timeout=3)
    report = str(failure.value)
    assert "did not end within 3 s" in report
    # all three processes printed their stacks (faulthandler on SIGABRT), one after the other, workers first
    assert report.count("Fatal Python error: Aborted") == 3
    assert len(WORKER_STACK.findall(report)) == 2
    assert report.rindex("line 3 in wait_for_peer") < report.index("in <module>\n\nstdout:")
    stdout, summary = report.split("stdout:\n")[1].split("Where each process was")
    worker_pids = [int(pid) for pid in stdout.split()]
    assert len(worker_pids) == 2
    # it ends with a line per process, workers first, which an excerpt of head and tail keeps (CI's);
    # the launcher waits in the standard library, so its own code's frame follows
    workers_line_0, workers_line_1, launcher_line = summary.splitlines()[1:]
    assert sorted([workers_line_0, workers_line_1]) == [
        f"  pid {pid}: <string>:3 in wait_for_peer" for pid in sorted(worker_pids)
    ]
    assert re.fullmatch(r"  pid \d+: subprocess.py:\d+ in _try_wait <- <string>:\d+ in <module>", launcher_line)
    for pid in worker_pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_subprocess_run_alone_would_leave_the_detached_worker_running():
    """Why launching.run exists: subprocess.run's timeout kills only the process it started."""
    process = subprocess.Popen([sys.executable, "-c", HUNG_TREE], stdout=subprocess.PIPE, text=True)
    worker_pids = [int(process.stdout.readline()) for rank in range(2)]
    process.kill()
    process.wait()
    try:
        assert all(psutil.Process(pid).is_running() for pid in worker_pids)
    finally:
        for pid in worker_pids:
            psutil.Process(pid).kill()


# a rank hung in a C++ destructor at its script's last line, as in CI: the signal lands on a gloo thread, which has no
# Python frame, so the main thread (listed last) says where the rank was
NATIVE_THREAD_REPORT = """\
Fatal Python error: Aborted

Current thread 0x00007fa99f6fe6c0 (most recent call first):
  <no Python frame>

Thread 0x00007fa99ceff6c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "/venv/lib/python3.11/site-packages/tqdm/_monitor.py", line 69 in run

Thread 0x00007fa9dd224b80 (most recent call first):
  File "/repo/training_scripts/train_vae.py", line 454 in <module>

Extension modules: numpy._core._multiarray_umath (total: 1)
Fatal Python error: Aborted

Current thread 0x00007fc96c5f1b80 (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/agent/server/api.py", line 923 in _invoke_run
  File "/venv/lib/python3.11/site-packages/accelerate/commands/launch.py", line 1423 in <module>
  File "<frozen runpy>", line 88 in _run_code
"""


def test_the_summary_takes_the_main_thread_when_the_signal_hit_a_native_thread():
    summary = launching.where_they_were(["pid 7, rank 1", "pid 5"], NATIVE_THREAD_REPORT)
    assert summary.splitlines()[1:] == [
        "  pid 7, rank 1: train_vae.py:454 in <module> (main thread)",
        "  pid 5: api.py:923 in _invoke_run",
    ]
    # a report missing (a process that had ended) would pair the others with the wrong processes: they are numbered
    summary = launching.where_they_were(["pid 8", "pid 7, rank 1", "pid 5"], NATIVE_THREAD_REPORT)
    assert summary.splitlines()[1] == "  report 1 of 2 (3 processes): train_vae.py:454 in <module> (main thread)"
