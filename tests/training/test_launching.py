"""The tests' script runner (tests/launching.py): a hung process tree is reported with its stacks and leaves nothing
behind, as a hung 2-process `accelerate launch` must."""

import os
import subprocess
import sys
import textwrap

import launching
import psutil
import pytest


# A launcher in miniature: the parent starts a worker in a session of its own (as torch's elastic agent starts its
# ranks), and both wait forever, the worker in a function whose name the report must show.
HUNG_TREE = textwrap.dedent(
    """
    import subprocess, sys
    worker = subprocess.Popen(
        [sys.executable, "-c", "import os, time\\ndef wait_for_peer():\\n    time.sleep(600)\\n"
         "print(os.getpid(), flush=True)\\nwait_for_peer()"],
        start_new_session=True,
    )
    worker.wait()
    """
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
    # both processes printed their stacks (faulthandler on SIGABRT); the worker's names where it waits
    assert report.count("Fatal Python error: Aborted") == 2
    assert "line 3 in wait_for_peer" in report
    worker_pid = int(report.split("stdout:\n")[1].split()[0])
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE


def test_subprocess_run_alone_would_leave_the_detached_worker_running():
    """Why launching.run exists: subprocess.run's timeout kills only the process it started."""
    process = subprocess.Popen([sys.executable, "-c", HUNG_TREE], stdout=subprocess.PIPE, text=True)
    worker_pid = int(process.stdout.readline())
    process.kill()
    process.wait()
    try:
        assert psutil.Process(worker_pid).is_running()
    finally:
        psutil.Process(worker_pid).kill()
