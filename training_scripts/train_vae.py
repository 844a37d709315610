#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Train diffusers' own `AutoencoderKL` with accelerate: the first stage of latent diffusion.

    accelerate launch training_scripts/train_vae.py

trains a small KL-regularised autoencoder on scikit-learn's handwritten digits at 32x32 (8x8x4 latents) in under ten
minutes on a CPU, and writes a folder that `AutoencoderKL.from_pretrained` loads, with `scaling_factor` measured on
the training data. `train_sculpt.py --vae_name_or_path <that folder> --resolution 32` then trains a latent
SculptPipeline on it. The objective is the autoencoder of latent diffusion (Rombach et al. 2022, arXiv 2112.10752):
a pixel reconstruction loss plus a slight KL penalty towards N(0, I). See training_scripts/README.md.
"""

import argparse
import copy
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import PIL.Image
import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import make_image_grid

from sculptdiff.training import arguments, checkpointing, data, publish, recipe, runtime
from sculptdiff.training.atomic_files import replace_path, save_image, write_text
from sculptdiff.training.card import RECONSTRUCTION_GRID_NAME, TrainingRun, build_vae_model_card
from sculptdiff.training.guard import DivergenceGuard
from sculptdiff.training.optimization import optimizer_step, prepare_training
from sculptdiff.training.validation import log_grid


logger = get_logger(__name__, log_level="INFO")

DEFAULT_MODEL_CARD_TEMPLATE = str(Path(__file__).resolve().parent.parent / "model_cards" / "vae_model_card.md")
# The optimisation defaults of the VAE run (the rest as the diffusion recipe): measured on the digits, see
# training_scripts/README.md ("train_vae.py").
VAE_RECIPE = dataclasses.replace(recipe.RECIPE, learning_rate=1e-3, lr_warmup_steps=50, max_train_steps=1500)
# The arguments that define a run, with the autoencoder's config, the process count and the precision: see
# run_fingerprint.
FINGERPRINT_ARGS = (
    # data
    "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "resolution", "center_crop",
    "random_flip", "max_train_samples",
    # objective
    "rec_loss", "kl_scale",
    # optimisation
    "seed", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "train_batch_size", "gradient_accumulation_steps",
    "use_ema", "ema_decay", "ema_inv_gamma", "ema_power",
)  # fmt: skip
# PIL modes of grey images (8-bit, 16-bit, 32-bit integer, float, 1-bit): the autoencoder gets one channel; a
# latent model trained on it then reads the images as grey too (train_sculpt.py takes the mode from the VAE).
GREY_MODES = ("L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F", "1")
# The files of the output folder that belong on the Hub.
HUB_FILES = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "README.md",
    RECONSTRUCTION_GRID_NAME,
    publish.ARGS_FILE_NAME,
]


def default_vae_config() -> dict:
    """The shape of the default autoencoder: three levels of 16, 32, 32 channels, so 32 px images become 8x8x4
    latents (f = 4, within the f = 4-16 that Rombach et al. find best, sec. 4.1), 242k parameters.

    Why 32 px and 8x8x4 for the digits: the scans are 8x8, so one latent position holds one scan pixel and the
    reconstruction can be nearly lossless; the 256 latent values are as many as the 16x16 pixel model denoises, so
    the latent model costs what the pixel model costs per step while it draws 32 px images; and an 8x8 latent grid
    fits the default U-Net's three levels (8, 4, 2) and the DiT's 2x2 patches (16 tokens). 4x4x4 latents of 16 px
    digits would leave the U-Net a 1x1 lowest level and the DiT 4 tokens.
    """
    return {
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (16, 32, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
    }


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a diffusers AutoencoderKL (a latent space) with accelerate.")
    arguments.add_data_arguments(parser)
    # the digits at 32 px: 8x8x4 latents with the default autoencoder (see default_vae_config)
    parser.set_defaults(resolution=32)
    arguments.add_optimization_arguments(parser, recipe=VAE_RECIPE)
    arguments.add_run_arguments(
        parser, output_dir="sculpt-vae", outputs="the autoencoder, the reconstruction grid and the model card"
    )
    arguments.add_checkpointing_arguments(parser)
    arguments.add_logging_arguments(parser)
    parser.set_defaults(validation_steps=500)
    arguments.add_hub_arguments(parser, model_card_template=DEFAULT_MODEL_CARD_TEMPLATE)

    group = parser.add_argument_group("autoencoder")
    group.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help=(
            "An AutoencoderKL config (config.json, or a folder or Hub repo holding one) for a new autoencoder; the"
            " shape flags override it. Default: 3 levels of 16, 32, 32 channels, 4 latent channels."
        ),
    )
    group.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=None,
        help="Channels of each level, highest resolution first; the image shrinks 2x per level after the first.",
    )
    group.add_argument("--layers_per_block", type=int, default=None, help="ResNet blocks per level (default 1).")
    group.add_argument("--latent_channels", type=int, default=None, help="Channels of the latents (default 4).")
    group.add_argument(
        "--norm_num_groups",
        type=int,
        default=None,
        help="GroupNorm groups; must divide every entry of --block_out_channels (default 8).",
    )

    group = parser.add_argument_group("objective")
    group.add_argument(
        "--rec_loss",
        type=str,
        default="l1",
        choices=["l1", "l2"],
        help=(
            "The pixel reconstruction loss: l1 (latent diffusion's autoencoders) or l2 (squared error), summed over"
            " the pixels of an image and averaged over the batch, as diffusers' train_autoencoderkl.py does."
        ),
    )
    group.add_argument(
        "--kl_scale",
        type=float,
        default=1e-6,
        help=(
            "Weight of the KL divergence of the latents from N(0, I) (summed over an image's latents). 1e-6, latent"
            " diffusion's value, keeps the latent space near-deterministic and detailed; larger weights make decodes"
            " of z ~ N(0, I) look like data (a VAE generator) at the cost of reconstruction."
        ),
    )

    args = parser.parse_args(input_args)
    arguments.check_data_arguments(args)
    arguments.check_optimization_arguments(args, recipe=VAE_RECIPE)
    arguments.check_run_arguments(args)
    arguments.check_checkpointing_arguments(args)
    arguments.check_logging_arguments(args)
    arguments.check_hub_arguments(args)
    arguments.check_positive(args, "layers_per_block", "latent_channels", "norm_num_groups")
    if args.kl_scale < 0:
        raise ValueError(f"--kl_scale must be >= 0, got {args.kl_scale}.")
    if args.block_out_channels is not None and min(args.block_out_channels) < 1:
        raise ValueError(f"--block_out_channels must be positive channel counts, got {args.block_out_channels}.")
    return args


def build_vae(args: argparse.Namespace, in_channels: int) -> AutoencoderKL:
    """A new AutoencoderKL: the default shape or --model_config_name_or_path, the shape flags on top, the image
    channels and size of the data."""
    config = default_vae_config()
    if args.model_config_name_or_path is not None:
        config = dict(AutoencoderKL.load_config(args.model_config_name_or_path, cache_dir=args.cache_dir))
    flags = {
        "layers_per_block": args.layers_per_block,
        "latent_channels": args.latent_channels,
        "norm_num_groups": args.norm_num_groups,
    }
    config.update({name: value for name, value in flags.items() if value is not None})
    if args.block_out_channels is not None:
        levels = len(args.block_out_channels)
        config["block_out_channels"] = tuple(args.block_out_channels)
        config["down_block_types"] = ("DownEncoderBlock2D",) * levels
        config["up_block_types"] = ("UpDecoderBlock2D",) * levels
    groups = config.get("norm_num_groups", 32)
    if any(channels % groups for channels in config["block_out_channels"]):
        raise ValueError(
            f"--norm_num_groups {groups} must divide every entry of --block_out_channels"
            f" {list(config['block_out_channels'])}."
        )
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if args.resolution % factor:
        raise ValueError(
            f"--resolution {args.resolution} must be a multiple of {factor}: the autoencoder halves the image"
            f" {len(config['block_out_channels']) - 1} times ({len(config['block_out_channels'])} levels)."
        )
    config.update(in_channels=in_channels, out_channels=in_channels, sample_size=args.resolution)
    return AutoencoderKL.from_config(config)


def vae_loss(
    model: torch.nn.Module, pixel_values: torch.Tensor, rec_loss: str, kl_scale: float, generator=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KL-regularised autoencoder objective of latent diffusion (Rombach et al. 2022, sec. 3.1 and appendix G)
    without its perceptual and adversarial terms: reconstruct x from a sample of q(z|x), plus kl_scale * KL(q(z|x) ||
    N(0, I)). Returns the loss, the mean per-pixel reconstruction error and the mean KL per image.

    `model` is the AutoencoderKL or what `accelerator.prepare` made of it: the step runs through its forward(), which
    DDP needs to synchronise the gradients of several processes. forward() builds the posterior and drops it, so the
    posterior's moments are caught from the layer that outputs them.
    """
    vae = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    moments = []

    def keep_moments(module, inputs, output):
        moments.append(output)

    handle = (vae.quant_conv if vae.quant_conv is not None else vae.encoder).register_forward_hook(keep_moments)
    try:
        reconstruction = model(pixel_values, sample_posterior=True, generator=generator).sample
    finally:
        handle.remove()
    posterior = DiagonalGaussianDistribution(moments[0])
    error = (reconstruction.float() - pixel_values.float()).abs()
    if rec_loss == "l2":
        error = error**2
    # summed over an image's pixels and latents, averaged over the batch (LDM's LPIPSWithDiscriminator, kl_weight)
    kl = posterior.kl().mean()
    loss = error.sum(dim=(1, 2, 3)).mean() + kl_scale * kl
    return loss, error.mean(), kl


