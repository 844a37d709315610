import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.training.recipe import build_noise_scheduler, build_unet
from sculptdiff.training.validation import log_grid, render_sample_grid


def tiny_pipeline(**config) -> SculptPipeline:
    torch.manual_seed(0)
    unet = build_unet(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), attention_levels=(False, True),
        attention_head_dim=8, norm_num_groups=4, prediction_type="epsilon", **config,
    ).eval()  # fmt: skip
    return SculptPipeline(unet=unet, scheduler=build_noise_scheduler(num_train_timesteps=100))


def test_class_grid_has_a_row_per_class_and_comes_from_its_seed_only():
    pipe = tiny_pipeline(num_class_embeds=12, conditioning_dropout_prob=0.1)
    state = torch.get_rng_state()
    grid = render_sample_grid(pipe, 3, 2, guidance_scale=2.0, seed=7, device=torch.device("cpu"), num_classes=12)
    # up to 10 rows, num_images columns, 8 px each
    assert grid.size == (3 * 8, 10 * 8)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    again = render_sample_grid(pipe, 3, 2, guidance_scale=2.0, seed=7, device=torch.device("cpu"), num_classes=12)
    assert np.array_equal(np.asarray(grid), np.asarray(again))
    other = render_sample_grid(pipe, 3, 2, guidance_scale=2.0, seed=8, device=torch.device("cpu"), num_classes=12)
    assert not np.array_equal(np.asarray(grid), np.asarray(other))


def test_unconditional_grid_has_four_rows_and_passes_eta():
    pipe = tiny_pipeline()
    grid = render_sample_grid(pipe, 2, 2, guidance_scale=1.0, seed=0, device=torch.device("cpu"))
    assert grid.size == (2 * 8, 4 * 8)
    ddim = render_sample_grid(pipe, 2, 2, guidance_scale=1.0, seed=0, device=torch.device("cpu"), eta=0.0)
    ddpm = render_sample_grid(pipe, 2, 2, guidance_scale=1.0, seed=0, device=torch.device("cpu"), eta=1.0)
    assert not np.array_equal(np.asarray(ddim), np.asarray(ddpm))


def test_log_grid_writes_to_tensorboard(tmp_path):
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    log_grid(accelerator, Image.new("L", (16, 8)).convert("RGB"), step=3)
    accelerator.end_training()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
