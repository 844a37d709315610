# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Resumable checkpoints for any training script that runs on `accelerate`.

A checkpoint is `output_dir/checkpoint-<step>`: accelerate's own state (optimizer, LR scheduler, RNG states, data
sampler), a `save_pretrained` folder per trained model and per EMA, and the run's fingerprint, the settings that
define the run. It is written under a staging name and renamed into place when complete, and it is resumed only
after every file of it has been read back:

    register_checkpoint_hooks(accelerator, model_folders=["unet"], ema_models={"unet_ema": ema_unet})
    ...
    resume = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir, fingerprint, ...)
    if resume is not None:
        accelerator.load_state(resume.path)
    ...
    save_checkpoint(accelerator, args.output_dir, global_step, fingerprint, args.checkpoints_total_limit)

Nothing here knows the model: a distiller or a VAE trainer names its own folders.
"""

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import load as accelerate_load
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from .atomic_files import replace_path


logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
FINGERPRINT_NAME = "run_fingerprint.json"
# what accelerate's save_state writes for one optimizer and one LR scheduler
ACCELERATE_STATE_FILES = ("optimizer.bin", "scheduler.bin")
# keys accelerate's load_state reads from random_states_<process>.pkl (it skips a broken file with an info message)
RNG_STATE_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from: its folder, its step, and how its fingerprint differs from the run's
    (`{field: (checkpoint's value, this run's value)}`, empty for a matching checkpoint)."""

    path: str
    step: int
    differences: dict = field(default_factory=dict)


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-<step> folders of output_dir, oldest first. Staging folders of unfinished saves do not match."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(match.group(1)) for match in map(CHECKPOINT_PATTERN.match, os.listdir(output_dir)) if match)
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint-<step> folder, read from its name."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is not named checkpoint-<step>; the step count is read from the name."
        )
    return int(match.group(1))


def resolve_checkpoint_path(checkpoint: str, output_dir: str) -> str:
    """A checkpoint given as a path, or as a checkpoint-<step> name inside output_dir; ValueError if neither exists."""
    for path in (checkpoint, os.path.join(output_dir, checkpoint)):
        if os.path.isdir(path):
            return path
    raise ValueError(
        f"--resume_from_checkpoint {checkpoint!r} is neither a folder nor a checkpoint inside --output_dir"
        f" {output_dir!r}. Pass an existing checkpoint-<step> folder, or 'latest'."
    )


def normalize_fingerprint(fingerprint: dict) -> dict:
    """The fingerprint as it reads back from JSON (tuples become lists, keys strings), so that a saved and a fresh one
    compare equal."""
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def fingerprint_differences(saved: dict, current: dict) -> dict:
    """`{field: (saved value, current value)}` for every field that differs; nested dicts (a model config) are
    compared entry by entry, as `field.entry`."""
    saved, current = normalize_fingerprint(saved), normalize_fingerprint(current)
    differences = {}
    for name in sorted(saved.keys() | current.keys()):
        old, new = saved.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            for key, (old_value, new_value) in fingerprint_differences(old, new).items():
                differences[f"{name}.{key}"] = (old_value, new_value)
        elif old != new:
            differences[name] = (old, new)
    return differences


def format_differences(differences: dict) -> str:
    return "; ".join(f"{name}: {old!r} in the checkpoint, {new!r} now" for name, (old, new) in differences.items())


def checkpoint_problem(path: str, model_folders: list[str], num_processes: int) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file missing or unreadable), or None.

    Every file is read back in full (weights, configs, optimizer and scheduler state, each process's RNG state, the
    fingerprint), so that a truncated or corrupt checkpoint is found before any state is touched.

    Args:
        path: the checkpoint folder.
        model_folders: the `save_pretrained` folders it must hold (trained models and EMAs).
        num_processes: the number of processes of the run; each one restores its own RNG state.
    """
    required = [FINGERPRINT_NAME, *ACCELERATE_STATE_FILES]
    required += [f"random_states_{index}.pkl" for index in range(num_processes)]
    required += [f"{folder}/config.json" for folder in model_folders]
    for name in required:
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    for folder in model_folders:
        if not any(name.endswith(".safetensors") for name in os.listdir(os.path.join(path, folder))):
            return f"{folder}/ holds no .safetensors weights"

    for root, _, names in os.walk(path):
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(root, name), path)
            try:
                read_back(os.path.join(root, name))
            # any failure to read (truncated pickle, bad header, invalid JSON, missing key) makes it unusable
            except Exception as error:
                return f"{relative} is unreadable ({type(error).__name__}: {error})"
    return None


def read_back(path: str):
    """Read a checkpoint file as resuming will, raising on anything incomplete."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            json.load(f)
    elif path.endswith(".safetensors"):
        load_file(path)
    elif path.endswith((".bin", ".pkl")):
        # accelerate's own loader (weights_only with its safe globals), as load_state reads these files
        state = accelerate_load(path, map_location="cpu")
        if os.path.basename(path).startswith("random_states_"):
            missing = [key for key in RNG_STATE_KEYS if key not in state]
            if missing:
                raise KeyError(f"no {', '.join(missing)}")