@torch.no_grad()
def reconstruction_grid(vae: AutoencoderKL, images: torch.Tensor, seed: int):
    """Three rows: the images, their reconstructions (the posterior's mean decoded) and decodes of z ~ N(0, I) (the
    autoencoder as a generator)."""
    latents = vae.encode(images).latent_dist.mode()
    prior = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    rows = torch.cat([images, vae.decode(latents).sample, vae.decode(prior).sample])
    pictures = VaeImageProcessor().postprocess(rows.float().cpu(), output_type="pil")
    return make_image_grid(pictures, rows=3, cols=len(images))


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, dataloader, seed: int) -> dict:
    """Over the whole training data: the std (and mean) of the latents `train_sculpt.py` diffuses (samples of
    q(z|x)), and the reconstruction error of the posterior's mean, in [0, 1] pixel units (images clipped as the
    pipelines clip them)."""
    generator = torch.Generator(device=vae.device).manual_seed(seed)
    count = total = total_squares = squared_error = absolute_error = 0.0
    num_pixels = 0
    for batch in dataloader:
        pixel_values = batch["pixel_values"].to(vae.device, vae.dtype)
        posterior = vae.encode(pixel_values).latent_dist
        latents = posterior.sample(generator=generator).double()
        count += latents.numel()
        total += latents.sum().item()
        total_squares += (latents**2).sum().item()
        error = (vae.decode(posterior.mode()).sample.clamp(-1, 1) - pixel_values).double() / 2
        squared_error += (error**2).sum().item()
        absolute_error += error.abs().sum().item()
        num_pixels += error.numel()
    mean = total / count
    std = math.sqrt(total_squares / count - mean**2)
    mse = squared_error / num_pixels
    return {
        "latent_mean": mean,
        "latent_std": std,
        "reconstruction_mse": mse,
        "reconstruction_l1": absolute_error / num_pixels,
        "reconstruction_psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
    }


