#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""DiT against U-Net on the digits, in one run: quality at equal wall clock, FD against training FLOPs, efficiency.

    python benchmarks/bench_backbones.py --threads 1             # 8 minutes of training per model, 500 samples
    python benchmarks/bench_backbones.py --threads 1 --quick     # the whole path in a few minutes
    python benchmarks/bench_backbones.py --combine a.json b.json  # means over runs of one command at several seeds

Four class-conditional denoisers, two sizes per family (`DEFAULT_BACKBONES`): the recipe's U-Net and DiT
(`sculptdiff.training.recipe`, what `train_sculpt.py --model_type unet|dit` builds) and a smaller one of each. All
train in this process on the digits' train split with the same data order, noise draws, objective (the recipe's
epsilon on its cosine schedule, or `--prediction_type`'s), batch, optimiser, learning-rate schedule, clipping, EMA
and initialisation seed, for the same wall-clock budget each, *interleaved* one step each in turn so that load from
other jobs falls on all alike. Each step is the package's training step
(`sculptdiff.training.objective.diffusion_loss`, backward, clipping, AdamW, EMA). The recipe's cosine decay runs over
`max_train_steps`, unknown under a time budget, so it runs over the fraction of the budget spent (as in
bench_quality.py).

Measured, each from this one run:

