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
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.training_utils import EMAModel
from transformers import AutoModel, AutoTokenizer

from sculptdiff.models.transformers.dit_sculpt import SculptDiT2DModel
from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler
from sculptdiff.training.arguments import (
    add_checkpointing_arguments,
    add_condition_arguments,
    add_data_arguments,
    add_hub_arguments,
    add_logging_arguments,
    add_optimization_arguments,
    add_run_arguments,
    add_sampling_arguments,
    check_checkpointing_arguments,
    check_condition_arguments,
    check_data_arguments,
    check_hub_arguments,
    check_logging_arguments,
    check_optimization_arguments,
    check_positive,
    check_run_arguments,
    check_sampling_arguments,
)
from sculptdiff.training.atomic_files import save_image, write_text
from sculptdiff.training.card import BASE_SAMPLE_GRID_NAME, SAMPLE_GRID_NAME, TrainingRun, build_model_card
from sculptdiff.training.checkpointing import register_checkpoint_hooks, resume_run, save_checkpoint, training_batches
from sculptdiff.training.data import (
    DIGITS_CLASS_COLUMN,
    batch_latents,
    check_columns,
    class_names,
    image_mode_for_channels,
    load_run_dataset,
    set_training_transform,
)
from sculptdiff.training.guard import DivergenceGuard
from sculptdiff.training.lora import (
    LORA_WEIGHT_NAME,
    add_lora_adapter,
    fuse_lora_adapter,
    lora_target_modules,
    save_lora_weights,
)
from sculptdiff.training.objective import diffusion_loss
from sculptdiff.training.optimization import optimizer_step, prepare_training
from sculptdiff.training.publish import ARGS_FILE_NAME, push_run, write_training_args
from sculptdiff.training.recipe import (
    RECIPE,
    build_dit,
    build_ema,
    build_noise_scheduler,
    build_unet,
    default_dit_config,
    default_unet_config,
)
from sculptdiff.training.runtime import init_trackers, make_accelerator, step_progress_bar
from sculptdiff.training.validation import log_grid, render_sample_grid


logger = get_logger(__name__, log_level="INFO")