def run_fingerprint(args: argparse.Namespace, vae: AutoencoderKL, accelerator) -> dict:
    """What defines this run, stored with each checkpoint: `latest` resumes only a checkpoint with the same one.
    Left out, as in train_sculpt.py: logging, validation, checkpointing, publishing and the run's length."""
    fingerprint = {name: getattr(args, name) for name in FINGERPRINT_ARGS}
    # a local folder counts by where it is, however it was spelled
    for name in ("train_data_dir", "dataset_name"):
        if fingerprint[name] is not None and os.path.exists(fingerprint[name]):
            fingerprint[name] = os.path.realpath(fingerprint[name])
    # the config holds the shape and what the data decided (channels, size)
    config = accelerator.unwrap_model(vae).config
    fingerprint["vae_config"] = {name: value for name, value in config.items() if not name.startswith("_")}
    fingerprint["num_processes"] = accelerator.num_processes
    fingerprint["mixed_precision"] = accelerator.mixed_precision
    return fingerprint


def main(args: argparse.Namespace):
    accelerator = runtime.make_accelerator(args)

    # 1. data: images only; an autoencoder learns no condition
    builtin = args.dataset_name is None and args.train_data_dir is None
    dataset = data.load_run_dataset(accelerator, args)
    data.check_columns(dataset, args.image_column)

    # 2. the autoencoder, with the data's channels: 1 for grey images (the digits), 3 for any other mode
    first_image = dataset[0][args.image_column]
    grey = builtin or (isinstance(first_image, PIL.Image.Image) and first_image.mode in GREY_MODES)
    vae = build_vae(args, in_channels=1 if grey else 3)
    image_mode = data.image_mode_for_channels(vae.config.in_channels)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    ema_vae = recipe.build_ema(vae, args.ema_decay, args.ema_inv_gamma, args.ema_power) if args.use_ema else None
    # the autoencoder that renders the grids and is saved: a copy made now, so that making it never draws from the RNG
    final_vae = copy.deepcopy(vae).eval()
    final_vae.requires_grad_(False)
    checkpointing.register_checkpoint_hooks(
        accelerator, model_folders=["vae"], ema_models={"vae_ema": ema_vae} if ema_vae else {}
    )

    # the grid's images: the first of the data, decoded before the training transform is set
    grid_transform = data.ImageTransform(args.resolution, image_mode, center_crop=True)
    grid_rows = dataset.select(range(min(args.num_validation_images, len(dataset))))[args.image_column]
    grid_images = torch.stack([grid_transform(image) for image in grid_rows])
    data.set_training_transform(dataset, args, image_mode)
    prepared = prepare_training(accelerator, vae, vae.parameters(), dataset, args)
    vae, optimizer, lr_scheduler = prepared.model, prepared.optimizer, prepared.lr_scheduler
    if ema_vae is not None:
        ema_vae.to(accelerator.device)
    final_vae.to(accelerator.device)
    runtime.init_trackers(accelerator, "train_vae", args)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(dataset)}, total batch size = {total_batch_size}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}, epochs = {prepared.num_train_epochs}")
    logger.info(f"  AutoencoderKL parameters = {sum(p.numel() for p in vae.parameters()):,}")

    # 3. resume: only a checkpoint of this run (same fingerprint) unless one is named explicitly
    fingerprint = run_fingerprint(args, vae, accelerator)
    resume, global_step = checkpointing.resume_run(
        accelerator,
        args,
        fingerprint,
        model_folders=["vae", "vae_ema"] if ema_vae else ["vae"],
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ema_models=[ema_vae] if ema_vae else [],
    )
    # stops at the first non-finite loss or weights, naming the newest checkpoint whose weights gave a finite loss
    guard = DivergenceGuard(accelerator, resumed_checkpoint=resume.path if resume is not None else None)

    # 4. the loop
    progress_bar = runtime.step_progress_bar(accelerator, args, global_step)
    train_start = time.monotonic()
    train_loss = 0.0
    last_pixel_values = None
    vae.train()
    for batch in checkpointing.training_batches(accelerator, prepared.dataloader, global_step, args):
        with accelerator.accumulate(vae):
            pixel_values = batch["pixel_values"]
            last_pixel_values = pixel_values
            loss, rec_error, kl = vae_loss(vae, pixel_values, args.rec_loss, args.kl_scale)
            avg_loss = accelerator.gather(loss.detach().repeat(pixel_values.shape[0])).mean()
            train_loss += avg_loss.item() / args.gradient_accumulation_steps

            optimizer_step(accelerator, loss, vae.parameters(), optimizer, lr_scheduler, args.max_grad_norm)

        if accelerator.sync_gradients:
            global_step += 1
            # after the update and before anything is saved
            guard.check_step(global_step, train_loss, vae.named_parameters())
            if ema_vae is not None:
                ema_vae.step(vae.parameters())
            progress_bar.update(1)
            logs = {"train_loss": train_loss, "rec_error": rec_error.item(), "kl": kl.item()}
            accelerator.log({**logs, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            progress_bar.set_postfix(**logs)
            train_loss = 0.0

            if global_step % args.checkpointing_steps == 0:
                path = checkpointing.save_checkpoint(
                    accelerator, args.output_dir, global_step, fingerprint, args.checkpoints_total_limit
                )
                guard.checkpoint_saved(path)
            if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                if accelerator.is_main_process:
                    load_final_weights(final_vae, vae, ema_vae, accelerator)
                    grid = reconstruction_grid(final_vae, grid_images.to(accelerator.device), seed=0)
                    save_image(grid, os.path.join(args.output_dir, "samples", f"step-{global_step:06d}.png"))
                    log_grid(accelerator, grid, global_step, tag="reconstructions")
                accelerator.wait_for_everyone()
    progress_bar.close()
    train_seconds = time.monotonic() - train_start

    # 5. the final weights (EMA), checked before anything is written: their loss on the last batch must be finite
    accelerator.wait_for_everyone()
    load_final_weights(final_vae, vae, ema_vae, accelerator)
    final_loss = None if last_pixel_values is None else final_batch_loss(final_vae, last_pixel_values, args)
    guard.check_final(final_loss, final_vae.named_parameters(), args.output_dir)

    if accelerator.is_main_process:
        # 6. the latent scale, as latent diffusion sets it: unit variance for the diffusion model (Rombach et al.
        # 2022, appendix G), measured on all training images; and the reconstruction error
        statistics_dataloader = torch.utils.data.DataLoader(
            dataset,
            collate_fn=data.collate_fn,
            batch_size=args.train_batch_size,
            num_workers=args.dataloader_num_workers,
        )
        statistics = latent_statistics(
            final_vae, statistics_dataloader, seed=args.seed if args.seed is not None else 0
        )
        final_vae.register_to_config(scaling_factor=1.0 / statistics["latent_std"])
        logger.info(
            f"Latents over the training data: {statistics}; scaling_factor = {1 / statistics['latent_std']:.6g}"
        )

        # written to a staging folder and renamed into place: an interrupted save leaves the earlier files
        with tempfile.TemporaryDirectory(dir=args.output_dir, prefix=".tmp-save-") as staging:
            final_vae.save_pretrained(staging)
            for name in sorted(os.listdir(staging)):
                replace_path(os.path.join(staging, name), os.path.join(args.output_dir, name))
        grid = reconstruction_grid(final_vae, grid_images.to(accelerator.device), seed=0)
        save_image(grid, os.path.join(args.output_dir, RECONSTRUCTION_GRID_NAME))
        log_grid(accelerator, grid, global_step, tag="reconstructions")
        publish.write_training_args(args.output_dir, args, resume)
        card = build_vae_model_card(
            args,
            final_vae,
            TrainingRun.finished(accelerator, args, len(dataset), global_step, train_seconds, resume),
            statistics,
        )
        write_text(os.path.join(args.output_dir, "README.md"), str(card))
        logger.info(f"Saved the autoencoder, {RECONSTRUCTION_GRID_NAME} and the model card to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()

    # 7. publish last, so that a failed push leaves a complete local folder
    if args.push_to_hub and accelerator.is_main_process:
        publish.push_run(args, HUB_FILES, commit_message="Upload AutoencoderKL trained with sculptdiff")


def load_final_weights(final_vae: AutoencoderKL, vae: torch.nn.Module, ema_vae, accelerator):
    """Copy the EMA weights (or the training weights) into the autoencoder that renders grids and is saved."""
    if ema_vae is not None:
        ema_vae.copy_to(final_vae.parameters())
    else:
        final_vae.load_state_dict(accelerator.unwrap_model(vae).state_dict())


@torch.no_grad()
def final_batch_loss(final_vae: AutoencoderKL, pixel_values: torch.Tensor, args: argparse.Namespace) -> float:
    """The objective of the final weights on the last training batch, with a fixed posterior draw."""
    generator = torch.Generator(device=pixel_values.device).manual_seed(0)
    return vae_loss(final_vae, pixel_values, args.rec_loss, args.kl_scale, generator)[0].item()


if __name__ == "__main__":
    main(parse_args())
