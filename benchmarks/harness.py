# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""What every benchmark shares: the machine, the load, the command line, results files written atomically, and the
models compared (the recipe's digits U-Net and the stock diffusers references).

Each script imports this sibling module (`import harness`: Python puts a script's folder on `sys.path`); no benchmark
imports another benchmark.
"""

import datetime
import io
import json
import os
import platform
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel

from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.training.atomic_files import write_bytes, write_text
from sculptdiff.training.recipe import RECIPE, build_unet


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
NUM_CLASSES = 10


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The command that started this process, as one would type it from the repository root."""
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:])


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


def calibration_table(calibration: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows of `DigitsEvaluator.calibrate`: the floor (real digits) as mean +- std over its draws, the noise
    band of an FD at that sample count, then the degraded sets."""
    lines = [
        "| reference set | FD | precision | recall | class acc. | coverage | entropy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in calibration.items():
        fd = f"{m['fd']:.2f}" + (f" +- {m['fd_std']:.2f} ({m['num_draws']} draws)" if "fd_std" in m else "")
        lines.append(
            f"| {name} | {fd} | {m['precision']:.3f} | {m['recall']:.3f} | {m['class_accuracy']:.3f} |"
            f" {m['class_coverage']:.2f} | {m['class_entropy']:.3f} |"
        )
    return lines


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


def build_sculpt_digits_unet(resolution: int, prediction_type: str = RECIPE.prediction_type) -> SculptUNet2DModel:
    """The recipe's class-conditional 1-channel U-Net for the digits (1,192,641 parameters), as train_sculpt.py
    builds it for the built-in data; label dropout for guidance lives in its class embedder."""
    return build_unet(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        num_class_embeds=NUM_CLASSES,
        id2label={str(index): str(index) for index in range(NUM_CLASSES)},
        prediction_type=prediction_type,
        conditioning_dropout_prob=RECIPE.conditioning_dropout_prob,
    )


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
