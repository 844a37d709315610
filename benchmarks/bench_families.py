#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""The seeds' comparison of generative families (GAN, VAE, diffusion), measured on one harness.

    python benchmarks/bench_families.py --threads 1                 # 5 min per model per seed, 3 seeds
    python benchmarks/bench_families.py --threads 1 --quick         # the whole path in a few minutes
    python benchmarks/bench_families.py --threads 1 --tune_gan      # the GAN baseline's settings, side by side

The first seed document's table ("总结对比表", ../shared/seeds/000_24fbc17c03ddb352.txt) says: GAN quality very high
and sharp, VAE average and blurry, diffusion very high; GAN diversity poor (mode collapse), VAE good, diffusion
excellent; GAN training unstable, VAE and diffusion stable; GAN and VAE one step, diffusion slow. Here every cell is
a measurement on the same data (the built-in digits at 16 px, [-1, 1], the 70% train split; the held-out 30% is the
metrics' reference), the same wall-clock budget per model and seed, and the same metrics
(`sculptdiff.evaluation.digits.DigitsEvaluator`).

Rows (families):
- `GAN`: the class-conditional DCGAN of `gan.py` (spectral norm, projection discriminator, hinge loss, EMA generator),
  with the settings `--tune_gan` picked;
- `VAE`: diffusers' AutoencoderKL trained by `training_scripts/train_vae.py` (a subprocess, `accelerate launch`, a
  step budget `--vae_steps`: the script has no clock) with squared error and the KL weight `--vae_kl_scale`, sampled
  by decoding z ~ N(0, I);
- `diffusion U-Net`, `diffusion DiT`: the recipe's U-Net and DiT (`sculptdiff.training.recipe`), epsilon objective,
  sampled with DPM-Solver++ with dynamic thresholding, the best sampler of the quality benchmark at 10 steps
  (results/quality-2026-12-01.md), the U-Net at each of `--steps`, the DiT at each of `--other_steps`;
- `flow matching`: the recipe's U-Net with the rectified-flow objective, SculptFlowScheduler euler (`--other_steps`);
- `latent diffusion`: the recipe's U-Net on the latents (scaled by their scaling_factor) of a second autoencoder,
  train_vae.py's default (latent diffusion's KL weight 1e-6), sampled through SculptPipeline with it (SculptScheduler,
  no clipping of latents; `--other_steps`);
- `consistency student` (when `--distill_steps` > 0): the U-Net distilled by distill_sculpt.py (a subprocess),
  sampled in 1 and 4 steps.

The GAN and the diffusion models train in this process, interleaved one step each with their own clocks (the load of
other jobs then falls on all alike), each step the package's (`harness.DiffusionRun`: `diffusion_loss`, clipping,
AdamW, EMA) or the GAN's own. What "unconditional" means per family: the diffusion models' null class (guidance 1,
the unconditional branch that classifier-free guidance trains), the GAN's generator with the class drawn uniformly
at random (its marginal; a class-conditional GAN has no null class), the VAE's prior (it is unconditional).

