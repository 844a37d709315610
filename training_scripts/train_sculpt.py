#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Train (or fine-tune) a SculptPipeline with accelerate.

    accelerate launch training_scripts/train_sculpt.py

trains a class-conditional pixel-space model on scikit-learn's handwritten digits (16x16) in a few minutes on a
CPU; `--model_type dit` trains a Diffusion Transformer instead of the U-Net. See training_scripts/README.md for the
flags, other data, text conditioning, latent training and publishing.
The structure follows diffusers' training examples (train_unconditional.py, train_text_to_image.py).
"""

import argparse
import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from sculptdiff.models.transformers.dit_sculpt import SculptDiT2DModel
from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.training.atomic_files import save_image, write_text
from sculptdiff.training.card import SAMPLE_GRID_NAME, TrainingRun, build_model_card
from sculptdiff.training.checkpointing import (
    apply_optimizer_settings,
    find_resume_checkpoint,
    format_differences,
    register_checkpoint_hooks,
    resolve_checkpoint_path,
    save_checkpoint,
)
from sculptdiff.training.data import (
    DIGITS_CLASS_COLUMN,
    ExampleTransform,
    ImageTransform,
    check_columns,
    class_names,
    class_value_names,
    collate_fn,
    image_mode_for_channels,
    load_training_dataset,
)
from sculptdiff.training.guard import DivergenceGuard
from sculptdiff.training.objective import diffusion_loss
from sculptdiff.training.publish import (
    ARGS_FILE_NAME,
    SECRET_ARGS,
    PushToHubError,
    hub_repo_id,
    portable_training_args,
    push_output_dir,
)
from sculptdiff.training.recipe import (
    RECIPE,
    build_dit,
    build_ema,
    build_noise_scheduler,
    build_unet,
    default_dit_config,
    default_unet_config,
)
from sculptdiff.training.validation import log_grid, render_sample_grid


logger = get_logger(__name__, log_level="INFO")

DEFAULT_MODEL_CARD_TEMPLATE = str(Path(__file__).resolve().parent.parent / "model_cards" / "sculpt_model_card.md")
# The arguments that define a run (with the model type and config, the process count and the precision): see
# run_fingerprint.
# The pipeline component of each --model_type: the slot name is part of the saved format (model_index.json, subfolder).
COMPONENTS = {"unet": "unet", "dit": "transformer"}
# The shape flags of each backbone (--attention_head_dim and --dropout are shared).
UNET_SHAPE_FLAGS = ("block_out_channels", "layers_per_block", "attention_levels", "norm_num_groups")
DIT_SHAPE_FLAGS = ("patch_size", "num_layers", "num_attention_heads")
FINGERPRINT_ARGS = (
    # data
    "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "class_column", "caption_column",
    "resolution", "center_crop", "random_flip", "max_train_samples",
    # frozen models
    "pretrained_model_name_or_path", "text_encoder_name_or_path", "vae_name_or_path",
    # objective
    "num_train_timesteps", "beta_schedule", "rescale_betas_zero_snr", "snr_gamma", "noise_offset",
    "weighting_scheme", "logit_mean", "logit_std",
    # optimisation
    "seed", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "train_batch_size", "gradient_accumulation_steps",
    "use_ema", "ema_decay", "ema_inv_gamma", "ema_power",
)  # fmt: skip


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
        help=(
            "A saved SculptPipeline (folder or Hub repo id) to fine-tune; its denoiser (U-Net or transformer),"
            " scheduler and text encoder are used."
        ),
    )
    parser.add_argument(
        "--model_type",
        type=str,
        default=None,
        choices=list(COMPONENTS),
        help=(
            "The denoising network: `unet` (SculptUNet2DModel, the default for a new model) or `dit` (SculptDiT2DModel,"
            " a Diffusion Transformer, Peebles & Xie 2022; with --prediction_type flow it is SiT, Ma et al. 2024),"
            " saved as the pipeline's `transformer`. Fine-tuning defaults to the backbone of"
            " --pretrained_model_name_or_path and refuses another."
        ),
    )
    parser.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help=(
            "A SculptUNet2DModel (or, with --model_type dit, SculptDiT2DModel) config (config.json, or a folder"
            " holding one) for a new model; shape flags override it."
        ),
    )
    parser.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=None,
        help="U-Net: channels of each level, highest resolution first (default 32 64 64).",
    )
    parser.add_argument(
        "--layers_per_block",
        type=int,
        default=None,
        help="U-Net: residual blocks per level on the down path (default 1).",
    )
    parser.add_argument(
        "--attention_levels",
        type=int,
        nargs="+",
        default=None,
        help="U-Net: one 0/1 flag per level, attention at that level (default 0 0 1: attention at the lowest level).",
    )
    parser.add_argument(
        "--attention_head_dim",
        type=int,
        default=None,
        help="Channels per attention head (default 32 for the U-Net, 16 for the DiT).",
    )
    parser.add_argument(
        "--norm_num_groups",
        type=int,
        default=None,
        help="U-Net: GroupNorm groups; must divide every entry of --block_out_channels (default 8).",
    )
    parser.add_argument(
        "--dropout", type=float, default=None, help="Dropout in the U-Net or transformer blocks (default 0.0)."
    )
    parser.add_argument(
        "--patch_size",
        type=int,
        default=None,
        help=(
            "DiT: side of the square patches that become tokens (default 2, DiT's best: a 16 px image is 64 tokens);"
            " --resolution must be a multiple of it."
        ),
    )
    parser.add_argument(
        "--num_layers",
        type=int,
        default=None,
        help="DiT: number of transformer blocks (default 6; DiT-S has 12, cut for a CPU).",
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int,
        default=None,
        help=(
            "DiT: attention heads per block (default 6, DiT-S's); the width is heads x --attention_head_dim (default"
            " 6 x 16 = 96, about the default U-Net's parameter count: sculptdiff.training.recipe.default_dit_config)."
        ),
    )
    parser.add_argument(
        "--text_encoder_name_or_path",
        type=str,
        default=None,
        help=(
            "A transformers text encoder + tokenizer (folder or Hub id) for caption training; it stays frozen and its"
            " last_hidden_state feeds the denoiser's cross-attention (cross_attention_dim = its hidden size)."
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
            "What the denoiser learns to predict: the noise (epsilon, DDPM), the velocity (v_prediction, Salimans & Ho"
            " 2022), the clean sample, or the rectified-flow velocity eps - x_0 (flow). Default: epsilon, or the"
            " fine-tuned model's."
        ),
    )
    parser.add_argument(
        "--num_train_timesteps",
        type=int,
        default=RECIPE.num_train_timesteps,
        help="Number of diffusion steps T of the training schedule.",
    )
    parser.add_argument(
        "--beta_schedule",
        type=str,
        default=RECIPE.beta_schedule,
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
            " Class labels are dropped by the denoiser's embedder (stored in its config); captions are replaced by the"
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
    parser.add_argument(
        "--learning_rate", type=float, default=RECIPE.learning_rate, help="Learning rate after warm-up (AdamW)."
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default=RECIPE.lr_scheduler,
        help=(
            'The learning-rate schedule: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",'
            ' "constant_with_warmup" (diffusers.optimization.get_scheduler).'
        ),
    )
    parser.add_argument(
        "--lr_warmup_steps", type=int, default=RECIPE.lr_warmup_steps, help="Warm-up steps of the learning rate."
    )
    parser.add_argument("--adam_beta1", type=float, default=RECIPE.adam_beta1, help="AdamW beta1.")
    parser.add_argument("--adam_beta2", type=float, default=RECIPE.adam_beta2, help="AdamW beta2.")
    parser.add_argument(
        "--adam_weight_decay", type=float, default=RECIPE.adam_weight_decay, help="AdamW weight decay."
    )
    parser.add_argument("--adam_epsilon", type=float, default=RECIPE.adam_epsilon, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=RECIPE.max_grad_norm, help="Gradient clipping norm.")
    parser.add_argument(
        "--train_batch_size",
        type=int,
        default=RECIPE.train_batch_size,
        help="Batch size per process (per device) for training.",
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
    parser.add_argument("--ema_decay", type=float, default=RECIPE.ema_decay, help="The maximum EMA decay.")
    parser.add_argument(
        "--ema_inv_gamma",
        type=float,
        default=RECIPE.ema_inv_gamma,
        help="Inverse gamma of the EMA warm-up (decay 1 - (1 + step/inv_gamma)^-power).",
    )
    parser.add_argument(
        "--ema_power",
        type=float,
        default=RECIPE.ema_power,
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
            '"latest": resume the newest checkpoint in --output_dir that reads back in full and belongs to this run'
            " (same data, model, objective, seed, batch and optimizer settings: stored in its run_fingerprint.json;"
            " a fresh start when there is none). A checkpoint folder (a path, or a checkpoint-<step> name inside"
            " --output_dir): resume it even if it was trained with other settings; this run's learning rate, AdamW"
            " and EMA settings then apply from the next step, and training_args.json and the card record the change."
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
            " classifier's feature space; sculptdiff.evaluation.digits) to the trackers and eval_metrics.jsonl."
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
        help=(
            "Refused: a token on the command line leaks into shell history, process lists and CI logs. Log in with"
            " `hf auth login` or set HF_TOKEN instead."
        ),
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
    if args.pretrained_model_name_or_path is None:
        # a new model: unet unless asked (a fine-tuned one takes the saved backbone, known once its folder is read)
        args.model_type = args.model_type or "unet"
        own_flags, other_flags = (
            (UNET_SHAPE_FLAGS, DIT_SHAPE_FLAGS) if args.model_type == "unet" else (DIT_SHAPE_FLAGS, UNET_SHAPE_FLAGS)
        )
        given = [f"--{flag}" for flag in other_flags if getattr(args, flag) is not None]
        if given:
            raise ValueError(
                f"{' '.join(given)}: not a flag of --model_type {args.model_type}, whose shape flags are"
                f" {', '.join('--' + flag for flag in own_flags)}, --attention_head_dim and --dropout."
            )
    # a config file or a fine-tuned model may have another number of levels: build_unet checks those
    if (
        args.attention_levels is not None
        and args.model_config_name_or_path is None
        and args.pretrained_model_name_or_path is None
    ):
        levels = len(args.block_out_channels or default_unet_config()["block_out_channels"])
        if len(args.attention_levels) != levels:
            raise ValueError(
                f"--attention_levels needs one 0/1 flag per level of --block_out_channels ({levels} levels), got"
                f" {args.attention_levels}."
            )
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = RECIPE.max_train_steps
    if args.hub_token is not None:
        # the value is never repeated: this message reaches the logs
        raise ValueError(
            "--hub_token is not accepted: a token on the command line leaks into shell history, process lists and"
            " CI logs (accelerate launch prints the whole command line of a failed run). Log in once with"
            " `hf auth login`, or set the HF_TOKEN environment variable, and drop --hub_token."
        )
    positive = (
        "resolution", "max_train_steps", "num_train_epochs", "train_batch_size", "gradient_accumulation_steps",
        "num_train_timesteps", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
        "num_validation_images", "validation_inference_steps", "eval_steps", "eval_num_samples", "patch_size",
        "num_layers", "num_attention_heads", "attention_head_dim",
    )  # fmt: skip
    for flag in positive:
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


def pretrained_model_type(pretrained: str, cache_dir: str | None) -> str:
    """The --model_type of a saved SculptPipeline: which denoiser slot its model_index.json fills."""
    index = SculptPipeline.load_config(pretrained, cache_dir=cache_dir)
    # an empty optional slot is saved as [null, null]
    filled = [model_type for model_type, component in COMPONENTS.items() if (index.get(component) or [None])[0]]
    if len(filled) != 1:
        raise ValueError(
            f"--pretrained_model_name_or_path {pretrained!r} is not a SculptPipeline with one denoiser: its"
            f" model_index.json fills {[COMPONENTS[name] for name in filled]} of 'unet' and 'transformer'."
        )
    return filled[0]


def load_or_build_denoiser(args: argparse.Namespace, data_config: dict) -> SculptUNet2DModel | SculptDiT2DModel:
    """A new U-Net or DiT (the recipe's shape, or a config file, with the shape flags on top), or the denoiser of the
    pipeline being fine-tuned."""
    model_class = SculptUNet2DModel if args.model_type == "unet" else SculptDiT2DModel
    if args.pretrained_model_name_or_path is not None:
        # config overrides: the objective and dropout of this run, and what the data decides
        return model_class.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder=COMPONENTS[args.model_type],
            cache_dir=args.cache_dir,
            **data_config,
        )

    config = None
    if args.model_config_name_or_path is not None:
        config = dict(model_class.load_config(args.model_config_name_or_path, cache_dir=args.cache_dir))
    if args.model_type == "dit":
        shape_flags = {
            "patch_size": args.patch_size,
            "num_layers": args.num_layers,
            "num_attention_heads": args.num_attention_heads,
            "attention_head_dim": args.attention_head_dim,
            "dropout": args.dropout,
        }
        build = build_dit
    else:
        shape_flags = {
            "block_out_channels": tuple(args.block_out_channels) if args.block_out_channels else None,
            "layers_per_block": args.layers_per_block,
            "attention_levels": tuple(bool(flag) for flag in args.attention_levels) if args.attention_levels else None,
            "attention_head_dim": args.attention_head_dim,
            "norm_num_groups": args.norm_num_groups,
            "dropout": args.dropout,
        }
        build = build_unet
    shape = {name: value for name, value in shape_flags.items() if value is not None}
    return build(config, **shape, **data_config)


def dit_patch_size(args: argparse.Namespace) -> int:
    """The patch size of the DiT this run trains: the fine-tuned model's, --patch_size, the config file's or the
    recipe's."""
    if args.pretrained_model_name_or_path is not None:
        config = SculptDiT2DModel.load_config(
            args.pretrained_model_name_or_path, subfolder="transformer", cache_dir=args.cache_dir
        )
        return config["patch_size"]
    if args.patch_size is not None:
        return args.patch_size
    if args.model_config_name_or_path is not None:
        config = SculptDiT2DModel.load_config(args.model_config_name_or_path, cache_dir=args.cache_dir)
        return config.get("patch_size", default_dit_config()["patch_size"])
    return default_dit_config()["patch_size"]


def check_resolution(resolution: int, factor: int, network: str, reason: str):
    """--resolution must pass through the VAE and the network: a multiple of the product of their downsampling
    factors, `factor`."""
    if resolution % factor != 0:
        raise ValueError(
            f"--resolution {resolution} cannot pass through this {network}: it must be a multiple of {factor}"
            f" ({reason}), e.g. {max(factor, resolution // factor * factor)} or {(resolution // factor + 1) * factor}."
        )


def encode_captions(pipeline: SculptPipeline, captions: list[str], device: torch.device) -> torch.Tensor:
    # The pipeline's own prompt encoding, so that training and sampling see the same embeddings; the null condition
    # is the dropped caption itself (the empty prompt), so no negative embeddings are encoded here.
    with torch.no_grad():
        return pipeline.encode_prompt(captions, device, do_classifier_free_guidance=False)[0]


def run_fingerprint(
    args: argparse.Namespace, denoiser: SculptUNet2DModel | SculptDiT2DModel, accelerator: Accelerator
) -> dict:
    """What defines this run, stored with each checkpoint: `latest` resumes only a checkpoint with the same one.

    Left out: what may change between a run and its resume without changing the weights it trains (logging,
    validation, checkpointing, publishing) and `--max_train_steps` / `--num_train_epochs`, so that a finished run can
    be extended (the LR schedule then follows the new length).
    """
    fingerprint = {name: getattr(args, name) for name in FINGERPRINT_ARGS}
    # a local folder counts by where it is, however it was spelled
    for name in ("train_data_dir", "dataset_name", "pretrained_model_name_or_path", "text_encoder_name_or_path"):
        if fingerprint[name] is not None and os.path.exists(fingerprint[name]):
            fingerprint[name] = os.path.realpath(fingerprint[name])
    if args.vae_name_or_path is not None and os.path.exists(args.vae_name_or_path):
        fingerprint["vae_name_or_path"] = os.path.realpath(args.vae_name_or_path)
    # the denoiser's config holds the shape, the objective and what the data decided (classes, channels, size)
    config = accelerator.unwrap_model(denoiser).config
    fingerprint["model_type"] = args.model_type
    fingerprint[f"{COMPONENTS[args.model_type]}_config"] = {
        name: value for name, value in config.items() if not name.startswith("_")
    }
    fingerprint["num_processes"] = accelerator.num_processes
    fingerprint["mixed_precision"] = accelerator.mixed_precision
    return fingerprint


def render_grid(
    pipeline: SculptPipeline,
    args: argparse.Namespace,
    names: list[str] | None,
    validation_prompts: list[str] | None,
    guidance_scale: float,
    accelerator: Accelerator,
):
    """The sample grid of the validation settings, from a fixed seed: one row per class (up to 10) or prompt."""
    return render_sample_grid(
        pipeline,
        num_images=args.num_validation_images,
        num_inference_steps=args.validation_inference_steps,
        guidance_scale=guidance_scale,
        seed=args.seed if args.seed is not None else 0,
        device=accelerator.device,
        num_classes=len(names) if names is not None else None,
        prompts=validation_prompts,
        # the flow sampler is deterministic and takes no eta
        eta=None if pipeline.denoiser.config.prediction_type == "flow" else args.validation_eta,
    )


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

    # 3. the denoiser (U-Net or DiT): what the data decides goes into its config, so the saved pipeline knows it
    if pretrained is not None:
        saved_model_type = pretrained_model_type(pretrained, args.cache_dir)
        if args.model_type not in (None, saved_model_type):
            raise ValueError(
                f"--model_type {args.model_type} but --pretrained_model_name_or_path {pretrained!r} holds a"
                f" {saved_model_type} (its `{COMPONENTS[saved_model_type]}`): pass --model_type {saved_model_type}"
                " or drop the flag to fine-tune it, or drop --pretrained_model_name_or_path to train a new"
                f" {args.model_type}."
            )
        args.model_type = saved_model_type
    component = COMPONENTS[args.model_type]
    network = "U-Net" if args.model_type == "unet" else "DiT"
    data_config = {"sample_size": args.resolution // vae_scale_factor}
    if args.prediction_type is not None or pretrained is None:
        data_config["prediction_type"] = args.prediction_type or RECIPE.prediction_type
    if args.conditioning_dropout_prob is not None or pretrained is None:
        # 10% null condition: the classifier-free guidance paper's best range (Ho & Salimans 2022)
        data_config["conditioning_dropout_prob"] = (
            args.conditioning_dropout_prob
            if args.conditioning_dropout_prob is not None
            else RECIPE.conditioning_dropout_prob
        )
    if pretrained is None:
        channels = vae.config.latent_channels if vae is not None else (1 if builtin else 3)
        data_config.update({"in_channels": channels, "out_channels": channels})
        if conditioning == "class":
            data_config["num_class_embeds"] = len(names)
            data_config["id2label"] = {str(index): name for index, name in enumerate(names)}
        if conditioning == "text":
            data_config["cross_attention_dim"] = text_encoder.config.hidden_size
    if args.model_type == "dit":
        # checked before the DiT is built, which refuses a sample size its patches do not tile, naming no flag
        patch_size = dit_patch_size(args)
        reason = f"patches of {patch_size}{' in a VAE latent space' if vae else ''}"
        check_resolution(args.resolution, vae_scale_factor * patch_size, network, reason)
    denoiser = load_or_build_denoiser(args, data_config)
    if pretrained is not None:
        if (denoiser.config.num_class_embeds is not None) != (conditioning == "class"):
            raise ValueError(
                f"The {network} of {pretrained!r} is {'' if denoiser.config.num_class_embeds else 'not '}class-conditional"
                f" but this run's data is {'' if conditioning == 'class' else 'not '}: set --class_column accordingly."
            )
        if (denoiser.config.cross_attention_dim is not None) != (conditioning == "text"):
            raise ValueError(
                f"The {network} of {pretrained!r} {'takes' if denoiser.config.cross_attention_dim else 'does not take'} text;"
                " set --caption_column accordingly."
            )
        if conditioning == "class" and len(names) != denoiser.config.num_class_embeds:
            raise ValueError(
                f"{pretrained!r} has {denoiser.config.num_class_embeds} classes but --class_column has {len(names)}."
            )
    prediction_type = denoiser.config.prediction_type
    conditioning_dropout_prob = denoiser.config.conditioning_dropout_prob
    if args.model_type == "unet":
        levels = len(denoiser.config.block_out_channels)
        factor = vae_scale_factor * 2 ** (levels - 1)
        check_resolution(args.resolution, factor, network, f"{levels} levels{' in a VAE latent space' if vae else ''}")
    image_mode = image_mode_for_channels(vae.config.in_channels if vae is not None else denoiser.config.in_channels)

    # 4. the forward process: DDPM family (Ho et al. 2020) or rectified flow (Liu et al. 2022)
    if prediction_type != "flow" and pretrained is not None and args.prediction_type is None:
        noise_scheduler = SculptScheduler.from_pretrained(pretrained, subfolder="scheduler")
    else:
        noise_scheduler = build_noise_scheduler(
            prediction_type,
            num_train_timesteps=args.num_train_timesteps,
            beta_schedule=args.beta_schedule,
            rescale_betas_zero_snr=args.rescale_betas_zero_snr,
            # pixels live in [-1, 1]; latents do not
            clip_sample=vae is None,
        )

    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()

    # 5. EMA of the weights (Polyak averaging, as in DDPM's released models), with crowsonkb's warm-up so that short
    # runs average recent weights rather than the random initialisation
    ema_denoiser = build_ema(denoiser, args.ema_decay, args.ema_inv_gamma, args.ema_power) if args.use_ema else None
    # the model that samples: a copy made now, so that making it never draws from the RNG mid-training
    sampling_denoiser = copy.deepcopy(denoiser).eval()
    sampling_denoiser.requires_grad_(False)

    # 6. checkpoints hold save_pretrained folders (safetensors) for the denoiser and its EMA
    ema_models = {f"{component}_ema": ema_denoiser} if args.use_ema else {}
    register_checkpoint_hooks(accelerator, model_folders=[component], ema_models=ema_models)

    optimizer = torch.optim.AdamW(
        denoiser.parameters(),
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
            class_names=class_value_names(dataset, class_column),
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

    denoiser, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        denoiser, optimizer, train_dataloader, lr_scheduler
    )
    if args.use_ema:
        ema_denoiser.to(accelerator.device)
    if text_encoder is not None:
        text_encoder.to(accelerator.device)
    if vae is not None:
        vae.to(accelerator.device)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # the pipeline that samples during and after training; it also owns prompt encoding
    sample_scheduler = copy.deepcopy(noise_scheduler)
    pipeline = SculptPipeline(
        **{component: sampling_denoiser},
        scheduler=sample_scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
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
        if conditioning != "class" or sampling_denoiser.config.in_channels != 1 or args.resolution not in (16, 32):
            raise ValueError(
                "--eval_steps scores digits: it needs a class-conditional 1-channel model at --resolution 16 or 32"
                " (the built-in digits data). Drop --eval_steps for other data."
            )
        # imported only here: the trainer depends on the digits evaluator only through --eval_steps
        from sculptdiff.evaluation.digits import DigitsEvaluator

        evaluator = DigitsEvaluator(args.resolution) if accelerator.is_main_process else None

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(dataset)}")
    logger.info(f"  Num Epochs = {num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  {type(denoiser).__name__} parameters = {sum(p.numel() for p in denoiser.parameters()):,}")

    # 7. resume: only a checkpoint of this run (same fingerprint) unless one is named explicitly
    fingerprint = run_fingerprint(args, denoiser, accelerator)
    resume = find_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        fingerprint,
        model_folders=[component, *ema_models],
        num_processes=accelerator.num_processes,
        max_train_steps=args.max_train_steps,
    )
    global_step = 0
    first_epoch = 0
    if resume is not None:
        logger.info(f"Resuming from checkpoint {resume.path}")
        accelerator.load_state(resume.path)
        global_step = resume.step
        first_epoch = global_step // num_update_steps_per_epoch
        if resume.differences:
            # resumed on purpose with other settings: the optimizer and EMA take this run's from here on
            apply_optimizer_settings(
                optimizer,
                lr_scheduler,
                args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.adam_weight_decay,
            )
            if ema_denoiser is not None:
                ema_denoiser.decay, ema_denoiser.inv_gamma = args.ema_decay, args.ema_inv_gamma
                ema_denoiser.power = args.ema_power
            logger.warning(
                f"{resume.path} was trained with other settings: {format_differences(resume.differences)}. This"
                f" run's settings apply from step {global_step + 1} (the random streams continue the checkpoint's);"
                f" {ARGS_FILE_NAME} and the model card record both."
            )
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
    initial_global_step = global_step
    # stops at the first non-finite loss or weights, naming the newest checkpoint whose weights gave a finite loss
    guard = DivergenceGuard(accelerator, resumed_checkpoint=resume.path if resume is not None else None)

    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    train_start = time.monotonic()
    train_loss = 0.0
    last_batch = None
    for epoch in range(first_epoch, num_train_epochs):
        denoiser.train()
        train_dataloader.set_epoch(epoch)
        if epoch == first_epoch and resume_batches > 0:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        else:
            active_dataloader = train_dataloader
        for batch in active_dataloader:
            # checked first: a run resumed at its last step trains no more
            if global_step >= args.max_train_steps:
                break
            with accelerator.accumulate(denoiser):
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

                encoder_hidden_states = None
                class_labels = None
                if conditioning == "class":
                    # dropped to the null class by the denoiser's embedder (conditioning_dropout_prob in its config)
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

                # kept for the check of the final weights
                last_batch = {
                    "latents": latents,
                    "class_labels": class_labels,
                    "encoder_hidden_states": encoder_hidden_states,
                }
                loss = diffusion_loss(
                    denoiser,
                    noise_scheduler,
                    latents,
                    prediction_type,
                    class_labels=class_labels,
                    encoder_hidden_states=encoder_hidden_states,
                    snr_gamma=args.snr_gamma,
                    noise_offset=args.noise_offset,
                    weighting_scheme=args.weighting_scheme,
                    logit_mean=args.logit_mean,
                    logit_std=args.logit_std,
                )

                # the mean over all processes: logged, and checked after the update on every process alike
                avg_loss = accelerator.gather(loss.detach().repeat(bsz)).mean()
                train_loss += avg_loss.item() / args.gradient_accumulation_steps

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # an optimisation step happened (the end of an accumulation cycle)
            if accelerator.sync_gradients:
                global_step += 1
                # after the update and before anything is saved: a finite loss can still overflow the weights
                guard.check_step(global_step, train_loss, denoiser.named_parameters())
                if args.use_ema:
                    ema_denoiser.step(denoiser.parameters())
                progress_bar.update(1)
                accelerator.log({"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                train_loss = 0.0

                if global_step % args.checkpointing_steps == 0:
                    path = save_checkpoint(
                        accelerator, args.output_dir, global_step, fingerprint, args.checkpoints_total_limit
                    )
                    guard.checkpoint_saved(path)

                if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                    if accelerator.is_main_process:
                        load_sampling_weights(sampling_denoiser, denoiser, ema_denoiser, accelerator)
                        grid = render_grid(pipeline, args, names, validation_prompts, guidance_scale, accelerator)
                        save_image(grid, os.path.join(args.output_dir, "samples", f"step-{global_step:06d}.png"))
                        log_grid(accelerator, grid, global_step)
                    accelerator.wait_for_everyone()

                if args.eval_steps is not None and global_step % args.eval_steps == 0:
                    if accelerator.is_main_process:
                        load_sampling_weights(sampling_denoiser, denoiser, ema_denoiser, accelerator)
                        labels = torch.arange(args.eval_num_samples) % len(names)
                        images = pipeline(
                            class_labels=labels,
                            guidance_scale=guidance_scale,
                            num_inference_steps=args.validation_inference_steps,
                            # the flow sampler is deterministic and takes no eta
                            eta=None if prediction_type == "flow" else args.validation_eta,
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

    # 8. the final pipeline (EMA weights), checked before anything is written, its samples, its card
    accelerator.wait_for_everyone()
    load_sampling_weights(sampling_denoiser, denoiser, ema_denoiser, accelerator)
    final_loss = None
    if last_batch is not None:
        with torch.no_grad():
            final_loss = diffusion_loss(
                sampling_denoiser,
                noise_scheduler,
                prediction_type=prediction_type,
                generator=torch.Generator(device=accelerator.device).manual_seed(0),
                **last_batch,
            ).item()
    guard.check_final(final_loss, sampling_denoiser.named_parameters(), args.output_dir)
    if accelerator.is_main_process:
        pipeline.save_pretrained(args.output_dir)
        grid = render_grid(pipeline, args, names, validation_prompts, guidance_scale, accelerator)
        save_image(grid, os.path.join(args.output_dir, SAMPLE_GRID_NAME))
        log_grid(accelerator, grid, global_step)

        training_args = portable_training_args(vars(args))
        if resume is not None:
            # what the checkpoint's run used where this run differs (this run's values are the arguments above)
            settings_before = {name: old for name, (old, _) in resume.differences.items()}
            training_args["resumed_from"] = {
                "checkpoint": os.path.basename(os.path.normpath(resume.path)),
                "step": resume.step,
                "settings_before": portable_training_args(settings_before),
            }
        write_text(os.path.join(args.output_dir, ARGS_FILE_NAME), json.dumps(training_args, indent=2, sort_keys=True))

        card = build_model_card(
            args,
            pipeline,
            TrainingRun(
                num_train_samples=len(dataset),
                training_steps=global_step,
                train_seconds=train_seconds,
                total_batch_size=total_batch_size,
                num_processes=accelerator.num_processes,
                device_type=accelerator.device.type,
                mixed_precision=accelerator.mixed_precision,
                sample_guidance_scale=guidance_scale,
                resumed_from_step=initial_global_step,
                validation_prompts=validation_prompts,
                resumed_settings=resume.differences if resume is not None else {},
            ),
        )
        write_text(os.path.join(args.output_dir, "README.md"), str(card))
        logger.info(f"Saved the pipeline, {SAMPLE_GRID_NAME} and the model card to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()

    # 9. publish last, so that a failed push leaves a complete local folder
    if args.push_to_hub and accelerator.is_main_process:
        try:
            # the token comes from HF_TOKEN or `hf auth login`, never from the command line
            pushed = push_output_dir(
                args.output_dir,
                hub_repo_id(args),
                pipeline.hub_allow_patterns() + [SAMPLE_GRID_NAME, ARGS_FILE_NAME],
                private=args.hub_private_repo,
            )
        except PushToHubError as error:
            logger.error(str(error))
            raise
        logger.info(f"Pushed {args.output_dir} to the Hub repo {pushed}")


def load_sampling_weights(
    sampling_denoiser: SculptUNet2DModel | SculptDiT2DModel,
    denoiser: torch.nn.Module,
    ema_denoiser: EMAModel | None,
    accelerator: Accelerator,
):
    """Copy the EMA weights (or the training weights) into the denoiser the pipeline samples with."""
    if ema_denoiser is not None:
        ema_denoiser.copy_to(sampling_denoiser.parameters())
    else:
        sampling_denoiser.load_state_dict(accelerator.unwrap_model(denoiser).state_dict())


if __name__ == "__main__":
    main(parse_args())
