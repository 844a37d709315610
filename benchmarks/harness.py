# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""What every benchmark shares: the machine, the load, the command line, results files written atomically, and the
models compared (the recipe's digits U-Net and the stock diffusers references).

Each script imports this sibling module (`import harness`: Python puts a script's folder on `sys.path`); no benchmark
imports another benchmark.
"""

import argparse
import datetime
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel

from sculptdiff.models.transformers.dit_sculpt import SculptDiT2DModel
from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.training.atomic_files import write_bytes, write_text
from sculptdiff.training.data import collate_fn
from sculptdiff.training.objective import diffusion_loss
from sculptdiff.training.recipe import RECIPE, build_dit, build_ema, build_unet


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
NUM_CLASSES = 10


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The command that started this process, as one would type it from the repository root (quoted: copy-pasteable
    even with arguments such as `--samplers "ours (SculptScheduler eta=0)"`)."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:])


class BenchmarkParser(argparse.ArgumentParser):
    """The argument parser every benchmark starts from: --threads, --output_dir (where `results` are written),
    --quick and, given its help text, --seed. With `train_minutes` (its default), the flags of a benchmark that trains
    and scores: --train_minutes, --num_samples and --model_dir. With --quick the parsed arguments take the smoke
    test's `quick` settings (argument name -> value; 15 s of training and 100 samples for a training benchmark),
    whatever else the command line says."""

    def __init__(
        self, description: str, results: str, quick: dict, seed: str | None = None, train_minutes: float | None = None
    ):
        super().__init__(description=description, formatter_class=argparse.RawTextHelpFormatter)
        self.counts = []
        if seed is not None:
            self.add_argument("--seed", type=int, default=0, help=seed)
        self.add_argument(
            "--threads",
            type=int,
            default=None,
            help=(
                "torch intra-op threads (default: torch's choice, the core count). On a loaded shared machine use 1:"
                " OpenMP threads that wait for each other made training 5x slower at load 7 on 2 cores."
            ),
        )
        self.add_argument("--output_dir", type=str, default=str(RESULTS_DIR), help=f"Where {results} are written.")
        if train_minutes is not None:
            self.add_argument(
                "--train_minutes",
                type=float,
                default=train_minutes,
                help="Wall-clock training budget per model, in minutes.",
            )
            self.add_argument(
                "--num_samples", type=int, default=500, help="Images per scored set (and per calibration set)."
            )
            self.add_argument(
                "--model_dir",
                type=str,
                default=None,
                help="Where the trained EMA models are saved (save_pretrained folders); default: a folder in the temp"
                " dir.",
            )
            quick = {"train_minutes": 0.25, "num_samples": 100, **quick}
        self.quick = quick
        settings = " ".join(
            f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else f'{value:g}'}"
            for name, value in quick.items()
        )
        self.add_argument("--quick", action="store_true", help=f"Smoke test, as {settings}.")

    def add_count(self, name: str, default: int, help: str):
        """An int flag `--<name>` that must be >= 1 (a count of steps, seeds, rounds, images...)."""
        self.add_argument(f"--{name}", type=int, default=default, help=help)
        self.counts.append(name)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        if parsed.quick:
            for name, value in self.quick.items():
                setattr(parsed, name, value)
        for name in self.counts:
            if getattr(parsed, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(parsed, name)}.")
        if "train_minutes" in parsed and parsed.train_minutes <= 0:
            raise ValueError(f"--train_minutes must be > 0, got {parsed.train_minutes}.")
        if "train_minutes" in parsed and parsed.num_samples < 20:
            raise ValueError(
                f"--num_samples must be >= 20 (k-NN and covariances need samples), got {parsed.num_samples}."
            )
        return parsed


def results_header(args: argparse.Namespace) -> dict:
    """What every results file starts with: date, command, machine, load average at the start and the arguments.
    Build it after `torch.set_num_threads`: the machine info records the thread count."""
    return {
        "date": utc_now(),
        "command": command_line(),
        "machine": machine_info(),
        "load": {"start": os.getloadavg()},
        "args": vars(args),
    }


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def header_lines(command: str, machine: dict, loads: dict[str, tuple[float, float, float]]) -> list[str]:
    """The markdown lines every results file starts with: command, machine and load averages (name -> 1/5/15 min).
    A load above 0 means other jobs shared the cores while the numbers were taken."""
    return [
        f"- Command: `{command}`",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({machine['torch_threads']}"
        f" threads), diffusers {machine['diffusers']}, Python {machine['python']}",
        "- Load average (1/5/15 min): "
        + "; ".join(f"{name} {', '.join(f'{value:.1f}' for value in values)}" for name, values in loads.items()),
    ]


def table_header(columns: str) -> list[str]:
    """The first two lines of a markdown table: the column names (`columns`, separated by " | ") and the separator
    row."""
    return [f"| {columns} |", "|" + "---|" * (columns.count(" | ") + 1)]


def calibration_section(calibration: dict[str, dict[str, float]]) -> list[str]:
    """The results files' calibration section (nothing before it is measured): heading and `calibration_table`."""
    if not calibration:
        return []
    return ["", "## Calibration (what the numbers mean at this sample count)", "", *calibration_table(calibration)]


def calibration_table(calibration: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows of `DigitsEvaluator.calibrate`: the floor (real digits) as mean +- std over its draws, the noise
    band of an FD at that sample count, then the degraded sets."""
    lines = table_header("reference set | FD | precision | recall | class acc. | coverage | entropy")
    for name, m in calibration.items():
        fd = f"{m['fd']:.2f}" + (f" +- {m['fd_std']:.2f} ({m['num_draws']} draws)" if "fd_std" in m else "")
        lines.append(
            f"| {name} | {fd} | {m['precision']:.3f} | {m['recall']:.3f} | {m['class_accuracy']:.3f} |"
            f" {m['class_coverage']:.2f} | {m['class_entropy']:.3f} |"
        )
    return lines


def target_line(text: str, met: bool) -> str:
    """A verdict line of a results file: what was measured against which target, then **met** or **missed**."""
    return f"{text}: **{'met' if met else 'missed'}**"


def noise_band_lines(calibration: dict[str, dict[str, float]], num_samples: int) -> list[str]:
    """The verdicts' first line (none before the calibration is measured): the FD of real digits, the floor, and its
    noise band over the draws; FD differences below twice its std are noise."""
    floor = calibration.get("real train digits (floor)")
    if not floor:
        return []
    return [
        f"- Real digits score FD {floor['fd']:.2f} +- {floor['fd_std']:.2f} at N={num_samples} (the floor and its"
        f" noise band over {floor['num_draws']} draws): FD differences below {2 * floor['fd_std']:.2f} are noise."
    ]


def write_results(base: Path, markdown: str, data: dict | None = None):
    """`<base>.md` (and `<base>.json` from `data`), each written to a temporary name and renamed into place."""
    write_text(str(base.with_suffix(".md")), markdown)
    if data is not None:
        write_text(str(base.with_suffix(".json")), json.dumps(data, indent=2, default=str))


def save_figure(figure, path: Path, dpi: int = 120):
    """A matplotlib figure as a PNG, through the same atomic write as every other file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_bytes(str(path), buffer.getvalue())


def digits_model_config(resolution: int, prediction_type: str = RECIPE.prediction_type) -> dict:
    """What the built-in digits decide in a denoiser's config, as train_sculpt.py sets it for either backbone: size,
    1 channel, 10 classes, the objective, and the recipe's label dropout for guidance (in the class embedder)."""
    return {
        "sample_size": resolution,
        "in_channels": 1,
        "out_channels": 1,
        "num_class_embeds": NUM_CLASSES,
        "id2label": {str(index): str(index) for index in range(NUM_CLASSES)},
        "prediction_type": prediction_type,
        "conditioning_dropout_prob": RECIPE.conditioning_dropout_prob,
    }


def build_sculpt_digits_unet(
    resolution: int, prediction_type: str = RECIPE.prediction_type, **shape
) -> SculptUNet2DModel:
    """The recipe's class-conditional 1-channel U-Net for the digits (1,192,641 parameters), as train_sculpt.py
    builds it for the built-in data; `shape` overrides entries of the recipe's U-Net config (other sizes)."""
    return build_unet(**digits_model_config(resolution, prediction_type), **shape)


def build_sculpt_digits_dit(
    resolution: int, prediction_type: str = RECIPE.prediction_type, **shape
) -> SculptDiT2DModel:
    """The recipe's class-conditional 1-channel DiT for the digits (1,114,084 parameters), as train_sculpt.py
    `--model_type dit` builds it; `shape` overrides entries of the recipe's DiT config (other sizes)."""
    return build_dit(**digits_model_config(resolution, prediction_type), **shape)


def ddpm_cifar10_unet_config(base_width: int = 64, channels: int = 3, norm_num_groups: int = 32) -> dict:
    """diffusers' UNet2DModel in the layout of DDPM's CIFAR-10 model (`google/ddpm-cifar10-32`, base width 128):
    channel multipliers (1, 2, 2, 2), 2 residual blocks per level, single-head self-attention at the second level and
    in the mid block, additive time embedding. The standard pixel U-Net that diffusers ships and documents."""
    return {
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": (base_width, 2 * base_width, 2 * base_width, 2 * base_width),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": None,
        "norm_num_groups": norm_num_groups,
    }


class GuidableUNet2DModel(UNet2DModel):
    """diffusers' UNet2DModel unchanged, taking SculptPipeline's call: the pipeline passes `encoder_hidden_states`
    and `cross_attention_kwargs` (None for a class model), which UNet2DModel's `forward` does not accept."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True, **text_conditioning):
        return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)


def build_stock_digits_unet(resolution: int) -> GuidableUNet2DModel:
    """The stock side of the digits comparisons: DDPM's layout at base width 24, so that its size matches the recipe's
    U-Net (1,266,337 vs 1,192,641 parameters, +6.2%, the closest this layout gets), GroupNorm with 8 groups (24
    channels cannot make DDPM's 32), class-conditional.

    UNet2DModel has no null class for classifier-free guidance: its class embedding gets one more row, at index
    `num_class_embeds`, where SculptPipeline (like DiT's LabelEmbedder) looks for the null class. Its config keeps
    `num_class_embeds=10`, so a saved copy loads with `load_stock_digits_unet`, not `from_pretrained`.
    """
    unet = GuidableUNet2DModel(
        sample_size=resolution,
        num_class_embeds=NUM_CLASSES,
        **ddpm_cifar10_unet_config(base_width=24, channels=1, norm_num_groups=8),
    )
    unet.class_embedding = torch.nn.Embedding(NUM_CLASSES + 1, unet.class_embedding.embedding_dim)
    return unet


def load_stock_digits_unet(folder: Path) -> GuidableUNet2DModel:
    """A `build_stock_digits_unet` model saved with `save_pretrained` (the null row makes `from_pretrained` refuse
    it: the config says 10 classes, the weights hold 11 rows)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    unet = build_stock_digits_unet(config["sample_size"])
    unet.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"))
    return unet


def build_stock_noise_scheduler() -> DDPMScheduler:
    """diffusers' defaults, as its train_unconditional.py example uses them: linear betas 1e-4 .. 0.02, T = 1000."""
    return DDPMScheduler(num_train_timesteps=1000)


# Training and sampling the digits models, shared by the benchmarks that train (bench_families.py; bench_quality.py
# keeps its own loop until it moves here). Each step is the package's: `diffusion_loss`, backward, clipping, AdamW,
# EMA, with the recipe's settings.


def digits_train_dataset(resolution: int):
    """The models' part of the built-in digits (the 70% split of `digits_split_indices`; the held-out 30% is the
    metrics' reference), through the training data's transform: `pixel_values` in [-1, 1] and `class_labels`."""
    from sculptdiff.evaluation.digits import digits_split_indices
    from sculptdiff.training.data import ExampleTransform, ImageTransform, load_digits_dataset

    dataset = load_digits_dataset()
    train_index, _ = digits_split_indices(dataset["label"])
    dataset = dataset.select(train_index.tolist())
    dataset.set_transform(ExampleTransform(ImageTransform(resolution, "L"), "image", "label"))
    return dataset


# what may follow a timed run's warm-up (diffusers' names): the recipe's decay to zero over the budget, or the peak
TIMED_LR_SCHEDULERS = ("cosine", "constant_with_warmup")


@dataclass
class DiffusionRun:
    """One diffusion model under training: its network, objective, optimiser, EMA, data and clock. With a `vae`, it
    trains on the VAE's scaled latents of each batch (as train_sculpt.py does with --vae_name_or_path)."""

    name: str
    model: torch.nn.Module
    noise_scheduler: object
    objective: str  # a `diffusion_loss` prediction type: "epsilon", "flow", ...
    optimizer: torch.optim.Optimizer
    ema: object
    dataloader: torch.utils.data.DataLoader
    generator: torch.Generator
    drop_labels_in_loop: bool = False  # stock UNet2DModel: the loop does the null-class dropout
    vae: object = None
    # the peak learning rate, its linear warm-up and what follows (`TIMED_LR_SCHEDULERS`); a recipe probe may change
    # them
    learning_rate: float = RECIPE.learning_rate
    lr_warmup_steps: int = RECIPE.lr_warmup_steps
    lr_scheduler: str = RECIPE.lr_scheduler
    batches: object = None
    seconds: float = 0.0
    steps: int = 0
    epochs: int = 0
    losses: list = field(default_factory=list)

    def __post_init__(self):
        if self.lr_scheduler not in TIMED_LR_SCHEDULERS:
            raise ValueError(
                f"lr_scheduler {self.lr_scheduler!r}: a timed run knows {' and '.join(map(repr, TIMED_LR_SCHEDULERS))}."
            )

    def next_batch(self) -> dict:
        if self.batches is None:
            self.batches = iter(self.dataloader)
        try:
            return next(self.batches)
        except StopIteration:
            self.epochs += 1
            self.batches = iter(self.dataloader)
            return next(self.batches)

    def clean_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return pixel_values
        # grey digits into an RGB autoencoder: three equal channels, as PIL's "L" -> "RGB" conversion gives
        pixel_values = pixel_values.expand(-1, self.vae.config.in_channels, -1, -1)
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample(generator=self.generator)
        return latents * self.vae.config.scaling_factor

    def warm_up(self):
        """One untimed forward and backward: one-time kernel set-up must not land on one model's clock."""
        batch = next(iter(self.dataloader))
        latents = self.clean_batch(batch["pixel_values"])
        timesteps = torch.full((latents.shape[0],), 500)
        self.model(latents, timesteps, class_labels=batch["class_labels"]).sample.mean().backward()
        self.optimizer.zero_grad()

    def train_step(self, progress: float):
        """One optimisation step. `progress` (the spent fraction of the time budget) drives the learning rate: linear
        warm-up, then cosine decay over the budget (train_sculpt.py decays over --max_train_steps, unknown under a
        time budget) or, with `lr_scheduler="constant_with_warmup"`, the peak."""
        warmup = min(1.0, (self.steps + 1) / self.lr_warmup_steps)
        decay = 1.0
        if self.lr_scheduler == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate * warmup * decay
        batch = self.next_batch()
        class_labels = batch["class_labels"]
        if self.drop_labels_in_loop:
            # DiT's token_drop, with the recipe's probability, for a U-Net without label dropout of its own
            drop = torch.rand(class_labels.shape[0], generator=self.generator) < RECIPE.conditioning_dropout_prob
            class_labels = torch.where(drop, NUM_CLASSES, class_labels)
        loss = diffusion_loss(
            self.model,
            self.noise_scheduler,
            self.clean_batch(batch["pixel_values"]),
            self.objective,
            class_labels=class_labels,
            generator=self.generator,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), RECIPE.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.step(self.model.parameters())
        self.steps += 1
        self.losses.append(loss.item())

    def finish(self) -> torch.nn.Module:
        """The EMA weights copied into the model, in eval mode: what samples."""
        self.ema.copy_to(self.model.parameters())
        return self.model.eval().requires_grad_(False)


def build_diffusion_run(
    name: str,
    model: torch.nn.Module,
    noise_scheduler,
    objective: str,
    dataset,
    seed: int,
    drop_labels_in_loop: bool = False,
    vae=None,
    adam_beta2: float = RECIPE.adam_beta2,
    **schedule,
) -> DiffusionRun:
    """A `DiffusionRun` with the recipe's optimiser (AdamW; a probe may change its `adam_beta2`), EMA and batch
    size; `schedule` may set its `learning_rate`, `lr_warmup_steps` and `lr_scheduler`. Runs built with the same seed
    see the same batches in the same order and the same noise draws."""
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=RECIPE.learning_rate,
        betas=(RECIPE.adam_beta1, adam_beta2),
        weight_decay=RECIPE.adam_weight_decay,
        eps=RECIPE.adam_epsilon,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=RECIPE.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )
    return DiffusionRun(
        name,
        model,
        noise_scheduler,
        objective,
        optimizer,
        build_ema(model),
        dataloader,
        torch.Generator().manual_seed(seed + 1),
        drop_labels_in_loop=drop_labels_in_loop,
        vae=vae,
        **schedule,
    )


def train_interleaved(runs: list, budget_seconds: float, log, report_every: float = 60.0):
    """One step of each run in turn until each has used `budget_seconds` of its own clock (only its own steps count):
    load from other jobs then falls on all runs alike. A run is anything with `name`, `seconds`, `steps`, `losses`,
    `warm_up()` and `train_step(progress)`."""
    for run in runs:
        run.warm_up()
    next_report = report_every
    while any(run.seconds < budget_seconds for run in runs):
        for run in runs:
            if run.seconds >= budget_seconds:
                continue
            start = time.perf_counter()
            run.train_step(run.seconds / budget_seconds)
            run.seconds += time.perf_counter() - start
        elapsed = min(run.seconds for run in runs)
        if elapsed >= next_report:
            next_report += report_every
            log(
                "  ".join(
                    f"{run.name}: {run.steps} steps, loss(last 50) {mean_of_last(run.losses):.4f}" for run in runs
                )
                + f"  load {os.getloadavg()[0]:.1f}"
            )


def mean_of_last(values: list[float], count: int = 50) -> float:
    """The mean of the last `count` values (all of them when fewer)."""
    tail = values[-count:]
    return sum(tail) / max(1, len(tail))


def sample_digits(
    denoiser: torch.nn.Module,
    scheduler,
    num_steps: int,
    seed: int,
    class_labels: torch.Tensor | None = None,
    batch_size: int = 1,
    guidance_scale: float | None = 1.0,
    vae=None,
    guider=None,
) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] from SculptPipeline (for `class_labels`, or `batch_size` images of the null class when
    None; guided by `guidance_scale`, or by a diffusers `guider` as the pipeline's component, then `guidance_scale`
    None) and the denoiser evaluations per image, counted on the denoiser: a batched [uncond, cond] pass counts twice.
    """
    # a diffusion transformer is the pipeline's `transformer`; only it has a patch size (a class check would miss a
    # copy loaded from a saved folder's module)
    slot = "transformer" if "patch_size" in denoiser.config else "unet"
    pipeline = SculptPipeline(**{slot: denoiser}, scheduler=scheduler, vae=vae, guider=guider)
    pipeline.set_progress_bar_config(disable=True)
    evaluations = []

    def count(module, args, output):
        evaluations.append(args[0].shape[0])

    hook = denoiser.register_forward_hook(count)
    try:
        images = pipeline(
            class_labels=class_labels,
            batch_size=batch_size,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images
    finally:
        hook.remove()
    # the pipeline returns [0, 1]; the evaluator reads the training range [-1, 1]
    return images * 2 - 1, sum(evaluations) / len(images)