def find_resume_checkpoint(
    resume_from_checkpoint: str | None,
    output_dir: str,
    fingerprint: dict,
    model_folders: list[str],
    num_processes: int,
    max_train_steps: int,
) -> ResumePoint | None:
    """The checkpoint to resume from, or None for a fresh start.

    `"latest"` takes the newest checkpoint of `output_dir` that reads back in full (skipping broken ones with a
    warning that names them) and resumes it only if its fingerprint matches this run's: a checkpoint of another run
    in the same folder is a ValueError that names the differences. An explicit checkpoint path is the way to resume
    on purpose with other settings: it must read back in full, and its differences are returned for the caller to
    apply and report. A checkpoint past `max_train_steps` is refused either way.
    """
    if resume_from_checkpoint is None:
        return None
    latest = resume_from_checkpoint == "latest"
    candidates = list_checkpoints(output_dir)[::-1] if latest else [resume_from_checkpoint]
    for path in candidates:
        problem = checkpoint_problem(path, model_folders, num_processes)
        if problem is not None:
            if not latest:
                raise ValueError(f"--resume_from_checkpoint {path!r} cannot be loaded: {problem}.")
            logger.warning(f"Skipping checkpoint {path}: {problem}.", main_process_only=False)
            continue
        step = checkpoint_step(path)
        if step > max_train_steps:
            raise ValueError(
                f"Checkpoint {path!r} is at step {step}, past --max_train_steps {max_train_steps}: it cannot be"
                " resumed into this run. Raise --max_train_steps, or use another --output_dir for a new run."
            )
        with open(os.path.join(path, FINGERPRINT_NAME), encoding="utf-8") as f:
            differences = fingerprint_differences(json.load(f), fingerprint)
        if differences and latest:
            raise ValueError(
                f"The newest checkpoint in --output_dir {output_dir!r}, {path!r}, belongs to another run:"
                f" {format_differences(differences)}. Use another --output_dir for a new run, or resume this"
                f" checkpoint on purpose with --resume_from_checkpoint {path} (this run's settings then apply from"
                f" step {step + 1})."
            )
        return ResumePoint(path, step, differences)
    logger.info(f"No loadable checkpoint in {output_dir!r}; starting a new training run.")
    return None


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, fingerprint: dict, total_limit: int | None = None
) -> str:
    """`accelerator.save_state` plus the fingerprint into a staging folder, renamed to checkpoint-<step> when
    complete; then the oldest checkpoints beyond `total_limit` are removed. Call it on every process."""
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    staging_path = os.path.join(output_dir, f".checkpoint-{step}.staging")
    if accelerator.is_main_process and os.path.exists(staging_path):
        shutil.rmtree(staging_path)
    accelerator.wait_for_everyone()
    # every process writes its own RNG state into the staging folder
    accelerator.save_state(staging_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(staging_path, FINGERPRINT_NAME), "w", encoding="utf-8") as f:
            json.dump(normalize_fingerprint(fingerprint), f, indent=2, sort_keys=True)
        replace_path(staging_path, final_path)
        if total_limit is not None:
            # the new checkpoint is in place before an old one is deleted
            for old_path in list_checkpoints(output_dir)[:-total_limit]:
                logger.info(f"Removing {old_path} (--checkpoints_total_limit {total_limit}).")
                shutil.rmtree(old_path)
        logger.info(f"Saved state to {final_path}")
    accelerator.wait_for_everyone()
    return final_path


