#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Train (or fine-tune) a SculptPipeline with accelerate.

    accelerate launch training_scripts/train_sculpt.py

trains a class-conditional pixel-space model on scikit-learn's handwritten digits (16x16) in a few minutes on a
CPU. See training_scripts/README.md for the flags, other data, text conditioning, latent training and publishing.
The structure follows diffusers' training examples (train_unconditional.py, train_text_to_image.py).
"""

import argparse
import copy
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_snr
from diffusers.utils import make_image_grid
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler
from sculptdiff.training.card import render_model_card
from sculptdiff.training.data import (
    DIGITS_CLASS_COLUMN,
    DIGITS_DATASET_NAME,
    ExampleTransform,
    ImageTransform,
    check_columns,
    class_names,
    collate_fn,
    image_mode_for_channels,
    load_training_dataset,
)
from sculptdiff.training.evaluation import DigitsEvaluator
from sculptdiff.training.publish import PushToHubError, push_output_dir


logger = get_logger(__name__, log_level="INFO")

DEFAULT_MODEL_CARD_TEMPLATE = str(Path(__file__).resolve().parent.parent / "model_cards" / "sculpt_model_card.md")
SAMPLE_GRID_NAME = "sample_grid.png"
ARGS_FILE_NAME = "training_args.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Never written to the logs, the args dump or the model card.
SECRET_ARGS = ("hub_token",)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a SculptPipeline (class, text or unconditional) with accelerate."
    )

    # data
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=(
            "A dataset on the Hub, a local dataset folder written by `save_to_disk`, or a local folder that"
            " `datasets.load_dataset` understands. With neither --dataset_name nor --train_data_dir the built-in"
            " dataset is used: scikit-learn's 1797 real handwritten digits (8x8 scans, 10 classes)."
        ),
    )
    parser.add_argument(
        "--dataset_config_name", type=str, default=None, help="The config of the dataset, if it has several."
    )
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help=(
            "A folder of images, loaded with the `imagefolder` builder: subfolders become a `label` class column,"
            " a metadata.jsonl/csv adds columns such as captions."
        ),
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets and models are cached.")
    parser.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    parser.add_argument(
        "--class_column",
        type=str,
        default=None,
        help=(
            "The dataset column holding class labels: trains a class-conditional model. Defaults to `label` for the"
            " built-in digits; other data trains unconditionally unless this or --caption_column is given."
        ),
    )
    parser.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="The dataset column holding captions (a string or a list of strings): trains a text-to-image model.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=16,
        help=(
            "Training image side in pixels; images are resized (short side) and cropped to it. The digits are"
            " 8x8 scans upsampled to this (16 by default, 32 also works)."
        ),
    )
    parser.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop the centre of non-square images; otherwise a random square is cropped.",
    )
    parser.add_argument(
        "--random_flip", action="store_true", help="Flip images horizontally at random (not for digits or text!)."
    )
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="For debugging or quicker training, truncate the dataset to this many examples.",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Subprocesses that load data; 0 loads in the main process.",
    )

    # model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A saved SculptPipeline (folder or Hub repo id) to fine-tune; its U-Net, scheduler and text encoder are used.",
    )
    parser.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help="A SculptUNet2DModel config (config.json, or a folder holding one) for a new U-Net; shape flags override it.",
    )
    parser.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=None,
        help="Channels of each U-Net level, highest resolution first (default 32 64 64).",
    )
    parser.add_argument(
        "--layers_per_block",
        type=int,
        default=None,
        help="Residual blocks per U-Net level on the down path (default 1).",
    )
    parser.add_argument(
        "--attention_levels",
        type=int,
        nargs="+",
        default=None,
        help="One 0/1 flag per U-Net level: attention at that level (default 0 0 1: attention at the lowest level).",
    )
    parser.add_argument(
        "--attention_head_dim", type=int, default=None, help="Channels per attention head (default 32)."
    )
    parser.add_argument(
        "--norm_num_groups",
        type=int,
        default=None,
        help="GroupNorm groups; must divide every entry of --block_out_channels (default 8).",
    )
    parser.add_argument("--dropout", type=float, default=None, help="Dropout in the U-Net blocks (default 0.0).")
    parser.add_argument(
        "--text_encoder_name_or_path",
        type=str,
        default=None,
        help=(
            "A transformers text encoder + tokenizer (folder or Hub id) for caption training; it stays frozen and its"
            " last_hidden_state feeds the U-Net's cross-attention (cross_attention_dim = its hidden size)."
        ),
    )
    parser.add_argument(
        "--vae_name_or_path",
        type=str,
        default=None,
        help="An AutoencoderKL (folder or Hub id): train in its latent space (latents scaled by its scaling_factor).",
    )

    # objective
    parser.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction", "sample", "flow"],
        help=(
            "What the U-Net learns to predict: the noise (epsilon, DDPM), the velocity (v_prediction, Salimans & Ho"
            " 2022), the clean sample, or the rectified-flow velocity eps - x_0 (flow). Default: epsilon, or the"
            " fine-tuned model's."
        ),
    )
    parser.add_argument(
        "--num_train_timesteps", type=int, default=1000, help="Number of diffusion steps T of the training schedule."
    )
    parser.add_argument(
        "--beta_schedule",
        type=str,
        default="squaredcos_cap_v2",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        help=(
            "The beta schedule of the DDPM-family objectives. Default squaredcos_cap_v2: the cosine schedule of"
            " Nichol & Dhariwal 2021, which keeps small images from being destroyed too early."
        ),
    )
    parser.add_argument(
        "--rescale_betas_zero_snr",
        action="store_true",
        help="Rescale the betas to zero terminal SNR (Lin et al. 2023); needs --prediction_type v_prediction.",
    )
    parser.add_argument(
        "--conditioning_dropout_prob",
        type=float,
        default=None,
        help=(
            "Probability that the condition is dropped during training, for classifier-free guidance (default 0.1)."
            " Class labels are dropped by the U-Net's embedder (stored in its config); captions are replaced by the"
            " empty-prompt embedding."
        ),
    )
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting gamma (Hang et al. 2023); 5.0 is recommended. Off by default.",
    )
    parser.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Scale of the offset noise (per-channel constant added to the noise); 0 disables it.",
    )
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="uniform",
        choices=["uniform", "logit_normal"],
        help="How flow training samples t in [0, 1]: uniform, or logit-normal (SD3, Esser et al. 2024).",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal t distribution.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit-normal t distribution.")

    # optimisation
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Learning rate after warm-up (AdamW).")
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help=(
            'The learning-rate schedule: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",'
            ' "constant_with_warmup" (diffusers.optimization.get_scheduler).'
        ),
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=100, help="Warm-up steps of the learning rate.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    parser.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument(
        "--train_batch_size", type=int, default=32, help="Batch size per process (per device) for training."
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of batches to accumulate before each optimisation step.",
    )
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total optimisation steps; overrides --num_train_epochs. Default 2000 when neither is given.",
    )
    parser.add_argument(
        "--num_train_epochs", type=int, default=None, help="Epochs to train for, when --max_train_steps is not given."
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; defaults to the accelerate config (or `accelerate launch --mixed_precision`).",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass to save memory, at the cost of speed.",
    )
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep an exponential moving average of the weights and save it as the final model (on by default).",
    )
    parser.add_argument("--ema_decay", type=float, default=0.9999, help="The maximum EMA decay.")
    parser.add_argument(
        "--ema_inv_gamma",
        type=float,
        default=1.0,
        help="Inverse gamma of the EMA warm-up (decay 1 - (1 + step/inv_gamma)^-power).",
    )
    parser.add_argument(
        "--ema_power",
        type=float,
        default=3 / 4,
        help="Power of the EMA warm-up; 3/4 suits runs of thousands of steps, 2/3 runs of a million.",
    )

    # checkpoints
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint (output_dir/checkpoint-<step>) every this many steps.",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (oldest removed).",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help=(
            'Resume from a checkpoint folder (a path, or a checkpoint-<step> name inside --output_dir), or "latest"'
            " for the newest loadable checkpoint in --output_dir (a fresh start when there is none)."
        ),
    )

    # validation and logs
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=1000,
        help="Render a sample grid (fixed seed, EMA weights) every this many steps, logged and saved as PNG.",
    )
    parser.add_argument(
        "--eval_steps",
        type=int,
        default=None,
        help=(
            "Every this many steps, sample --eval_num_samples class-conditional digits with the validation settings"
            " and log the benchmarks' quality figures (FD, class accuracy, coverage, precision/recall in a digits"
            " classifier's feature space; sculptdiff.training.evaluation) to the trackers and eval_metrics.jsonl."
            " Needs a class-conditional 1-channel model at 16 or 32 px."
        ),
    )
    parser.add_argument(
        "--eval_num_samples", type=int, default=200, help="Samples per --eval_steps evaluation (class i %% 10)."
    )
    parser.add_argument(
        "--validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help="Prompts for the sample grids of a text model (one row each); default: the first captions of the data.",
    )
    parser.add_argument(
        "--num_validation_images", type=int, default=8, help="Images per row (per class or prompt) of a sample grid."
    )
    parser.add_argument(
        "--validation_guidance_scale", type=float, default=3.0, help="Classifier-free guidance scale of the samples."
    )
    parser.add_argument(
        "--validation_inference_steps", type=int, default=50, help="Sampling steps of the sample grids."
    )
    parser.add_argument(
        "--validation_eta",
        type=float,
        default=1.0,
        help=(
            "eta of the DDPM-family sampler for the sample grids and the card's snippet: 1 = DDPM's ancestral"
            " sampling, 0 = deterministic DDIM (which over-sharpens small, briefly trained models at high guidance)."
        ),
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="sculpt-digits",
        help="Where the pipeline, the sample grid, the model card, the logs and the checkpoints are written.",
    )
    parser.add_argument(
        "--logging_dir", type=str, default="logs", help="Log directory, relative to --output_dir (TensorBoard)."
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Where to log: "tensorboard", "wandb", "all", or "none".',
    )
    parser.add_argument(
        "--model_card_template",
        type=str,
        default=DEFAULT_MODEL_CARD_TEMPLATE,
        help="The Jinja template of the model card (README.md).",
    )

    # publishing
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the output folder (without checkpoints and logs) at the end.",
    )
    parser.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="The Hub repo to push to (namespace/name); defaults to the name of --output_dir.",
    )
    parser.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="A Hub token for the push (prefer `hf auth login` or HF_TOKEN); never logged or saved.",
    )
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")

    args = parser.parse_args(input_args)

    # combinations, checked before anything is loaded
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("Pass one of --dataset_name and --train_data_dir, not both.")
    if args.class_column is not None and args.caption_column is not None:
        raise ValueError(
            "--class_column and --caption_column are both set: a SculptPipeline is conditioned on classes or on"
            " text, pick one."
        )
    if args.text_encoder_name_or_path is not None and args.caption_column is None:
        raise ValueError("--text_encoder_name_or_path needs --caption_column (the captions it encodes).")
    if (
        args.caption_column is not None
        and args.text_encoder_name_or_path is None
        and args.pretrained_model_name_or_path is None
    ):
        raise ValueError(
            "--caption_column needs a text encoder: pass --text_encoder_name_or_path, or fine-tune a text model"
            " with --pretrained_model_name_or_path."
        )
    if args.validation_prompts is not None and args.caption_column is None:
        raise ValueError("--validation_prompts is for text models; pass --caption_column too.")
    if args.conditioning_dropout_prob is not None and not 0.0 <= args.conditioning_dropout_prob < 1.0:
        raise ValueError(f"--conditioning_dropout_prob must be in [0, 1), got {args.conditioning_dropout_prob}.")
    if args.prediction_type == "flow":
        if args.snr_gamma is not None:
            raise ValueError("--snr_gamma weights DDPM-family losses; it has no meaning with --prediction_type flow.")
        if args.rescale_betas_zero_snr:
            raise ValueError("--rescale_betas_zero_snr changes a beta schedule; flow training has none.")
    elif args.weighting_scheme != "uniform":
        raise ValueError(
            f"--weighting_scheme {args.weighting_scheme} samples flow times; use it with --prediction_type flow."
        )
    if args.rescale_betas_zero_snr and args.prediction_type in (None, "epsilon"):
        raise ValueError(
            "--rescale_betas_zero_snr makes the last step pure noise, where an epsilon prediction carries no"
            " information (Lin et al. 2023): add --prediction_type v_prediction."
        )
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = 2000
    positive = ("max_train_steps", "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit")
    for flag in (*positive, "validation_steps", "train_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}.")
    if args.max_train_samples is not None and args.max_train_samples < 0:
        raise ValueError(f"--max_train_samples must be >= 0, got {args.max_train_samples}.")
    if args.resume_from_checkpoint not in (None, "latest"):
        args.resume_from_checkpoint = resolve_checkpoint_path(args.resume_from_checkpoint, args.output_dir)
    if not os.path.isfile(args.model_card_template):
        raise ValueError(f"--model_card_template {args.model_card_template!r} is not a file.")
    return args


def resolve_checkpoint_path(checkpoint: str, output_dir: str) -> str:
    """A checkpoint given as a path, or as a checkpoint-<step> name inside output_dir; ValueError if neither exists."""
    for path in (checkpoint, os.path.join(output_dir, checkpoint)):
        if os.path.isdir(path):
            return path
    raise ValueError(
        f"--resume_from_checkpoint {checkpoint!r} is neither a folder nor a checkpoint inside --output_dir"
        f" {output_dir!r}. Pass an existing checkpoint-<step> folder, or 'latest'."
    )


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-<step> folders of output_dir, oldest first. Staging folders of unfinished saves do not match."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(match.group(1)) for match in map(CHECKPOINT_PATTERN.match, os.listdir(output_dir)) if match)
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def checkpoint_problem(path: str, use_ema: bool, num_processes: int) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing or unreadable files), or None when it looks complete.

    Reads file headers only, so a broken folder is found before any state is touched.
    """
    required = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "optimizer.bin", "scheduler.bin"]
    required += [f"random_states_{index}.pkl" for index in range(num_processes)]
    if use_ema:
        required += ["unet_ema/config.json", "unet_ema/diffusion_pytorch_model.safetensors"]
    for name in required:
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    for name in required:
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), framework="pt") as weights:
                    weights.keys()
            except Exception as error:
                return f"{name} is unreadable ({error})"
        if name.endswith(".json"):
            try:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    json.load(f)
            except ValueError as error:
                return f"{name} is unreadable ({error})"
    return None


