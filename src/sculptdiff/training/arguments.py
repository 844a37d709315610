# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""The command-line flags every training script shares, one group per job, named as in diffusers' examples.

A script builds its parser from the groups it needs, adds its own flags, and checks the groups after parsing:

    parser = argparse.ArgumentParser(description="Distill a SculptPipeline into a few-step student.")
    add_data_arguments(parser)
    add_optimization_arguments(parser, recipe=dataclasses.replace(RECIPE, learning_rate=1e-4))
    ...
    args = parser.parse_args(input_args)
    check_data_arguments(args)
    check_optimization_arguments(args, recipe=...)

Each `add_*` function adds one argparse group; each `check_*` function checks the combinations of its group, sets
what depends on them (such as the default step count) and raises a ValueError naming the flag. A script changes a
default with `parser.set_defaults(name=value)` after adding the group.
"""

import argparse
import os

from .checkpointing import resolve_checkpoint_path
from .recipe import RECIPE, TrainingRecipe


def add_data_arguments(parser: argparse.ArgumentParser):
    """The training images: the dataset (Hub, folder or the built-in digits), its image column, size and loading."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=(
            "A dataset on the Hub, a local dataset folder written by `save_to_disk`, or a local folder that"
            " `datasets.load_dataset` understands. With neither --dataset_name nor --train_data_dir the built-in"
            " dataset is used: scikit-learn's 1797 real handwritten digits (8x8 scans, 10 classes)."
        ),
    )
    group.add_argument(
        "--dataset_config_name", type=str, default=None, help="The config of the dataset, if it has several."
    )
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help=(
            "A folder of images, loaded with the `imagefolder` builder: subfolders become a `label` class column,"
            " a metadata.jsonl/csv adds columns such as captions."
        ),
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets and models are cached.")
    group.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    group.add_argument(
        "--resolution",
        type=int,
        default=16,
        help=(
            "Training image side in pixels; images are resized (short side) and cropped to it. The digits are"
            " 8x8 scans upsampled to this (16 by default, 32 also works)."
        ),
    )
    group.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop the centre of non-square images; otherwise a random square is cropped.",
    )
    group.add_argument(
        "--random_flip", action="store_true", help="Flip images horizontally at random (not for digits or text!)."
    )
    group.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="For debugging or quicker training, truncate the dataset to this many examples.",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Subprocesses that load data; 0 loads in the main process.",
    )


def check_data_arguments(args: argparse.Namespace):
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("Pass one of --dataset_name and --train_data_dir, not both.")
    check_positive(args, "resolution")
    if args.max_train_samples is not None and args.max_train_samples < 0:
        raise ValueError(f"--max_train_samples must be >= 0, got {args.max_train_samples}.")


def add_condition_arguments(parser: argparse.ArgumentParser):
    """The dataset columns a conditional model learns from: class labels or captions."""
    group = parser.add_argument_group("conditioning")
    group.add_argument(
        "--class_column",
        type=str,
        default=None,
        help=(
            "The dataset column holding class labels: trains a class-conditional model. Defaults to `label` for the"
            " built-in digits; other data trains unconditionally unless this or --caption_column is given."
        ),
    )
    group.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="The dataset column holding captions (a string or a list of strings): trains a text-to-image model.",
    )


def check_condition_arguments(args: argparse.Namespace):
    if args.class_column is not None and args.caption_column is not None:
        raise ValueError(
            "--class_column and --caption_column are both set: a SculptPipeline is conditioned on classes or on"
            " text, pick one."
        )


