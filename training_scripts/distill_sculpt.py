#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Distil a trained SculptPipeline into a 1-4 step student by latent consistency distillation (LCM).

    accelerate launch training_scripts/distill_sculpt.py --teacher sculpt-digits

Latent consistency distillation (Luo et al. 2023, arXiv 2310.04378, Algorithm 1): the student, a copy of the
teacher's U-Net or DiT that also reads the guidance scale w (`time_cond_proj_dim`), learns to map any point of the
teacher's guided probability-flow ODE to its end point, so that it samples in 1-4 steps with diffusers'
`LCMScheduler` and one model call per step. The structure, the flags and the math follow diffusers'
examples/consistency_distillation/train_lcm_distill_sd_wds.py; data, checkpoints, resume, the divergence guard,
sample grids, the model card and the push are the package's (`sculptdiff.training`), shared with train_sculpt.py.
"""

import argparse
import copy
import dataclasses
import inspect
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import LCMScheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid

from sculptdiff.pipelines.sculpt.pipeline_sculpt import DIFFUSION_PREDICTION_TYPES, SculptPipeline
from sculptdiff.training import arguments, checkpointing, data, optimization, publish, runtime, validation
from sculptdiff.training.atomic_files import save_image, write_text
from sculptdiff.training.card import SAMPLE_GRID_NAME, TrainingRun, build_distilled_model_card
from sculptdiff.training.guard import DivergenceGuard
from sculptdiff.training.recipe import RECIPE, build_ema


logger = get_logger(__name__, log_level="INFO")

DEFAULT_MODEL_CARD_TEMPLATE = str(Path(__file__).resolve().parent.parent / "model_cards" / "distill_model_card.md")
# The defaults of a run that distils the default digits model in minutes on a CPU. The target network is the EMA of
# the student with LCM's mu = 0.95 (diffusers' example: --ema_decay 0.95), with the recipe's warm-up.
DISTILL_RECIPE = dataclasses.replace(
    RECIPE,
    learning_rate=1e-4,
    lr_scheduler="constant_with_warmup",
    lr_warmup_steps=50,
    max_train_steps=1000,
    ema_decay=0.95,
)
# The arguments that define a distillation run: `--resume_from_checkpoint latest` resumes only a checkpoint with the
# same ones (with the teacher's location, the student's config, the process count and the precision).
FINGERPRINT_ARGS = (
    "teacher", "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "class_column",
    "caption_column", "resolution", "center_crop", "random_flip", "max_train_samples",
    "w_min", "w_max", "num_ddim_timesteps", "loss_type", "huber_c", "timestep_scaling_factor",
    "seed", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "train_batch_size", "gradient_accumulation_steps",
    "use_ema", "ema_decay", "ema_inv_gamma", "ema_power",
)  # fmt: skip


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Distil a SculptPipeline into a few-step LCM student.")
    group = parser.add_argument_group("latent consistency distillation")
    group.add_argument(
        "--teacher",
        required=True,
        help=(
            "The trained SculptPipeline to distil (a folder or a Hub repo id): a class- or text-conditional U-Net or"
            " DiT trained with a null condition, predicting epsilon, v_prediction or sample."
        ),
    )
    group.add_argument(
        "--time_cond_proj_dim",
        type=int,
        default=256,
        help=(
            "Width of the student's guidance-scale embedding (diffusers' example: --unet_time_cond_proj_dim). It"
            " enters the time embedding through a projection that starts at zero, so the student starts as the"
            " teacher."
        ),
    )
    group.add_argument(
        "--w_min",
        type=float,
        default=1.0,
        help=(
            "The smallest guidance scale w the student learns; each example draws w uniformly in [w_min, w_max]. w is"
            " the pipeline's `guidance_scale` (eps_uncond + w (eps_cond - eps_uncond), w = 1 plain conditional"
            " sampling); diffusers' example and the LCM paper write the same guidance as w - 1."
        ),
    )
    group.add_argument("--w_max", type=float, default=4.0, help="The largest guidance scale w the student learns.")
    group.add_argument(
        "--num_ddim_timesteps",
        type=int,
        default=48,
        help=(
            "N, the points of the teacher's DDIM solver grid [k - 1, 2k - 1, ..., kN - 1], k = T // N; the student's"
            " LCMScheduler samples on the same grid (its `original_inference_steps`). 48 rather than diffusers' 50:"
            " on T = 1000 its grid ends at t = 959, where an epsilon model's x_0 = (x_t - sigma_t eps) / alpha_t"
            " amplifies its error 16 times under the cosine schedule (Stable Diffusion's: 15 at t = 999); a grid"
            " ending at t = 999 amplifies it 20,000 times, and 1-step samples are noise."
        ),
    )
    group.add_argument(
        "--loss_type",
        default="l2",
        choices=["l2", "huber"],
        help="The consistency distance: l2 (MSE) or the pseudo-Huber loss (Song & Dhariwal 2023) with --huber_c.",
    )
    group.add_argument(
        "--huber_c",
        type=float,
        default=0.001,
        help="c of the pseudo-Huber loss sqrt(d^2 + c^2) - c (only with --loss_type huber); small c approaches l1.",
    )
    group.add_argument(
        "--timestep_scaling_factor",
        type=float,
        default=10.0,
        help=(
            "Multiplies the timestep in the boundary scalings c_skip and c_out (LCMScheduler's `timestep_scaling`):"
            " larger values bring c_skip(0) = 1, c_out(0) = 0 closer to the consistency model's boundary condition."
        ),
    )
    group.add_argument(
        "--validation_inference_steps",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        help="The LCMScheduler step counts of the sample grid, one panel each from left to right.",
    )
    group.add_argument(
        "--validation_guidance_scale", type=float, default=3.0, help="The guidance scale w of the sample grid."
    )

    arguments.add_data_arguments(parser)
    # the teacher's resolution unless given
    parser.set_defaults(resolution=None)
    arguments.add_condition_arguments(parser)
    arguments.add_optimization_arguments(parser, recipe=DISTILL_RECIPE)
    arguments.add_run_arguments(
        parser, output_dir="sculpt-digits-lcm", outputs="the student pipeline, its samples, its card"
    )
    arguments.add_checkpointing_arguments(parser)
    arguments.add_logging_arguments(parser)
    arguments.add_hub_arguments(parser, model_card_template=DEFAULT_MODEL_CARD_TEMPLATE)

    args = parser.parse_args(input_args)
    arguments.check_data_arguments(args)
    arguments.check_condition_arguments(args)
    arguments.check_optimization_arguments(args, recipe=DISTILL_RECIPE)
    arguments.check_run_arguments(args)
    arguments.check_checkpointing_arguments(args)
    arguments.check_logging_arguments(args)
    arguments.check_hub_arguments(args)
    arguments.check_positive(args, "time_cond_proj_dim", "num_ddim_timesteps")
    if not 0 <= args.w_min <= args.w_max:
        raise ValueError(f"--w_min and --w_max must satisfy 0 <= w_min <= w_max, got {args.w_min} and {args.w_max}.")
    steps = args.validation_inference_steps
    if min(steps) < 1 or max(steps) > args.num_ddim_timesteps:
        raise ValueError(
            f"--validation_inference_steps {steps}: LCMScheduler samples 1 to --num_ddim_timesteps"
            f" ({args.num_ddim_timesteps}) steps."
        )
    return args


def load_teacher(args: argparse.Namespace) -> SculptPipeline:
    """The teacher pipeline, checked for what latent consistency distillation needs, or a ValueError that says why
    not."""
    try:
        teacher = SculptPipeline.from_pretrained(args.teacher, cache_dir=args.cache_dir)
    # a missing folder, an unknown repo, a folder of another pipeline: all end here, with diffusers' reason
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"--teacher {args.teacher!r} could not be loaded as a SculptPipeline ({type(error).__name__}: {error})."
            " Pass a folder written by train_sculpt.py, or the Hub repo id of one."
        ) from error
    config = teacher.denoiser.config
    problem = None
    if config.get("prediction_type") not in DIFFUSION_PREDICTION_TYPES:
        problem = (
            f"it predicts {config.get('prediction_type')!r}; LCM distils DDPM-family teachers (epsilon, v_prediction,"
            " sample): a flow-matching teacher has no DDIM solver and no LCMScheduler"
        )
    elif not hasattr(teacher.scheduler, "alphas_cumprod"):
        problem = f"its scheduler {type(teacher.scheduler).__name__} has no DDPM noise schedule (`alphas_cumprod`)"
    elif config.get("time_cond_proj_dim") is not None:
        problem = "its denoiser already reads a guidance scale (`time_cond_proj_dim`): it is a distilled student"
    elif teacher.num_classes() is None and config.get("cross_attention_dim") is None:
        problem = "it is unconditional; the student learns classifier-free guidance, which needs a condition"
    elif config.get("conditioning_dropout_prob", 0.0) <= 0:
        problem = "it was trained without a null condition (`conditioning_dropout_prob=0`), so it cannot guide"
    elif "time_cond_proj_dim" not in inspect.signature(type(teacher.denoiser).__init__).parameters:
        problem = f"its {type(teacher.denoiser).__name__} takes no guidance-scale input (`time_cond_proj_dim`)"
    if problem is not None:
        raise ValueError(f"--teacher {args.teacher!r} cannot be distilled: {problem}.")
    return teacher


def build_student_scheduler(teacher: SculptPipeline, args: argparse.Namespace) -> LCMScheduler:
    """diffusers' LCMScheduler on the teacher's noise schedule, sampling on the distillation's skip-step grid."""
    try:
        scheduler = LCMScheduler.from_config(
            teacher.scheduler.config,
            original_inference_steps=args.num_ddim_timesteps,
            timestep_scaling=args.timestep_scaling_factor,
        )
    # LCMScheduler knows three beta schedules and raises NotImplementedError for the others
    except NotImplementedError as error:
        raise ValueError(f"--teacher {args.teacher!r} cannot be distilled: LCMScheduler says {error}") from error
    if not torch.allclose(scheduler.alphas_cumprod, teacher.scheduler.alphas_cumprod.cpu()):
        raise ValueError(
            f"--teacher {args.teacher!r} cannot be distilled: LCMScheduler does not reproduce the noise schedule of"
            f" its {type(teacher.scheduler).__name__} ({teacher.scheduler.config.get('beta_schedule')})."
        )
    if args.num_ddim_timesteps > scheduler.config.num_train_timesteps:
        raise ValueError(
            f"--num_ddim_timesteps {args.num_ddim_timesteps} exceeds the teacher's"
            f" {scheduler.config.num_train_timesteps} training timesteps."
        )
    return scheduler