DEFAULT_MODEL_CARD_TEMPLATE = str(Path(__file__).resolve().parent.parent / "model_cards" / "sculpt_model_card.md")
# the card of a --lora_rank run, unless --model_card_template names another
DEFAULT_LORA_MODEL_CARD_TEMPLATE = str(
    Path(__file__).resolve().parent.parent / "model_cards" / "sculpt_lora_model_card.md"
)
# The arguments that define a run (with the model type and config, the process count and the precision): see
# run_fingerprint.
# The pipeline component of each --model_type: the slot name is part of the saved format (model_index.json, subfolder).
DEFAULT_RESOLUTION = 16
COMPONENTS = {"unet": "unet", "dit": "transformer"}
# The denoisers --pretrained_model_name_or_path may hold, by their class name in model_index.json: ours, and the stock
# diffusers backbones of DDPMPipeline, StableDiffusionPipeline and DiTPipeline, fine-tuned as they are (no conversion).
PRETRAINED_DENOISERS = {
    model_class.__name__: model_class
    for model_class in (SculptUNet2DModel, SculptDiT2DModel, UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel)
}
STOCK_DENOISERS = (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel)
# The shape flags of each backbone (--attention_head_dim and --dropout are shared).
UNET_SHAPE_FLAGS = ("block_out_channels", "layers_per_block", "attention_levels", "norm_num_groups")
DIT_SHAPE_FLAGS = ("patch_size", "num_layers", "num_attention_heads", "long_skip_connections")
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
    # LoRA
    "lora_rank", "lora_alpha", "lora_target_modules",
)  # fmt: skip


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a SculptPipeline (class, text or unconditional) with accelerate."
    )
    # the groups every training script shares (sculptdiff.training.arguments), then this script's own flags
    add_data_arguments(parser)
    # 16, or with --vae_name_or_path the resolution the VAE was trained at (main reads it from the VAE's config)
    parser.set_defaults(resolution=None)
    add_condition_arguments(parser)
    add_optimization_arguments(parser)
    add_run_arguments(parser, output_dir="sculpt-digits", outputs="the pipeline, the sample grid, the model card")
    add_checkpointing_arguments(parser)
    add_logging_arguments(parser)
    add_sampling_arguments(parser)
    add_hub_arguments(parser, model_card_template=DEFAULT_MODEL_CARD_TEMPLATE)

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
            " a Diffusion Transformer, Peebles & Xie 2022; with --prediction_type flow it is SiT, Ma et al. 2024, which"
            " on the digits matches the U-Net at equal time where epsilon trails it), saved as the pipeline's"
            " `transformer`. Fine-tuning defaults to the backbone of"
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
        "--long_skip_connections",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "DiT: long skips from each block of the first half to its mirror in the second (U-ViT; default on: faster"
            " early on, caught up with after 10 CPU minutes on the digits); --no-long_skip_connections: DiT's plain"
            " stack."
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

    # LoRA
    parser.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help=(
            "Train only a LoRA adapter of this rank (Hu et al. 2021) on the denoiser of"
            " --pretrained_model_name_or_path, which stays frozen; saved as diffusers saves LoRA weights"
            " (pytorch_lora_weights.safetensors, loaded with `pipe.load_lora_weights`). Without it the whole denoiser"
            " is fine-tuned."
        ),
    )
    parser.add_argument(
        "--lora_alpha",
        type=float,
        default=None,
        help="LoRA alpha: the adapter's output is scaled by alpha / rank (default: alpha = rank, scale 1).",
    )
    parser.add_argument(
        "--lora_target_modules",
        type=str,
        default=None,
        help=(
            "Comma-separated layer names the LoRA adapts; `attention` (the default) and `feed_forward` stand for the"
            " backbone's attention projections and the layers next to them, e.g. `attention,feed_forward` or"
            " `to_q,to_v`."
        ),
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
        "--num_train_timesteps", type=int, default=RECIPE.num_train_timesteps, help="Diffusion steps T."
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

    # evaluation and text prompts
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

    args = parser.parse_args(input_args)

    # combinations, checked before anything is loaded
    check_data_arguments(args)
    check_condition_arguments(args)
    check_optimization_arguments(args)
    check_run_arguments(args)
    check_checkpointing_arguments(args)
    check_logging_arguments(args)
    check_sampling_arguments(args)
    check_hub_arguments(args)
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
    if args.lora_rank is None:
        given = [f"--{flag}" for flag in ("lora_alpha", "lora_target_modules") if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"{' '.join(given)} set(s) up a LoRA adapter: add --lora_rank.")
    else:
        if args.pretrained_model_name_or_path is None:
            raise ValueError(
                "--lora_rank trains an adapter on a trained model: pass the pipeline to adapt with"
                " --pretrained_model_name_or_path."
            )
        if args.lora_alpha is not None and args.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {args.lora_alpha}.")
        if args.model_card_template == DEFAULT_MODEL_CARD_TEMPLATE:
            args.model_card_template = DEFAULT_LORA_MODEL_CARD_TEMPLATE
    check_positive(
        args, "lora_rank", "num_train_timesteps", "eval_steps", "eval_num_samples", "patch_size", "num_layers",
        "num_attention_heads", "attention_head_dim",
    )  # fmt: skip
    return args


def pretrained_denoiser(pretrained: str, cache_dir: str | None) -> tuple[str, type]:
    """The --model_type and the denoiser class of a saved pipeline (a SculptPipeline, or a diffusers pipeline whose
    `unet` or `transformer` is a stock backbone): which denoiser slot its model_index.json fills, and with what."""
    index = DiffusionPipeline.load_config(pretrained, cache_dir=cache_dir)
    # a slot is saved as [library, class name]; an empty optional slot as [null, null]
    filled = {
        model_type: (index.get(component) or [None, None])[1]
        for model_type, component in COMPONENTS.items()
        if (index.get(component) or [None, None])[1]
    }
    if len(filled) != 1 or next(iter(filled.values())) not in PRETRAINED_DENOISERS:
        found = ", ".join(f"`{COMPONENTS[model_type]}` {name}" for model_type, name in filled.items()) or "no denoiser"
        raise ValueError(
            f"--pretrained_model_name_or_path {pretrained!r} is a {index.get('_class_name')} with {found}: the"
            " trainer fine-tunes a pipeline whose one denoiser (its `unet` or `transformer`) is one of"
            f" {', '.join(PRETRAINED_DENOISERS)}."
        )
    ((model_type, class_name),) = filled.items()
    return model_type, PRETRAINED_DENOISERS[class_name]


def denoiser_num_classes(config: dict) -> int | None:
    """The classes of a denoiser config: diffusers' DiT keeps them in its adaLN-Zero norms (`num_embeds_ada_norm`),
    the U-Nets and ours in `num_class_embeds` (as `SculptPipeline.num_classes` reads them)."""
    if config.get("norm_type") == "ada_norm_zero":
        return config["num_embeds_ada_norm"]
    return config.get("num_class_embeds")


def load_or_build_denoiser(
    args: argparse.Namespace, data_config: dict, pretrained_class: type | None = None
) -> torch.nn.Module:
    """A new U-Net or DiT (the recipe's shape, or a config file, with the shape flags on top), or the denoiser of the
    pipeline being fine-tuned, of its own class `pretrained_class`."""
    if args.pretrained_model_name_or_path is not None:
        # config overrides: the objective and dropout of this run, and what the data decides
        return pretrained_class.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder=COMPONENTS[args.model_type],
            cache_dir=args.cache_dir,
            **data_config,
        )

    model_class = SculptUNet2DModel if args.model_type == "unet" else SculptDiT2DModel
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
            "long_skip_connections": args.long_skip_connections,
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
        eta=None if isinstance(pipeline.scheduler, SculptFlowScheduler) else args.validation_eta,
    )