def replace_path(source: str, target: str):
    """Move source onto target (file or folder); an existing target is removed only once source is in place."""
    backup = None
    if os.path.exists(target):
        backup = f"{target}.old-{os.getpid()}"
        os.replace(target, backup)
    os.replace(source, target)
    if backup is not None:
        if os.path.isdir(backup):
            shutil.rmtree(backup)
        else:
            os.remove(backup)


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, global_step: int):
    """accelerator.save_state into a staging folder, renamed to checkpoint-<step> when complete (all processes)."""
    final_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    staging_path = os.path.join(args.output_dir, f".checkpoint-{global_step}.staging")
    if accelerator.is_main_process and os.path.exists(staging_path):
        shutil.rmtree(staging_path)
    accelerator.wait_for_everyone()
    # every process writes its own RNG state into the staging folder
    accelerator.save_state(staging_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_path(staging_path, final_path)
        if args.checkpoints_total_limit is not None:
            # the new checkpoint is in place before an old one is deleted
            for old_path in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                logger.info(f"Removing {old_path} (--checkpoints_total_limit {args.checkpoints_total_limit}).")
                shutil.rmtree(old_path)
        logger.info(f"Saved state to {final_path}")
    accelerator.wait_for_everyone()


def build_unet(
    args: argparse.Namespace, data_config: dict, accelerator: Accelerator
) -> tuple[SculptUNet2DModel, str | None]:
    """A new U-Net from a config and the shape flags, or the U-Net of the pipeline being fine-tuned."""
    if args.pretrained_model_name_or_path is not None:
        # config overrides: the objective and dropout of this run, and what the data decides
        unet = SculptUNet2DModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", cache_dir=args.cache_dir, **data_config
        )
        return unet, args.pretrained_model_name_or_path

    config = {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "attention_levels": (False, False, True),
        "attention_head_dim": 32,
        "norm_num_groups": 8,
        "dropout": 0.0,
    }
    if args.model_config_name_or_path is not None:
        config = dict(SculptUNet2DModel.load_config(args.model_config_name_or_path, cache_dir=args.cache_dir))
    shape_flags = {
        "block_out_channels": tuple(args.block_out_channels) if args.block_out_channels else None,
        "layers_per_block": args.layers_per_block,
        "attention_levels": tuple(bool(flag) for flag in args.attention_levels) if args.attention_levels else None,
        "attention_head_dim": args.attention_head_dim,
        "norm_num_groups": args.norm_num_groups,
        "dropout": args.dropout,
    }
    config.update({name: value for name, value in shape_flags.items() if value is not None})
    config.update(data_config)
    levels = len(config["block_out_channels"])
    if config.get("attention_levels") is not None and len(config["attention_levels"]) != levels:
        raise ValueError(
            f"--attention_levels needs one 0/1 flag per level of --block_out_channels ({levels} levels), got"
            f" {config['attention_levels']}."
        )
    return SculptUNet2DModel.from_config(config), None


