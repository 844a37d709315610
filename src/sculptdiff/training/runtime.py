# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""The process a training run runs in: the Accelerator with its project folders, logging, the seed, CPU threads and
the trackers. Every training script starts with

    accelerator = make_accelerator(args)
    ...
    init_trackers(accelerator, "train_sculpt", args)

which reads the flags of `sculptdiff.training.arguments`' run, optimisation and logging groups.
"""

import argparse
import atexit
import gc
import logging
import os

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from .publish import SECRET_ARGS


logger = get_logger(__name__, log_level="INFO")

# Python handles of the default process group, held from `make_accelerator` until the interpreter exits
# (`keep_process_group`)
KEPT_PROCESS_GROUPS = []


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's Accelerator (accumulation, precision, trackers, `output_dir/logging_dir`), with logging set up, the
    CPU threads chosen (`set_cpu_threads`), the seed set and `output_dir` created."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # a seeded sampler whose epoch is checkpointed: a resumed run replays the same batch order
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_cpu_threads(accelerator, args.num_threads)
    if torch.distributed.is_initialized():
        keep_process_group()

    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def keep_process_group():
    """Hold a Python handle of the default process group until the interpreter exits, so that the group's last
    reference is that handle and not DDP's reducer.

    Why: when a script returns, freeing a DDP model's reducer can drop the last reference to the gloo group, whose C++
    destructor then joins gloo's worker threads while it holds the GIL. A worker still releasing the tensors of the
    last collective (the closing barrier) waits for the GIL, and the process hangs at exit (torch 2.13; 2 hangs in 65
    two-process train_vae.py runs on 2 cores). Freed from a Python handle, the group is destroyed with the GIL
    released, so the handle is dropped last: at exit, after a collection frees any reference cycle holding a model.
    """
    # registered once however often a process keeps a group
    atexit.unregister(release_process_groups)
    atexit.register(release_process_groups)
    KEPT_PROCESS_GROUPS.append(torch.distributed.group.WORLD)


def release_process_groups():
    """Drop what `keep_process_group` holds (at exit), once nothing else can hold the groups."""
    gc.collect()
    KEPT_PROCESS_GROUPS.clear()


def set_cpu_threads(accelerator: Accelerator, num_threads: int | None) -> int:
    """Give torch `num_threads` threads, or, when it is None and the run is one process on a CPU that was left at one
    thread, every core this process may run on; returns the count, which is logged.

    `accelerate launch` without a config sets OMP_NUM_THREADS=1 for its process unless the variable is already set,
    so a single-process CPU run would use one core of the machine. An OMP_NUM_THREADS other than 1 (the user's, or
    accelerate's `--num_cpu_threads_per_process`) is kept. An OMP_NUM_THREADS of 1 cannot be told apart from
    accelerate's default: pass `--num_threads 1` to train on one thread. Several processes keep accelerate's split.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        reason = "--num_threads"
    elif (
        accelerator.device.type == "cpu"
        and accelerator.num_processes == 1
        and os.environ.get("OMP_NUM_THREADS", "1") == "1"
    ):
        # the cores of this process's affinity mask (`taskset` narrows it), not of the whole machine
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        reason = "one CPU process: every core it may run on (--num_threads to choose)"
    else:
        reason = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {accelerator.num_processes} process(es)"
    threads = torch.get_num_threads()
    logger.info(f"torch uses {threads} CPU thread(s) per process ({reason}).")
    return threads


def init_trackers(accelerator: Accelerator, project_name: str, args: argparse.Namespace):
    """Start the trackers (TensorBoard, W&B, ...) on the main process with the run's arguments, secrets left out."""
    if accelerator.is_main_process:
        tracker_config = {
            name: str(value) if isinstance(value, (list, tuple)) else value
            for name, value in vars(args).items()
            if name not in SECRET_ARGS and value is not None
        }
        accelerator.init_trackers(project_name, config=tracker_config)


def step_progress_bar(accelerator: Accelerator, args: argparse.Namespace, global_step: int) -> tqdm:
    """The run's bar of optimisation steps, from `global_step` (a resumed run's) to `args.max_train_steps`, shown by
    the local main process only."""
    return tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
