#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Sample quality per sampling step: sculptdiff's default recipe against stock diffusers, trained in one run.

    python benchmarks/bench_quality.py                 # 10 minutes of training per model, 500 samples per set
    python benchmarks/bench_quality.py --quick         # the whole path in about two minutes

Models, all class-conditional on the built-in digits (train split only; the held-out split is the metrics'
reference), trained in this process by the harness's one loop (`harness.train_interleaved` over
`harness.DiffusionRun`s) under the same wall-clock budget, batch, optimiser, learning rate schedule, gradient
clipping and EMA:

- `sculptdiff`: SculptUNet2DModel + SculptScheduler, the default recipe of `sculptdiff.training.recipe` (the
  training script's defaults: its U-Net config, cosine betas, "trailing" spacing, epsilon, lr 1e-3 with warm-up and
  cosine decay, its batch size, EMA with warm-up, label dropout 0.1 in the U-Net's embedder);
- `stock`: diffusers' UNet2DModel + DDPMScheduler with its defaults (linear betas, epsilon), at the same parameter
  count (+6%, DDPM's layout, `harness.build_stock_digits_unet`), class-conditional with a null-class row for
  guidance and the same label dropout done before the loss, so that both can be guided;
- `sculptdiff-flow` (`--with_flow`, on by default): the same U-Net trained with the rectified-flow objective
  (SculptFlowScheduler).

Why in-process rather than `accelerate launch training_scripts/train_sculpt.py`: the stock model cannot go through
the script (it builds SculptUNet2DModel only), and equal treatment is easiest to guarantee with one loop for all.
Each step is the package's training step (`sculptdiff.training.objective.diffusion_loss`, then backward, clipping,
AdamW and EMA as the script does them). The models train *interleaved*, one step each in turn, each with its own
clock: the machine's load (shared cores) then falls on all models alike, which a sequential run cannot promise. The
script's cosine learning-rate decay runs over `--max_train_steps`, unknown under a time budget, so here it runs over
the fraction of the budget spent.

Then every model samples `--num_samples` images through SculptPipeline (class i % 10 for image i, the same starting
noise for every set) with several samplers and step counts (DDIM, DPM-Solver++ plain and with thresholding,
SculptScheduler eta=0; flow Euler and Heun), and each set is scored by `sculptdiff.evaluation.digits.DigitsEvaluator`:
Frechet distance (FD) in a digits classifier's feature space, class accuracy, class coverage, k-NN precision and
recall, read against its calibration rows (real digits drawn for the same labels, the floor and its noise band over
several draws; blurred, noisy, collapsed digits). Guided sets use the pipeline's own classifier-free guidance
(`--guidance_scales`) or one of diffusers' guiders as its `guider` component (`--guiders`: CFG, CFG in an interval,
APG, CFG-Zero*, TCFG, FDG); `--student` adds a consistency-distilled student (LCMScheduler, its w an input) beside its
teacher, with model calls per image and images/s. The sets run in priority order (the cells the targets need first)
and the results file is rewritten after each set, so a run stopped early still reports what it measured. Writes
benchmarks/results/quality-<date>.md (+ .json, an FD-vs-steps plot and a sample grid). Needs matplotlib for the PNGs
(the `bench` extra).
"""

import argparse
import ast
import inspect
import math
import os
import time
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import harness
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers import guiders as diffusers_guiders
from diffusers.guiders import BaseGuidance
from harness import NUM_CLASSES

from sculptdiff.evaluation.digits import DigitsEvaluator
from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler
from sculptdiff.training.recipe import RECIPE, build_noise_scheduler


# The guider sweep (`--guiders`): each entry is the Python call that builds one of diffusers' guiders, so a setting
# that wins can be shipped as printed (`pipe.register_modules(guider=...)`). Fractions of the loop for `start`/`stop`
# are read on the recipe's 10-step "trailing" cosine grid, whose sigma = sqrt((1 - alpha_bar) / alpha_bar) runs
# 2e4, 6.4, 3.1, 2.0, 1.4, 1.0, 0.74, 0.52, 0.34, 0.17.
DEFAULT_GUIDERS = [
    # plain CFG, the reference (arXiv 2207.12598)
    "ClassifierFreeGuidance(guidance_scale=1.5)",
    "ClassifierFreeGuidance(guidance_scale=2.0)",
    "ClassifierFreeGuidance(guidance_scale=3.0)",
    "ClassifierFreeGuidance(guidance_scale=4.0)",
    # guidance in a limited interval (arXiv 2404.07724): its SD-XL / EDM2-S interval sigma in (0.28, 5.42] is steps
    # 2-8 of 10 (start=0.2, stop=0.9); its EDM2-XXL interval (0.19, 1.61] is steps 4-8 (start=0.4); later still,
    # steps 6-8 (sigma 0.74-0.34) and 6-9
    "ClassifierFreeGuidance(guidance_scale=3.0, start=0.2, stop=0.9)",
    "ClassifierFreeGuidance(guidance_scale=4.0, start=0.2, stop=0.9)",
    "ClassifierFreeGuidance(guidance_scale=5.0, start=0.2, stop=0.9)",
    "ClassifierFreeGuidance(guidance_scale=2.0, start=0.4, stop=0.9)",
    "ClassifierFreeGuidance(guidance_scale=3.0, start=0.4, stop=0.9)",
    "ClassifierFreeGuidance(guidance_scale=5.0, start=0.4, stop=0.9)",
    "ClassifierFreeGuidance(guidance_scale=3.0, start=0.6, stop=0.9)",
    "ClassifierFreeGuidance(guidance_scale=4.0, start=0.6, stop=0.9)",
    "ClassifierFreeGuidance(guidance_scale=3.0, start=0.6, stop=1.0)",
    # APG (arXiv 2410.02416): eta = 0 (drop the update's part parallel to the conditional prediction), negative
    # momentum -0.5, and a norm threshold r on the update (diffusers' `adaptive_projected_guidance_rescale`, the L2
    # norm of eps_cond - eps_uncond over the whole prediction; diffusers' default 15 is for SD's 4x128x128 latents).
    # On the digits model's 1x16x16 epsilon that norm is 0.3-0.8 at 10 steps (median per step, measured on the
    # 2026-12-02 models), so r = 0.5 clips part of the update and 0.25 most of it
    "AdaptiveProjectedGuidance(guidance_scale=3.0, eta=0.0, adaptive_projected_guidance_rescale=0.0)",
    "AdaptiveProjectedGuidance(guidance_scale=5.0, eta=0.0, adaptive_projected_guidance_rescale=0.5,"
    " adaptive_projected_guidance_momentum=-0.5)",
    "AdaptiveProjectedGuidance(guidance_scale=5.0, eta=0.0, adaptive_projected_guidance_rescale=0.25,"
    " adaptive_projected_guidance_momentum=-0.5)",
    "AdaptiveProjectedGuidance(guidance_scale=8.0, eta=0.0, adaptive_projected_guidance_rescale=0.25,"
    " adaptive_projected_guidance_momentum=-0.5)",
    # CFG-Zero* (arXiv 2503.18886): the optimised scale of the unconditional branch, with and without zeroing the
    # first step's prediction (the paper zeroes the first 4% of steps; diffusers' default is 1 step)
    "ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=0)",
    "ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1)",
    # Tangential CFG (arXiv 2503.18137)
    "TangentialClassifierFreeGuidance(guidance_scale=3.0)",
    "TangentialClassifierFreeGuidance(guidance_scale=5.0)",
    # Frequency-decoupled guidance (arXiv 2506.19713): strong guidance on the high band, weak on the low band (not
    # 1.0: diffusers 0.42.1 then rebuilds the image from the wrong band and fails on a shape mismatch)
    "FrequencyDecoupledGuidance(guidance_scales=[3.0, 1.5])",
    "FrequencyDecoupledGuidance(guidance_scales=[5.0, 1.5])",
    "FrequencyDecoupledGuidance(guidance_scales=[5.0, 1.25])",
]
# `--quick`: one setting of each guider class
QUICK_GUIDERS = [
    "ClassifierFreeGuidance(guidance_scale=3.0, start=0.2, stop=0.9)",
    "AdaptiveProjectedGuidance(guidance_scale=5.0, eta=0.0, adaptive_projected_guidance_rescale=0.5,"
    " adaptive_projected_guidance_momentum=-0.5)",
    "ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=0)",
    "TangentialClassifierFreeGuidance(guidance_scale=3.0)",
    "FrequencyDecoupledGuidance(guidance_scales=[3.0, 1.5])",
]
# The guider target (issue 16): class accuracy >= 99.5% with FD within 1.3x of the same model's w = 1 FD
GUIDER_TARGET_ACCURACY, GUIDER_TARGET_FD_RATIO = 0.995, 1.3
# The student targets (issue 16): the student at 4 steps no worse in FD than the teacher at --teacher_steps guided
# steps, at class accuracy >= 99%; at 1 step, FD within 2x of the teacher's
STUDENT_TARGET_ACCURACY, STUDENT_ONE_STEP_FD_RATIO = 0.99, 2.0


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = harness.BenchmarkParser(
        __doc__.split("\n\n")[0],
        results="quality-<date>.md/.json/.png",
        quick={"steps": [5, 10], "guidance_scales": [1.0, 3.0], "guidance_steps": 10},
        seed="Seed of model init, data order, noise and samples.",
        train_minutes=10.0,
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[5, 10, 20, 50], help="Sampling step counts of the step sweep."
    )
    parser.add_argument(
        "--step_sweep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "Sample every sampler at --steps with w=1. With --no-step_sweep only each main sampler's w=1 set at"
            " --guidance_steps runs (the guider target's baseline), e.g. to re-score guiders with --from_models."
        ),
    )
    parser.add_argument(
        "--guidance_scales",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 3.0, 4.0],
        help="Guidance scales of the guidance sweep (at --guidance_steps steps, main sampler of each model).",
    )
    parser.add_argument(
        "--guidance_steps",
        type=int,
        default=10,
        help="Step count of the guidance sweep and of the class-accuracy target.",
    )
    parser.add_argument(
        "--resolution", type=int, default=16, help="Image side in pixels (the training recipe's default is 16)."
    )
    parser.add_argument(
        "--with_flow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also train and sample sculptdiff's rectified-flow model (SculptFlowScheduler).",
    )
    parser.add_argument(
        "--from_models",
        type=str,
        default=None,
        help=(
            "Skip training: sample and score the models a previous run saved in this --model_dir (to re-score after"
            " a change to the samplers or metrics). Writes quality-<date>-from-models.*."
        ),
    )
    parser.add_argument(
        "--samplers",
        type=str,
        nargs="+",
        default=None,
        help='Only these samplers, by their table names (e.g. "DDIM" "DPM-Solver++ (thresholding)"); default all.',
    )
    parser.add_argument(
        "--guiders",
        type=str,
        nargs="*",
        default=None,
        help=(
            "Guider sweep at --guidance_steps with each model's main sampler: calls of diffusers' guider classes with"
            ' literal keyword arguments, e.g. "ClassifierFreeGuidance(guidance_scale=3, start=0.2, stop=0.9)".'
            " Default: plain CFG, CFG in an interval, APG, CFG-Zero*, TCFG and FDG settings (DEFAULT_GUIDERS);"
            " with --quick one setting per class (QUICK_GUIDERS); `--guiders` alone: no guider sweep."
        ),
    )
    parser.add_argument(
        "--student",
        type=str,
        nargs="+",
        action="extend",
        default=[],
        help=(
            "A consistency-distilled student pipeline folder (SculptPipeline with LCMScheduler, a denoiser with"
            " `time_cond_proj_dim`); repeatable. Adds its rows at --student_steps beside the teacher's."
        ),
    )
    parser.add_argument(
        "--student_steps", type=int, nargs="+", default=[1, 2, 4, 8], help="Step counts of the student rows."
    )
    parser.add_argument(
        "--student_guidance_scale",
        type=float,
        default=3.0,
        help="Guidance scale w of the student rows (the student's w input) and of the teacher's rows beside them.",
    )
    parser.add_argument(
        "--teacher",
        type=str,
        default=None,
        help=(
            "The students' teacher, a SculptPipeline folder, sampled with its own scheduler. Default: this run's"
            " sculptdiff model (the default recipe) with its main sampler."
        ),
    )
    parser.add_argument(
        "--teacher_steps",
        type=int,
        default=20,
        help="Guided step count of the teacher's reference row (besides the student's step counts).",
    )
    parser.add_count(
        "timing_batch_size",
        64,
        "Batch of the images/s measurement of the student and teacher rows (whole pipeline calls).",
    )
    args = parser.parse_args(input_args)
    if args.guiders is None:
        args.guiders = QUICK_GUIDERS if args.quick else DEFAULT_GUIDERS
    if any(steps < 1 for steps in args.steps) or args.guidance_steps < 1:
        raise ValueError("--steps and --guidance_steps must be >= 1.")
    if any(scale < 1 for scale in args.guidance_scales):
        raise ValueError("--guidance_scales must be >= 1 (1 = plain conditional sampling).")
    if any(steps < 1 for steps in args.student_steps) or args.teacher_steps < 1:
        raise ValueError("--student_steps and --teacher_steps must be >= 1.")
    # fail on a mistyped guider before any training; the canonical spelling goes into the results
    args.guiders = [parse_guider(spec).spec for spec in args.guiders]
    return args


@dataclass(frozen=True)
class GuiderSetting:
    """One of diffusers' guiders and its arguments; `spec` is the Python call that builds it."""

    spec: str
    guider_class: type
    kwargs: dict

    def build(self) -> BaseGuidance:
        # a fresh guider per set: APG's momentum buffer and every guider's step state start clean
        return self.guider_class(**self.kwargs)