1. Quality: each final EMA model samples `--num_samples` images through SculptPipeline (`unet` or `transformer`) with
   its main sampler (SculptScheduler, eta=0: DDIM; for flow, SculptFlowScheduler's Euler) at every `--steps` count
   unguided, and at 10 steps with guidance w=3; each set is scored by `sculptdiff.evaluation.digits.DigitsEvaluator`
   (FD, class accuracy, precision, recall), read against its calibration rows (real digits: the floor and its noise
   band). Target: the best DiT's FD at 10 steps within 1.25x of the best U-Net's.
2. Scaling: the EMA weights are also kept at fractions of the budget (`--snapshots`) and scored at 10 steps, so
   each family gives FD against training FLOPs over two sizes and several training lengths. Training FLOPs = FLOPs
   of one training step (one forward and backward of the loss at the training batch, counted by
   `torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions, attention; not the element-wise work) x steps
   trained. The slope of log FD against log FLOPs is fitted per family.
3. Efficiency: achieved GFLOP/s of each model's training step (loss, backward, clipping, AdamW, EMA at the training
   batch) = counted FLOPs x steps / seconds on its clock over the whole training, and of its forward + backward
   alone (timed before training, alternating between the models), each as a fraction of this machine's fp32 matmul
   peak at the same thread count, measured in the same run (a large `torch.mm`, before and after training).

Writes benchmarks/results/backbones-<date>.md (+ .json, .png) through harness.py, rewritten after each scored set so
that a run stopped early reports what it measured. Needs matplotlib for the PNG (the `bench` extra).

One run is one draw: the cosine decay follows each model's clock, so no two runs train step-for-step alike, and the
same DiT at the same seed has scored FD 9.7 in one run and 11.0 in the next. `--combine` reads the results of one
command run at several `--seed` values (in parallel on separate cores, say) and writes
backbones-<date>-<n>-seeds.md (+ .json): each model's FD mean +- std over the seeds, the target's verdict on the means,
and the paired per-seed differences between the models of a family (the ablations).
"""

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field, fields
from operator import itemgetter
from pathlib import Path

import harness
import numpy as np
import torch
from harness import NUM_CLASSES
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sculptdiff.evaluation.digits import DigitsEvaluator
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler
from sculptdiff.training.objective import diffusion_loss
from sculptdiff.training.recipe import RECIPE, build_noise_scheduler


RESOLUTION = 16
TARGET_STEPS = 10
GUIDANCE_SCALE = 3.0
# the best DiT's FD at TARGET_STEPS within this factor of the best U-Net's (issue 15)
TARGET_FD_RATIO = 1.25
TARGET_PEAK_FRACTION = 0.5
# side of the square fp32 matrices whose product measures the machine's matmul peak
MATMUL_SIZE = 2048

# the smaller model of each family, as overrides of the recipe's config
UNET_S = {"block_out_channels": (16, 32, 32), "attention_head_dim": 16}
DIT_S = {"num_attention_heads": 4}
# ... and DiT S without the recipe's long skips (DiT's plain stack)
DIT_S_PLAIN = {**DIT_S, "long_skip_connections": False}
# name -> (family, shape overrides of the recipe's config, optimiser overrides of the recipe: the learning rate, its
# warm-up and schedule, AdamW's beta2); "M" is the recipe's own model of that family
BACKBONES = {
    "U-Net S": ("U-Net", UNET_S, {}),
    "U-Net M": ("U-Net", {}, {}),
    "DiT S": ("DiT", DIT_S, {}),
    "DiT M": ("DiT", {}, {}),
    # the DiT recipe probe (`--backbones "U-Net M" "DiT M" "DiT M, lr 3e-4" ...`): is the DiT's gap its learning
    # rate, its 2x2 patches or its depth?
    "DiT M, lr 3e-4": ("DiT", {}, {"learning_rate": 3e-4}),
    "DiT M, lr 2e-3": ("DiT", {}, {"learning_rate": 2e-3, "lr_warmup_steps": 500}),
    "DiT patch 1": ("DiT", {"patch_size": 1, "num_attention_heads": 4, "num_layers": 4}, {}),
    "DiT deep": ("DiT", {"num_attention_heads": 4, "num_layers": 12}, {}),
    # the learning-rate sweep of both families (`--backbones "U-Net M" "U-Net M, lr 2e-3" ...`): does the DiT want
    # a larger rate than the recipe's, and would the U-Net gain from it too?
    "U-Net M, lr 2e-3": ("U-Net", {}, {"learning_rate": 2e-3}),
    "U-Net M, lr 4e-3": ("U-Net", {}, {"learning_rate": 4e-3}),
    "U-Net S, lr 4e-3": ("U-Net", UNET_S, {"learning_rate": 4e-3}),
    "DiT M, lr 4e-3": ("DiT", {}, {"learning_rate": 4e-3}),
    "DiT S, lr 4e-3": ("DiT", DIT_S, {"learning_rate": 4e-3}),
    "DiT M, lr 6e-3": ("DiT", {}, {"learning_rate": 6e-3}),
    # the long-skip ablation (`--backbones "U-Net S, lr 4e-3" "DiT S, lr 4e-3" "DiT S, no skips, lr 4e-3" ...`): the
    # recipe's DiT has U-ViT's long skips; what do they buy at equal time?
    "DiT S, no skips": ("DiT", DIT_S_PLAIN, {}),
    "DiT S, no skips, lr 4e-3": ("DiT", DIT_S_PLAIN, {"learning_rate": 4e-3}),
    # the schedule probe (`--backbones "U-Net S, constant lr" "DiT S, constant lr"`): the DiT S halfway through
    # 20-minute runs, its rate still at half the peak, scored better than at the end of 10-minute runs whose cosine
    # decay reaches zero; does the decay cost the DiT at equal time?
    "U-Net S, constant lr": ("U-Net", UNET_S, {"lr_scheduler": "constant_with_warmup"}),
    "DiT S, constant lr": ("DiT", DIT_S, {"lr_scheduler": "constant_with_warmup"}),
    # the optimiser probe (`--backbones "U-Net S" "DiT S, beta2 0.99"`): transformer recipes often shorten Adam's
    # second-moment memory (beta2 0.99 or 0.95); in a 3000-step scratch run at seed 0 it took DiT S from FD 13.0
    # to 11.4
    "DiT S, beta2 0.99": ("DiT", DIT_S, {"adam_beta2": 0.99}),
    "U-Net S, beta2 0.99": ("U-Net", UNET_S, {"adam_beta2": 0.99}),
}
DEFAULT_BACKBONES = ["U-Net S", "U-Net M", "DiT S", "DiT M"]
FAMILY_BUILDERS = {"U-Net": harness.build_sculpt_digits_unet, "DiT": harness.build_sculpt_digits_dit}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = harness.BenchmarkParser(
        __doc__.split("\n\n")[0],
        results="backbones-<date>.md/.json/.png",
        quick={"steps": [5, TARGET_STEPS], "snapshots": [0.5], "efficiency_steps": 2},
        seed="Seed of model init, data order, noise and samples.",
        train_minutes=8.0,
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[5, 10, 20],
        help=f"Sampling step counts of the final models (must include {TARGET_STEPS}, the target's).",
    )
    parser.add_argument(
        "--snapshots",
        type=float,
        nargs="+",
        default=[0.25, 0.5],
        help=(
            f"Fractions of the budget at which the EMA weights are kept and scored at {TARGET_STEPS} steps (the"
            " scaling points besides the final model)."
        ),
    )
    parser.add_argument(
        "--backbones",
        type=str,
        nargs="+",
        default=DEFAULT_BACKBONES,
        choices=list(BACKBONES),
        help="The models to train (`BACKBONES`); the default is the four of the comparison, the others probe the DiT.",
    )
    parser.add_argument(
        "--prediction_type",
        type=str,
        default=RECIPE.prediction_type,
        choices=["epsilon", "v_prediction", "sample", "flow"],
        help=(
            "The objective of every model (the recipe's by default). `flow` trains rectified flow (a DiT trained so is"
            " SiT) and samples with SculptFlowScheduler's Euler solver; the others sample with DDIM."
        ),
    )
    parser.add_argument(
        "--combine",
        type=str,
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help=(
            "Train nothing: combine these results files of one command run at different --seed values (means over"
            " the seeds, the verdict on the means, paired differences within a family)."
        ),
    )
    parser.add_count(
        "efficiency_steps",
        5,
        "Timed forward + backward passes per model and round (the efficiency's diagnostic column).",
    )
    args = parser.parse_args(input_args)
    if args.combine is not None and len(args.combine) < 2:
        raise ValueError(f"--combine needs the results of at least 2 seeds (a spread), got {args.combine}.")
    if {"U-Net", "DiT"} - {BACKBONES[name][0] for name in args.backbones}:
        raise ValueError(f"--backbones must include a U-Net and a DiT (the comparison), got {args.backbones}.")
    if TARGET_STEPS not in args.steps or min(args.steps) < 1:
        raise ValueError(
            f"--steps must be >= 1 and include {TARGET_STEPS} (the target's step count), got {args.steps}."
        )
    if not all(0 < fraction < 1 for fraction in args.snapshots):
        raise ValueError(
            f"--snapshots must be fractions in (0, 1) (the final model is always scored), got {args.snapshots}."
        )
    return args


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows SDPA's CUDA kernels but not the CPU one that SDPA dispatches to here: without these the DiT's
# attention would count as free. The same formulas as torch's for the other kernels.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
}


def train_step_flops(
    model: torch.nn.Module,
    noise_scheduler,
    images: torch.Tensor,
    class_labels: torch.Tensor,
    objective: str = RECIPE.prediction_type,
) -> int:
    """FLOPs of one training step's forward and backward on this batch, as `FlopCounterMode` counts them (matrix
    multiplications, convolutions and attention; element-wise work is not counted). Leaves no gradients behind."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        diffusion_loss(model, noise_scheduler, images, objective, class_labels=class_labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def clocks() -> dict[str, float]:
    """Wall-clock time, and this process's CPU time: on cores shared with other jobs the CPU time still measures
    what the work itself costs (one thread: CPU seconds = seconds on a core)."""
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def seconds_since(start: dict[str, float], count: int = 1) -> dict[str, float]:
    now = clocks()
    return {clock: (now[clock] - start[clock]) / count for clock in start}


def matmul_gflops(size: int, repeats: int = 3) -> dict[str, float]:
    """This machine's fp32 matrix-multiply throughput at the current thread count, by wall-clock and by CPU time:
    the best of `repeats` timed `torch.mm` of two `size` x `size` matrices (2 size^3 FLOPs each), after one untimed
    warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = {"wall": math.inf, "cpu": math.inf}
    for _ in range(repeats):
        start = clocks()
        torch.mm(a, b)
        best = {clock: min(best[clock], seconds) for clock, seconds in seconds_since(start).items()}
    return {clock: 2 * size**3 / seconds / 1e9 for clock, seconds in best.items()}


def fit_power_law(flops: list[float], fds: list[float]) -> float | None:
    """Slope of log FD against log training FLOPs (least squares); None with fewer than two distinct FLOP counts."""
    if len(set(flops)) < 2:
        return None
    slope, _ = np.polyfit(np.log10(flops), np.log10(fds), 1)
    return float(slope)


@dataclass
class BackboneRun(harness.DiffusionRun):
    """A `harness.DiffusionRun` (the package's training step) that also knows its family and FLOPs per step, and keeps
    its EMA weights when its clock passes each of `snapshot_fractions` of the budget (the scaling points)."""

    family: str = ""
    flops_per_step: int = 0
    snapshot_fractions: tuple = ()
    # budget fraction -> (steps trained, EMA weights)
    snapshots: dict = field(default_factory=dict)

    def train_step(self, progress: float):
        for fraction in self.snapshot_fractions:
            if progress >= fraction and fraction not in self.snapshots:
                self.snapshots[fraction] = (self.steps, [weight.detach().clone() for weight in self.ema.shadow_params])
        super().train_step(progress)


def build_runs(args: argparse.Namespace, noise_scheduler) -> list[BackboneRun]:
    """The four backbones with the same initialisation seed, data order, noise draws, optimiser and EMA."""
    dataset = harness.digits_train_dataset(RESOLUTION)
    runs = []
    for name in args.backbones:
        family, shape, optimiser = BACKBONES[name]
        torch.manual_seed(args.seed)
        model = FAMILY_BUILDERS[family](RESOLUTION, prediction_type=args.prediction_type, **shape)
        run = harness.build_diffusion_run(
            name, model, noise_scheduler, args.prediction_type, dataset, args.seed, **optimiser
        )
        batch = next(iter(run.dataloader))
        flops_per_step = train_step_flops(
            model, noise_scheduler, batch["pixel_values"], batch["class_labels"], args.prediction_type
        )
        runs.append(
            BackboneRun(
                **{column.name: getattr(run, column.name) for column in fields(run)},
                family=family,
                flops_per_step=flops_per_step,
                snapshot_fractions=tuple(args.snapshots),
            )
        )
    return runs


def time_forward_backward(runs: list[BackboneRun], noise_scheduler, args: argparse.Namespace) -> tuple[dict, list]:
    """Seconds per forward + backward of the loss alone (what the FLOPs count) for each model on one training batch,
    and matmul peaks, alternating over rounds so that load falls on all alike. Leaves no gradients behind."""
    batch = next(iter(runs[0].dataloader))
    seconds, peaks = {}, []
    for _ in range(2):
        peaks.append(matmul_gflops(MATMUL_SIZE))
        for run in runs:
            # the first pass is untimed: one-time kernel set-up
            for index in range(args.efficiency_steps + 1):
                if index == 1:
                    start = clocks()
                loss = diffusion_loss(
                    run.model,
                    noise_scheduler,
                    batch["pixel_values"],
                    args.prediction_type,
                    class_labels=batch["class_labels"],
                )
                loss.backward()
            seconds.setdefault(run.name, []).append(seconds_since(start, args.efficiency_steps))
            run.model.zero_grad(set_to_none=True)
    return {name: medians(times) for name, times in seconds.items()}, peaks


def main_sampler(noise_scheduler) -> SculptScheduler | SculptFlowScheduler:
    """The sampler the models are scored with, from the training's noise schedule: Euler on the straight paths of
    rectified flow, DDIM (SculptScheduler, eta=0) for the DDPM family."""
    if isinstance(noise_scheduler, SculptFlowScheduler):
        return SculptFlowScheduler.from_config(noise_scheduler.config, solver="euler")
    return SculptScheduler.from_config(noise_scheduler.config, eta=0.0)


def describe_objective(prediction_type: str) -> tuple[str, str]:
    """What the results say the models trained on and were sampled with (`main_sampler`)."""
    if prediction_type == "flow":
        return "rectified flow (the velocity objective)", "SculptFlowScheduler, Euler"
    return f"the {prediction_type} objective on the recipe's cosine betas", "SculptScheduler eta=0 (DDIM)"


def medians(measurements: list[dict[str, float]]) -> dict[str, float]:
    return {clock: statistics.median(measurement[clock] for measurement in measurements) for clock in measurements[0]}


def efficiency(runs: list[BackboneRun], forward_backward: dict, peaks: list) -> dict:
    """Achieved GFLOP/s of each model's training step over its whole training (counted FLOPs x steps / seconds on its
    wall clock) and of its forward + backward alone (by wall clock and by CPU time), and their fractions of the
    median matmul peak by the same clock."""
    peak = medians(peaks)
    models = {}
    for run in runs:
        step_gflops = run.flops_per_step * run.steps / run.seconds / 1e9
        pass_gflops = {
            clock: run.flops_per_step / seconds / 1e9 for clock, seconds in forward_backward[run.name].items()
        }
        models[run.name] = {
            "step_seconds": run.seconds / run.steps,
            "step_gflops": step_gflops,
            "step_peak_fraction": step_gflops / peak["wall"],
            "forward_backward_seconds": forward_backward[run.name],
            "forward_backward_gflops": pass_gflops,
            "forward_backward_peak_fraction": {clock: pass_gflops[clock] / peak[clock] for clock in peak},
        }
    return {"matmul_size": MATMUL_SIZE, "peak_gflops": peak, "peaks": peaks, "models": models}


class Report:
    """Everything measured; rewrites the markdown, JSON and PNG (each through a rename) after every scored set."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.base = Path(args.output_dir) / f"backbones-{harness.utc_now()[:10]}{'-quick' if args.quick else ''}"
        self.data = {
            **harness.results_header(args),
            "status": "running",
            "models": {},
            "calibration": {},
            "efficiency": {},
            "cells": [],
            "scaling": {},
        }

    def cells(self, model: str | None = None, **match) -> list[dict]:
        return [
            cell
            for cell in self.data["cells"]
            if (model is None or cell["model"] == model) and all(cell[key] == value for key, value in match.items())
        ]

    def target_cell(self, model: str) -> dict | None:
        found = self.cells(model, fraction=1.0, steps=TARGET_STEPS, guidance=1.0)
        return found[0] if found else None

    def best(self, family: str) -> dict | None:
        found = [self.target_cell(name) for name, info in self.data["models"].items() if info["family"] == family]
        found = [cell for cell in found if cell is not None]
        return min(found, key=itemgetter("fd")) if found else None

    def fit_scaling(self):
        for family in FAMILY_BUILDERS:
            points = [cell for cell in self.cells(steps=TARGET_STEPS, guidance=1.0) if cell["family"] == family]
            slope = fit_power_law([cell["train_flops"] for cell in points], [cell["fd"] for cell in points])
            self.data["scaling"][family] = {"slope": slope, "points": len(points)}

    def verdicts(self) -> list[str]:
        lines = harness.noise_band_lines(self.data["calibration"], self.args.num_samples)
        dit, unet = self.best("DiT"), self.best("U-Net")
        if dit and unet:
            ratio = dit["fd"] / unet["fd"]
            text = (
                f"- FD at {TARGET_STEPS} steps, best DiT ({dit['model']}, {dit['fd']:.2f}) vs best U-Net"
                f" ({unet['model']}, {unet['fd']:.2f}): ratio {ratio:.2f} (target <= {TARGET_FD_RATIO})"
            )
            lines.append(harness.target_line(text, ratio <= TARGET_FD_RATIO))
        for name, info in self.data["efficiency"].get("models", {}).items():
            if self.data["models"][name]["family"] == "DiT":
                verdict = "met" if info["step_peak_fraction"] >= TARGET_PEAK_FRACTION else "missed"
                lines.append(
                    f"- {name} training step: {info['step_gflops']:.1f} GFLOP/s,"
                    f" {100 * info['step_peak_fraction']:.1f}% of the measured fp32 matmul peak (target >="
                    f" {100 * TARGET_PEAK_FRACTION:.0f}%): **{verdict}**; its forward+backward alone:"
                    f" {100 * info['forward_backward_peak_fraction']['cpu']:.0f}% of the peak by CPU time"
                )
        for family, fit in self.data["scaling"].items():
            if fit["slope"] is not None:
                lines.append(
                    f"- {family}: log FD against log training FLOPs has slope {fit['slope']:+.2f} over"
                    f" {fit['points']} points (negative: better with more compute)"
                )
        return lines or ["- (nothing measured yet)"]

    def markdown(self) -> str:
        data, args = self.data, self.args
        objective, sampler = describe_objective(args.prediction_type)
        lines = [
            f"# DiT vs U-Net on the digits ({data['date']})",
            "",
            f"Status: **{data['status']}**",
            "",
            *harness.header_lines(data["command"], data["machine"], data["load"]),
            f"- Data: sklearn digits at {RESOLUTION} px, train split (70%) for the models; metrics against the held-out"
            " 30% (`sculptdiff.evaluation.digits`)",
            f"- Training: {args.train_minutes:g} min per model, interleaved; {objective}, batch"
            f" {RECIPE.train_batch_size}, AdamW lr {RECIPE.learning_rate:g} (the table's peak lr where a"
            f" model changes it; {RECIPE.lr_warmup_steps} warm-up steps, cosine decay over the budget unless the model's"
            f" name says constant lr), clipping"
            f" {RECIPE.max_grad_norm:g}, EMA"
            f" {RECIPE.ema_decay} (power {RECIPE.ema_power:g}), label dropout {RECIPE.conditioning_dropout_prob:g}",
            f"- Sampling: {sampler}, {args.num_samples} images per set"
            " (class i % 10 for image i, the same starting noise for every set)",
        ]
        if data["models"]:
            lines += ["", "## Models and training (same budget, data, objective, batch, EMA, seed)", ""]
            lines += harness.table_header(
                "model | family | changes (over the recipe's) | peak lr | parameters | train GFLOP/image | steps |"
                " epochs | s/step | training FLOPs | loss (last 100)"
            )
            for name, info in data["models"].items():
                shape = ", ".join(f"{key}={value}" for key, value in info["shape"].items()) or "the recipe's"
                lines.append(
                    f"| {name} | {info['family']} | {shape} | {info['learning_rate']:g} | {info['parameters']:,} |"
                    f" {info['flops_per_step'] / RECIPE.train_batch_size / 1e9:.3f} | {info.get('steps', '')} |"
                    f" {info.get('epochs', '')} | {format_number(info.get('seconds_per_step'), 3)} |"
                    f" {format_number(info.get('train_flops'), 2, 1e12)} TFLOP | {format_number(info.get('loss'), 4)} |"
                )
        lines += harness.calibration_section(data["calibration"])
        lines += ["", "## Verdicts", ""] + self.verdicts()
        finals = [cell for cell in data["cells"] if cell["fraction"] == 1.0]
        if finals:
            lines += ["", "## Quality of the final models", ""]
            header = " | ".join(f"FD {steps} steps" for steps in args.steps)
            lines += harness.table_header(
                f"model | parameters | {header} | class acc. {TARGET_STEPS} steps w={GUIDANCE_SCALE:g} | precision /"
                f" recall {TARGET_STEPS} steps"
            )
            for name, info in data["models"].items():
                fds = [self.cells(name, fraction=1.0, steps=steps, guidance=1.0) for steps in args.steps]
                guided = self.cells(name, fraction=1.0, steps=TARGET_STEPS, guidance=GUIDANCE_SCALE)
                target = self.target_cell(name)
                accuracy = f"{100 * guided[0]['class_accuracy']:.1f}%" if guided else ""
                precision_recall = f"{target['precision']:.3f} / {target['recall']:.3f}" if target else ""
                lines.append(
                    f"| {name} | {info['parameters']:,} | "
                    + " | ".join(f"{found[0]['fd']:.2f}" if found else "" for found in fds)
                    + f" | {accuracy} | {precision_recall} |"
                )
        if data["scaling"]:
            lines += ["", f"## Scaling: FD at {TARGET_STEPS} steps against training FLOPs", ""]
            lines += [
                "Training FLOPs = counted FLOPs of one training step x steps trained; earlier points are the EMA weights"
                " kept during the same run (their learning rate had not decayed yet, which favours the final point).",
                "",
                *harness.table_header("model | budget fraction | steps | training FLOPs | FD"),
            ]
            for cell in sorted(self.cells(steps=TARGET_STEPS, guidance=1.0), key=itemgetter("model", "fraction")):
                lines.append(
                    f"| {cell['model']} | {cell['fraction']:g} | {cell['steps_trained']} |"
                    f" {cell['train_flops'] / 1e12:.2f} TFLOP | {cell['fd']:.2f} |"
                )
            lines += [""] + [
                f"- {family}: slope {format_number(fit['slope'], 3)} over {fit['points']} points"
                for family, fit in data["scaling"].items()
            ]
        if data["efficiency"]:
            eff = data["efficiency"]
            lines += ["", "## Efficiency (achieved FLOP rate of the training step)", ""]
            walls = [peak["wall"] for peak in eff["peaks"]]
            lines += [
                f"fp32 matmul peak: {eff['peak_gflops']['wall']:.1f} GFLOP/s by wall clock, {eff['peak_gflops']['cpu']:.1f}"
                f" per CPU second (`torch.mm` of {eff['matmul_size']}^2 matrices at {data['machine']['torch_threads']}"
                f" threads, median of {len(walls)} measurements before and after training, wall-clock range"
                f" {min(walls):.1f}-{max(walls):.1f}). Training step: counted FLOPs x steps / wall seconds over the whole"
                f" training (loss, backward, clipping, AdamW, EMA; batch {RECIPE.train_batch_size}). Forward+backward:"
                " the loss and its backward alone, timed before training, by wall clock and by this process's CPU time"
                " (the CPU-time column holds on cores shared with other jobs; on an idle core both agree).",
                "",
                *harness.table_header(
                    "model | training step s | GFLOP/s | % of peak | forward+backward s | GFLOP/s | % of peak |"
                    " forward+backward GFLOP/CPU-s | % of peak (CPU time)"
                ),
            ]
            for name, info in eff["models"].items():
                # forward+backward by wall clock, then by CPU time: GFLOP/s and % of peak each
                rates = " | ".join(
                    f"{info['forward_backward_gflops'][clock]:.1f} |"
                    f" {100 * info['forward_backward_peak_fraction'][clock]:.0f}%"
                    for clock in ("wall", "cpu")
                )
                lines.append(
                    f"| {name} | {info['step_seconds']:.4f} | {info['step_gflops']:.1f} |"
                    f" {100 * info['step_peak_fraction']:.0f}% | {info['forward_backward_seconds']['wall']:.4f} | {rates} |"
                )
        if data["cells"]:
            lines += ["", "## All sets", ""]
            lines += harness.table_header(
                "model | budget fraction | steps | w | FD | precision | recall | class acc. | coverage | sample s"
            )
            for c in data["cells"]:
                lines.append(
                    f"| {c['model']} | {c['fraction']:g} | {c['steps']} | {c['guidance']:g} | {c['fd']:.2f} |"
                    f" {c['precision']:.3f} | {c['recall']:.3f} | {c['class_accuracy']:.3f} | {c['class_coverage']:.2f} |"
                    f" {c['seconds']:.0f} |"
                )
        if data.get("plot"):
            lines += ["", f"![FD against steps and training FLOPs]({data['plot']})"]
        return "\n".join(lines) + "\n"

    def save(self):
        harness.write_results(self.base, self.markdown(), self.data)

    def plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (by_steps, by_flops) = plt.subplots(1, 2, figsize=(11, 4.5))
        floor = self.data["calibration"].get("real train digits (floor)")
        colours = {name: f"C{index}" for index, name in enumerate(self.args.backbones)}
        for name in self.data["models"]:
            finals = sorted((cell["steps"], cell["fd"]) for cell in self.cells(name, fraction=1.0, guidance=1.0))
            if finals:
                by_steps.plot(*zip(*finals), marker="o", color=colours[name], label=name)
            scaling = sorted(
                (cell["train_flops"], cell["fd"]) for cell in self.cells(name, steps=TARGET_STEPS, guidance=1.0)
            )
            if scaling:
                marker = "s" if self.data["models"][name]["family"] == "DiT" else "o"
                by_flops.plot(*zip(*scaling), marker=marker, color=colours[name], label=name)
        for family, fit in self.data["scaling"].items():
            if fit["slope"] is None:
                continue
            points = [cell for cell in self.cells(steps=TARGET_STEPS, guidance=1.0) if cell["family"] == family]
            x = np.log10([cell["train_flops"] for cell in points])
            slope, intercept = np.polyfit(x, np.log10([cell["fd"] for cell in points]), 1)
            ends = np.array([x.min(), x.max()])
            by_flops.plot(
                10**ends,
                10 ** (intercept + slope * ends),
                linestyle=":",
                color="black" if family == "DiT" else "grey",
                label=f"{family} fit, slope {slope:+.2f}",
            )
        for axis in (by_steps, by_flops):
            if floor:
                axis.axhspan(floor["fd"] - floor["fd_std"], floor["fd"] + floor["fd_std"], color="grey", alpha=0.2)
                axis.axhline(floor["fd"], color="grey", linestyle="--", label="real digits (floor)")
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_ylabel(f"FD (digits classifier features, N={self.args.num_samples})")
            axis.legend(fontsize=7)
        by_steps.minorticks_off()
        by_steps.set_xticks(self.args.steps)
        by_steps.set_xticklabels([str(steps) for steps in self.args.steps])
        by_steps.set_xlabel(f"sampling steps ({describe_objective(self.args.prediction_type)[1]}), w=1")
        by_steps.set_title("final models: FD against sampling steps")
        by_flops.set_xlabel("training FLOPs (counted forward + backward x steps)")
        by_flops.set_title(f"FD at {TARGET_STEPS} steps against training compute")
        figure.tight_layout()
        path = self.base.with_name(self.base.name + ".png")
        harness.save_figure(figure, path)
        plt.close(figure)
        self.data["plot"] = path.name


def format_number(value: float | None, digits: int, unit: float = 1.0) -> str:
    return "" if value is None else f"{value / unit:.{digits}f}"


def scoring_plan(args: argparse.Namespace, runs: list[BackboneRun]) -> list[tuple[BackboneRun, float, int, float]]:
    """(model, budget fraction, steps, guidance) of every set; the target's cells first, then the guided ones, the
    other step counts and the snapshots."""
    plan = [(run, 1.0, TARGET_STEPS, 1.0) for run in runs]
    plan += [(run, 1.0, TARGET_STEPS, GUIDANCE_SCALE) for run in runs]
    plan += [(run, 1.0, steps, 1.0) for steps in args.steps if steps != TARGET_STEPS for run in runs]
    plan += [(run, fraction, TARGET_STEPS, 1.0) for fraction in args.snapshots for run in runs]
    return plan


# the arguments of runs that are combined must agree on: one command, up to --seed and where it wrote
COMBINED_ARGS = (
    "backbones",
    "train_minutes",
    "num_samples",
    "steps",
    "snapshots",
    "threads",
    "quick",
    "prediction_type",
)
# what results files written before an argument existed ran with
OLDER_ARGS = {"prediction_type": "epsilon"}


def load_repeats(paths: list[str]) -> list[dict]:
    """The results files `paths`, checked to be complete runs of one command at distinct seeds."""
    repeats = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a results file of bench_backbones.py (invalid JSON: {error}).") from error
        data["args"] = {**OLDER_ARGS, **data["args"]}
        repeats.append(data)
    for path, data in zip(paths, repeats):
        if not data["status"].startswith("complete"):
            raise ValueError(
                f"{path} is a run that did not finish (status {data['status']!r}): combine complete runs only."
            )
        differ = [name for name in COMBINED_ARGS if data["args"][name] != repeats[0]["args"][name]]
        if differ:
            raise ValueError(
                f"{path} differs from {paths[0]} in {', '.join(f'--{name}' for name in differ)}: combine runs of one"
                " command that differ only in --seed."
            )
    seeds = [data["args"]["seed"] for data in repeats]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"The results repeat a seed ({seeds}): combine runs of distinct --seed values.")
    return repeats


def summarize_seeds(repeats: list[dict]) -> list[dict]:
    """One row per model and scored set (budget fraction, steps, guidance) that every run scored: its FD and class
    accuracy per seed (in the order of `repeats`), the FD's mean, sample std and standard error."""
    rows = {}
    for data in repeats:
        for cell in data["cells"]:
            key = (cell["model"], cell["fraction"], cell["steps"], cell["guidance"])
            row = rows.setdefault(
                key,
                {
                    **dict(zip(("model", "fraction", "steps", "guidance"), key)),
                    "family": cell["family"],
                    "seeds": [],
                    "fd": [],
                    "class_accuracy": [],
                    "steps_trained": [],
                },
            )
            row["seeds"].append(data["args"]["seed"])
            for name in ("fd", "class_accuracy", "steps_trained"):
                row[name].append(cell[name])
    complete = [row for row in rows.values() if len(row["seeds"]) == len(repeats)]
    for row in complete:
        row["fd_mean"] = statistics.mean(row["fd"])
        row["fd_std"] = statistics.stdev(row["fd"])
        row["fd_standard_error"] = row["fd_std"] / math.sqrt(len(row["fd"]))
    return complete


def seed_verdicts(rows: list[dict], num_seeds: int) -> list[str]:
    """The target's verdict on the mean FDs over the seeds, and the paired per-seed FD differences between the models
    of a family at each budget fraction (the ablations: same seed, same data order and noise, one change)."""
    targets = [row for row in rows if (row["steps"], row["guidance"]) == (TARGET_STEPS, 1.0)]
    finals = [row for row in targets if row["fraction"] == 1.0]
    best = {
        family: min((row for row in finals if row["family"] == family), key=itemgetter("fd_mean"))
        for family in FAMILY_BUILDERS
    }
    dit, unet = best["DiT"], best["U-Net"]
    ratio = dit["fd_mean"] / unet["fd_mean"]
    per_seed = [dit_fd / unet_fd for dit_fd, unet_fd in zip(dit["fd"], unet["fd"])]
    met_seeds = sum(seed_ratio <= TARGET_FD_RATIO for seed_ratio in per_seed)
    text = (
        f"- FD at {TARGET_STEPS} steps over {num_seeds} seeds, best DiT by its mean ({dit['model']}, {dit['fd_mean']:.2f}"
        f" +- {dit['fd_std']:.2f}) vs best U-Net by its mean ({unet['model']}, {unet['fd_mean']:.2f} +-"
        f" {unet['fd_std']:.2f}): ratio of the means {ratio:.2f} (target <= {TARGET_FD_RATIO}); per seed"
        f" {min(per_seed):.2f}-{max(per_seed):.2f}, within the target in {met_seeds} of {num_seeds} seeds"
    )
    lines = [harness.target_line(text, ratio <= TARGET_FD_RATIO)]
    for first in targets:
        for second in targets:
            same_set = (first["family"], first["fraction"]) == (second["family"], second["fraction"])
            if same_set and first["model"] < second["model"]:
                differences = [a - b for a, b in zip(first["fd"], second["fd"])]
                budget = "the whole budget" if first["fraction"] == 1.0 else f"{first['fraction']:g} of the budget"
                lines.append(
                    f"- `{first['model']}` minus `{second['model']}`, FD at {TARGET_STEPS} steps after {budget}:"
                    f" {statistics.mean(differences):+.2f} +-"
                    f" {statistics.stdev(differences):.2f} over the seeds (per seed"
                    f" {', '.join(f'{difference:+.2f}' for difference in differences)}; `{first['model']}` better in"
                    f" {sum(difference < 0 for difference in differences)} of {num_seeds})"
                )
    return lines


def combine(args: argparse.Namespace) -> str:
    """`--combine`: the means over the seeds of several runs of one command, written to
    backbones-<date>-<n>-seeds.md/.json in `args.output_dir`; returns the markdown."""
    repeats = load_repeats(args.combine)
    rows = summarize_seeds(repeats)
    data = {
        **harness.results_header(args),
        "runs": [
            {name: run[name] for name in ("date", "command", "machine", "load")} | {"path": path}
            for path, run in zip(args.combine, repeats)
        ],
        "rows": rows,
        "verdicts": seed_verdicts(rows, len(repeats)),
    }
    first = repeats[0]
    lines = [
        f"# DiT vs U-Net on the digits over {len(repeats)} seeds ({data['date']})",
        "",
        *harness.header_lines(data["command"], data["machine"], data["load"]),
        f"- Runs combined: `{first['command']}` at --seed"
        f" {', '.join(str(run['args']['seed']) for run in repeats)}; {first['args']['train_minutes']:g} min of"
        f" training per model, {first['args']['num_samples']} images per set (each run's own file has its models,"
        " efficiency and calibration)",
        "",
        *harness.table_header("results file | seed | date | machine | load after training | steps trained"),
    ]
    for path, run in zip(args.combine, repeats):
        steps = ", ".join(f"{name} {info['steps']}" for name, info in run["models"].items())
        lines.append(
            f"| {Path(path).name} | {run['args']['seed']} | {run['date']} | {run['machine']['cpu']},"
            f" {run['machine']['torch_threads']} threads | {run['load']['after training'][0]:.1f} | {steps} |"
        )
    lines += ["", "## Verdicts (on the means over the seeds)", ""]
    lines += harness.noise_band_lines(first["calibration"], first["args"]["num_samples"]) + data["verdicts"]
    lines += [
        "",
        "## FD per model and set over the seeds",
        "",
        *harness.table_header(
            "model | budget fraction | steps | w | FD mean | std | standard error | FD per seed | class acc. (mean)"
        ),
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['fraction']:g} | {row['steps']} | {row['guidance']:g} | {row['fd_mean']:.2f} |"
            f" {row['fd_std']:.2f} | {row['fd_standard_error']:.2f} | {', '.join(f'{fd:.2f}' for fd in row['fd'])} |"
            f" {100 * statistics.mean(row['class_accuracy']):.1f}% |"
        )
    markdown = "\n".join(lines) + "\n"
    base = Path(args.output_dir) / f"backbones-{data['date'][:10]}-{len(repeats)}-seeds"
    harness.write_results(base, markdown, data)
    return markdown


def main(args: argparse.Namespace):
    if args.combine:
        print(combine(args))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report(args)
    started = time.monotonic()

    def log(message: str):
        print(f"[{time.monotonic() - started:7.0f}s] {message}", flush=True)

    # 1. the metric's classifier and its calibration rows (the scale every FD is read on)
    evaluator = DigitsEvaluator(RESOLUTION)
    report.data["calibration"] = evaluator.calibrate(args.num_samples, seed=args.seed)
    floor = report.data["calibration"]["real train digits (floor)"]
    log(f"real digits score FD {floor['fd']:.2f} +- {floor['fd_std']:.2f} at N={args.num_samples}")

    # 2. the models, their FLOPs per training step, and the efficiency of their training steps
    noise_scheduler = build_noise_scheduler(prediction_type=args.prediction_type)
    runs = build_runs(args, noise_scheduler)
    for run in runs:
        report.data["models"][run.name] = {
            "family": run.family,
            "shape": {
                key: list(value) if isinstance(value, tuple) else value
                for key, value in {**BACKBONES[run.name][1], **BACKBONES[run.name][2]}.items()
            },
            "learning_rate": run.learning_rate,
            "parameters": sum(parameter.numel() for parameter in run.model.parameters()),
            "flops_per_step": run.flops_per_step,
        }
    forward_backward, peaks = time_forward_backward(runs, noise_scheduler, args)
    report.save()
    for name, seconds in forward_backward.items():
        gflops = report.data["models"][name]["flops_per_step"] / seconds["cpu"] / 1e9
        log(
            f"{name}: {report.data['models'][name]['parameters']:,} parameters, forward+backward {gflops:.1f} GFLOP"
            f" per CPU second (matmul peak {medians(peaks)['cpu']:.1f})"
        )

    # 3. training: interleaved, the same wall-clock budget each
    budget = args.train_minutes * 60
    log(f"training {', '.join(run.name for run in runs)} for {budget:.0f} s each, interleaved")
    harness.train_interleaved(runs, budget, log)
    peaks.append(matmul_gflops(MATMUL_SIZE))
    report.data["load"]["after training"] = os.getloadavg()
    report.data["efficiency"] = efficiency(runs, forward_backward, peaks)
    model_dir = Path(
        args.model_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"sculptdiff-bench-backbones-{os.getpid()}"
    )
    final_weights = {}
    for run in runs:
        run.finish()
        final_weights[run.name] = [parameter.detach().clone() for parameter in run.model.parameters()]
        run.model.save_pretrained(model_dir / run.name.replace(" ", "-"))
        report.data["models"][run.name].update(
            steps=run.steps,
            epochs=run.epochs,
            seconds=run.seconds,
            seconds_per_step=run.seconds / max(1, run.steps),
            train_flops=run.flops_per_step * run.steps,
            loss=float(np.mean(run.losses[-100:])),
        )
    noise_scheduler.save_pretrained(model_dir / "scheduler")
    report.save()
    log(f"trained; final EMA models saved to {model_dir}")
    for line in report.verdicts():
        log(line)

    # 4. sample and score, the target's cells first; the results are rewritten after every set
    sampler = main_sampler(noise_scheduler)
    class_labels = torch.arange(args.num_samples) % NUM_CLASSES
    for run, fraction, steps, guidance in scoring_plan(args, runs):
        steps_trained, weights = (run.steps, final_weights[run.name])
        if fraction < 1.0:
            # a budget shorter than one step per snapshot leaves nothing to score
            if fraction not in run.snapshots:
                continue
            steps_trained, weights = run.snapshots[fraction]
        with torch.no_grad():
            for parameter, weight in zip(run.model.parameters(), weights):
                parameter.copy_(weight)
        start = time.perf_counter()
        images, _ = harness.sample_digits(run.model, sampler, steps, args.seed, class_labels, guidance_scale=guidance)
        seconds = time.perf_counter() - start
        metrics = evaluator.evaluate(images, class_labels)
        cell = {
            "model": run.name,
            "family": run.family,
            "fraction": fraction,
            "steps_trained": steps_trained,
            "train_flops": run.flops_per_step * steps_trained,
            "steps": steps,
            "guidance": guidance,
            **metrics,
            "seconds": seconds,
        }
        report.data["cells"].append(cell)
        report.fit_scaling()
        report.plot()
        report.save()
        log(
            f"{run.name} ({'final' if fraction == 1.0 else f'{fraction:g} of the budget'}) / {steps} steps /"
            f" w={guidance:g}: FD {metrics['fd']:.2f},"
            f" class acc {metrics['class_accuracy']:.3f} ({seconds:.0f} s, load {os.getloadavg()[0]:.1f})"
        )
    report.data["load"]["end"] = os.getloadavg()
    report.data["status"] = f"complete ({(time.monotonic() - started) / 60:.0f} min)"
    report.save()
    print(report.markdown())


if __name__ == "__main__":
    main(parse_args())
