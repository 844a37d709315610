#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Training and sampling speed, and peak memory: sculptdiff's recipe U-Net against stock diffusers at equal size.

    python benchmarks/bench_speed.py             # batch 64, 16 and 32 px, 2 rounds
    python benchmarks/bench_speed.py --quick     # the whole path in 2-8 minutes (8 fresh workers; load-dependent)

For each resolution and model (SculptUNet2DModel with the recipe's config; diffusers' UNet2DModel at the same
parameter count, `harness.build_stock_digits_unet`), both class-conditional, as the quality benchmark trains them:

- train step: the package's loss (`sculptdiff.training.objective.diffusion_loss`) + backward + gradient clipping +
  AdamW step, seconds per step (median);
- sampling: one denoising step of SculptPipeline (U-Net forward + DDIM step, timed between the pipeline's step-end
  callbacks) on the batch, images per second per step, unguided (batch B) and guided (classifier-free guidance:
  one batched forward on 2B);
- peak memory: `ru_maxrss` of a fresh subprocess per (model, resolution, phase). tracemalloc sees only Python's
  allocator, not torch's tensors; `ru_maxrss` is the kernel's peak resident set of the whole process, so a fresh
  process per configuration isolates each peak. The table gives the peak during the measured steps and the increase
  over the peak after setup (imports, model, optimiser), which is what the configuration itself costs.

The subprocesses alternate between the models and repeat for `--rounds` rounds, and the medians over rounds are
reported, so that load from other jobs on shared cores falls on both models alike; ratios are sculptdiff / stock
from the same run. Writes benchmarks/results/speed-<date>.md (+ .json) with the machine, the command and the load.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
import torch
from harness import NUM_CLASSES


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = harness.BenchmarkParser(
        __doc__.split("\n\n")[0],
        results="speed-<date>.md/.json",
        quick={"steps": 2, "warmup_steps": 1, "rounds": 1},
    )
    parser.add_count("batch_size", 64, "Batch size of training and of (unguided) sampling.")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32], help="Image sides to measure.")
    parser.add_count("steps", 20, "Measured steps per configuration (after warm-up).")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Unmeasured steps before timing.")
    parser.add_count("rounds", 2, "Rounds over all configurations (alternating models); medians reported.")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(input_args)
    if args.warmup_steps < 1:
        raise ValueError(
            f"--warmup_steps must be >= 1 (the first sampling step holds the pipeline's set-up), got"
            f" {args.warmup_steps}."
        )
    for resolution in args.resolutions:
        if resolution % 4 != 0:
            raise ValueError(f"--resolutions must be multiples of 4 (the U-Nets downsample twice), got {resolution}.")
    return args


def build_model(model_name: str, resolution: int) -> tuple[torch.nn.Module, object]:
    """The model and its training noise scheduler, as bench_quality.py trains them."""
    from sculptdiff.training.recipe import build_noise_scheduler

    torch.manual_seed(0)
    if model_name == "stock":
        return harness.build_stock_digits_unet(resolution), harness.build_stock_noise_scheduler()
    return harness.build_sculpt_digits_unet(resolution), build_noise_scheduler()


def run_worker(config: dict) -> dict:
    """One configuration in this (fresh) process: time the phase, report the process's peak RSS."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    from diffusers import DDIMScheduler

    from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
    from sculptdiff.training.objective import diffusion_loss
    from sculptdiff.training.recipe import RECIPE

    model, noise_scheduler = build_model(config["model"], config["resolution"])
    batch, resolution = config["batch_size"], config["resolution"]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, resolution, resolution, generator=generator) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    result = {**config, "parameters": sum(p.numel() for p in model.parameters())}

    if config["phase"] == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE.learning_rate)
        setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for index in range(config["warmup_steps"] + config["steps"]):
            start = time.perf_counter()
            loss = diffusion_loss(model, noise_scheduler, images, "epsilon", class_labels=labels, generator=generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            if index >= config["warmup_steps"]:
                times.append(time.perf_counter() - start)
        result["seconds_per_step"] = statistics.median(times)
    else:
        model.eval().requires_grad_(False)
        pipeline = SculptPipeline(unet=model, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
        pipeline.set_progress_bar_config(disable=True)
        setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        num_steps = config["warmup_steps"] + config["steps"]
        for guided in (False, True):
            step_ends = [time.perf_counter()]

            def record_step_end(pipe, step, timestep, callback_kwargs):
                step_ends.append(time.perf_counter())
                return {}

            pipeline(
                class_labels=labels,
                num_inference_steps=num_steps,
                guidance_scale=3.0 if guided else 1.0,
                generator=generator,
                output_type="pt",
                callback_on_step_end=record_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            )
            # the first interval also holds the set-up before the loop: it is one of the warm-up steps
            times = [end - start for start, end in zip(step_ends[:-1], step_ends[1:])][config["warmup_steps"] :]
            result["guided_images_per_second" if guided else "images_per_second"] = batch / statistics.median(times)
    # ru_maxrss is in KiB on Linux
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_mib"] = peak_rss / 1024
    result["phase_rss_mib"] = (peak_rss - setup_rss) / 1024
    return result


def median_of(results: list[dict], model: str, resolution: int, phase: str, key: str) -> float:
    values = [
        r[key] for r in results if (r["model"], r["resolution"], r["phase"]) == (model, resolution, phase) and key in r
    ]
    return statistics.median(values)


def markdown(args: argparse.Namespace, info: dict, results: list[dict]) -> str:
    lines = [
        f"# Speed: sculptdiff vs stock diffusers at equal parameters ({info['date']})",
        "",
        *harness.header_lines(info["command"], info["machine"], info["load"]),
        f"- torch threads per worker: {args.threads or 'default'}",
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
    info = harness.results_header(args)
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
    info["load"]["end"] = os.getloadavg()
    base = Path(args.output_dir) / f"speed-{info['date'][:10]}{'-quick' if args.quick else ''}"
    text = markdown(args, info, results)
    harness.write_results(base, text, {"info": info, "args": vars(args), "results": results})
    print(text)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker is not None:
        print(json.dumps(run_worker(json.loads(arguments.worker))))
    else:
        main(arguments)