Columns:
- quality: FD and precision of class-conditional sets (class i % 10, read against real digits drawn for the same
  labels: the floor and its noise band) and of unconditional sets (read against random draws of real digits, whose
  class counts wander as an unconditional model's do); sharpness, the mean absolute pixel difference between
  neighbours relative to real digits' (1 = as sharp as the data; blur lowers it);
- diversity: recall, class coverage and mode collapse: the share of classes that get fewer than 5% of the samples
  (the digits classifier's predictions);
- stability: FD mean +- std over `--seeds` seeds, runs that diverged (a non-finite loss, or an FD no better than the
  pure-noise calibration set) or collapsed (two or more classes below 5% of the samples);
- speed: model calls per image, images/s at batch 64 on this CPU (one timed batch after one warm-up batch), and the
  training time.

The results file renders the seeds' table beside ours, cell by cell, with a verdict computed from the numbers. The
verdicts read every family on one footing (`quality`): the sample set it was built to draw, as a multiple of real
digits drawn the same way: class-matched sets for the class-conditional GAN and diffusion rows, the prior for the
VAE. (The unconditional sets differ by family: a diffusion model's null class trains on a tenth of the batches.)
`--render <json>` recomputes a saved run's summary and verdicts with the current rules.
Writes benchmarks/results/families-<date>.md (+ .json, -samples.png). Needs matplotlib (the `bench` extra).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import gan
import harness
import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from harness import NUM_CLASSES

from sculptdiff.evaluation.digits import DigitsEvaluator, classify, digits_split_indices, load_digits_split
from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler
from sculptdiff.training.data import load_digits_dataset
from sculptdiff.training.recipe import build_noise_scheduler, build_unet


# the benchmark's data: the digits at the training recipe's default resolution, as the quality benchmark
RESOLUTION = 16
SPEED_BATCH = 64
# a class is "collapsed" below half of its uniform share (10% of the samples for 10 classes)
COLLAPSE_SHARE = 0.05
# a run "collapsed" when this many classes or more fall below COLLAPSE_SHARE
COLLAPSED_CLASSES = 2
UNCONDITIONAL_FLOOR = "real train digits, random draw (unconditional floor)"
CONDITIONAL_FLOOR = "real train digits (floor)"
# the verdict of a claim that is read against the other families, in a run of one family
ALONE = "n/a (one family measured; this claim is read against the others)"
VAE_SCRIPT = harness.REPO_ROOT / "training_scripts" / "train_vae.py"
DISTILL_SCRIPT = harness.REPO_ROOT / "training_scripts" / "distill_sculpt.py"
STUDENT_STEPS = (1, 4)
# the VAE generator's KL weight against the summed squared error (the ELBO of a Gaussian decoder of std sigma weighs
# it 2 sigma^2). Measured, `--families vae --seeds 1 --vae_kl_scale K` (1500 steps, unconditional FD of decodes of
# z ~ N(0, I), 500 samples, floor 8.6): K = 0.01: 190; 0.05: 117; 0.2: 92; 1: 79; 3: 157; 10: 2442 (posterior
# collapse: one blob). train_vae.py's 1e-6 decodes no digits at all.
VAE_KL_SCALE = 1.0
# the seeds' table, as written there (translated), per trait and family
SEED_CLAIMS = {
    "quality": {"GAN": "very high, sharp", "VAE": "average, blurry", "diffusion": "very high, fine detail"},
    "diversity": {"GAN": "poor (mode collapse)", "VAE": "good", "diffusion": "excellent (high coverage)"},
    "stability": {"GAN": "poor (hard to tune)", "VAE": "good", "diffusion": "good (converges stably)"},
    "speed": {"GAN": "fast (one step)", "VAE": "fast (one step)", "diffusion": "slow (many steps; being optimised)"},
}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = harness.BenchmarkParser(
        __doc__.split("\n\n")[0],
        results="families-<date>.*",
        quick={
            "budget_minutes": 1 / 3,
            "seeds": 1,
            "num_samples": 100,
            "steps": [10],
            "other_steps": [10],
            "vae_steps": 30,
            "distill_steps": 10,
        },
    )
    parser.add_argument(
        "--budget_minutes", type=float, default=5.0, help="Wall-clock training budget per model and seed, in minutes."
    )
    parser.add_count("seeds", 3, "Training runs per model (seeds 0, 1, ...).")
    parser.add_argument("--num_samples", type=int, default=500, help="Images per scored set.")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[10, 50], help="Sampling steps of the diffusion U-Net's rows."
    )
    parser.add_argument(
        "--other_steps",
        type=int,
        nargs="+",
        default=[10],
        help=(
            "Sampling steps of the DiT, flow-matching and latent rows (the U-Net's rows show what more steps buy; a"
            " 50-step row costs 5x the sampling time of a 10-step one)."
        ),
    )
    parser.add_argument(
        "--vae_steps",
        type=int,
        default=1500,
        help=(
            "Training steps of train_vae.py (a step budget: the script has no clock; 1500 is its own default); its"
            " time is reported."
        ),
    )
    parser.add_argument(
        "--vae_kl_scale",
        type=float,
        default=VAE_KL_SCALE,
        help=(
            "KL weight (train_vae.py's --kl_scale, with --rec_loss l2) of the VAE generator; the latent-diffusion"
            " autoencoder keeps train_vae.py's default 1e-6."
        ),
    )
    parser.add_argument(
        "--distill_steps",
        type=int,
        default=1000,
        help="Training steps of distill_sculpt.py for the consistency student (0: no student row).",
    )
    parser.add_argument(
        "--families",
        type=str,
        nargs="+",
        default=["gan", "vae", "unet", "dit", "flow", "latent", "student"],
        choices=["gan", "vae", "unet", "dit", "flow", "latent", "student"],
        help="The rows to train (latent and student need vae and unet).",
    )
    parser.add_argument(
        "--tune_gan",
        action="store_true",
        help="Instead of the comparison: train every setting of gan.TUNING_GRID for --budget_minutes (interleaved,"
        " seed 0) and write families-gan-tuning-<date>.md.",
    )
    parser.add_argument(
        "--render",
        type=str,
        default=None,
        help=(
            "A families-<date>.json of an earlier run: recompute its summary and verdicts from its measurements with"
            " this version's rules and rewrite its .md and .json (no training, no sampling)."
        ),
    )
    parser.add_argument(
        "--work_dir",
        type=str,
        default=None,
        help="Where the subprocesses' models and the exported train split go (default: a new temporary folder).",
    )
    args = parser.parse_args(input_args)
    args.resolution = RESOLUTION
    if args.budget_minutes <= 0:
        raise ValueError(f"--budget_minutes must be > 0, got {args.budget_minutes}.")
    if args.num_samples < 20:
        raise ValueError(f"--num_samples must be >= 20 (k-NN and covariances need samples), got {args.num_samples}.")
    if min(args.steps + args.other_steps) < 1 or args.vae_steps < 1 or args.distill_steps < 0:
        raise ValueError("--steps, --other_steps and --vae_steps must be >= 1, --distill_steps >= 0.")
    return args


def sharpness(images: torch.Tensor) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixels (blur lowers it)."""
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return float((horizontal + vertical) / 2)


class Scorer:
    """The evaluator plus what this benchmark adds: the unconditional floor, sharpness relative to real digits and
    the share of classes below COLLAPSE_SHARE."""

    def __init__(self, resolution: int, num_samples: int, seed: int = 0, num_draws: int = 8):
        self.evaluator = DigitsEvaluator(resolution)
        self.num_samples = num_samples
        self.calibration = self.evaluator.calibrate(num_samples, seed=seed, num_draws=num_draws)
        train_images = self.evaluator.split.train_images
        self.real_sharpness = sharpness(train_images)
        draws = []
        for draw in range(num_draws):
            generator = torch.Generator().manual_seed(seed + draw)
            index = torch.randperm(train_images.shape[0], generator=generator)[:num_samples]
            draws.append(self.score(train_images[index]))
        floor = {name: float(np.mean([draw[name] for draw in draws])) for name in draws[0]}
        floor["fd_std"] = float(np.std([draw["fd"] for draw in draws], ddof=1))
        floor["num_draws"] = num_draws
        self.calibration[UNCONDITIONAL_FLOOR] = floor

    def score(self, images: torch.Tensor, class_labels: torch.Tensor | None = None) -> dict:
        metrics = self.evaluator.evaluate(images, class_labels)
        _, logits = classify(self.evaluator.classifier, images)
        shares = torch.bincount(logits.argmax(dim=1), minlength=NUM_CLASSES).double() / images.shape[0]
        metrics["mode_collapse"] = float((shares < COLLAPSE_SHARE).double().mean())
        metrics["sharpness"] = sharpness(images) / self.real_sharpness
        return metrics


def export_train_split(folder: Path) -> Path:
    """The models' train split of the digits as a `save_to_disk` folder, for the scripts' --dataset_name (the
    scripts' built-in data is all the digits, held-out ones included)."""
    dataset = load_digits_dataset()
    train_index, _ = digits_split_indices(dataset["label"])
    path = folder / "digits-train"
    if not (path / "dataset_info.json").is_file():
        dataset.select(train_index.tolist()).save_to_disk(str(path))
    return path


class ScriptError(RuntimeError):
    """A training script run as a subprocess failed: its row is skipped, with the reason in the results."""


def run_script(script: Path, arguments: list[str], threads: int | None, log) -> float:
    """`accelerate launch <script> <arguments>` on one CPU process; returns its wall-clock seconds."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    command += [str(script), *arguments]
    if threads:
        command.append(f"--num_threads={threads}")
    log(" ".join(command))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        log(result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if "Error" in line]
        raise ScriptError(f"{script.name} failed (exit code {result.returncode}): {(errors or ['?'])[0].strip()}")
    return seconds


def find_saved(folder: Path, *subfolders: str) -> Path:
    """The first of `folder`/`subfolder` holding a config.json or model_index.json."""
    for subfolder in subfolders:
        if (folder / subfolder / "config.json").is_file() or (folder / subfolder / "model_index.json").is_file():
            return folder / subfolder
    raise RuntimeError(f"No saved model in {folder} (looked in {subfolders}).")


def build_latent_unet(vae: AutoencoderKL, resolution: int):
    """The recipe's U-Net on the VAE's latents: the latent channels and size, the digits' classes."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size, channels = resolution // factor, vae.config.latent_channels
    if size < 4:
        raise ValueError(f"The VAE's latents are {size}x{size}: the recipe's U-Net needs at least 4x4.")
    config = {**harness.digits_model_config(size), "in_channels": channels, "out_channels": channels}
    return build_unet(**config)


@dataclass
class Row:
    """One row of the table at one seed. `sampler(class_labels or None, number, seed)` returns images in [-1, 1]
    (None when the row cannot condition on classes); `final_loss` is None when the training ran in a subprocess."""

    name: str
    family: str
    calls: int
    training_seconds: float
    final_loss: float | None
    sampler: Callable


def grey(images: torch.Tensor) -> torch.Tensor:
    """An RGB autoencoder's output (train_vae.py makes one for data given by --dataset_name) as the evaluator's grey
    images: the mean of the channels, which the digits fed in equal."""
    return images.mean(dim=1, keepdim=True)


def diffusion_sampler(model, scheduler, steps: int, vae=None):
    """A function (class_labels or None, number, seed) -> images in [-1, 1] through SculptPipeline."""

    def draw(class_labels, number, seed):
        images, _ = harness.sample_digits(
            model, scheduler, steps, seed, class_labels=class_labels, batch_size=number, vae=vae
        )
        return grey(images)

    return draw


def gan_sampler(trainer: gan.GANTrainer):
    def draw(class_labels, number, seed):
        generator = torch.Generator().manual_seed(seed)
        if class_labels is None:
            # unconditional: the class drawn uniformly at random (the generator's marginal)
            class_labels = torch.randint(0, NUM_CLASSES, (number,), generator=generator)
        return trainer.sample(class_labels, generator)

    return draw


def vae_sampler(vae: AutoencoderKL, resolution: int):
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (vae.config.latent_channels, resolution // factor, resolution // factor)

    def draw(class_labels, number, seed):
        if class_labels is not None:
            return None
        # the VAE's prior: z ~ N(0, I) in its latent space, unscaled (the KL term pulls the posterior there)
        z = torch.randn((number, *shape), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return grey(vae.decode(z).sample.clamp(-1, 1))

    return draw


def train_seed(args, seed: int, work_dir: Path, data_dir: Path, notes: list[str], log) -> list[Row]:
    """Train every family at one seed; the rows that sample. A script that fails costs its rows (in `notes`)."""
    families = set(args.families)
    budget = args.budget_minutes * 60
    rows, runs = [], []
    vae = None
    # two autoencoders: a VAE is a generator only with a KL weight near the ELBO's, while latent diffusion wants
    # latent diffusion's near-deterministic one (train_vae.py's default); one autoencoder cannot be both
    for family, kl_scale in (("vae", args.vae_kl_scale), ("latent", None)):
        if family not in families:
            continue
        try:
            autoencoder, seconds = train_vae(
                args, seed, work_dir / f"{family}-vae-seed{seed}", data_dir, log, kl_scale
            )
        except ScriptError as error:
            notes.append(f"seed {seed}: the {family} row skipped: {error}")
            continue
        if family == "vae":
            rows.append(Row("VAE", "VAE", 1, seconds, None, vae_sampler(autoencoder, args.resolution)))
        else:
            vae = autoencoder

    dataset = harness.digits_train_dataset(args.resolution)
    if "gan" in families:
        # the same 70% split as tensors (the evaluator's), through the same transform
        split = load_digits_split(args.resolution)
        runs.append(gan.GANTrainer(split.train_images, split.train_labels, gan.DEFAULT_SETTINGS, seed=seed))
    diffusion = []
    if "unet" in families or "student" in families:
        torch.manual_seed(seed)
        model = harness.build_sculpt_digits_unet(args.resolution)
        diffusion.append(("diffusion U-Net", model, build_noise_scheduler(), "epsilon", None))
    if "dit" in families:
        torch.manual_seed(seed)
        model = harness.build_sculpt_digits_dit(args.resolution)
        diffusion.append(("diffusion DiT", model, build_noise_scheduler(), "epsilon", None))
    if "flow" in families:
        torch.manual_seed(seed)
        model = harness.build_sculpt_digits_unet(args.resolution, prediction_type="flow")
        diffusion.append(("flow matching", model, build_noise_scheduler(prediction_type="flow"), "flow", None))
    if "latent" in families and vae is not None:
        torch.manual_seed(seed)
        model = build_latent_unet(vae, args.resolution)
        diffusion.append(("latent diffusion", model, build_noise_scheduler(clip_sample=False), "epsilon", vae))
    for name, model, scheduler, objective, run_vae in diffusion:
        runs.append(harness.build_diffusion_run(name, model, scheduler, objective, dataset, seed, vae=run_vae))
    log(f"seed {seed}: training {', '.join(run.name for run in runs)} for {budget:.0f} s each, interleaved")
    harness.train_interleaved(runs, budget, log)

    for run in runs:
        final_loss = float(np.mean(run.losses[-100:]))
        if isinstance(run, gan.GANTrainer):
            rows.append(Row("GAN", "GAN", 1, run.seconds, final_loss, gan_sampler(run)))
            continue
        model = run.finish()
        config = run.noise_scheduler.config
        if run.objective == "flow":
            scheduler = SculptFlowScheduler.from_config(config, solver="euler")
        elif run.vae is not None:
            scheduler = SculptScheduler.from_config(config, eta=0.0)
        else:
            # the quality benchmark's best at 10 steps: the plain swap fails on the recipe's cosine schedule
            scheduler = DPMSolverMultistepScheduler.from_config(config, thresholding=True, sample_max_value=1.0)
        for steps in args.steps if run.name == "diffusion U-Net" else args.other_steps:
            # a VAE decode is one more network call per image
            calls = steps + (1 if run.vae is not None else 0)
            rows.append(
                Row(
                    f"{run.name}, {steps} steps",
                    "diffusion",
                    calls,
                    run.seconds,
                    final_loss,
                    diffusion_sampler(model, scheduler, steps, run.vae),
                )
            )
        if run.name == "diffusion U-Net" and "student" in families and args.distill_steps:
            try:
                rows += distill_rows(args, seed, run, work_dir, data_dir, log)
            except ScriptError as error:
                notes.append(f"seed {seed}: consistency student skipped: {error}")
    return rows


def train_vae(
    args, seed: int, output: Path, data_dir: Path, log, kl_scale: float | None = None
) -> tuple[AutoencoderKL, float]:
    """train_vae.py on the train split (a subprocess), with `kl_scale` (None: the script's default): its AutoencoderKL
    and the script's wall-clock seconds."""
    arguments = [
        f"--dataset_name={data_dir}",
        f"--resolution={args.resolution}",
        f"--max_train_steps={args.vae_steps}",
        f"--seed={seed}",
        f"--output_dir={output}",
    ]
    if kl_scale is not None:
        arguments += ["--rec_loss=l2", f"--kl_scale={kl_scale}"]
    seconds = run_script(VAE_SCRIPT, arguments, args.threads, log)
    vae = AutoencoderKL.from_pretrained(find_saved(output, "", "vae"))
    return vae.eval().requires_grad_(False), seconds


def distill_rows(args, seed: int, teacher: harness.DiffusionRun, work_dir: Path, data_dir: Path, log) -> list[Row]:
    """The consistency student distilled from this seed's trained U-Net by distill_sculpt.py, at 1 and 4 steps; its
    training time is the teacher's plus the distillation's."""
    teacher_dir, output = work_dir / f"teacher-seed{seed}", work_dir / f"student-seed{seed}"
    SculptPipeline(unet=teacher.model, scheduler=teacher.noise_scheduler).save_pretrained(teacher_dir)
    seconds = run_script(
        DISTILL_SCRIPT,
        [
            f"--teacher={teacher_dir}",
            f"--dataset_name={data_dir}",
            "--class_column=label",
            f"--resolution={args.resolution}",
            f"--max_train_steps={args.distill_steps}",
            f"--seed={seed}",
            f"--output_dir={output}",
        ],
        args.threads,
        log,
    )
    pipeline = SculptPipeline.from_pretrained(find_saved(output, ""))
    student = pipeline.unet if pipeline.unet is not None else pipeline.transformer
    return [
        Row(
            f"consistency student, {steps} step{'s' if steps > 1 else ''}",
            "diffusion",
            steps,
            teacher.seconds + seconds,
            None,
            diffusion_sampler(student.eval(), pipeline.scheduler, steps),
        )
        for steps in STUDENT_STEPS
    ]


def measure_row(row: Row, scorer: Scorer, args, seed: int, timed: bool) -> tuple[dict, torch.Tensor]:
    """The row's metrics at this seed, and 20 unconditional or class-ordered samples for the grid."""
    class_labels = torch.arange(args.num_samples) % NUM_CLASSES
    result = {"name": row.name, "family": row.family, "seed": seed, "calls": row.calls}
    result.update(training_seconds=row.training_seconds, final_loss=row.final_loss)
    conditional = row.sampler(class_labels, args.num_samples, seed)
    unconditional = row.sampler(None, args.num_samples, seed)
    result["conditional"] = None if conditional is None else scorer.score(conditional, class_labels)
    result["unconditional"] = scorer.score(unconditional)
    grid = conditional[:20] if conditional is not None else unconditional[:20]
    if timed:
        row.sampler(None, SPEED_BATCH, seed)
        start = time.perf_counter()
        row.sampler(None, SPEED_BATCH, seed + 1)
        result["images_per_second"] = SPEED_BATCH / (time.perf_counter() - start)
    return result, grid


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summarize(results: list[dict], calibration: dict) -> dict[str, dict]:
    """Per row over seeds: mean metrics, FD mean +- std, diverged and collapsed runs, speed."""
    noise_fd = calibration["pure noise N(0, 1)"]["fd"]
    summary = {}
    for result in results:
        entry = summary.setdefault(result["name"], {"family": result["family"], "calls": result["calls"], "runs": []})
        entry["runs"].append(result)
        if "images_per_second" in result:
            entry["images_per_second"] = result["images_per_second"]
    for entry in summary.values():
        runs = entry["runs"]
        for kind in ("conditional", "unconditional"):
            scored = [run[kind] for run in runs if run[kind] is not None]
            entry[kind] = {name: float(np.mean([s[name] for s in scored])) for name in scored[0]} if scored else None
            fds = [s["fd"] for s in scored]
            entry[f"{kind}_fd_std"] = float(np.std(fds, ddof=1)) if len(fds) > 1 else float("nan")
        # failures on the footing of `quality`: the class-matched samples of class-conditional rows
        scored = [run["conditional"] or run["unconditional"] for run in runs]
        entry["diverged"] = sum(
            1
            for run, score in zip(runs, scored)
            if (run["final_loss"] is not None and not math.isfinite(run["final_loss"]))
            or not math.isfinite(score["fd"])
            or score["fd"] >= noise_fd
        )
        entry["collapsed"] = sum(
            1 for score in scored if round(score["mode_collapse"] * NUM_CLASSES) >= COLLAPSED_CLASSES
        )
        entry["training_seconds"] = float(np.mean([run["training_seconds"] for run in runs]))
        entry["seeds"] = len(runs)
    return summary


def quality(entry: dict, calibration: dict) -> dict:
    """A row's quality on one footing for every family: the FD of the samples it was built to draw, as a multiple of
    real digits drawn the same way. Class-conditional rows (GAN, diffusion) are scored on their class-matched samples
    against the class-matched floor; the VAE, which has no classes, on its prior samples against the random-draw
    floor. (The "unconditional" sets are not one footing: a GAN draws random classes, a diffusion model its null
    class, which trains on a tenth of the batches.)"""
    kind, floor = (
        ("conditional", CONDITIONAL_FLOOR) if entry["conditional"] else ("unconditional", UNCONDITIONAL_FLOOR)
    )
    fd, floor_fd = entry[kind]["fd"], calibration[floor]["fd"]
    return {
        "kind": kind,
        "fd": fd,
        "fd_std": entry[f"{kind}_fd_std"],
        "floor": floor_fd,
        "ratio": fd / floor_fd,
        # twice the floor's draw-to-draw spread, in the same multiples
        "band": 2 * calibration[floor]["fd_std"] / floor_fd,
        "blurred": calibration["real, blurred sigma=1 px"]["fd"] / calibration[CONDITIONAL_FLOOR]["fd"],
    }


def family_best(summary: dict, family: str, calibration: dict) -> tuple[str, dict] | None:
    """The family's row of the best quality (its best showing)."""
    rows = [
        (quality(entry, calibration)["ratio"], name, entry)
        for name, entry in summary.items()
        if entry["family"] == family
    ]
    return min(rows, key=itemgetter(0))[1:] if rows else None


def verdicts(summary: dict, calibration: dict) -> dict[str, dict[str, tuple[str, str]]]:
    """(our cell, verdict) per trait and family, computed from the measurements."""
    best = {family: family_best(summary, family, calibration) for family in ("GAN", "VAE", "diffusion")}
    present = {family: item for family, item in best.items() if item is not None}
    floor = calibration[UNCONDITIONAL_FLOOR]
    cells = {trait: {} for trait in SEED_CLAIMS}
    scores = {family: quality(entry, calibration) for family, (_, entry) in present.items()}
    recalls = {family: entry[scores[family]["kind"]]["recall"] for family, (_, entry) in present.items()}
    # quality, diversity (but the VAE's), stability and diffusion's speed are read against the other families: a run
    # of one family (`--families dit`) has nothing to read them against
    alone = len(present) < 2
    for family, (name, entry) in present.items():
        score = scores[family]
        # every trait on the quality footing: the sample set the row was built to draw
        un = entry[score["kind"]]
        lowest = min(other["ratio"] for other in scores.values())
        near_best = score["ratio"] <= lowest + score["band"]
        # quality: "very high" = among the best (within the floor's noise band) and better than 1 px of blur
        claims_high = family in ("GAN", "diffusion")
        high = near_best and score["ratio"] < score["blurred"]
        sharp = entry[score["kind"]]["sharpness"]
        cell = (
            f"FD {fmt(score['fd'])} = {fmt(score['ratio'])}x real ({score['kind']}), precision"
            f" {fmt(entry[score['kind']]['precision'], 3)}, sharpness {fmt(sharp)}"
        )
        if claims_high:
            holds = high and (family != "GAN" or sharp >= 0.9)
        else:
            holds = not near_best and sharp < 0.9
        cells["quality"][family] = (cell + f" [{name}]", ALONE if alone else "holds" if holds else "does not hold")
        # diversity: GAN poor = lowest recall or any collapse; VAE good; diffusion excellent = highest recall
        collapse = un["mode_collapse"]
        cell = f"recall {fmt(un['recall'], 3)}, coverage {fmt(un['class_coverage'])}, collapse {fmt(collapse)}"
        if family == "GAN":
            holds = recalls[family] == min(recalls.values()) or collapse > 0
        elif family == "VAE":
            holds = un["recall"] >= floor["recall"] - 0.2 and collapse == 0
        else:
            holds = recalls[family] == max(recalls.values()) and collapse == 0
        compared = alone and family != "VAE"
        cells["diversity"][family] = (cell, ALONE if compared else "holds" if holds else "does not hold")
        # stability: over seeds, on the quality footing
        failures = entry["diverged"] + entry["collapsed"]
        cell = f"FD {fmt(score['fd'])} +- {fmt(score['fd_std'])} over {entry['seeds']} seeds, {failures} failed"
        if entry["seeds"] < 2:
            verdict = "not measured (1 seed)"
        elif alone:
            verdict = ALONE
        else:
            spreads = {f: other["fd_std"] / max(other["fd"], 1e-9) for f, other in scores.items()}
            unstable = failures > 0 or spreads[family] == max(spreads.values())
            verdict = "holds" if unstable == (family == "GAN") else "does not hold"
        cells["stability"][family] = (cell, verdict)
    # speed: calls per image and images/s; diffusion's slowest and fastest rows
    speeds = {name: entry for name, entry in summary.items() if "images_per_second" in entry}
    one_step = [entry["images_per_second"] for entry in speeds.values() if entry["family"] in ("GAN", "VAE")]
    for family in present:
        rows = [(name, entry) for name, entry in speeds.items() if entry["family"] == family]
        if not rows:
            continue
        cell = "; ".join(
            f"{name}: {entry['calls']} calls, {fmt(entry['images_per_second'], 0)} img/s" for name, entry in rows
        )
        if family == "diffusion":
            many = [entry for _, entry in rows if entry["calls"] > 1]
            holds = bool(many) and bool(one_step) and max(e["images_per_second"] for e in many) < min(one_step)
        else:
            holds = all(entry["calls"] == 1 for _, entry in rows)
        compared = family == "diffusion" and not one_step
        cells["speed"][family] = (cell, ALONE if compared else "holds" if holds else "does not hold")
    return cells


def seed_table(cells: dict) -> list[str]:
    lines = [
        "| trait | family | the seed says | we measured | verdict |",
        "|---|---|---|---|---|",
    ]
    for trait, claims in SEED_CLAIMS.items():
        for family, claim in claims.items():
            cell, verdict = cells[trait].get(family, ("not measured (row skipped)", "n/a"))
            lines.append(f"| {trait} | {family} | {claim} | {cell} | **{verdict}** |")
    return lines


def results_table(summary: dict) -> list[str]:
    lines = [
        "| row | FD cond. (mean +- std) | precision cond. | recall cond. | FD uncond. (mean +- std) | precision |"
        " recall | coverage | mode collapse | sharpness | diverged / collapsed | calls / image | images/s (batch 64) |"
        " training s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        cond, un = entry["conditional"], entry["unconditional"]
        cond_fd = f"{fmt(cond['fd'])} +- {fmt(entry['conditional_fd_std'])}" if cond else "n/a"
        lines.append(
            f"| {name} | {cond_fd} |"
            f" {fmt(cond['precision'], 3) if cond else 'n/a'} | {fmt(cond['recall'], 3) if cond else 'n/a'} |"
            f" {fmt(un['fd'])} +- {fmt(entry['unconditional_fd_std'])} | {fmt(un['precision'], 3)} |"
            f" {fmt(un['recall'], 3)} | {fmt(un['class_coverage'])} | {fmt(un['mode_collapse'])} |"
            f" {fmt(un['sharpness'])} | {entry['diverged']} / {entry['collapsed']} of {entry['seeds']} |"
            f" {entry['calls']} | {fmt(entry.get('images_per_second'), 0)} | {fmt(entry['training_seconds'], 0)} |"
        )
    return lines


def save_grid(grids: dict[str, torch.Tensor], path: Path):
    """One line of 20 samples per row (two per class for the class-conditional rows, class order 0-9, 0-9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(grids), 1, figsize=(8, 0.6 * len(grids) + 0.4))
    for axis, (name, images) in zip(np.atleast_1d(axes), grids.items()):
        strip = torch.cat(list(images[:, 0]), dim=1)
        axis.imshow((strip.numpy() + 1) / 2, cmap="gray", vmin=0, vmax=1)
        axis.set_title(name, fontsize=7, loc="left")
        axis.axis("off")
    figure.tight_layout()
    harness.save_figure(figure, path)
    plt.close(figure)


def markdown(data: dict, args) -> str:
    lines = [
        f"# GAN vs VAE vs diffusion, measured on one harness ({data['date']})",
        "",
        f"Status: **{data['status']}**",
        "",
        *harness.header_lines(data["command"], data["machine"], data["load"]),
        f"- Data: sklearn digits at {args.resolution} px, train split (70%); metrics against the held-out 30%"
        f" (`sculptdiff.evaluation.digits`), {args.num_samples} samples per set",
        f"- Budget: {args.budget_minutes:g} min of training per model and seed (interleaved, own clocks), {args.seeds}"
        f" seed(s); the VAE {args.vae_steps} steps, the student {args.distill_steps} steps (scripts, step budgets)",
        f"- GAN settings: {gan.DEFAULT_SETTINGS.describe()}",
        "- Unconditional: diffusion = null class at guidance 1; GAN = class drawn uniformly; VAE = z ~ N(0, I)",
    ]
    lines += [f"- {note}" for note in data["notes"]]
    if data.get("rendered"):
        lines.append(f"- Summary and verdicts: {data['rendered']}")
    lines += ["", "## The seeds' table beside ours", ""] + seed_table(data["verdicts"])
    lines += [
        "",
        "Verdict rules (computed): quality is a family's best row's FD as a multiple of real digits drawn the same"
        " way (class-conditional rows: class-matched samples against the class-matched floor; the VAE: prior samples"
        " against the random-draw floor); 'very high' when that multiple is within twice the floor's noise band of"
        " the best family's and below that of real digits blurred by 1 px, 'sharp' when its sharpness is"
        " >= 0.9 of real digits', 'average, blurry' the opposite; GAN diversity is 'poor' when its recall is the"
        " lowest or a class collapses, diffusion's 'excellent' when its recall is the highest and nothing collapses;"
        " 'unstable' means a failed run or the largest relative FD spread over seeds; one-step speed means 1 call"
        " per image, diffusion 'slow' means every multi-step row is slower than every one-step row.",
    ]
    if data["summary"]:
        lines += ["", "## Measurements (means over seeds)", ""] + results_table(data["summary"])
    lines += harness.calibration_section(data["calibration"])
    if data.get("grid"):
        lines += ["", f"![samples]({data['grid']})"]
    return "\n".join(lines) + "\n"


def tune_gan(args, scorer: Scorer, base: Path, log):
    """Every setting of gan.TUNING_GRID, trained interleaved for the budget at seed 0, scored conditionally."""
    split = load_digits_split(args.resolution)
    trainers = [
        gan.GANTrainer(split.train_images, split.train_labels, settings, seed=0, name=f"setting {index}")
        for index, settings in enumerate(gan.TUNING_GRID)
    ]
    harness.train_interleaved(trainers, args.budget_minutes * 60, log)
    class_labels = torch.arange(args.num_samples) % NUM_CLASSES
    lines = [
        f"# GAN baseline settings ({harness.utc_now()})",
        "",
        *harness.header_lines(harness.command_line(), harness.machine_info(), {"end": os.getloadavg()}),
        f"- {args.budget_minutes:g} min per setting (interleaved), seed 0, {args.num_samples} samples (class i % 10)",
        "",
        "| setting | steps | FD | precision | recall | class acc. | mode collapse (uncond.) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for trainer in trainers:
        metrics = scorer.score(trainer.sample(class_labels, torch.Generator().manual_seed(0)), class_labels)
        unconditional = scorer.score(gan_sampler(trainer)(None, args.num_samples, 0))
        rows.append({"settings": trainer.settings.describe(), "steps": trainer.steps, **metrics})
        lines.append(
            f"| {trainer.settings.describe()} | {trainer.steps} | {fmt(metrics['fd'])} |"
            f" {fmt(metrics['precision'], 3)} | {fmt(metrics['recall'], 3)} | {fmt(metrics['class_accuracy'], 3)} |"
            f" {fmt(unconditional['mode_collapse'])} |"
        )
        log(lines[-1])
    floor = scorer.calibration[CONDITIONAL_FLOOR]
    lines += ["", f"Real digits (class-matched floor): FD {fmt(floor['fd'])} +- {fmt(floor['fd_std'])}", ""]
    harness.write_results(
        base.with_name(base.name.replace("families", "families-gan-tuning")), "\n".join(lines), {"rows": rows}
    )


def render(path: Path):
    """Rewrite an earlier run's results from its measurements: summary, verdicts and Markdown by today's rules."""
    data = json.loads(path.read_text())
    data["summary"] = summarize(data["results"], data["calibration"])
    data["verdicts"] = verdicts(data["summary"], data["calibration"])
    data["rendered"] = f"verdicts recomputed by `{harness.command_line()}` ({harness.utc_now()})"
    harness.write_results(path.with_suffix(""), markdown(data, argparse.Namespace(**data["args"])), data)


def main(args: argparse.Namespace):
    if args.render:
        render(Path(args.render))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()

    def log(message: str):
        print(f"[{time.monotonic() - started:7.0f}s] {message}", flush=True)

    stamp = harness.utc_now()[:10]
    base = Path(args.output_dir) / f"families-{stamp}{'-quick' if args.quick else ''}"
    scorer = Scorer(args.resolution, args.num_samples)
    log(
        f"calibrated; real digits FD {scorer.calibration[CONDITIONAL_FLOOR]['fd']:.2f} (class-matched),"
        f" {scorer.calibration[UNCONDITIONAL_FLOOR]['fd']:.2f} (random draw)"
    )
    if args.tune_gan:
        tune_gan(args, scorer, base, log)
        return
    data = {
        **harness.results_header(args),
        "calibration": scorer.calibration,
        "notes": [],
        "results": [],
        "summary": {},
        "verdicts": {trait: {} for trait in SEED_CLAIMS},
        "status": "running",
    }
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="sculptdiff-families-"))
    data_dir = export_train_split(work_dir)
    grids = {}
    for seed in range(args.seeds):
        rows = train_seed(args, seed, work_dir, data_dir, data["notes"], log)
        data["load"][f"after training, seed {seed}"] = os.getloadavg()
        for row in rows:
            result, grid = measure_row(row, scorer, args, seed, timed=seed == 0)
            data["results"].append(result)
            grids.setdefault(row.name, grid)
            un = result["unconditional"]
            log(
                f"seed {seed} / {row.name}: FD uncond. {un['fd']:.2f}, recall {un['recall']:.3f}, collapse"
                f" {un['mode_collapse']:.2f}"
            )
        data["summary"] = summarize(data["results"], scorer.calibration)
        data["verdicts"] = verdicts(data["summary"], scorer.calibration)
        save_grid(grids, base.with_name(base.name + "-samples.png"))
        data["grid"] = base.name + "-samples.png"
        harness.write_results(base, markdown(data, args), data)
    if args.work_dir is None:
        shutil.rmtree(work_dir)
    data["load"]["end"] = os.getloadavg()
    data["status"] = f"complete ({(time.monotonic() - started) / 60:.0f} min)"
    harness.write_results(base, markdown(data, args), data)
    print(markdown(data, args))


if __name__ == "__main__":
    main(parse_args())
