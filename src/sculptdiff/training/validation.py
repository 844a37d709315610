# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Sample grids during and after training: rendered from a fixed seed with the pipeline being trained, so that grids
of different steps compare, and drawn from a private generator, so that rendering never changes the training stream.
"""

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from diffusers.utils import make_image_grid


def render_sample_grid(
    pipeline,
    num_images: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    device: torch.device,
    num_classes: int | None = None,
    prompts: list[str] | None = None,
    eta: float | None = None,
) -> PIL.Image.Image:
    """A grid of `num_images` samples per row: one row per class (up to 10) for a class model, one per prompt for a
    text model, otherwise 4 rows of unconditional samples.

    Args:
        pipeline: a SculptPipeline (or any pipeline taking `class_labels` / `prompt` / `batch_size` likewise).
        num_images: the number of columns.
        num_inference_steps: the sampling steps.
        guidance_scale: the classifier-free guidance scale (1 for none).
        seed: the seed of the private generator.
        device: where the generator lives (the pipeline's device).
        num_classes: the number of classes of a class-conditional model.
        prompts: the prompts of a text model.
        eta: the sampler's eta, for schedulers that take one (`None` keeps the scheduler's own).
    """
    pipeline.set_progress_bar_config(disable=True)
    common = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": torch.Generator(device=device).manual_seed(seed),
    }
    if eta is not None:
        common["eta"] = eta
    if num_classes is not None:
        rows = min(num_classes, 10)
        labels = [label for label in range(rows) for _ in range(num_images)]
        images = pipeline(class_labels=labels, **common).images
    elif prompts is not None:
        rows = len(prompts)
        images = pipeline(prompt=prompts, num_images_per_prompt=num_images, **common).images
    else:
        rows = 4
        images = pipeline(batch_size=rows * num_images, **common).images
    return make_image_grid(images, rows=rows, cols=num_images)


def log_grid(accelerator: Accelerator, grid: PIL.Image.Image, step: int, tag: str = "samples"):
    """Log a grid to the run's TensorBoard tracker, if it has one."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