def save_ema(ema_model: EMAModel, path: str):
    """`ema_model.save_pretrained(path)` without touching the global RNG.

    EMAModel.save_pretrained builds a fresh model from the config to copy the averages into, and that model's random
    initialisation draws from the global RNG: a run that saved more often would train on other noise afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        ema_model.save_pretrained(path)


def register_checkpoint_hooks(accelerator: Accelerator, model_folders: list[str], ema_models: dict[str, EMAModel]):
    """Make `accelerator.save_state` / `load_state` write and read `save_pretrained` folders (safetensors and
    config.json, loadable on their own) instead of accelerate's anonymous weight files.

    Args:
        accelerator: the run's accelerator.
        model_folders: one folder name per model passed to `accelerator.prepare`, in that order.
        ema_models: EMA models by folder name, saved and restored beside the trained models.
    """

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for folder, ema_model in ema_models.items():
                save_ema(ema_model, os.path.join(output_dir, folder))
            for folder, model in zip(model_folders, models):
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, folder))
        # the weights are in the folders: accelerate must not write them again
        weights.clear()

    def load_model_hook(models, input_dir):
        for folder, ema_model in ema_models.items():
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, folder), ema_model.model_cls)
            ema_model.load_state_dict(loaded.state_dict())
            ema_model.to(accelerator.device)
        for folder, model in zip(model_folders, models):
            model = accelerator.unwrap_model(model)
            loaded = type(model).from_pretrained(input_dir, subfolder=folder)
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
        # the models are loaded: accelerate must not look for its own weight files
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, lr_scheduler, learning_rate: float, **group_settings):
    """Set this run's optimizer settings after `accelerator.load_state`, which restores the checkpoint's.

    Args:
        optimizer: the optimizer as `accelerator.prepare` returned it.
        lr_scheduler: the LR scheduler as `accelerator.prepare` returned it, wrapping a `LambdaLR` (what
            `diffusers.optimization.get_scheduler` makes); its schedule continues at the restored step, now with
            `learning_rate` as the peak.
        learning_rate: the new peak learning rate.
        group_settings: other settings for every parameter group (e.g. `betas`, `eps`, `weight_decay`).
    """
    scheduler = lr_scheduler.scheduler
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * lr_lambda(scheduler.last_epoch)
        group.update(group_settings)


def resume_training(
    accelerator: Accelerator,
    resume: ResumePoint | None,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    args,
    ema_models: list[EMAModel] = (),
) -> int:
    """Load the checkpoint `find_resume_checkpoint` chose into the run and return the step to continue from (0 for a
    fresh start, `resume` None).

    A checkpoint of a run with other settings (resumed on purpose) gets this run's learning rate, AdamW settings and
    EMA warm-up from here on (`args.learning_rate`, `adam_beta1`, `adam_beta2`, `adam_epsilon`, `adam_weight_decay`,
    `ema_decay`, `ema_inv_gamma`, `ema_power`: the flags of `arguments.add_optimization_arguments`), with a warning.
    Call it on every process, after `accelerator.prepare` and `register_checkpoint_hooks`.
    """
    if resume is None:
        return 0
    logger.info(f"Resuming from checkpoint {resume.path}")
    accelerator.load_state(resume.path)
    if resume.differences:
        apply_optimizer_settings(
            optimizer,
            lr_scheduler,
            args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.adam_weight_decay,
        )
        for ema_model in ema_models:
            ema_model.decay, ema_model.inv_gamma, ema_model.power = args.ema_decay, args.ema_inv_gamma, args.ema_power
        logger.warning(
            f"{resume.path} was trained with other settings: {format_differences(resume.differences)}. This"
            f" run's settings apply from step {resume.step + 1} (the random streams continue the checkpoint's);"
            " training_args.json and the model card record both."
        )
    return resume.step


def resume_run(
    accelerator: Accelerator,
    args,
    fingerprint: dict,
    model_folders: list[str],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    ema_models: list[EMAModel] = (),
) -> tuple[ResumePoint | None, int]:
    """`find_resume_checkpoint` for `args.resume_from_checkpoint` in `args.output_dir`, then `resume_training`:
    the checkpoint resumed (None for a fresh start) and the step to continue from."""
    resume = find_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        fingerprint,
        model_folders=model_folders,
        num_processes=accelerator.num_processes,
        max_train_steps=args.max_train_steps,
    )
    return resume, resume_training(accelerator, resume, optimizer, lr_scheduler, args, ema_models)


def training_batches(accelerator: Accelerator, dataloader, global_step: int, args):
    """The batches of a run from optimisation step `global_step` to `args.max_train_steps`, epoch after epoch.

    The seedable sampler is set to each epoch, and a run resumed mid-epoch skips the batches its checkpoint already
    trained on, so that it sees the batches an uninterrupted run would. An optimisation step takes
    `args.gradient_accumulation_steps` batches, the last one of an epoch the batches left (accelerate syncs the
    gradients at the end of the loader). With `args.random_flip`, each image of `batch["pixel_values"]` is mirrored
    left-right with probability 0.5, drawn here in the main process from the global RNG that checkpoints restore, so
    that a resumed run replays the draws.

    Args:
        accelerator: the run's accelerator.
        dataloader: the prepared training loader (this process's shard).
        global_step: the step the run starts from (`resume_run`'s).
        args: reads `max_train_steps`, `gradient_accumulation_steps` and `random_flip`.
    """
    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(dataloader) / accumulation)
    first_epoch = global_step // steps_per_epoch
    resume_batches = (global_step % steps_per_epoch) * accumulation
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch)):
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and resume_batches > 0:
            batches = accelerator.skip_first_batches(dataloader, resume_batches)
        for index, batch in enumerate(batches, start=resume_batches if epoch == first_epoch else 0):
            if epoch * steps_per_epoch + index // accumulation >= args.max_train_steps:
                return
            if args.random_flip:
                pixel_values = batch["pixel_values"]
                flip = torch.rand(pixel_values.shape[0], device=pixel_values.device) < 0.5
                batch["pixel_values"] = torch.where(flip[:, None, None, None], pixel_values.flip(-1), pixel_values)
            yield batch
