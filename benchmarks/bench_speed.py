#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Training and sampling speed, and peak memory: sculptdiff's recipe U-Net against stock diffusers at equal size.

    python benchmarks/bench_speed.py             # batch 64, 16 and 32 px, 2 rounds
    python benchmarks/bench_speed.py --quick     # the whole path in 2-8 minutes (8 fresh workers; load-dependent)

For each resolution and model (SculptUNet2DModel with the training script's default config; diffusers'
UNet2DModel at the same parameter count, `bench_quality.stock_unet_config`), both class-conditional:

- train step: forward + MSE loss + backward + gradient clipping + AdamW step, seconds per step (median);
- sampling: one denoising step (U-Net forward + DDIM step) on the batch, images per second per step, unguided
  (batch B) and guided (classifier-free guidance: one batched forward on 2B);
- peak memory: `ru_maxrss` of a fresh subprocess per (model, resolution, phase). tracemalloc sees only Python's
  allocator, not torch's tensors; `ru_maxrss` is the kernel's peak resident set of the whole process, so a fresh
  process per configuration isolates each peak. The table gives the peak during the measured steps and the increase
  over the peak after setup (imports, model, optimiser), which is what the configuration itself costs.

The subprocesses alternate between the models and repeat for `--rounds` rounds, and the medians over rounds are
reported, so that load from other jobs on shared cores falls on both models alike; ratios are sculptdiff / stock
from the same run. Writes benchmarks/results/speed-<date>.md (+ .json) with the machine, the command and the load.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_quality import load_training_script, stock_unet_config, write_text


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
NUM_CLASSES = 10


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--batch_size", type=int, default=64, help="Batch size of training and of (unguided) sampling."
    )
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32], help="Image sides to measure.")
    parser.add_argument("--steps", type=int, default=20, help="Measured steps per configuration (after warm-up).")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Unmeasured steps before timing.")
    parser.add_argument(
        "--rounds", type=int, default=2, help="Rounds over all configurations (alternating models); medians reported."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads in the workers (default: torch's choice; 1 on a loaded shared machine).",
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default=str(BENCHMARKS_DIR / "results"),
        help="Where speed-<date>.md/.json are written.",
    )
    parser.add_argument("--quick", action="store_true", help="Smoke test: 2 measured steps, 1 warm-up, 1 round.")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(input_args)
    if args.quick:
        args.steps, args.warmup_steps, args.rounds = 2, 1, 1
    for flag in ("batch_size", "steps", "rounds"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    for resolution in args.resolutions:
        if resolution % 4 != 0:
            raise ValueError(f"--resolutions must be multiples of 4 (the U-Nets downsample twice), got {resolution}.")
    return args


def build_model(model_name: str, resolution: int) -> tuple[torch.nn.Module, object]:
    """The model and its training noise scheduler, as bench_quality.py trains them."""
    from diffusers import DDPMScheduler, UNet2DModel

    from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler

    torch.manual_seed(0)
    if model_name == "stock":
        return UNet2DModel(**stock_unet_config(resolution)), DDPMScheduler(num_train_timesteps=1000)
    script = load_training_script()
    recipe = script.parse_args([])
    data_config = {
        "sample_size": resolution,
        "in_channels": 1,
        "out_channels": 1,
        "num_class_embeds": NUM_CLASSES,
        "conditioning_dropout_prob": 0.1,
        "prediction_type": "epsilon",
    }
    unet, _ = script.build_unet(recipe, data_config, None)
    scheduler = SculptScheduler(
        num_train_timesteps=1000, beta_schedule=recipe.beta_schedule, clip_sample=True, timestep_spacing="trailing"
    )
    return unet, scheduler


def run_worker(config: dict) -> dict:
    """One configuration in this (fresh) process: time the phase, report the process's peak RSS."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    from diffusers import DDIMScheduler

    model, noise_scheduler = build_model(config["model"], config["resolution"])
    batch, resolution = config["batch_size"], config["resolution"]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, resolution, resolution, generator=generator) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    result = {**config, "parameters": sum(p.numel() for p in model.parameters())}

    if config["phase"] == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for index in range(config["warmup_steps"] + config["steps"]):
            start = time.perf_counter()
            noise = torch.randn(images.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (batch,), generator=generator)
            noisy = noise_scheduler.add_noise(images, noise, timesteps)
            loss = F.mse_loss(model(noisy, timesteps, class_labels=labels).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if index >= config["warmup_steps"]:
                times.append(time.perf_counter() - start)
        result["seconds_per_step"] = statistics.median(times)
    else:
        model.eval().requires_grad_(False)
        scheduler = DDIMScheduler.from_config(noise_scheduler.config)
        # a long grid, so that every measured step is a plain DDIM step
        scheduler.set_timesteps(config["warmup_steps"] + config["steps"] + 1)
        setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        null = torch.full_like(labels, NUM_CLASSES)
        for guided in (False, True):
            latents = torch.randn(images.shape, generator=generator)
            times = []
            with torch.no_grad():
                for index, t in enumerate(scheduler.timesteps[: config["warmup_steps"] + config["steps"]]):
                    start = time.perf_counter()
                    if guided:
                        output = model(torch.cat([latents] * 2), t, class_labels=torch.cat([null, labels])).sample
                        output_uncond, output_cond = output.chunk(2)
                        output = output_uncond + 3.0 * (output_cond - output_uncond)
                    else:
                        output = model(latents, t, class_labels=labels).sample
                    latents = scheduler.step(output, t, latents).prev_sample
                    if index >= config["warmup_steps"]:
                        times.append(time.perf_counter() - start)
            result["guided_images_per_second" if guided else "images_per_second"] = batch / statistics.median(times)
    # ru_maxrss is in KiB on Linux
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_mib"] = peak_rss / 1024
    result["phase_rss_mib"] = (peak_rss - setup_rss) / 1024
    return result


def machine_info() -> dict:
    import diffusers

    cpu = "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__}


def median_of(results: list[dict], model: str, resolution: int, phase: str, key: str) -> float:
    values = [
        r[key] for r in results if (r["model"], r["resolution"], r["phase"]) == (model, resolution, phase) and key in r
    ]
    return statistics.median(values)


def markdown(args: argparse.Namespace, info: dict, results: list[dict]) -> str:
    lines = [
        f"# Speed: sculptdiff vs stock diffusers at equal parameters ({info['date']})",
        "",
        f"- Command: `{info['command']}`",
        f"- Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, torch {info['machine']['torch']},"
        f" diffusers {info['machine']['diffusers']}; torch threads per worker: {args.threads or 'default'}",
        f"- Load average (1/5/15 min) at start: {', '.join(f'{v:.2f}' for v in info['load_start'])}; at end:"
        f" {', '.join(f'{v:.2f}' for v in info['load_end'])} (the cores are shared with other jobs when this is > 0)",
        f"- Batch {args.batch_size}; {args.steps} measured steps after {args.warmup_steps} warm-up, median; medians over"
        f" {args.rounds} round(s) of fresh subprocesses alternating the models",
        "- Peak memory: ru_maxrss of the worker process (peak RSS) and its increase during the measured phase",
        "",
        "| px | model | params | train s/step | train ratio | sample img/s/step | ratio | guided img/s/step | ratio |"
        " peak RSS train MiB (phase +) | peak RSS sample MiB (phase +) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for resolution in args.resolutions:
        for model in ("sculptdiff", "stock"):
            train = median_of(results, model, resolution, "train", "seconds_per_step")
            speed = median_of(results, model, resolution, "sample", "images_per_second")
            guided = median_of(results, model, resolution, "sample", "guided_images_per_second")
            stock_train = median_of(results, "stock", resolution, "train", "seconds_per_step")
            stock_speed = median_of(results, "stock", resolution, "sample", "images_per_second")
            stock_guided = median_of(results, "stock", resolution, "sample", "guided_images_per_second")
            params = median_of(results, model, resolution, "train", "parameters")
            memory = []
            for phase in ("train", "sample"):
                peak = median_of(results, model, resolution, phase, "peak_rss_mib")
                delta = median_of(results, model, resolution, phase, "phase_rss_mib")
                memory.append(f"{peak:.0f} (+{delta:.0f})")
            lines.append(
                f"| {resolution} | {model} | {params:,.0f} | {train:.3f} | {train / stock_train:.2f} | {speed:.0f} |"
                f" {speed / stock_speed:.2f} | {guided:.0f} | {guided / stock_guided:.2f} | {memory[0]} | {memory[1]} |"
            )
    lines += [
        "",
        "Ratios are sculptdiff / stock: a train ratio below 1 means sculptdiff's step is faster; an img/s ratio above 1"
        " means sculptdiff samples faster.",
        "",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
        "machine": machine_info(),
        "load_start": os.getloadavg(),
    }
    results = []
    for round_index in range(args.rounds):
        # alternate which model goes first, so neither always runs in the same slot
        models = ("sculptdiff", "stock") if round_index % 2 == 0 else ("stock", "sculptdiff")
        for resolution in args.resolutions:
            for phase in ("train", "sample"):
                for model in models:
                    config = {
                        "model": model,
                        "resolution": resolution,
                        "phase": phase,
                        "batch_size": args.batch_size,
                        "steps": args.steps,
                        "warmup_steps": args.warmup_steps,
                        "threads": args.threads,
                    }
                    completed = subprocess.run(
                        [sys.executable, __file__, "--worker", json.dumps(config)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if completed.returncode != 0:
                        raise RuntimeError(f"worker {config} failed:\n{completed.stderr[-3000:]}")
                    result = json.loads(completed.stdout.strip().splitlines()[-1])
                    result["load"] = os.getloadavg()[0]
                    results.append(result)
                    print(json.dumps(result), flush=True)
    info["load_end"] = os.getloadavg()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = output_dir / f"speed-{info['date'][:10]}{'-quick' if args.quick else ''}"
    text = markdown(args, info, results)
    write_text(base.with_suffix(".md"), text)
    write_text(base.with_suffix(".json"), json.dumps({"info": info, "args": vars(args), "results": results}, indent=2))
    print(text)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker is not None:
        print(json.dumps(run_worker(json.loads(arguments.worker))))
    else:
        main(arguments)
