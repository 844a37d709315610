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
    worker_pids = [int(pid) for pid in report.split("stdout:\n")[1].split()]
    assert len(worker_pids) == 2
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
