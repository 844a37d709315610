#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Sample quality per sampling step: sculptdiff's default recipe against stock diffusers, trained in one run.

    python benchmarks/bench_quality.py                 # 10 minutes of training per model, 500 samples per set
    python benchmarks/bench_quality.py --quick         # the whole path in about two minutes

Models, all class-conditional on the built-in digits (train split only; the held-out split is the metrics'
reference), trained in this process by one plain loop under the same wall-clock budget, batch, optimiser, learning
rate schedule, gradient clipping and EMA:

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
several draws; blurred, noisy, collapsed digits). The sets run in priority order (the cells the targets need first)
and the results file is rewritten after each set, so a run stopped early still reports what it measured. Writes
benchmarks/results/quality-<date>.md (+ .json, an FD-vs-steps plot and a sample grid). Needs matplotlib for the PNGs
(the `bench` extra).
"""

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import harness
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import EMAModel
from harness import NUM_CLASSES

from sculptdiff.evaluation.digits import DigitsEvaluator, digits_split_indices
from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler
from sculptdiff.training.data import ExampleTransform, ImageTransform, collate_fn, load_digits_dataset
from sculptdiff.training.objective import diffusion_loss
from sculptdiff.training.recipe import RECIPE, build_ema, build_noise_scheduler


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--train_minutes", type=float, default=10.0, help="Wall-clock training budget per model, in minutes."
    )
    parser.add_argument(
        "--num_samples", type=int, default=500, help="Images per scored set (and per calibration set)."
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[5, 10, 20, 50], help="Sampling step counts of the step sweep."
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
    parser.add_argument("--seed", type=int, default=0, help="Seed of model init, data order, noise and samples.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=(
            "torch intra-op threads (default: torch's choice, the core count). On a loaded shared machine use 1:"
            " OpenMP threads that wait for each other made training 5x slower at load 7 on 2 cores."
        ),
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default=str(harness.RESULTS_DIR),
        help="Where quality-<date>.md/.json/.png are written.",
    )
    parser.add_argument(
        "--model_dir",
        type=str,
        default=None,
        help="Where the trained models are saved (save_pretrained folders); default: a folder in the system temp dir.",
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
        "--quick",
        action="store_true",
        help="Smoke test: 15 s of training per model, 100 samples, steps 5 and 10, guidance 1 and 3.",
    )
    args = parser.parse_args(input_args)
    if args.quick:
        args.train_minutes = 0.25
        args.num_samples = 100
        args.steps = [5, 10]
        args.guidance_scales = [1.0, 3.0]
        args.guidance_steps = 10
    if args.train_minutes <= 0:
        raise ValueError(f"--train_minutes must be > 0, got {args.train_minutes}.")
    if args.num_samples < 20:
        raise ValueError(f"--num_samples must be >= 20 (k-NN and covariances need samples), got {args.num_samples}.")
    if any(steps < 1 for steps in args.steps) or args.guidance_steps < 1:
        raise ValueError("--steps and --guidance_steps must be >= 1.")
    if any(scale < 1 for scale in args.guidance_scales):
        raise ValueError("--guidance_scales must be >= 1 (1 = plain conditional sampling).")
    return args


@dataclass
class Run:
    """One model under training: its network, objective, optimiser, EMA, data and clock."""

    name: str
    model: torch.nn.Module
    noise_scheduler: object
    objective: str  # "epsilon" or "flow"
    drop_labels_in_loop: bool  # stock: the loop does the null-class dropout; sculptdiff: the U-Net's embedder does
    optimizer: torch.optim.Optimizer = None
    ema: EMAModel = None
    dataloader: torch.utils.data.DataLoader = None
    batches: object = None
    generator: torch.Generator = None
    seconds: float = 0.0
    steps: int = 0
    epochs: int = 0
    losses: list = field(default_factory=list)


def build_runs(args: argparse.Namespace) -> list[Run]:
    torch.manual_seed(args.seed)
    runs = [
        Run(
            "sculptdiff",
            harness.build_sculpt_digits_unet(args.resolution),
            build_noise_scheduler(),
            "epsilon",
            drop_labels_in_loop=False,
        )
    ]
    torch.manual_seed(args.seed)
    runs.append(
        Run(
            "stock",
            harness.build_stock_digits_unet(args.resolution),
            harness.build_stock_noise_scheduler(),
            "epsilon",
            drop_labels_in_loop=True,
        )
    )
    if args.with_flow:
        torch.manual_seed(args.seed)
        runs.append(
            Run(
                "sculptdiff-flow",
                harness.build_sculpt_digits_unet(args.resolution, prediction_type="flow"),
                build_noise_scheduler(prediction_type="flow"),
                "flow",
                drop_labels_in_loop=False,
            )
        )

    dataset = load_digits_dataset()
    train_index, _ = digits_split_indices(dataset["label"])
    dataset = dataset.select(train_index.tolist())
    dataset.set_transform(ExampleTransform(ImageTransform(args.resolution, "L"), "image", "label"))
    for run in runs:
        run.model.train()
        run.optimizer = torch.optim.AdamW(
            run.model.parameters(),
            lr=RECIPE.learning_rate,
            betas=(RECIPE.adam_beta1, RECIPE.adam_beta2),
            weight_decay=RECIPE.adam_weight_decay,
            eps=RECIPE.adam_epsilon,
        )
        run.ema = build_ema(run.model)
        # the same seed for every model: the same batches in the same order, the same noise draws
        run.dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_size=RECIPE.train_batch_size,
            shuffle=True,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(args.seed),
        )
        run.batches = iter(run.dataloader)
        run.generator = torch.Generator().manual_seed(args.seed + 1)
    return runs


def next_batch(run: Run) -> dict:
    try:
        return next(run.batches)
    except StopIteration:
        run.epochs += 1
        run.batches = iter(run.dataloader)
        return next(run.batches)


def train_step(run: Run, budget_seconds: float):
    """One optimisation step of the package's training step, as train_sculpt.py takes it for a class-conditional
    pixel model."""
    # learning rate: linear warm-up, then cosine decay over the time budget (see the module docstring)
    warmup = min(1.0, (run.steps + 1) / RECIPE.lr_warmup_steps)
    decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, run.seconds / budget_seconds)))
    for group in run.optimizer.param_groups:
        group["lr"] = RECIPE.learning_rate * warmup * decay

    batch = next_batch(run)
    class_labels = batch["class_labels"]
    if run.drop_labels_in_loop:
        # the stock U-Net has no label dropout of its own: DiT's token_drop, here, with the recipe's probability
        drop = torch.rand(class_labels.shape[0], generator=run.generator) < RECIPE.conditioning_dropout_prob
        class_labels = torch.where(drop, NUM_CLASSES, class_labels)
    loss = diffusion_loss(
        run.model,
        run.noise_scheduler,
        batch["pixel_values"],
        run.objective,
        class_labels=class_labels,
        generator=run.generator,
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), RECIPE.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad()
    run.ema.step(run.model.parameters())
    run.steps += 1
    run.losses.append(loss.item())


def train_interleaved(runs: list[Run], budget_seconds: float, log):
    """One step of each model in turn until each has used its budget; only its own steps count on its clock."""
    # one untimed forward and backward per model first: one-time kernel set-up must not land on one model's clock
    for run in runs:
        batch = next(iter(run.dataloader))
        timesteps = torch.full((batch["pixel_values"].shape[0],), 500)
        run.model(batch["pixel_values"], timesteps, class_labels=batch["class_labels"]).sample.mean().backward()
        run.optimizer.zero_grad()
    next_report = 60.0
    while any(run.seconds < budget_seconds for run in runs):
        for run in runs:
            if run.seconds >= budget_seconds:
                continue
            start = time.perf_counter()
            train_step(run, budget_seconds)
            run.seconds += time.perf_counter() - start
        elapsed = min(run.seconds for run in runs)
        if elapsed >= next_report:
            next_report += 60.0
            log(
                "  ".join(
                    f"{run.name}: {run.steps} steps, loss(last 50) {np.mean(run.losses[-50:]):.4f}" for run in runs
                )
                + f"  load {os.getloadavg()[0]:.1f}"
            )


@dataclass
class Sampler:
    name: str
    scheduler: object
    guided_default: bool  # the model's main sampler: the one of the guidance sweep


def samplers_for(run: Run) -> list[Sampler]:
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


def sample(
    model: torch.nn.Module, scheduler, class_labels: torch.Tensor, num_steps: int, guidance_scale: float, seed: int
) -> tuple[torch.Tensor, int]:
    """Images in [-1, 1] from SculptPipeline, and the number of network evaluations per image (NFE)."""
    pipeline = SculptPipeline(unet=model, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        class_labels=class_labels,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    # the pipeline returns [0, 1]; the evaluator reads the training range [-1, 1]
    return images * 2 - 1, len(pipeline.scheduler.timesteps)


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
            "date": harness.utc_now(),
            "command": harness.command_line(),
            "machine": harness.machine_info(),
            "load": {"start": os.getloadavg()},
            "args": vars(args),
            "training": {},
            "checks": {},
            "calibration": {},
            "cells": [],
            "status": "running",
        }

    def cell(self, model: str, sampler: str, steps: int, guidance: float) -> dict | None:
        for cell in self.data["cells"]:
            if (cell["model"], cell["sampler"], cell["steps"], cell["guidance"]) == (model, sampler, steps, guidance):
                return cell
        return None

    def best_fd(self, model: str, steps: int, guidance: float = 1.0) -> dict | None:
        best = None
        for cell in self.data["cells"]:
            if (cell["model"], cell["steps"], cell["guidance"]) == (model, steps, guidance):
                if best is None or cell["fd"] < best["fd"]:
                    best = cell
        return best

    def targets(self) -> list[str]:
        lines = []
        floor = self.data["calibration"].get("real train digits (floor)")
        if floor:
            lines.append(
                f"- Read FDs against real digits, {floor['fd']:.2f} +- {floor['fd_std']:.2f} at this sample count (the"
                f" floor and its noise band): FD differences below {2 * floor['fd_std']:.2f} are not significant"
            )
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
                verdict = "met" if ratio <= 0.5 else "missed"
                lines.append(
                    f"- FD at {steps_low} steps, w=1, {label}: sculptdiff {ours['fd']:.2f} ({ours['sampler']}) vs stock"
                    f" {stock['fd']:.2f} ({stock['sampler']}), ratio {ratio:.2f} (target <= 0.50): **{verdict}**"
                )
        ours, stock = self.cell("sculptdiff", "DDIM", steps_high, 1.0), self.cell("stock", "DDIM", steps_high, 1.0)
        if ours and stock:
            verdict = "met" if ours["fd"] <= stock["fd"] else "missed"
            lines.append(
                f"- FD at {steps_high} steps, w=1, DDIM: sculptdiff {ours['fd']:.2f} vs stock {stock['fd']:.2f}"
                f" (target: no worse): **{verdict}**"
            )
        # the guidance sweep runs each model's own main sampler only, so the w=3 cell of a model is that sampler's
        for cell in self.data["cells"]:
            if cell["steps"] == self.args.guidance_steps and cell["guidance"] == 3.0:
                verdict = "met" if cell["class_accuracy"] >= 0.97 else "missed"
                lines.append(
                    f"- class accuracy, w=3, {self.args.guidance_steps} steps, {cell['model']} ({cell['sampler']}):"
                    f" {100 * cell['class_accuracy']:.1f}% (target >= 97%): **{verdict}**"
                )
        flow, ddim = (
            self.cell("sculptdiff-flow", "flow euler", steps_low, 1.0),
            self.cell("sculptdiff", "DDIM", steps_high, 1.0),
        )
        if flow and ddim:
            verdict = "met" if flow["fd"] <= ddim["fd"] else "missed"
            lines.append(
                f"- flow (euler) at {steps_low} steps, FD {flow['fd']:.2f}, vs epsilon DDIM at {steps_high} steps, FD"
                f" {ddim['fd']:.2f} (target: no worse): **{verdict}**"
            )
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
        if data["calibration"]:
            lines += ["", "## Calibration (what the numbers mean at this sample count)", ""]
            lines += harness.calibration_table(data["calibration"])
        lines += ["", "## Targets", ""] + self.targets()
        if data["cells"]:
            lines += ["", "## All sets", ""]
            lines += [
                "| model | sampler | steps | NFE | w | FD | precision | recall | class acc. | coverage | entropy | sample s |"
            ]
            lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for c in sorted(data["cells"], key=itemgetter("model", "sampler", "guidance", "steps")):
                sampler = c["sampler"] + (f" (= {c['same_as']}, identical samples)" if c.get("same_as") else "")
                lines.append(
                    f"| {c['model']} | {sampler} | {c['steps']} | {c['nfe']} | {c['guidance']:g} | {c['fd']:.2f} |"
                    f" {c['precision']:.3f} | {c['recall']:.3f} | {format_metric(c['class_accuracy'], 3)} |"
                    f" {c['class_coverage']:.2f} | {c['class_entropy']:.3f} | {c['seconds']:.0f} |"
                )
        lines += [""]
        if data.get("plot"):
            lines += [f"![FD vs steps]({data['plot']})", ""]
        if data.get("grid"):
            lines += [f"![samples]({data['grid']})", ""]
        return "\n".join(lines)

    def save(self):
        harness.write_results(self.base, self.markdown(), self.data)

    def plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4.5))
        series = {}
        for c in self.data["cells"]:
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


def sampling_plan(args: argparse.Namespace, runs: list[Run]) -> list[tuple[Run, Sampler, int, float]]:
    """All (model, sampler, steps, guidance) sets, the ones the targets read first, then cheap before expensive."""
    samplers = {run.name: samplers_for(run) for run in runs}
    cells = []
    for run in runs:
        main = next(sampler for sampler in samplers[run.name] if sampler.guided_default)
        for sampler in samplers[run.name]:
            for steps in args.steps:
                cells.append((run, sampler, steps, 1.0))
        for scale in args.guidance_scales:
            if scale != 1.0:
                cells.append((run, main, args.guidance_steps, scale))
    if args.samplers is not None:
        cells = [cell for cell in cells if cell[1].name in args.samplers]

    def priority(cell):
        run, sampler, steps, scale = cell
        is_main = sampler.guided_default
        target = (
            (is_main and steps in (10, 50) and scale == 1.0)
            or (is_main and scale == 3.0)
            or (sampler.name.startswith("ours") and steps == 10)
        )
        # identical-sample checks (ours vs DDIM) cost only a probe: early is cheap
        cost = steps * (2 if scale > 1 else 1) * (2 if "heun" in sampler.name else 1)
        return (0 if target else 1, cost)

    return sorted(cells, key=priority)


def load_runs(args: argparse.Namespace) -> list[Run]:
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
        runs.append(Run(name, model, scheduler, objective, drop_labels_in_loop=name == "stock"))
    return runs


def train_runs(args, report: Report, stamp: str, log) -> list[Run]:
    """Build, train (interleaved, equal budgets) and save the models; their EMA weights are what samples."""
    runs = build_runs(args)
    budget = args.train_minutes * 60
    log(
        f"training {', '.join(f'{r.name} ({sum(p.numel() for p in r.model.parameters()):,} params)' for r in runs)}"
        f" for {budget:.0f} s each, interleaved"
    )
    train_interleaved(runs, budget, log)
    report.data["load"]["after training"] = os.getloadavg()
    model_dir = Path(args.model_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"sculptdiff-bench-quality-{stamp}")
    for run in runs:
        run.ema.copy_to(run.model.parameters())
        run.model.eval().requires_grad_(False)
        report.data["training"][run.name] = {
            "parameters": sum(p.numel() for p in run.model.parameters()),
            "steps": run.steps,
            "epochs": run.epochs,
            "seconds": run.seconds,
            "final_loss": float(np.mean(run.losses[-100:])),
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

    # 3. sample and score, in priority order; identical samplers (probe of 10 images) reuse the measured set
    class_labels = torch.arange(args.num_samples) % NUM_CLASSES
    probe_labels = torch.arange(NUM_CLASSES)
    probes = {}
    grids = {}
    grid_scale = 3.0 if 3.0 in args.guidance_scales else max(args.guidance_scales)
    for run, sampler, steps, scale in sampling_plan(args, runs):
        probe, _ = sample(run.model, sampler.scheduler, probe_labels, steps, scale, args.seed)
        probes[(run.name, sampler.name, steps, scale)] = probe
        same_as = None
        for (name, other, other_steps, other_scale), other_probe in probes.items():
            if (name, other_steps, other_scale) == (run.name, steps, scale) and other != sampler.name:
                if report.cell(run.name, other, steps, scale) and (probe - other_probe).abs().max() < 1e-4:
                    same_as = other
                    break
        if same_as is not None:
            cell = {**report.cell(run.name, same_as, steps, scale), "sampler": sampler.name, "same_as": same_as}
            report.data["cells"].append(cell)
            report.save()
            log(f"{run.name} / {sampler.name} / {steps} steps / w={scale:g}: identical to {same_as}, reused")
            continue
        start = time.perf_counter()
        images, nfe = sample(run.model, sampler.scheduler, class_labels, steps, scale, args.seed)
        seconds = time.perf_counter() - start
        metrics = evaluator.evaluate(images, class_labels)
        cell = {"model": run.name, "sampler": sampler.name, "steps": steps, "guidance": scale, "nfe": nfe}
        cell.update(metrics)
        cell["seconds"] = seconds
        report.data["cells"].append(cell)
        if sampler.guided_default and steps == args.guidance_steps and scale == grid_scale:
            order = torch.argsort(class_labels[:100], stable=True)
            grids[run.name] = images[:100][order]
            report.grid(grids, f"{args.guidance_steps} steps, w={grid_scale:g}, main sampler; one row per class (0-9)")
        report.save()
        log(
            f"{run.name} / {sampler.name} / {steps} steps / w={scale:g}: FD {metrics['fd']:.2f}, precision"
            f" {metrics['precision']:.3f}, recall {metrics['recall']:.3f}, class acc {metrics['class_accuracy']:.3f}"
            f" ({seconds:.0f} s, load {os.getloadavg()[0]:.1f})"
        )
        report.plot()
    report.data["load"]["end"] = os.getloadavg()
    report.data["status"] = f"complete ({(time.monotonic() - started) / 60:.0f} min)"
    report.plot()
    report.save()
    print(report.markdown())


if __name__ == "__main__":
    main(parse_args())