def build_student(teacher_denoiser: torch.nn.Module, time_cond_proj_dim: int) -> torch.nn.Module:
    """The teacher's backbone with a guidance-scale input (`time_cond_proj_dim`), initialised from the teacher.

    The new projection of the w embedding starts at zero, so the student starts as the teacher, and classifier-free
    guidance enters as it is learned (diffusers' example leaves it random, which perturbs every prediction at first).
    """
    student = type(teacher_denoiser).from_config(teacher_denoiser.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_denoiser.state_dict(), strict=False)
    if unexpected or not missing or not all(".cond_proj." in name for name in missing):
        raise ValueError(
            f"The {type(student).__name__} with time_cond_proj_dim differs from the teacher in more than the w"
            f" projection: missing {missing}, unexpected {unexpected}."
        )
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if name in missing:
                parameter.zero_()
    return student


class DDIMSolver:
    """The teacher's ODE solver on LCM's skip-step grid, as in diffusers' example: N timesteps [k - 1, 2k - 1, ...,
    T - 1] with k = T // N, and one DDIM step (Song et al. 2021, eq. 12, eta = 0) from a grid point to the previous
    one. It reads a prediction as the teacher's own sampler does: x_0 clipped to `clip_range` (pixel models), and the
    noise that leads from that x_0 to x_t (DDIM's `use_clipped_model_output`).

    Args:
        alphas_cumprod: the teacher's abar_t, `(T,)`.
        num_ddim_timesteps: N.
        prediction_type: what the teacher (and the student) predict: `epsilon`, `v_prediction` or `sample`.
        clip_range: the teacher scheduler's `clip_sample_range`, or None when it does not clip.
    """

    def __init__(
        self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int, prediction_type: str, clip_range: float | None
    ):
        self.step_ratio = len(alphas_cumprod) // num_ddim_timesteps
        self.ddim_timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.step_ratio - 1
        # x_t = alpha_t x_0 + sigma_t eps
        self.alpha_schedule = alphas_cumprod.sqrt()
        self.sigma_schedule = (1 - alphas_cumprod).sqrt()
        # abar of the previous grid point; the first point steps to t = 0
        self.ddim_alpha_cumprods_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])
        self.prediction_type = prediction_type
        self.clip_range = clip_range

    def to(self, device: torch.device) -> "DDIMSolver":
        for name in ("ddim_timesteps", "alpha_schedule", "sigma_schedule", "ddim_alpha_cumprods_prev"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def predicted_original_sample_and_noise(
        self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_0 and eps from a prediction at x_t (LCMScheduler.step and DDIMScheduler.step, stages 3 and 4)."""
        alphas = append_dims(self.alpha_schedule[timesteps], sample.ndim)
        sigmas = append_dims(self.sigma_schedule[timesteps], sample.ndim)
        if self.prediction_type == "epsilon":
            pred_x0 = (sample - sigmas * model_output) / alphas
        elif self.prediction_type == "sample":
            pred_x0 = model_output
        else:
            # v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022)
            pred_x0 = alphas * sample - sigmas * model_output
        if self.clip_range is not None:
            # near t = T an unclipped x_0 is the prediction's error divided by alpha_T ~ 0
            pred_x0 = pred_x0.clamp(-self.clip_range, self.clip_range)
        return pred_x0, (sample - alphas * pred_x0) / sigmas

    def ddim_step(self, pred_x0: torch.Tensor, pred_noise: torch.Tensor, timestep_index: torch.Tensor) -> torch.Tensor:
        alpha_cumprod_prev = append_dims(self.ddim_alpha_cumprods_prev[timestep_index], pred_x0.ndim)
        return alpha_cumprod_prev.sqrt() * pred_x0 + (1.0 - alpha_cumprod_prev).sqrt() * pred_noise


def consistency_function(
    solver: DDIMSolver,
    scheduler: LCMScheduler,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x_0(x_t, t), with LCMScheduler's own boundary scalings (c_skip(0) ~ 1,
    c_out(0) ~ 0): what `LCMScheduler.step` computes as `denoised` from the same prediction."""
    pred_x0, _ = solver.predicted_original_sample_and_noise(model_output, timesteps, sample)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timesteps)
    return append_dims(c_skip, sample.ndim) * sample + append_dims(c_out, sample.ndim) * pred_x0


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1) with `target_dims` dimensions, to broadcast over samples."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def run_fingerprint(args: argparse.Namespace, student: torch.nn.Module, accelerator: Accelerator) -> dict:
    """What defines this run, stored with each checkpoint (see train_sculpt.py's run_fingerprint)."""
    fingerprint = {name: getattr(args, name) for name in FINGERPRINT_ARGS}
    for name in ("teacher", "dataset_name", "train_data_dir"):
        if fingerprint[name] is not None and os.path.exists(fingerprint[name]):
            fingerprint[name] = os.path.realpath(fingerprint[name])
    config = accelerator.unwrap_model(student).config
    fingerprint.update(
        student_config={name: value for name, value in config.items() if not name.startswith("_")},
        num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision,
    )
    return fingerprint