def add_optimization_arguments(parser: argparse.ArgumentParser, recipe: TrainingRecipe = RECIPE):
    """AdamW, the learning-rate schedule, batch size, accumulation, clipping, length and EMA; defaults from
    `recipe` (pass `dataclasses.replace(RECIPE, ...)` for other defaults)."""
    group = parser.add_argument_group("optimisation")
    group.add_argument(
        "--learning_rate", type=float, default=recipe.learning_rate, help="Learning rate after warm-up (AdamW)."
    )
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default=recipe.lr_scheduler,
        help=(
            'The learning-rate schedule: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",'
            ' "constant_with_warmup" (diffusers.optimization.get_scheduler).'
        ),
    )
    group.add_argument(
        "--lr_warmup_steps", type=int, default=recipe.lr_warmup_steps, help="Warm-up steps of the learning rate."
    )
    group.add_argument("--adam_beta1", type=float, default=recipe.adam_beta1, help="AdamW beta1.")
    group.add_argument("--adam_beta2", type=float, default=recipe.adam_beta2, help="AdamW beta2.")
    group.add_argument("--adam_weight_decay", type=float, default=recipe.adam_weight_decay, help="AdamW weight decay.")
    group.add_argument("--adam_epsilon", type=float, default=recipe.adam_epsilon, help="AdamW epsilon.")
    group.add_argument("--max_grad_norm", type=float, default=recipe.max_grad_norm, help="Gradient clipping norm.")
    group.add_argument("--train_batch_size", type=int, default=recipe.train_batch_size, help="Batch size per process.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimisation step.")
    group.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help=(
            f"Total optimisation steps; overrides --num_train_epochs. Default {recipe.max_train_steps} when neither"
            " is given."
        ),
    )
    group.add_argument(
        "--num_train_epochs", type=int, default=None, help="Epochs to train for, when --max_train_steps is not given."
    )
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass to save memory, at the cost of speed.",
    )
    group.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep an exponential moving average of the weights and save it as the final model (on by default).",
    )
    group.add_argument("--ema_decay", type=float, default=recipe.ema_decay, help="The maximum EMA decay.")
    group.add_argument("--ema_inv_gamma", type=float, default=recipe.ema_inv_gamma, help="EMA warm-up's 1 / gamma.")
    group.add_argument(
        "--ema_power",
        type=float,
        default=recipe.ema_power,
        help=(
            "Power of the EMA warm-up, decay 1 - (1 + step / inv_gamma) ** -power; 3/4 suits runs of thousands of"
            " steps, 2/3 runs of a million."
        ),
    )


def check_optimization_arguments(args: argparse.Namespace, recipe: TrainingRecipe = RECIPE):
    """Also sets `args.max_train_steps` to the recipe's when neither it nor `--num_train_epochs` is given."""
    check_positive(args, "max_train_steps", "num_train_epochs", "train_batch_size", "gradient_accumulation_steps")
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = recipe.max_train_steps


def add_run_arguments(parser: argparse.ArgumentParser, output_dir: str, outputs: str):
    """Where the run writes (`output_dir` by default; `outputs` names what it writes besides logs and checkpoints),
    its seed and its precision."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--output_dir",
        type=str,
        default=output_dir,
        help=f"Where {outputs}, the logs and the checkpoints are written.",
    )
    group.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; defaults to the accelerate config (or `accelerate launch --mixed_precision`).",
    )
    group.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help=(
            "CPU threads of torch in each process. Default: a run of one process on a CPU uses every core it may run"
            " on (`accelerate launch` without a config would leave it one thread); an OMP_NUM_THREADS other than 1"
            " and several processes keep accelerate's choice."
        ),
    )


def check_run_arguments(args: argparse.Namespace):
    check_positive(args, "num_threads")


def add_checkpointing_arguments(parser: argparse.ArgumentParser):
    """Resumable checkpoints (`sculptdiff.training.checkpointing`): how often, how many, and which to resume."""
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint (output_dir/checkpoint-<step>) every this many steps.",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (oldest removed).",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help=(
            '"latest": resume the newest checkpoint in --output_dir that reads back in full and belongs to this run'
            " (same data, model, objective, seed, batch and optimizer settings: stored in its run_fingerprint.json;"
            " a fresh start when there is none). A checkpoint folder (a path, or a checkpoint-<step> name inside"
            " --output_dir): resume it even if it was trained with other settings; this run's learning rate, AdamW"
            " and EMA settings then apply from the next step, and training_args.json and the card record the change."
        ),
    )


def check_checkpointing_arguments(args: argparse.Namespace):
    """Also turns an explicit `--resume_from_checkpoint` into the checkpoint's path."""
    check_positive(args, "checkpointing_steps", "checkpoints_total_limit")
    if args.resume_from_checkpoint not in (None, "latest"):
        args.resume_from_checkpoint = resolve_checkpoint_path(args.resume_from_checkpoint, args.output_dir)