def encode_captions(pipeline: SculptPipeline, captions: list[str], device: torch.device) -> torch.Tensor:
    # The pipeline's own prompt encoding, so that training and sampling see the same embeddings.
    with torch.no_grad():
        return pipeline.encode_prompt(captions, device)[0]


def render_samples(
    pipeline: SculptPipeline,
    args: argparse.Namespace,
    conditioning: str,
    num_classes: int,
    validation_prompts: list[str] | None,
    guidance_scale: float,
    device: torch.device,
):
    """A grid of samples from a fixed seed: one row per class (up to 10) or prompt, or 4 rows unconditionally."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(args.seed if args.seed is not None else 0)
    columns = args.num_validation_images
    common = {
        "num_inference_steps": args.validation_inference_steps,
        "guidance_scale": guidance_scale,
        "eta": args.validation_eta,
        "generator": generator,
    }
    if conditioning == "class":
        rows = min(num_classes, 10)
        labels = [label for label in range(rows) for _ in range(columns)]
        images = pipeline(class_labels=labels, **common).images
    elif conditioning == "text":
        rows = len(validation_prompts)
        images = pipeline(prompt=validation_prompts, num_images_per_prompt=columns, **common).images
    else:
        rows = 4
        images = pipeline(batch_size=rows * columns, **common).images
    return make_image_grid(images, rows=rows, cols=columns)


def main(args: argparse.Namespace):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
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

    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # 1. data
    builtin = args.dataset_name is None and args.train_data_dir is None
    with accelerator.main_process_first():
        dataset = load_training_dataset(
            args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir
        )
    class_column = args.class_column
    if builtin and class_column is None and args.caption_column is None:
        class_column = DIGITS_CLASS_COLUMN
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    check_columns(dataset, args.image_column, class_column, args.caption_column)
    conditioning = "class" if class_column is not None else "text" if args.caption_column is not None else "none"
    names = class_names(dataset, class_column) if conditioning == "class" else None
    validation_prompts = None
    if conditioning == "text":
        # default sample prompts: the first distinct captions of the data
        first_captions = dataset.select(range(min(64, len(dataset))))[args.caption_column]
        first_captions = [caption if isinstance(caption, str) else caption[0] for caption in first_captions]
        validation_prompts = args.validation_prompts or sorted(set(first_captions))[:4]

    # 2. frozen text encoder and VAE
    pretrained = args.pretrained_model_name_or_path
    text_encoder = tokenizer = vae = None
    if conditioning == "text":
        source, subfolder = (
            (args.text_encoder_name_or_path, None) if args.text_encoder_name_or_path else (pretrained, "text_encoder")
        )
        text_encoder = AutoModel.from_pretrained(source, subfolder=subfolder or "", cache_dir=args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(
            source, subfolder="tokenizer" if subfolder else "", cache_dir=args.cache_dir
        )
        text_encoder.requires_grad_(False)
        text_encoder.eval()
    if args.vae_name_or_path is not None:
        vae = AutoencoderKL.from_pretrained(args.vae_name_or_path, cache_dir=args.cache_dir)
    elif pretrained is not None and os.path.isfile(os.path.join(pretrained, "vae", "config.json")):
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
    if vae is not None:
        vae.requires_grad_(False)
        vae.eval()
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    # 3. the U-Net: what the data decides goes into its config, so the saved pipeline knows it
    data_config = {"sample_size": args.resolution // vae_scale_factor}
    if args.prediction_type is not None or pretrained is None:
        data_config["prediction_type"] = args.prediction_type or "epsilon"
    if args.conditioning_dropout_prob is not None or pretrained is None:
        # 10% null condition: the classifier-free guidance paper's best range (Ho & Salimans 2022)
        data_config["conditioning_dropout_prob"] = (
            args.conditioning_dropout_prob if args.conditioning_dropout_prob is not None else 0.1
        )
    if pretrained is None:
        channels = vae.config.latent_channels if vae is not None else (1 if builtin else 3)
        data_config.update({"in_channels": channels, "out_channels": channels})
        if conditioning == "class":
            data_config["num_class_embeds"] = len(names)
            data_config["id2label"] = {str(index): name for index, name in enumerate(names)}
        if conditioning == "text":
            data_config["cross_attention_dim"] = text_encoder.config.hidden_size
    unet, base_model = build_unet(args, data_config, accelerator)
    if pretrained is not None:
        if (unet.config.num_class_embeds is not None) != (conditioning == "class"):
            raise ValueError(
                f"The U-Net of {pretrained!r} is {'' if unet.config.num_class_embeds else 'not '}class-conditional"
                f" but this run's data is {'' if conditioning == 'class' else 'not '}: set --class_column accordingly."
            )
        if (unet.config.cross_attention_dim is not None) != (conditioning == "text"):
            raise ValueError(
                f"The U-Net of {pretrained!r} {'takes' if unet.config.cross_attention_dim else 'does not take'} text;"
                " set --caption_column accordingly."
            )
        if conditioning == "class" and len(names) != unet.config.num_class_embeds:
            raise ValueError(
                f"{pretrained!r} has {unet.config.num_class_embeds} classes but --class_column has {len(names)}."
            )
    prediction_type = unet.config.prediction_type
    conditioning_dropout_prob = unet.config.conditioning_dropout_prob
    factor = vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if args.resolution % factor != 0:
        raise ValueError(
            f"--resolution {args.resolution} cannot pass through this U-Net: it must be a multiple of {factor}"
            f" ({len(unet.config.block_out_channels)} levels{' in a VAE latent space' if vae else ''}), e.g."
            f" {max(factor, args.resolution // factor * factor)} or {(args.resolution // factor + 1) * factor}."
        )
    image_mode = image_mode_for_channels(vae.config.in_channels if vae is not None else unet.config.in_channels)

    # 4. the forward process: DDPM family (Ho et al. 2020) or rectified flow (Liu et al. 2022)
    if prediction_type == "flow":
        noise_scheduler = SculptFlowScheduler(num_train_timesteps=args.num_train_timesteps)
    elif pretrained is not None and args.prediction_type is None:
        noise_scheduler = SculptScheduler.from_pretrained(pretrained, subfolder="scheduler")
    else:
        noise_scheduler = SculptScheduler(
            num_train_timesteps=args.num_train_timesteps,
            beta_schedule=args.beta_schedule,
            prediction_type=prediction_type,
            rescale_betas_zero_snr=args.rescale_betas_zero_snr,
            # pixels live in [-1, 1]; latents do not
            clip_sample=vae is None,
            # "trailing" starts sampling at t = T, where training put pure noise (Lin et al. 2023, table 2)
            timestep_spacing="trailing",
        )
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    # 5. EMA of the weights (Polyak averaging, as in DDPM's released models), with crowsonkb's warm-up so that short
    # runs average recent weights rather than the random initialisation
    ema_unet = None
    if args.use_ema:
        ema_unet = EMAModel(
            unet.parameters(),
            decay=args.ema_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=SculptUNet2DModel,
            model_config=unet.config,
        )
    # the model that samples: a copy made now, so that making it never draws from the RNG mid-training
    sampling_unet = copy.deepcopy(unet).eval()
    sampling_unet.requires_grad_(False)

    # 6. checkpoints hold save_pretrained folders (safetensors) for the U-Net and its EMA
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if args.use_ema:
                ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    def load_model_hook(models, input_dir):
        if args.use_ema:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), SculptUNet2DModel)
            ema_unet.load_state_dict(loaded.state_dict())
            ema_unet.to(accelerator.device)
            del loaded
        for _ in range(len(models)):
            model = accelerator.unwrap_model(models.pop())
            loaded = SculptUNet2DModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    dataset.set_transform(
        ExampleTransform(
            ImageTransform(args.resolution, image_mode, center_crop=args.center_crop),
            image_column=args.image_column,
            class_column=class_column,
            class_names=names,
            caption_column=args.caption_column,
        )
    )
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        # The loader draws its workers' base seed from this generator, not from the global RNG, whose state the
        # checkpoints restore: a resumed run creating its loader mid-epoch then draws the same noise as an
        # uninterrupted one.
        generator=torch.Generator().manual_seed(torch.initial_seed()),
    )
    # decode one example now: a bad column or an unreadable image fails here, before the first step
    collate_fn([dataset[0]])

    # Scheduler and math around the number of training steps (as diffusers' examples).
    num_update_steps_per_epoch = math.ceil(
        math.ceil(len(train_dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    if args.use_ema:
        ema_unet.to(accelerator.device)
    if text_encoder is not None:
        text_encoder.to(accelerator.device)
    if vae is not None:
        vae.to(accelerator.device)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # the pipeline that samples during and after training; it also owns prompt encoding
    sample_scheduler = copy.deepcopy(noise_scheduler)
    pipeline = SculptPipeline(
        unet=sampling_unet, scheduler=sample_scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae
    )
    null_prompt_embeds = None
    if conditioning == "text":
        # CFG's null condition for text: the empty prompt, as the pipeline's negative prompt defaults to
        null_prompt_embeds = encode_captions(pipeline, [""], accelerator.device)
    guidance_scale = (
        args.validation_guidance_scale if conditioning_dropout_prob > 0 and conditioning != "none" else 1.0
    )

    if accelerator.is_main_process:
        tracker_config = {
            name: str(value) if isinstance(value, (list, tuple)) else value
            for name, value in vars(args).items()
            if name not in SECRET_ARGS and value is not None
        }
        accelerator.init_trackers("train_sculpt", config=tracker_config)

    evaluator = None
    if args.eval_steps is not None:
        if conditioning != "class" or sampling_unet.config.in_channels != 1 or args.resolution not in (16, 32):
            raise ValueError(
                "--eval_steps scores digits: it needs a class-conditional 1-channel model at --resolution 16 or 32"
                " (the built-in digits data). Drop --eval_steps for other data."
            )
        evaluator = DigitsEvaluator(args.resolution) if accelerator.is_main_process else None

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(dataset)}")
    logger.info(f"  Num Epochs = {num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  U-Net parameters = {sum(p.numel() for p in unet.parameters()):,}")

    # 7. resume
    global_step = 0
    first_epoch = 0
    if args.resume_from_checkpoint is not None:
        if args.resume_from_checkpoint == "latest":
            candidates = list_checkpoints(args.output_dir)[::-1]
        else:
            candidates = [args.resume_from_checkpoint]
        resume_path = None
        for path in candidates:
            problem = checkpoint_problem(path, args.use_ema, accelerator.num_processes)
            if problem is None:
                resume_path = path
                break
            if args.resume_from_checkpoint != "latest":
                raise ValueError(f"--resume_from_checkpoint {path!r} cannot be loaded: {problem}.")
            logger.warning(f"Skipping checkpoint {path}: {problem}.", main_process_only=False)
        if resume_path is None:
            logger.info(f"No loadable checkpoint in {args.output_dir!r}; starting a new training run.")
        else:
            match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(resume_path)))
            if match is None:
                raise ValueError(
                    f"--resume_from_checkpoint {resume_path!r} is not named checkpoint-<step>; the step count"
                    " is read from the name."
                )
            logger.info(f"Resuming from checkpoint {resume_path}")
            accelerator.load_state(resume_path)
            global_step = int(match.group(1))
            first_epoch = global_step // num_update_steps_per_epoch
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
    initial_global_step = global_step
    last_checkpoint = (list_checkpoints(args.output_dir) or [None])[-1]

    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    train_start = time.monotonic()
    train_loss = 0.0
    for epoch in range(first_epoch, num_train_epochs):
        unet.train()
        train_dataloader.set_epoch(epoch)
        if epoch == first_epoch and resume_batches > 0:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        else:
            active_dataloader = train_dataloader
        for batch in active_dataloader:
            # checked first: a run resumed at its last step trains no more
            if global_step >= args.max_train_steps:
                break
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"]
                if args.random_flip:
                    # flipped here, in the main process, so the draws are replayed on resume
                    flip = torch.rand(pixel_values.shape[0], device=pixel_values.device) < 0.5
                    pixel_values = torch.where(flip[:, None, None, None], pixel_values.flip(-1), pixel_values)
                if vae is not None:
                    with torch.no_grad():
                        # latent diffusion (Rombach et al. 2022): denoise the VAE's scaled latents
                        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
                        latents = latents * vae.config.scaling_factor
                else:
                    latents = pixel_values
                latents = latents.float()
                bsz = latents.shape[0]

                # eps ~ N(0, I)
                noise = torch.randn_like(latents)
                if args.noise_offset:
                    # https://www.crosslabs.org//blog/diffusion-with-offset-noise
                    noise = noise + args.noise_offset * torch.randn(
                        (bsz, latents.shape[1], 1, 1), device=latents.device
                    )

                if prediction_type == "flow":
                    # rectified flow: t ~ p(t) on [0, 1], x_t = (1 - t) x_0 + t eps, target v = eps - x_0
                    sigmas = compute_density_for_timestep_sampling(
                        args.weighting_scheme, bsz, args.logit_mean, args.logit_std, device=latents.device
                    )
                    timesteps = sigmas * num_train_timesteps
                    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    # DDPM: t ~ U{0, T-1}, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps in one step (Ho et al. eq. 4)
                    timesteps = torch.randint(0, num_train_timesteps, (bsz,), device=latents.device).long()
                    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                    if prediction_type == "epsilon":
                        target = noise
                    elif prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        target = latents

                encoder_hidden_states = None
                class_labels = None
                if conditioning == "class":
                    # dropped to the null class by the U-Net's embedder (conditioning_dropout_prob in its config)
                    class_labels = batch["class_labels"]
                elif conditioning == "text":
                    encoder_hidden_states = encode_captions(pipeline, batch["captions"], latents.device)
                    if conditioning_dropout_prob > 0:
                        # classifier-free guidance training: the empty prompt stands in for "no condition"
                        drop = torch.rand(bsz, device=latents.device) < conditioning_dropout_prob
                        encoder_hidden_states = torch.where(
                            drop[:, None, None],
                            null_prompt_embeds.to(encoder_hidden_states.dtype),
                            encoder_hidden_states,
                        )

                model_pred = unet(
                    noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels
                ).sample

                if args.snr_gamma is None:
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                else:
                    # Min-SNR-gamma (Hang et al. 2023, eq. 7), as diffusers' train_text_to_image.py
                    snr = compute_snr(noise_scheduler, timesteps)
                    mse_loss_weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(
                        dim=1
                    )[0]
                    if prediction_type == "epsilon":
                        mse_loss_weights = mse_loss_weights / snr
                    elif prediction_type == "v_prediction":
                        mse_loss_weights = mse_loss_weights / (snr + 1)
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
                    loss = loss.mean()

                # the mean over all processes: logged, and checked on every process alike
                avg_loss = accelerator.gather(loss.detach().repeat(bsz)).mean()
                if not torch.isfinite(avg_loss):
                    raise FloatingPointError(
                        f"Training stopped: the loss is {avg_loss.item()} at step {global_step + 1} (epoch {epoch})."
                        f" Nothing was saved after it; the last good checkpoint is {last_checkpoint or 'none'}."
                        " Lower --learning_rate, keep --max_grad_norm, or turn off --mixed_precision, then resume"
                        " with --resume_from_checkpoint latest."
                    )
                train_loss += avg_loss.item() / args.gradient_accumulation_steps

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # an optimisation step happened (the end of an accumulation cycle)
            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_unet.step(unet.parameters())
                progress_bar.update(1)
                global_step += 1
                accelerator.log({"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                train_loss = 0.0

                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args, global_step)
                    last_checkpoint = os.path.join(args.output_dir, f"checkpoint-{global_step}")

                if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                    if accelerator.is_main_process:
                        load_sampling_weights(sampling_unet, unet, ema_unet, accelerator)
                        grid = render_samples(
                            pipeline,
                            args,
                            conditioning,
                            len(names or []),
                            validation_prompts,
                            guidance_scale,
                            accelerator.device,
                        )
                        save_image(grid, os.path.join(args.output_dir, "samples", f"step-{global_step:06d}.png"))
                        log_grid(accelerator, grid, global_step)
                    accelerator.wait_for_everyone()

                if args.eval_steps is not None and global_step % args.eval_steps == 0:
                    if accelerator.is_main_process:
                        load_sampling_weights(sampling_unet, unet, ema_unet, accelerator)
                        labels = torch.arange(args.eval_num_samples) % len(names)
                        images = pipeline(
                            class_labels=labels,
                            guidance_scale=guidance_scale,
                            num_inference_steps=args.validation_inference_steps,
                            eta=args.validation_eta,
                            generator=torch.Generator(device=accelerator.device).manual_seed(0),
                            output_type="pt",
                        ).images
                        # the pipeline returns [0, 1]; the evaluator reads the training range [-1, 1]
                        metrics = evaluator.evaluate(images * 2 - 1, labels)
                        accelerator.log({f"eval/{name}": value for name, value in metrics.items()}, step=global_step)
                        with open(os.path.join(args.output_dir, "eval_metrics.jsonl"), "a", encoding="utf-8") as f:
                            f.write(json.dumps({"step": global_step, **metrics}) + "\n")
                        logger.info(f"eval at step {global_step}: {metrics}")
                    accelerator.wait_for_everyone()

            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress_bar.set_postfix(**logs)
        if global_step >= args.max_train_steps:
            break
    progress_bar.close()
    train_seconds = time.monotonic() - train_start

    # 8. the final pipeline (EMA weights), its samples, its card
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        load_sampling_weights(sampling_unet, unet, ema_unet, accelerator)
        pipeline.save_pretrained(args.output_dir)
        grid = render_samples(
            pipeline, args, conditioning, len(names or []), validation_prompts, guidance_scale, accelerator.device
        )
        save_image(grid, os.path.join(args.output_dir, SAMPLE_GRID_NAME))
        log_grid(accelerator, grid, global_step)

        public_args = {name: value for name, value in vars(args).items() if name not in SECRET_ARGS}
        write_text(os.path.join(args.output_dir, ARGS_FILE_NAME), json.dumps(public_args, indent=2, sort_keys=True))

        repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
        if builtin:
            dataset_name = DIGITS_DATASET_NAME
            description = (
                "scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`, the UCI optical"
                " recognition of handwritten digits test set): real 8x8 scans with 16 grey levels, 10 classes."
            )
        else:
            dataset_name = args.dataset_name or args.train_data_dir
            description = f"`{dataset_name}`, column `{args.image_column}`."
        hyperparameters = {
            "prediction_type": prediction_type,
            "num_train_timesteps": num_train_timesteps,
            "beta_schedule": noise_scheduler.config.get("beta_schedule", "n/a (flow)"),
            "conditioning_dropout_prob": conditioning_dropout_prob,
            "block_out_channels": list(sampling_unet.config.block_out_channels),
            "parameters": f"{sum(p.numel() for p in sampling_unet.parameters()):,}",
            "learning_rate": args.learning_rate,
            "lr_scheduler": args.lr_scheduler,
            "lr_warmup_steps": args.lr_warmup_steps,
            "train_batch_size (total)": total_batch_size,
            "max_train_steps": args.max_train_steps,
            "use_ema": args.use_ema,
            "ema_power": args.ema_power if args.use_ema else "n/a",
            "snr_gamma": args.snr_gamma,
            "mixed_precision": accelerator.mixed_precision,
            "seed": args.seed,
        }
        if prediction_type == "flow":
            hyperparameters["weighting_scheme"] = args.weighting_scheme
        if text_encoder is not None:
            hyperparameters["text_encoder"] = args.text_encoder_name_or_path or f"{pretrained} (text_encoder)"
        if vae is not None:
            hyperparameters["vae"] = args.vae_name_or_path or f"{pretrained} (vae)"
        resumed = f" (resumed at step {initial_global_step})" if initial_global_step else ""
        card = render_model_card(
            args.model_card_template,
            repo_id if args.push_to_hub else str(Path(args.output_dir).resolve()),
            conditioning=conditioning,
            dataset_name=dataset_name,
            dataset_description=description,
            num_train_samples=len(dataset),
            resolution=args.resolution,
            class_names=names,
            validation_prompts=validation_prompts,
            hyperparameters=hyperparameters,
            training_steps=global_step,
            training_time=f"{int(train_seconds // 60)} min {int(train_seconds % 60)} s on {accelerator.num_processes} process(es)"
            f" ({accelerator.device.type}){resumed}",
            sample_grid=SAMPLE_GRID_NAME,
            sample_guidance_scale=guidance_scale,
            sample_inference_steps=args.validation_inference_steps,
            sample_eta=None if prediction_type == "flow" else args.validation_eta,
            base_model=base_model,
        )
        write_text(os.path.join(args.output_dir, "README.md"), str(card))
        logger.info(f"Saved the pipeline, {SAMPLE_GRID_NAME} and the model card to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()

    # 9. publish last, so that a failed push leaves a complete local folder
    if args.push_to_hub and accelerator.is_main_process:
        try:
            pushed = push_output_dir(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        except PushToHubError as error:
            logger.error(str(error))
            raise
        logger.info(f"Pushed {args.output_dir} to the Hub repo {pushed}")


def load_sampling_weights(
    sampling_unet: SculptUNet2DModel, unet: torch.nn.Module, ema_unet: EMAModel | None, accelerator: Accelerator
):
    """Copy the EMA weights (or the training weights) into the U-Net the pipeline samples with."""
    if ema_unet is not None:
        ema_unet.copy_to(sampling_unet.parameters())
    else:
        sampling_unet.load_state_dict(accelerator.unwrap_model(unet).state_dict())


def save_image(image, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.tmp-{os.getpid()}.png"
    image.save(staging)
    os.replace(staging, path)


def write_text(path: str, text: str):
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(staging, path)


def log_grid(accelerator: Accelerator, grid, step: int):
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


if __name__ == "__main__":
    main(parse_args())