def as_float(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [as_float(item) for item in value]
    return value


def parse_guider(spec: str) -> GuiderSetting:
    """A `--guiders` entry: a call of a diffusers guider class with literal keyword arguments."""
    example = '"ClassifierFreeGuidance(guidance_scale=3.0, start=0.2, stop=0.9)"'
    try:
        call = ast.parse(spec.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise SyntaxError(spec)
        if any(keyword.arg is None for keyword in call.keywords):
            raise SyntaxError(spec)
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (SyntaxError, ValueError) as error:
        raise ValueError(
            f"--guiders entry {spec!r} is not a guider class called with literal keyword arguments, e.g. {example}."
        ) from error
    guider_class = getattr(diffusers_guiders, call.func.id, None)
    if (
        not isinstance(guider_class, type)
        or not issubclass(guider_class, BaseGuidance)
        or guider_class is BaseGuidance
    ):
        known = sorted(
            name
            for name in dir(diffusers_guiders)
            if isinstance(getattr(diffusers_guiders, name), type)
            and issubclass(getattr(diffusers_guiders, name), BaseGuidance)
            and name != "BaseGuidance"
        )
        raise ValueError(f"--guiders entry {spec!r}: {call.func.id} is not one of diffusers' guiders {known}.")
    parameters = inspect.signature(guider_class.__init__).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ValueError(
            f"--guiders entry {spec!r}: {guider_class.__name__} takes no {unknown}; it takes"
            f" {[name for name in parameters if name != 'self']}."
        )
    for name, value in kwargs.items():
        # 3 means 3.0 except for integer arguments (CFG-Zero*'s `zero_init_steps`): FrequencyDecoupledGuidance tests
        # `isinstance(start, float)`
        default = parameters[name].default
        if not (isinstance(default, int) and not isinstance(default, bool)):
            kwargs[name] = as_float(value)
    canonical = f"{guider_class.__name__}({', '.join(f'{name}={value!r}' for name, value in kwargs.items())})"
    setting = GuiderSetting(canonical, guider_class, kwargs)
    setting.build()  # the guider's own checks (list lengths, kornia for FDG) fail here, before any training
    return setting


def build_runs(args: argparse.Namespace) -> list[harness.DiffusionRun]:
    """The models to train, each from `--seed` (the same initial draws), seeing the same batches in the same order and
    the same noise draws."""
    dataset = harness.digits_train_dataset(args.resolution)
    entries = [
        ("sculptdiff", harness.build_sculpt_digits_unet, build_noise_scheduler(), "epsilon"),
        ("stock", harness.build_stock_digits_unet, harness.build_stock_noise_scheduler(), "epsilon"),
    ]
    if args.with_flow:
        entries.append(
            ("sculptdiff-flow", build_flow_digits_unet, build_noise_scheduler(prediction_type="flow"), "flow")
        )
    runs = []
    for name, build_model, noise_scheduler, objective in entries:
        torch.manual_seed(args.seed)
        model = build_model(args.resolution)
        # stock: the loop does the null-class dropout; sculptdiff: the U-Net's embedder does
        runs.append(
            harness.build_diffusion_run(
                name, model, noise_scheduler, objective, dataset, args.seed, drop_labels_in_loop=name == "stock"
            )
        )
    return runs


def build_flow_digits_unet(resolution: int) -> SculptUNet2DModel:
    return harness.build_sculpt_digits_unet(resolution, prediction_type="flow")


def scored_run(name: str, model: torch.nn.Module, noise_scheduler, objective: str) -> harness.DiffusionRun:
    """A trained model to sample and score (loaded, not trained here): a run without optimiser, EMA or data."""
    return harness.DiffusionRun(name, model, noise_scheduler, objective, None, None, None, None)


@dataclass
class Sampler:
    name: str
    scheduler: object
    guided_default: bool  # the model's main sampler: the one of the guidance sweep


def samplers_for(run: harness.DiffusionRun) -> list[Sampler]:
    """Every sampler is built from the training scheduler's config, as a user swapping schedulers would."""
    config = run.noise_scheduler.config
    if run.objective == "flow":
        return [
            Sampler("flow euler", SculptFlowScheduler.from_config(config, solver="euler"), True),
            Sampler("flow heun", SculptFlowScheduler.from_config(config, solver="heun"), False),
        ]
    # each model's guidance sweep uses its own package's sampler: DDIM for stock, SculptScheduler for sculptdiff
    ours = Sampler("ours (SculptScheduler eta=0)", SculptScheduler.from_config(config, eta=0.0), run.name != "stock")
    return [
        Sampler("DDIM", DDIMScheduler.from_config(config), run.name == "stock"),
        Sampler("DPM-Solver++", DPMSolverMultistepScheduler.from_config(config), False),
        # The plain swap above never clips x_0, and the recipe's cosine schedule with "trailing" spacing starts at
        # alphas_cumprod[T-1] = 2.4e-9, where x_0 = (x_t - sigma_t eps) / alpha_t amplifies eps errors 2e4-fold
        # (DDIM survives through clip_sample). Dynamic thresholding (Imagen) is DPM-Solver's own remedy.
        Sampler(
            "DPM-Solver++ (thresholding)",
            DPMSolverMultistepScheduler.from_config(config, thresholding=True, sample_max_value=1.0),
            False,
        ),
        ours,
    ]


@dataclass
class Job:
    """One scored set: a model, its sampler, a step count, and either a guidance scale or a guider."""

    run: harness.DiffusionRun
    sampler: Sampler
    steps: int
    guidance: float | None = 1.0  # `guidance_scale`; None when a guider owns guidance
    guider: GuiderSetting | None = None
    sweep: str = "steps"  # the table it belongs to: "steps", "guidance", "guiders" or "students"
    timed: bool = False  # images/s at --timing_batch_size as well

    def describe(self) -> str:
        setting = self.guider.spec if self.guider else f"w={self.guidance:g}"
        return f"{self.run.name} / {self.sampler.name} / {self.steps} steps / {setting}"


def sample_job(job: Job, class_labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
    guider = job.guider.build() if job.guider else None
    return harness.sample_digits(
        job.run.model,
        job.sampler.scheduler,
        job.steps,
        seed,
        class_labels=class_labels,
        guidance_scale=job.guidance,
        guider=guider,
    )


def images_per_second(job: Job, batch_size: int, seed: int, repeats: int = 3) -> float:
    """Whole pipeline calls on a batch (every step, guidance included): the median of `repeats` timed calls after an
    untimed warm-up call."""
    class_labels = torch.arange(batch_size) % NUM_CLASSES
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        sample_job(job, class_labels, seed)
        seconds.append(time.perf_counter() - start)
    return batch_size / float(np.median(seconds[1:]))


def format_metric(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


class Report:
    """Collects everything measured and rewrites the markdown, JSON and plot files (each via a rename)."""

    def __init__(self, args: argparse.Namespace, stamp: str):
        self.args = args
        self.stamp = stamp
        suffix = ("-from-models" if args.from_models else "") + ("-quick" if args.quick else "")
        self.base = Path(args.output_dir) / f"quality-{stamp}{suffix}"
        self.data = {
            **harness.results_header(args),
            "training": {},
            "checks": {},
            "calibration": {},
            "cells": [],
            "status": "running",
        }

    def cells(self, *sweeps: str) -> list[dict]:
        return [cell for cell in self.data["cells"] if cell.get("sweep", "steps") in sweeps]

    def cell(self, model: str, sampler: str, steps: int, guidance: float, sweeps=("steps", "guidance")) -> dict | None:
        for cell in self.cells(*sweeps):
            if (cell["model"], cell["sampler"], cell["steps"], cell["guidance"]) == (model, sampler, steps, guidance):
                return cell
        return None

    def best_fd(self, model: str, steps: int, guidance: float = 1.0) -> dict | None:
        best = None
        for cell in self.cells("steps", "guidance"):
            if (cell["model"], cell["steps"], cell["guidance"]) == (model, steps, guidance):
                if best is None or cell["fd"] < best["fd"]:
                    best = cell
        return best

    def guider_reference(self, model: str, sampler: str) -> dict | None:
        """The unguided (w = 1) set of a model's main sampler at --guidance_steps: the guider target's FD baseline."""
        return self.cell(model, sampler, self.args.guidance_steps, 1.0)

    def guider_targets(self) -> list[str]:
        """Per model: the best guider setting with class accuracy >= 99.5% and FD within 1.3x of its w = 1 FD."""
        lines = []
        for model in dict.fromkeys(cell["model"] for cell in self.cells("guiders")):
            cells = [cell for cell in self.cells("guiders") if cell["model"] == model]
            reference = self.guider_reference(model, cells[0]["sampler"])
            if reference is None:
                continue
            limit = GUIDER_TARGET_FD_RATIO * reference["fd"]
            prefix = (
                f"- guider, {self.args.guidance_steps} steps, {model} ({cells[0]['sampler']}): w = 1 FD"
                f" {reference['fd']:.2f}, class acc {100 * reference['class_accuracy']:.1f}%; target class acc >="
                f" {100 * GUIDER_TARGET_ACCURACY:.1f}% with FD <= {limit:.2f} ({GUIDER_TARGET_FD_RATIO:g}x)"
            )
            accurate = [cell for cell in cells if cell["class_accuracy"] >= GUIDER_TARGET_ACCURACY]
            qualifying = [cell for cell in accurate if cell["fd"] <= limit]
            if qualifying:
                best = min(qualifying, key=itemgetter("fd"))
                text = (
                    f"{prefix}: best `{best['guider']}`, FD {best['fd']:.2f} ({best['fd'] / reference['fd']:.2f}x),"
                    f" class acc {100 * best['class_accuracy']:.1f}%, recall {best['recall']:.3f}"
                )
                lines.append(harness.target_line(text, met=True))
                continue
            closest = min(accurate, key=itemgetter("fd")) if accurate else max(cells, key=itemgetter("class_accuracy"))
            text = (
                f"{prefix}: {'lowest FD at that accuracy' if accurate else 'no setting reaches it; most accurate'}"
                f" `{closest['guider']}`, FD {closest['fd']:.2f} ({closest['fd'] / reference['fd']:.2f}x), class acc"
                f" {100 * closest['class_accuracy']:.1f}%"
            )
            lines.append(harness.target_line(text, met=False))
        return lines

    def student_targets(self) -> list[str]:
        """Per student: 4 steps vs the teacher at --teacher_steps guided steps (FD, class accuracy >= 99%), and 1 step
        within 2x of that teacher FD."""
        info = self.data.get("students")
        if not info:
            return []
        teacher = self.cell(
            info["teacher"], info["teacher_sampler"], self.args.teacher_steps, info["guidance"], ["students"]
        )
        if teacher is None:
            return []
        lines = []
        reference = (
            f"the teacher ({info['teacher']}, {info['teacher_sampler']}) at {self.args.teacher_steps} steps, w ="
            f" {info['guidance']:g}: FD {teacher['fd']:.2f}, class acc {100 * teacher['class_accuracy']:.1f}%,"
            f" {teacher['nfe']:g} evaluations per image"
        )
        for student in info["students"]:
            cells = {cell["steps"]: cell for cell in self.cells("students") if cell["model"] == student}
            if 4 in cells:
                four = cells[4]
                met = (
                    four["fd"] <= teacher["fd"]
                    and min(four["class_accuracy"], teacher["class_accuracy"]) >= STUDENT_TARGET_ACCURACY
                )
                text = (
                    f"- {student} at 4 steps: FD {four['fd']:.2f}, class acc {100 * four['class_accuracy']:.1f}%,"
                    f" {four['nfe']:g} evaluations per image, vs {reference} (target: FD no worse, both class acc >="
                    f" {100 * STUDENT_TARGET_ACCURACY:.0f}%)"
                )
                lines.append(harness.target_line(text, met))
            if 1 in cells:
                one = cells[1]
                ratio = one["fd"] / teacher["fd"]
                text = (
                    f"- {student} at 1 step: FD {one['fd']:.2f}, {ratio:.2f}x the teacher's {self.args.teacher_steps}"
                    f"-step FD {teacher['fd']:.2f} (target <= {STUDENT_ONE_STEP_FD_RATIO:g}x)"
                )
                lines.append(harness.target_line(text, ratio <= STUDENT_ONE_STEP_FD_RATIO))
        return lines

    def targets(self) -> list[str]:
        lines = harness.noise_band_lines(self.data["calibration"], self.args.num_samples)
        steps_low, steps_high = 10, 50
        for label, ours, stock in (
            (
                "DDIM vs DDIM",
                self.cell("sculptdiff", "DDIM", steps_low, 1.0),
                self.cell("stock", "DDIM", steps_low, 1.0),
            ),
            ("best sampler vs best sampler", self.best_fd("sculptdiff", steps_low), self.best_fd("stock", steps_low)),
        ):
            if ours and stock:
                ratio = ours["fd"] / stock["fd"]
                text = (
                    f"- FD at {steps_low} steps, w=1, {label}: sculptdiff {ours['fd']:.2f} ({ours['sampler']}) vs stock"
                    f" {stock['fd']:.2f} ({stock['sampler']}), ratio {ratio:.2f} (target <= 0.50)"
                )
                lines.append(harness.target_line(text, ratio <= 0.5))
        ours, stock = self.cell("sculptdiff", "DDIM", steps_high, 1.0), self.cell("stock", "DDIM", steps_high, 1.0)
        if ours and stock:
            text = (
                f"- FD at {steps_high} steps, w=1, DDIM: sculptdiff {ours['fd']:.2f} vs stock {stock['fd']:.2f}"
                " (target: no worse)"
            )
            lines.append(harness.target_line(text, ours["fd"] <= stock["fd"]))
        # the guidance sweep runs each model's own main sampler only, so the w=3 cell of a model is that sampler's
        for cell in self.cells("steps", "guidance"):
            if cell["steps"] == self.args.guidance_steps and cell["guidance"] == 3.0:
                text = (
                    f"- class accuracy, w=3, {self.args.guidance_steps} steps, {cell['model']} ({cell['sampler']}):"
                    f" {100 * cell['class_accuracy']:.1f}% (target >= 97%)"
                )
                lines.append(harness.target_line(text, cell["class_accuracy"] >= 0.97))
        flow, ddim = (
            self.cell("sculptdiff-flow", "flow euler", steps_low, 1.0),
            self.cell("sculptdiff", "DDIM", steps_high, 1.0),
        )
        if flow and ddim:
            text = (
                f"- flow (euler) at {steps_low} steps, FD {flow['fd']:.2f}, vs epsilon DDIM at {steps_high} steps, FD"
                f" {ddim['fd']:.2f} (target: no worse)"
            )
            lines.append(harness.target_line(text, flow["fd"] <= ddim["fd"]))
        lines += self.guider_targets() + self.student_targets()
        return lines or ["- (no target cell measured yet)"]

    def markdown(self) -> str:
        data = self.data
        lines = [
            f"# Sample quality per step: sculptdiff vs stock diffusers ({data['date']})",
            "",
            f"Status: **{data['status']}**",
            "",
            *harness.header_lines(data["command"], data["machine"], data["load"]),
            f"- Data: sklearn digits at {self.args.resolution} px, train split (70%) for the models; metrics against"
            " the held-out 30% in a digits classifier's feature space (`sculptdiff.evaluation.digits`)",
            f"- Samples per set: {self.args.num_samples} (class i % 10 for image i; the same starting noise for every"
            " set); k-NN precision/recall with k=3",
        ]
        if data.get("recipe"):
            lines.append(
                f"- Recipe (`sculptdiff.training.recipe.RECIPE`, train_sculpt.py's defaults, when the run started):"
                f" {', '.join(f'{name} {value}' for name, value in data['recipe'].items())}"
            )
        if "classifier_accuracy" in data["checks"]:
            lines.append(f"- Digits classifier held-out accuracy: {100 * data['checks']['classifier_accuracy']:.2f}%")
        if "models" in data["checks"]:
            lines.append(f"- Models: {data['checks']['models']}")
        for note in data.get("notes", []):
            lines.append(f"- {note}")
        if data["training"]:
            lines += ["", "## Training (same budget, batch, optimiser, schedule, EMA; interleaved)", ""]
            lines += ["| model | parameters | steps | epochs | seconds | s/step | final loss (mean of last 100) |"]
            lines += ["|---|---|---|---|---|---|---|"]
            for name, info in data["training"].items():
                lines.append(
                    f"| {name} | {info['parameters']:,} | {info['steps']} | {info['epochs']} | {info['seconds']:.0f} |"
                    f" {info['seconds'] / max(1, info['steps']):.3f} | {info['final_loss']:.4f} |"
                )
        lines += harness.calibration_section(data["calibration"])
        lines += ["", "## Targets", ""] + self.targets()
        if self.cells("steps", "guidance"):
            lines += ["", "## All sets", ""]
            lines += [
                "| model | sampler | steps | NFE | w | FD | precision | recall | class acc. | coverage | entropy | sample s |"
            ]
            lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for c in sorted(self.cells("steps", "guidance"), key=itemgetter("model", "sampler", "guidance", "steps")):
                sampler = c["sampler"] + (f" (= {c['same_as']}, identical samples)" if c.get("same_as") else "")
                lines.append(
                    f"| {c['model']} | {sampler} | {c['steps']} | {c['nfe']:g} | {c['guidance']:g} | {c['fd']:.2f} |"
                    f" {c['precision']:.3f} | {c['recall']:.3f} | {format_metric(c['class_accuracy'], 3)} |"
                    f" {c['class_coverage']:.2f} | {c['class_entropy']:.3f} | {c['seconds']:.0f} |"
                )
        lines += self.guider_table() + self.student_table() + [""]
        if data.get("plot"):
            lines += [f"![FD vs steps]({data['plot']})", ""]
        if data.get("grid"):
            lines += [f"![samples]({data['grid']})", ""]
        return "\n".join(lines)

    def guider_table(self) -> list[str]:
        if not self.cells("guiders"):
            return []
        lines = [
            "",
            f"## Guiders ({self.args.guidance_steps} steps, each model's main sampler; SculptPipeline's `guider`)",
            "",
            "Each setting is the diffusers call that builds it (`pipe.register_modules(guider=...)`). `FD / w=1`:"
            " the FD over the same model's unguided FD at this step count. NFE: denoiser evaluations per image"
            " (guidance in an interval skips the unconditional branch outside it).",
            "",
            "| model | guider | NFE | FD | FD / w=1 | precision | recall | class acc. | coverage | sample s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model in dict.fromkeys(cell["model"] for cell in self.cells("guiders")):
            cells = [cell for cell in self.cells("guiders") if cell["model"] == model]
            reference = self.guider_reference(model, cells[0]["sampler"])
            rows = ([reference] if reference else []) + cells
            for c in rows:
                ratio = f"{c['fd'] / reference['fd']:.2f}" if reference else "n/a"
                guider = f"`{c['guider']}`" if c["guider"] else "none (w = 1)"
                guider += f" (= {c['same_as']}, identical samples)" if c.get("same_as") else ""
                lines.append(
                    f"| {c['model']} | {guider} | {c['nfe']:g} | {c['fd']:.2f} | {ratio} | {c['precision']:.3f} |"
                    f" {c['recall']:.3f} | {format_metric(c['class_accuracy'], 3)} | {c['class_coverage']:.2f} |"
                    f" {c['seconds']:.0f} |"
                )
        return lines

    def student_table(self) -> list[str]:
        if not self.cells("students"):
            return []
        lines = [
            "",
            "## Consistency-distilled students beside their teacher",
            "",
            "NFE: denoiser evaluations per image, counted (a guided teacher step is 2; a student step is 1, its w an"
            f" input). images/s: whole pipeline calls on a batch of {self.args.timing_batch_size}, median of 3 after a"
            " warm-up call.",
            "",
            "| model | sampler | steps | w | NFE | FD | precision | recall | class acc. | coverage | images/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in sorted(self.cells("students"), key=itemgetter("model", "steps")):
            lines.append(
                f"| {c['model']} | {c['sampler']} | {c['steps']} | {c['guidance']:g} | {c['nfe']:g} | {c['fd']:.2f} |"
                f" {c['precision']:.3f} | {c['recall']:.3f} | {format_metric(c['class_accuracy'], 3)} |"
                f" {c['class_coverage']:.2f} | {c['images_per_second']:.1f} |"
            )
        return lines

    def save(self):
        harness.write_results(self.base, self.markdown(), self.data)

    def plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4.5))
        series = {}
        for c in self.cells("steps", "guidance"):
            if c["guidance"] == 1.0:
                series.setdefault(f"{c['model']} / {c['sampler']}", []).append((c["steps"], c["fd"]))
        for name, points in sorted(series.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        floor = self.data["calibration"].get("real train digits (floor)")
        if floor:
            axis.axhline(floor["fd"], color="grey", linestyle="--", label="real vs held-out (floor)")
            axis.axhspan(floor["fd"] - floor["fd_std"], floor["fd"] + floor["fd_std"], color="grey", alpha=0.2)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.minorticks_off()
        axis.set_xticks(self.args.steps)
        axis.set_xticklabels([str(s) for s in self.args.steps])
        axis.set_xlabel("sampling steps")
        axis.set_ylabel(f"FD (digits classifier features, N={self.args.num_samples})")
        axis.set_title("FD vs steps, guidance 1 (lower is better)")
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = self.base.with_name(self.base.name + "-fd.png")
        harness.save_figure(figure, path)
        plt.close(figure)
        self.data["plot"] = path.name

    def grid(self, grids: dict[str, torch.Tensor], title: str):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6))
        axes = np.atleast_1d(axes)
        for axis, (name, images) in zip(axes, grids.items()):
            # (100, 1, H, W) sorted by class -> (10 H, 10 W): one row per class
            rows = images[:100].reshape(10, 10, images.shape[-2], images.shape[-1])
            mosaic = rows.permute(0, 2, 1, 3).reshape(10 * images.shape[-2], 10 * images.shape[-1])
            axis.imshow((mosaic.numpy() + 1) / 2, cmap="gray", vmin=0, vmax=1)
            axis.set_title(name, fontsize=8)
            axis.axis("off")
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        path = self.base.with_name(self.base.name + "-samples.png")
        harness.save_figure(figure, path)
        plt.close(figure)
        self.data["grid"] = path.name


def sampling_plan(
    args: argparse.Namespace,
    runs: list[harness.DiffusionRun],
    students: list[tuple[harness.DiffusionRun, Sampler]],
    teacher: tuple[harness.DiffusionRun, Sampler] | None,
) -> list[Job]:
    """All scored sets, the ones the targets read first, then cheap before expensive."""
    samplers = {run.name: samplers_for(run) for run in runs}
    guiders = [parse_guider(spec) for spec in args.guiders]
    jobs = []
    for run in runs:
        main = next(sampler for sampler in samplers[run.name] if sampler.guided_default)
        if args.step_sweep:
            for sampler in samplers[run.name]:
                for steps in args.steps:
                    jobs.append(Job(run, sampler, steps))
        if not args.step_sweep or args.guidance_steps not in args.steps:
            # the unguided baseline of the guider target and of the guidance sweep
            jobs.append(Job(run, main, args.guidance_steps))
        for scale in args.guidance_scales:
            if scale != 1.0:
                jobs.append(Job(run, main, args.guidance_steps, scale, sweep="guidance"))
        for guider in guiders:
            jobs.append(Job(run, main, args.guidance_steps, None, guider, sweep="guiders"))
    if args.samplers is not None:
        jobs = [job for job in jobs if job.sampler.name in args.samplers]
    if students:
        # the teacher at the students' step counts and at its own guided reference step count, then the students
        teacher_run, teacher_sampler = teacher
        for steps in sorted({*args.student_steps, args.teacher_steps}):
            jobs.append(
                Job(teacher_run, teacher_sampler, steps, args.student_guidance_scale, sweep="students", timed=True)
            )
        for run, sampler in students:
            for steps in args.student_steps:
                jobs.append(Job(run, sampler, steps, args.student_guidance_scale, sweep="students", timed=True))

    def priority(job: Job):
        is_main = job.sampler.guided_default
        target = (
            (is_main and job.steps in (10, 50) and job.guidance == 1.0 and job.guider is None)
            or (is_main and job.guidance == 3.0 and job.sweep == "guidance")
            or (job.sampler.name.startswith("ours") and job.steps == 10 and job.guider is None)
        )
        # a guidance-distilled student takes w as an input: one pass per step
        distilled = job.run.model.config.get("time_cond_proj_dim") is not None
        guided = job.guider is not None or (job.guidance != 1.0 and not distilled)
        # identical-sample checks (ours vs DDIM) cost only a probe: early is cheap
        cost = job.steps * (2 if guided else 1) * (2 if "heun" in job.sampler.name else 1)
        return (0 if target else 1, cost)

    return sorted(jobs, key=priority)


def load_runs(args: argparse.Namespace) -> list[harness.DiffusionRun]:
    """The EMA models and training schedulers a previous run saved (`--from_models`)."""
    folder = Path(args.from_models)
    entries = [("sculptdiff", SculptScheduler, "epsilon"), ("stock", DDPMScheduler, "epsilon")]
    if args.with_flow:
        entries.append(("sculptdiff-flow", SculptFlowScheduler, "flow"))
    runs = []
    for name, scheduler_class, objective in entries:
        if not (folder / name / "config.json").is_file():
            raise ValueError(
                f"--from_models {folder} has no {name}/config.json; pass the --model_dir of a finished run."
            )
        if name == "stock":
            model = harness.load_stock_digits_unet(folder / name)
        else:
            model = SculptUNet2DModel.from_pretrained(folder / name)
        model.eval().requires_grad_(False)
        scheduler = scheduler_class.from_pretrained(folder / name, subfolder="scheduler")
        runs.append(scored_run(name, model, scheduler, objective))
    return runs


def load_pipeline_run(folder: str, name: str, argument: str) -> tuple[harness.DiffusionRun, Sampler]:
    """A saved SculptPipeline (`--student`, `--teacher`) as a model to score, sampled with the pipeline's own
    scheduler."""
    if not (Path(folder) / "model_index.json").is_file():
        raise ValueError(f"{argument} {folder} is not a saved pipeline folder (it has no model_index.json).")
    pipeline = SculptPipeline.from_pretrained(folder)
    model = pipeline.denoiser.eval().requires_grad_(False)
    objective = "flow" if model.config.get("prediction_type") == "flow" else "epsilon"
    run = scored_run(name, model, pipeline.scheduler, objective)
    return run, Sampler(type(pipeline.scheduler).__name__, pipeline.scheduler, True)


def load_students(args: argparse.Namespace) -> list[tuple[harness.DiffusionRun, Sampler]]:
    students = []
    for folder in args.student:
        run, sampler = load_pipeline_run(folder, f"student {Path(folder).resolve().name}", "--student")
        # the student guides itself through its w input; a plain model would be scored at w = 1 without saying so
        if run.model.config.get("time_cond_proj_dim") is None:
            raise ValueError(
                f"--student {folder}: its {type(run.model).__name__} has no `time_cond_proj_dim` (the guidance-scale"
                " input of a consistency-distilled student); pass the folder distill_sculpt.py wrote."
            )
        students.append((run, sampler))
    return students


def train_runs(args, report: Report, stamp: str, log) -> list[harness.DiffusionRun]:
    """Build, train (interleaved, equal budgets) and save the models; their EMA weights are what samples."""
    runs = build_runs(args)
    budget = args.train_minutes * 60
    log(
        f"training {', '.join(f'{r.name} ({sum(p.numel() for p in r.model.parameters()):,} params)' for r in runs)}"
        f" for {budget:.0f} s each, interleaved"
    )
    harness.train_interleaved(runs, budget, log)
    report.data["load"]["after training"] = os.getloadavg()
    model_dir = Path(args.model_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"sculptdiff-bench-quality-{stamp}")
    for run in runs:
        run.finish()
        report.data["training"][run.name] = {
            "parameters": sum(p.numel() for p in run.model.parameters()),
            "steps": run.steps,
            "epochs": run.epochs,
            "seconds": run.seconds,
            "final_loss": harness.mean_of_last(run.losses, 100),
        }
        run.model.save_pretrained(model_dir / run.name)
        run.noise_scheduler.save_pretrained(model_dir / run.name / "scheduler")
    report.save()
    log(f"trained; EMA models saved to {model_dir}")
    return runs


def main(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = harness.utc_now()[:10]
    report = Report(args, stamp)
    started = time.monotonic()

    def log(message: str):
        print(f"[{time.monotonic() - started:7.0f}s] {message}", flush=True)

    report.data["recipe"] = {
        name: getattr(RECIPE, name)
        for name in (
            "learning_rate",
            "lr_warmup_steps",
            "train_batch_size",
            "max_grad_norm",
            "ema_decay",
            "ema_power",
            "beta_schedule",
            "num_train_timesteps",
        )
    }

    # 1. the metrics' classifier and the calibration rows (cheap, and useful even if training is interrupted)
    evaluator = DigitsEvaluator(args.resolution)
    report.data["checks"]["classifier_accuracy"] = evaluator.held_out_accuracy
    report.data["calibration"] = evaluator.calibrate(args.num_samples, seed=args.seed)
    report.save()
    floor = report.data["calibration"]["real train digits (floor)"]
    log(
        f"classifier held-out accuracy {evaluator.held_out_accuracy:.4f}; real digits score FD {floor['fd']:.2f} +-"
        f" {floor['fd_std']:.2f}; calibration written to {report.base}.md"
    )

    # 2. train all models under the same wall-clock budget, or load the models of an earlier run
    if args.from_models:
        runs = load_runs(args)
        report.data["training"] = {}
        report.data["checks"]["models"] = f"loaded from {args.from_models} (trained by an earlier run)"
        log(f"loaded {', '.join(run.name for run in runs)} from {args.from_models}")
    else:
        runs = train_runs(args, report, stamp, log)

    # 3. sample and score, in priority order; a set whose 10-image probe is identical to a measured set's (same
    # model: SculptScheduler eta=0 and DDIM, the CFG guider and the built-in CFG) reuses it
    students = load_students(args)
    teacher = None
    if students:
        if args.teacher:
            teacher = load_pipeline_run(args.teacher, f"teacher {Path(args.teacher).resolve().name}", "--teacher")
        else:
            sculpt = next(run for run in runs if run.name == "sculptdiff")
            teacher = (sculpt, next(sampler for sampler in samplers_for(sculpt) if sampler.guided_default))
        report.data["students"] = {
            "teacher": teacher[0].name,
            "teacher_sampler": teacher[1].name,
            "students": [run.name for run, _ in students],
            "guidance": args.student_guidance_scale,
        }
    class_labels = torch.arange(args.num_samples) % NUM_CLASSES
    probe_labels = torch.arange(NUM_CLASSES)
    probes = []
    grids = {}
    grid_scale = 3.0 if 3.0 in args.guidance_scales else max(args.guidance_scales)
    for job in sampling_plan(args, runs, students, teacher):
        fields = {
            "model": job.run.name,
            "sampler": job.sampler.name,
            "steps": job.steps,
            "guidance": job.guidance,
            "guider": job.guider.spec if job.guider else None,
            "sweep": job.sweep,
        }
        probe, _ = sample_job(job, probe_labels, args.seed)
        same_as = next(
            (
                (other, cell)
                for other, other_probe, cell in probes
                if other.run is job.run and (probe - other_probe).abs().max() < 1e-4
            ),
            None,
        )
        if same_as is not None:
            other, cell = same_as
            cell = {**cell, **fields, "same_as": other.describe()}
            log(f"{job.describe()}: identical to {other.describe()}, reused")
        else:
            start = time.perf_counter()
            images, nfe = sample_job(job, class_labels, args.seed)
            seconds = time.perf_counter() - start
            metrics = evaluator.evaluate(images, class_labels)
            cell = {**fields, "nfe": nfe, **metrics, "seconds": seconds}
            if (
                job.sampler.guided_default
                and job.sweep in ("steps", "guidance")
                and (job.steps, job.guidance) == (args.guidance_steps, grid_scale)
            ):
                order = torch.argsort(class_labels[:100], stable=True)
                grids[job.run.name] = images[:100][order]
                report.grid(
                    grids, f"{args.guidance_steps} steps, w={grid_scale:g}, main sampler; one row per class (0-9)"
                )
            log(
                f"{job.describe()}: FD {metrics['fd']:.2f}, precision {metrics['precision']:.3f}, recall"
                f" {metrics['recall']:.3f}, class acc {metrics['class_accuracy']:.3f}, {nfe:g} evaluations per image"
                f" ({seconds:.0f} s, load {os.getloadavg()[0]:.1f})"
            )
        if job.timed:
            cell["images_per_second"] = images_per_second(job, args.timing_batch_size, args.seed)
            log(f"{job.describe()}: {cell['images_per_second']:.1f} images/s at batch {args.timing_batch_size}")
        probes.append((job, probe, cell))
        report.data["cells"].append(cell)
        report.save()
        report.plot()
    report.data["load"]["end"] = os.getloadavg()
    report.data["status"] = f"complete ({(time.monotonic() - started) / 60:.0f} min)"
    report.plot()
    report.save()
    print(report.markdown())


if __name__ == "__main__":
    main(parse_args())
