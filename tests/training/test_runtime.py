"""The process setup of a training run: CPU threads (issue 18, part 4) and the trackers' config."""

import argparse
import logging
import os

import pytest
import torch
from accelerate import Accelerator

from sculptdiff.training.runtime import set_cpu_threads, step_progress_bar


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