def render_grids(
    pipeline: SculptPipeline,
    args: argparse.Namespace,
    device: torch.device,
    names: list[str] | None,
    prompts: list[str] | None,
):
    """The sample grid: one panel per --validation_inference_steps count, left to right, from one fixed seed."""
    panels = [
        validation.render_sample_grid(
            pipeline,
            num_images=args.num_validation_images,
            num_inference_steps=num_steps,
            guidance_scale=args.validation_guidance_scale,
            seed=args.seed if args.seed is not None else 0,
            device=device,
            num_classes=len(names) if names is not None else None,
            prompts=prompts,
        )
        for num_steps in args.validation_inference_steps
    ]
    return make_image_grid(panels, rows=1, cols=len(panels))


def load_target_weights(
    target_denoiser: torch.nn.Module, student: torch.nn.Module, target_ema: EMAModel | None, accelerator: Accelerator
):
    """theta^- <- the EMA of the student, or the student itself without EMA."""
    if target_ema is not None:
        target_ema.copy_to(target_denoiser.parameters())
    else:
        target_denoiser.load_state_dict(accelerator.unwrap_model(student).state_dict())


def main(args: argparse.Namespace):
    accelerator = runtime.make_accelerator(args)

    # 1. the teacher (frozen), its noise schedule and the DDIM solver on the skip-step grid
    teacher = load_teacher(args)
    teacher_denoiser = teacher.denoiser
    teacher_denoiser.requires_grad_(False).eval()
    component = "unet" if teacher.unet is not None else "transformer"
    prediction_type = teacher_denoiser.config.prediction_type
    student_scheduler = build_student_scheduler(teacher, args)
    # pixel-space teachers clip the predicted x_0 to [-1, 1] when they sample; LCMScheduler (which takes the setting
    # from the teacher's config) does too, so the solver and the consistency function clip as the samplers do
    clip_range = student_scheduler.config.clip_sample_range if student_scheduler.config.clip_sample else None
    solver = DDIMSolver(
        teacher.scheduler.alphas_cumprod.float(), args.num_ddim_timesteps, prediction_type, clip_range
    ).to(accelerator.device)
    # the student's first sampling step reads x_0 off its prediction at the top of the grid
    top_alpha = solver.alpha_schedule[solver.ddim_timesteps[-1]].item()
    if prediction_type == "epsilon" and top_alpha < 0.02:
        logger.warning(
            f"The solver grid ends at t = {solver.ddim_timesteps[-1].item()}, where alpha_t = {top_alpha:.2g}: an"
            f" epsilon student's x_0 there is its error times {1 / top_alpha:,.0f}, so its 1-2 step samples will be"
            " noise. Choose --num_ddim_timesteps so that the grid ends lower (e.g. 48 for T = 1000: t = 959)."
        )
    text_encoder, vae = teacher.text_encoder, teacher.vae
    for frozen in (text_encoder, vae):
        if frozen is not None:
            frozen.requires_grad_(False).eval().to(accelerator.device)
    teacher_denoiser.to(accelerator.device)

    # 2. data, at the teacher's resolution
    builtin = args.dataset_name is None and args.train_data_dir is None
    dataset = data.load_run_dataset(accelerator, args)
    conditioning = "class" if teacher.num_classes() is not None else "text"
    class_column = args.class_column or (data.DIGITS_CLASS_COLUMN if builtin and conditioning == "class" else None)
    if (conditioning == "class") != (class_column is not None) or (conditioning == "text") != (
        args.caption_column is not None
    ):
        flag = "--class_column" if conditioning == "class" else "--caption_column"
        raise ValueError(f"The teacher is {conditioning}-conditional: pass {flag} (and only it) for its data.")
    data.check_columns(dataset, args.image_column, class_column, args.caption_column)
    names = prompts = None
    if conditioning == "class":
        names = data.class_names(dataset, class_column)
        if len(names) != teacher.num_classes():
            raise ValueError(f"The teacher has {teacher.num_classes()} classes but --class_column has {len(names)}.")
    else:
        first_captions = dataset.select(range(min(64, len(dataset))))[args.caption_column]
        prompts = sorted({caption if isinstance(caption, str) else caption[0] for caption in first_captions})[:4]
    resolution = args.resolution or teacher_denoiser.config.sample_size * teacher.vae_scale_factor
    image_mode = data.image_mode_for_channels(
        vae.config.in_channels if vae is not None else teacher_denoiser.config.in_channels
    )
    data.set_training_transform(dataset, args, image_mode, class_column, args.caption_column, resolution)

    # 3. the student (trained) and its target network theta^-: an EMA of the student (LCM), or with --no-use_ema the
    # student itself behind a stop-gradient (improved consistency training's mu = 0); the target is what is saved
    student = build_student(teacher_denoiser, args.time_cond_proj_dim)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    # LCD conditions every prediction on the real condition (diffusers' example: no empty prompts): eval mode keeps
    # the embedder from dropping labels to the null class; gradients flow as in train mode
    student.eval()
    target_ema = build_ema(student, args.ema_decay, args.ema_inv_gamma, args.ema_power) if args.use_ema else None
    target_denoiser = copy.deepcopy(student).requires_grad_(False)
    ema_models = {f"{component}_target": target_ema} if args.use_ema else {}
    checkpointing.register_checkpoint_hooks(accelerator, model_folders=[component], ema_models=ema_models)

    prepared = optimization.prepare_training(accelerator, student, student.parameters(), dataset, args)
    student, optimizer, lr_scheduler = prepared.model, prepared.optimizer, prepared.lr_scheduler
    if args.use_ema:
        target_ema.to(accelerator.device)
    target_denoiser.to(accelerator.device)

    # the student pipeline: samples during and after distillation, encodes prompts, and is what is saved
    pipeline = SculptPipeline(
        **{component: target_denoiser},
        scheduler=student_scheduler,
        text_encoder=text_encoder,
        tokenizer=teacher.tokenizer,
        vae=vae,
    )
    null_prompt_embeds = None
    if conditioning == "text":
        with torch.no_grad():
            null_prompt_embeds = pipeline.encode_prompt([""], accelerator.device, do_classifier_free_guidance=False)[0]

    runtime.init_trackers(accelerator, "distill_sculpt", args)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Distilling {args.teacher} ({type(teacher_denoiser).__name__}, {prediction_type}) into an LCM"
        f" student: {args.max_train_steps} steps of {total_batch_size} of {len(dataset)} images, w in"
        f" [{args.w_min}, {args.w_max}], a {args.num_ddim_timesteps}-point solver grid *****"
    )

    # 4. resume (this run's checkpoints only, unless one is named), then the consistency distillation loop
    fingerprint = run_fingerprint(args, student, accelerator)
    resume, global_step = checkpointing.resume_run(
        accelerator,
        args,
        fingerprint,
        [component, *ema_models],
        optimizer,
        lr_scheduler,
        ema_models=list(ema_models.values()),
    )
    load_target_weights(target_denoiser, student, target_ema, accelerator)
    guard = DivergenceGuard(accelerator, resumed_checkpoint=resume.path if resume is not None else None)

    progress_bar = runtime.step_progress_bar(accelerator, args, global_step)
    train_start = time.monotonic()
    train_loss = 0.0
    for batch in checkpointing.training_batches(accelerator, prepared.dataloader, global_step, args):
        with accelerator.accumulate(student):
            # 1. the clean batch x_0 and its condition c
            latents = data.batch_latents(batch["pixel_values"], vae)
            with torch.no_grad():
                bsz = latents.shape[0]
                if conditioning == "class":
                    condition = {"class_labels": batch["class_labels"]}
                    null_condition = {"class_labels": torch.full_like(batch["class_labels"], teacher.num_classes())}
                else:
                    embeds = pipeline.encode_prompt(
                        batch["captions"], accelerator.device, do_classifier_free_guidance=False
                    )[0]
                    condition = {"encoder_hidden_states": embeds}
                    null_condition = {"encoder_hidden_states": null_prompt_embeds.expand_as(embeds)}

            # 2. a solver step n + k -> n of the skip-step grid, uniformly (the grid is [k-1, 2k-1, ..., T-1])
            index = torch.randint(0, args.num_ddim_timesteps, (bsz,), device=latents.device)
            start_timesteps = solver.ddim_timesteps[index]
            timesteps = (start_timesteps - solver.step_ratio).clamp(min=0)

            # 3. z_{t_{n+k}} from the forward process (Algorithm 1)
            noise = torch.randn_like(latents)
            noisy_model_input = teacher.scheduler.add_noise(latents, noise, start_timesteps)

            # 4. w ~ U[w_min, w_max], embedded as w - 1 like the pipeline embeds its guidance_scale
            w = (args.w_max - args.w_min) * torch.rand((bsz,), device=latents.device) + args.w_min
            w_embedding = pipeline.get_guidance_scale_embedding(w.cpu() - 1, embedding_dim=args.time_cond_proj_dim).to(
                latents.device
            )
            w = append_dims(w, latents.ndim)

            # 5. the online student's consistency function at t_{n+k}
            channels = latents.shape[1]
            model_output = student(noisy_model_input, start_timesteps, timestep_cond=w_embedding, **condition)
            model_pred = consistency_function(
                solver, student_scheduler, model_output.sample[:, :channels], start_timesteps, noisy_model_input
            )

            with torch.no_grad():
                # 6. the teacher's guided DDIM step to t_n: both branches in one batched pass, guided as the
                # pipeline guides, on the prediction: uncond + w (cond - uncond)
                teacher_conditions = {
                    name: torch.cat([null_condition[name], value]) for name, value in condition.items()
                }
                teacher_output = teacher_denoiser(
                    torch.cat([noisy_model_input] * 2), start_timesteps.repeat(2), **teacher_conditions
                ).sample[:, :channels]
                uncond_output, cond_output = teacher_output.chunk(2)
                guided_output = uncond_output + w * (cond_output - uncond_output)
                guided_x0, guided_noise = solver.predicted_original_sample_and_noise(
                    guided_output, start_timesteps, noisy_model_input
                )
                x_prev = solver.ddim_step(guided_x0, guided_noise, index)

                # 7. the target network's consistency function at t_n
                target_output = target_denoiser(x_prev, timesteps, timestep_cond=w_embedding, **condition)
                target = consistency_function(
                    solver, student_scheduler, target_output.sample[:, :channels], timesteps, x_prev
                )

            # 8. the consistency distance
            if args.loss_type == "l2":
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            else:
                loss = torch.mean(
                    torch.sqrt((model_pred.float() - target.float()) ** 2 + args.huber_c**2) - args.huber_c
                )
            avg_loss = accelerator.gather(loss.detach().repeat(bsz)).mean()
            train_loss += avg_loss.item() / args.gradient_accumulation_steps

            optimization.optimizer_step(
                accelerator, loss, student.parameters(), optimizer, lr_scheduler, args.max_grad_norm
            )

        if accelerator.sync_gradients:
            global_step += 1
            guard.check_step(global_step, train_loss, student.named_parameters())
            # 9. theta^- <- stopgrad(mu theta^- + (1 - mu) theta)
            if args.use_ema:
                target_ema.step(student.parameters())
            load_target_weights(target_denoiser, student, target_ema, accelerator)
            progress_bar.update(1)
            accelerator.log({"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            progress_bar.set_postfix(loss=train_loss)
            train_loss = 0.0

            if global_step % args.checkpointing_steps == 0:
                guard.checkpoint_saved(
                    checkpointing.save_checkpoint(
                        accelerator, args.output_dir, global_step, fingerprint, args.checkpoints_total_limit
                    )
                )
            if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                if accelerator.is_main_process:
                    grid = render_grids(pipeline, args, accelerator.device, names, prompts)
                    save_image(grid, os.path.join(args.output_dir, "samples", f"step-{global_step:06d}.png"))
                    validation.log_grid(accelerator, grid, global_step)
                accelerator.wait_for_everyone()
    progress_bar.close()
    train_seconds = time.monotonic() - train_start

    # 5. the student pipeline (target network weights, LCMScheduler), its samples at 1/2/4 steps, its card
    accelerator.wait_for_everyone()
    guard.check_final(None, target_denoiser.named_parameters(), args.output_dir)
    if accelerator.is_main_process:
        pipeline.save_pretrained(args.output_dir)
        grid = render_grids(pipeline, args, accelerator.device, names, prompts)
        save_image(grid, os.path.join(args.output_dir, SAMPLE_GRID_NAME))
        validation.log_grid(accelerator, grid, global_step)
        publish.write_training_args(args.output_dir, args, resume)
        card = build_distilled_model_card(
            args,
            pipeline,
            TrainingRun.finished(
                accelerator, args, len(dataset), global_step, train_seconds, resume, validation_prompts=prompts
            ),
        )
        write_text(os.path.join(args.output_dir, "README.md"), str(card))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # 6. publish once every process is done and every file written: a failed push leaves a complete local folder
    if args.push_to_hub and accelerator.is_main_process:
        publish.push_run(
            args,
            pipeline.hub_allow_patterns() + [SAMPLE_GRID_NAME, publish.ARGS_FILE_NAME],
            commit_message="Upload a SculptPipeline LCM student distilled with sculptdiff",
        )


if __name__ == "__main__":
    main(parse_args())