def add_logging_arguments(parser: argparse.ArgumentParser):
    """The trackers (TensorBoard by default) and the sample grids rendered during training."""
    group = parser.add_argument_group("validation and logs")
    group.add_argument(
        "--validation_steps",
        type=int,
        default=1000,
        help="Render a sample grid (fixed seed, EMA weights) every this many steps, logged and saved as PNG.",
    )
    group.add_argument(
        "--num_validation_images", type=int, default=8, help="Images per row (per class or prompt) of a sample grid."
    )
    group.add_argument(
        "--logging_dir", type=str, default="logs", help="Log directory, relative to --output_dir (TensorBoard)."
    )
    group.add_argument(
        "--report_to", type=str, default="tensorboard", help='Where to log: "tensorboard", "wandb", "all", or "none".'
    )


def check_logging_arguments(args: argparse.Namespace):
    check_positive(args, "validation_steps", "num_validation_images")


def add_sampling_arguments(parser: argparse.ArgumentParser):
    """How the sample grids (and the model card's snippet) sample: guidance, steps, eta."""
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--validation_guidance_scale", type=float, default=3.0, help="Classifier-free guidance scale of the samples."
    )
    group.add_argument(
        "--validation_inference_steps", type=int, default=50, help="Sampling steps of the sample grids."
    )
    group.add_argument(
        "--validation_eta",
        type=float,
        default=1.0,
        help=(
            "eta of the DDPM-family sampler for the sample grids and the card's snippet: 1 = DDPM's ancestral"
            " sampling, 0 = deterministic DDIM (which over-sharpens small, briefly trained models at high guidance)."
        ),
    )


def check_sampling_arguments(args: argparse.Namespace):
    check_positive(args, "validation_inference_steps")


def add_hub_arguments(parser: argparse.ArgumentParser, model_card_template: str):
    """The model card (rendered from `model_card_template` by default) and the push to the Hub
    (`sculptdiff.training.publish`)."""
    group = parser.add_argument_group("publishing")
    group.add_argument(
        "--model_card_template",
        type=str,
        default=model_card_template,
        help="The Jinja template of the model card (README.md).",
    )
    group.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the output folder (without checkpoints and logs) at the end.",
    )
    group.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="The Hub repo to push to (namespace/name); defaults to the name of --output_dir.",
    )
    group.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help=(
            "Refused: a token on the command line leaks into shell history, process lists and CI logs. Log in with"
            " `hf auth login` or set HF_TOKEN instead."
        ),
    )
    group.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")


def check_hub_arguments(args: argparse.Namespace):
    if args.hub_token is not None:
        # the value is never repeated: this message reaches the logs
        raise ValueError(
            "--hub_token is not accepted: a token on the command line leaks into shell history, process lists and"
            " CI logs (accelerate launch prints the whole command line of a failed run). Log in once with"
            " `hf auth login`, or set the HF_TOKEN environment variable, and drop --hub_token."
        )
    if not os.path.isfile(args.model_card_template):
        raise ValueError(f"--model_card_template {args.model_card_template!r} is not a file.")


def check_positive(args: argparse.Namespace, *flags: str):
    """Each of `flags` that is set must be >= 1."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}.")
