"""The process setup of a training run: CPU threads (issue 18, part 4), the trackers' config, and a process group
that does not hang the exit."""

import argparse
import functools
import logging
import os
import sys
import textwrap

import launching
import pytest
import torch
from accelerate import Accelerator

from sculptdiff.training import runtime
from sculptdiff.training.runtime import set_cpu_threads, step_progress_bar


# A rank of a 2-process gloo group that, again and again, trains a DDP model a step, closes with a barrier and
# destroys the group, as a training script does, then returns, which frees the model and its reducer: the exit of a
# script, repeated. `release_process_groups` is what runs at exit. Without `keep_process_group` (argv[3] "0") freeing
# the reducer destroys the group with the GIL held and hangs a run within a few dozen returns (at return 0 to 44 in
# eight tries). gc.freeze() spares each release's collection the objects of the imports.
RETURNING_RANK = textwrap.dedent(
    """
    import gc, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from sculptdiff.training import runtime

    rank, store_dir, keep = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    torch.set_num_threads(1)
    gc.freeze()

    def train_and_return(index):
        dist.init_process_group("gloo", store=dist.FileStore(f"{store_dir}/{index}", 2), rank=rank, world_size=2)
        if keep:
            runtime.keep_process_group()
        model = DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        dist.barrier()
        dist.destroy_process_group()

    for index in range(100):
        train_and_return(index)
        runtime.release_process_groups()
    """
)
# starts both ranks and fails when either does
TWO_RANKS = textwrap.dedent(
    """
    import subprocess, sys
    ranks = [subprocess.Popen([sys.executable, "-c", sys.argv[1], str(rank), *sys.argv[2:]]) for rank in range(2)]
    sys.exit(max(rank.wait() for rank in ranks))
    """
)


@pytest.fixture
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def three_cores_affinity(pid: int) -> set[int]:
    return {0, 1, 2}


@pytest.fixture
def three_cores(monkeypatch):
    # this process may run on 3 cores, whatever the machine it tests on
    monkeypatch.setattr(os, "sched_getaffinity", three_cores_affinity)


def test_accelerates_one_thread_default_becomes_every_core(accelerator, monkeypatch, three_cores, caplog):
    """`accelerate launch` without a config starts one process with OMP_NUM_THREADS=1."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO):
        assert set_cpu_threads(accelerator, None) == 3
    assert torch.get_num_threads() == 3
    assert "torch uses 3 CPU thread(s) per process (one CPU process: every core it may run on" in caplog.text


def test_an_explicit_thread_count_wins(accelerator, monkeypatch, three_cores, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with caplog.at_level(logging.INFO):
        assert set_cpu_threads(accelerator, 2) == 2
    assert torch.get_num_threads() == 2
    assert "(--num_threads)" in caplog.text


def test_the_users_omp_num_threads_is_kept(accelerator, monkeypatch, three_cores, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO):
        assert set_cpu_threads(accelerator, None) == 2
    assert "OMP_NUM_THREADS=2" in caplog.text


def test_step_progress_bar_counts_from_the_resumed_step(accelerator):
    bar = step_progress_bar(accelerator, argparse.Namespace(max_train_steps=12), 5)
    assert (bar.total, bar.n, bar.disable) == (12, 5, not accelerator.is_local_main_process)
    bar.close()


def test_a_kept_process_group_lets_ddp_scripts_return_without_hanging(tmp_path):
    command = [sys.executable, "-c", TWO_RANKS, RETURNING_RANK, str(tmp_path), "1"]
    result = launching.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("distributed", [True, False])
def test_make_accelerator_keeps_the_process_group_of_a_distributed_run(distributed, tmp_path, monkeypatch):
    calls = []

    def is_initialized() -> bool:
        return distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", is_initialized)
    monkeypatch.setattr(runtime, "keep_process_group", functools.partial(calls.append, "kept"))
    args = argparse.Namespace(
        gradient_accumulation_steps=1,
        mixed_precision="no",
        report_to="none",
        output_dir=str(tmp_path),
        logging_dir="logs",
        num_threads=1,
        seed=None,
    )
    runtime.make_accelerator(args)
    assert calls == (["kept"] if distributed else [])