def main(args: argparse.Namespace):
    accelerator = make_accelerator(args)

    # 0. the pipeline being fine-tuned: which denoiser, of which class, with which config
    pretrained = args.pretrained_model_name_or_path
    pretrained_class = pretrained_config = None
    if pretrained is not None:
        saved_model_type, pretrained_class = pretrained_denoiser(pretrained, args.cache_dir)
        if args.model_type not in (None, saved_model_type):
            raise ValueError(
                f"--model_type {args.model_type} but --pretrained_model_name_or_path {pretrained!r} holds a"
                f" {saved_model_type} (its `{COMPONENTS[saved_model_type]}`): pass --model_type {saved_model_type}"
                " or drop the flag to fine-tune it, or drop --pretrained_model_name_or_path to train a new"
                f" {args.model_type}."
            )
        args.model_type = saved_model_type
        pretrained_config = pretrained_class.load_config(
            pretrained, subfolder=COMPONENTS[args.model_type], cache_dir=args.cache_dir
        )
    # a stock diffusers backbone keeps its own config: the objective lives in its scheduler, and only a text model's
    # condition is dropped by this script (diffusers' DiT drops 10% of its labels itself; its U-Nets have no null class)
    stock = pretrained_class in STOCK_DENOISERS
    if stock and args.conditioning_dropout_prob is not None and pretrained_config.get("cross_attention_dim") is None:
        raise ValueError(
            f"--conditioning_dropout_prob sets the null-condition rate of sculptdiff's denoisers; the stock"
            f" {pretrained_class.__name__} of {pretrained!r} has no setting for it: drop the flag."
        )

    # 1. data
    builtin = args.dataset_name is None and args.train_data_dir is None
    dataset = load_run_dataset(accelerator, args)
    class_column = args.class_column
    # the digits' labels, unless the model being fine-tuned has no classes
    pretrained_classes = denoiser_num_classes(pretrained_config) if pretrained is not None else None
    if builtin and class_column is None and args.caption_column is None and (pretrained is None or pretrained_classes):
        class_column = DIGITS_CLASS_COLUMN
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
    if args.resolution is None:
        # train_vae.py saves the resolution it trained at as the VAE's sample_size
        args.resolution = vae.config.sample_size if args.vae_name_or_path is not None else DEFAULT_RESOLUTION
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    # 3. the denoiser (U-Net or DiT): what the data decides goes into its config, so the saved pipeline knows it
    component = COMPONENTS[args.model_type]
    network = "U-Net" if args.model_type == "unet" else "DiT"
    data_config = {"sample_size": args.resolution // vae_scale_factor}
    if not stock and (args.prediction_type is not None or pretrained is None):
        data_config["prediction_type"] = args.prediction_type or RECIPE.prediction_type
    if not stock and (args.conditioning_dropout_prob is not None or pretrained is None):
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
    denoiser = load_or_build_denoiser(args, data_config, pretrained_class)
    if pretrained is not None:
        if (pretrained_classes is not None) != (conditioning == "class"):
            raise ValueError(
                f"The {network} of {pretrained!r} is {'' if pretrained_classes else 'not '}class-conditional"
                f" but this run's data is {'' if conditioning == 'class' else 'not '}: set --class_column accordingly."
            )
        takes_text = denoiser.config.get("cross_attention_dim") is not None
        if takes_text != (conditioning == "text"):
            raise ValueError(
                f"The {network} of {pretrained!r} {'takes' if takes_text else 'does not take'} text;"
                " set --caption_column accordingly."
            )
        if conditioning == "class" and len(names) != pretrained_classes:
            raise ValueError(f"{pretrained!r} has {pretrained_classes} classes but --class_column has {len(names)}.")
        if stock and denoiser.config.out_channels not in (None, denoiser.config.in_channels):
            raise ValueError(
                f"The {network} of {pretrained!r} predicts {denoiser.config.out_channels} channels for"
                f" {denoiser.config.in_channels} input channels (a learned variance): the trainer fine-tunes"
                " denoisers whose output has the input's channels."
            )
    if stock:
        prediction_type = args.prediction_type or SculptScheduler.load_config(pretrained, subfolder="scheduler").get(
            "prediction_type", RECIPE.prediction_type
        )
        if pretrained_config.get("cross_attention_dim") is not None:
            conditioning_dropout_prob = (
                args.conditioning_dropout_prob
                if args.conditioning_dropout_prob is not None
                else RECIPE.conditioning_dropout_prob
            )
        else:
            # diffusers' DiT drops labels with its embedder's default rate (CombinedTimestepLabelEmbeddings)
            conditioning_dropout_prob = 0.1 if args.model_type == "dit" and conditioning == "class" else 0.0
    else:
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

    # LoRA (Hu et al. 2021): the denoiser stays frozen, a low-rank adapter on its attention projections learns
    lora_targets = None
    if args.lora_rank is not None:
        lora_targets = lora_target_modules(denoiser, args.lora_target_modules)
        trained_parameters = add_lora_adapter(denoiser, args.lora_rank, args.lora_alpha, lora_targets)
    else:
        trained_parameters = list(denoiser.parameters())

    # 5. EMA of the weights (Polyak averaging, as in DDPM's released models), with crowsonkb's warm-up so that short
    # runs average recent weights rather than the random initialisation; of a LoRA run, the adapter's weights
    ema_denoiser = None
    if args.use_ema:
        ema_denoiser = build_ema(
            denoiser,
            args.ema_decay,
            args.ema_inv_gamma,
            args.ema_power,
            parameters=trained_parameters if args.lora_rank is not None else None,
        )
    # the model that samples: a copy made now, so that making it never draws from the RNG mid-training
    sampling_denoiser = copy.deepcopy(denoiser).eval()
    sampling_denoiser.requires_grad_(False)

    # 6. checkpoints hold save_pretrained folders (safetensors) for the denoiser and its EMA; a LoRA run's adapter
    # lives inside the frozen denoiser, so accelerate saves the whole model and the adapter's EMA as they are
    if args.lora_rank is None:
        ema_models = {f"{component}_ema": ema_denoiser} if args.use_ema else {}
        register_checkpoint_hooks(accelerator, model_folders=[component], ema_models=ema_models)
        model_folders = [component, *ema_models]
    else:
        if args.use_ema:
            accelerator.register_for_checkpointing(ema_denoiser)
        model_folders = []

    # AdamW over the trained parameters, the seeded loader, the LR schedule, through accelerator.prepare
    set_training_transform(dataset, args, image_mode, class_column, args.caption_column)
    prepared = prepare_training(accelerator, denoiser, trained_parameters, dataset, args)
    denoiser, optimizer, lr_scheduler = prepared.model, prepared.optimizer, prepared.lr_scheduler
    if args.use_ema:
        ema_denoiser.to(accelerator.device)
    if text_encoder is not None:
        text_encoder.to(accelerator.device)
    if vae is not None:
        vae.to(accelerator.device)

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

    init_trackers(accelerator, "train_sculpt", args)
    if args.lora_rank is not None and accelerator.is_main_process:
        # the base model's samples, for the card's before/after: the adapter starts as the identity (LoRA's B is 0)
        grid = render_grid(pipeline, args, names, validation_prompts, guidance_scale, accelerator)
        save_image(grid, os.path.join(args.output_dir, BASE_SAMPLE_GRID_NAME))

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
    logger.info(f"  Num Epochs = {prepared.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  {type(denoiser).__name__} parameters = {sum(p.numel() for p in denoiser.parameters()):,}")
    if args.lora_rank is not None:
        logger.info(f"  LoRA rank {args.lora_rank} on {', '.join(lora_targets)}")
        logger.info(f"  Trained (adapter) parameters = {sum(p.numel() for p in trained_parameters):,}")

    # 7. resume: only a checkpoint of this run (same fingerprint) unless one is named explicitly
    fingerprint = run_fingerprint(args, denoiser, accelerator)
    resume, global_step = resume_run(
        accelerator,
        args,
        fingerprint,
        model_folders,
        optimizer,
        lr_scheduler,
        ema_models=[ema_denoiser] if args.use_ema else [],
    )
    # stops at the first non-finite loss or weights, naming the newest checkpoint whose weights gave a finite loss
    guard = DivergenceGuard(accelerator, resumed_checkpoint=resume.path if resume is not None else None)

    progress_bar = step_progress_bar(accelerator, args, global_step)
    train_start = time.monotonic()
    train_loss = 0.0
    last_batch = None
    denoiser.train()
    for batch in training_batches(accelerator, prepared.dataloader, global_step, args):
        with accelerator.accumulate(denoiser):
            latents = batch_latents(batch["pixel_values"], vae)
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
                        drop[:, None, None], null_prompt_embeds.to(encoder_hidden_states.dtype), encoder_hidden_states
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

            optimizer_step(accelerator, loss, trained_parameters, optimizer, lr_scheduler, args.max_grad_norm)

        # an optimisation step happened (the end of an accumulation cycle)
        if accelerator.sync_gradients:
            global_step += 1
            # after the update and before anything is saved: a finite loss can still overflow the weights
            guard.check_step(global_step, train_loss, denoiser.named_parameters())
            if args.use_ema:
                ema_denoiser.step(trained_parameters)
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
        if args.lora_rank is None:
            pipeline.save_pretrained(args.output_dir)
            published = pipeline.hub_allow_patterns()
        else:
            # diffusers' LoRA format, read by `pipe.load_lora_weights` (keys `unet.`/`transformer.` + PEFT names)
            save_lora_weights(args.output_dir, sampling_denoiser)
            published = [LORA_WEIGHT_NAME, "README.md", BASE_SAMPLE_GRID_NAME]
        grid = render_grid(pipeline, args, names, validation_prompts, guidance_scale, accelerator)
        save_image(grid, os.path.join(args.output_dir, SAMPLE_GRID_NAME))
        log_grid(accelerator, grid, global_step)
        if args.lora_rank is not None and not isinstance(sampling_denoiser, PeftAdapterMixin):
            # diffusers cannot load an adapter into a stock UNet2DModel or DiTTransformer2DModel: the pipeline is
            # also saved whole, with the adapter merged into its weights
            fuse_lora_adapter(sampling_denoiser)
            pipeline.save_pretrained(args.output_dir)
            published += pipeline.hub_allow_patterns()

        write_training_args(args.output_dir, args, resume)

        card = build_model_card(
            args,
            pipeline,
            TrainingRun.finished(
                accelerator,
                args,
                len(dataset),
                global_step,
                train_seconds,
                resume,
                sample_guidance_scale=guidance_scale,
                validation_prompts=validation_prompts,
                lora_target_modules=lora_targets,
                conditioning_dropout_prob=conditioning_dropout_prob,
            ),
        )
        write_text(os.path.join(args.output_dir, "README.md"), str(card))
        logger.info(f"Saved the pipeline, {SAMPLE_GRID_NAME} and the model card to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()

    # 9. publish last, so that a failed push leaves a complete local folder
    if args.push_to_hub and accelerator.is_main_process:
        push_run(args, published + [SAMPLE_GRID_NAME, ARGS_FILE_NAME])


def load_sampling_weights(
    sampling_denoiser: SculptUNet2DModel | SculptDiT2DModel,
    denoiser: torch.nn.Module,
    ema_denoiser: EMAModel | None,
    accelerator: Accelerator,
):
    """Copy the EMA weights (or the training weights) into the denoiser the pipeline samples with."""
    if ema_denoiser is not None:
        # the EMA averages the trained parameters: all of them, or a LoRA adapter's
        trained = [
            name
            for name, parameter in accelerator.unwrap_model(denoiser).named_parameters()
            if parameter.requires_grad
        ]
        sampling_parameters = dict(sampling_denoiser.named_parameters())
        ema_denoiser.copy_to([sampling_parameters[name] for name in trained])
    else:
        sampling_denoiser.load_state_dict(accelerator.unwrap_model(denoiser).state_dict())


if __name__ == "__main__":
    main(parse_args())
