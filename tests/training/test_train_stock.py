"""Fine-tuning the pipelines users already have (issue 18, part 3): a stock diffusers DDPMPipeline (a `UNet2DModel`,
the layout of google/ddpm-cifar10-32) is fine-tuned with `accelerate launch` as it is, and the result loads through
both doors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from test_train_sculpt import TINY_RUN, load_script, subprocess_env, train

from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory, build_tiny_stock_unet) -> Path:
    """A tiny DDPMPipeline saved by diffusers: an unconditional RGB UNet2DModel of 8-16 channels."""
    unet = build_tiny_stock_unet(norm_num_groups=4, attention_head_dim=8)
    folder = tmp_path_factory.mktemp("stock") / "ddpm-tiny"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fine_tuned(ddpm_folder, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("stock-run") / "ddpm-digits"
    # the built-in digits: the unconditional U-Net trains unconditionally, on the digits as RGB
    train(output_dir, "--max_train_steps", "2", model=TINY_RUN + ["--pretrained_model_name_or_path", str(ddpm_folder)])
    return output_dir


def sample(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images


def test_a_stock_unet_is_fine_tuned_as_it_is(ddpm_folder, fine_tuned):
    index = json.loads((fine_tuned / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"][1] == "SculptScheduler"
    before = UNet2DModel.from_pretrained(ddpm_folder, subfolder="unet")
    after = UNet2DModel.from_pretrained(fine_tuned, subfolder="unet")
    assert after.config.block_out_channels == before.config.block_out_channels
    changed = [
        name
        for (name, old), new in zip(before.state_dict().items(), after.state_dict().values())
        if not torch.equal(old, new)
    ]
    assert changed, "fine-tuning changed no weight"
    # the DDPM scheduler's settings carry over: its 100 training steps and its epsilon objective
    scheduler_config = json.loads((fine_tuned / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["num_train_timesteps"] == 100
    assert scheduler_config["prediction_type"] == "epsilon"
    assert "UNet2DModel (U-Net, 2 levels of 8, 16 channels)" in (fine_tuned / "README.md").read_text()


def test_the_fine_tuned_stock_pipeline_loads_through_both_doors(fine_tuned, tmp_path):
    pipe = SculptPipeline.from_pretrained(fine_tuned)
    assert type(pipe.unet) is UNet2DModel
    images = sample(pipe)
    assert images.shape == (2, 8, 8, 3)

    # diffusers alone, through the custom-code files saved beside the weights
    remote = tmp_path / "remote.npy"
    code = f"""
import sys
sys.modules["sculptdiff"] = None
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(fine_tuned)!r}, trust_remote_code=True)
assert type(pipe).__name__ == "SculptPipeline" and type(pipe.unet).__name__ == "UNet2DModel"
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
np.save({str(remote)!r}, images)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(remote), images)


def test_an_unsupported_denoiser_is_named_with_what_is_supported(tmp_path):
    folder = tmp_path / "pixart"
    folder.mkdir()
    index = {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    script = load_script()
    args = script.parse_args(["--output_dir", str(tmp_path / "out"), "--pretrained_model_name_or_path", str(folder)])
    message = (
        f"--pretrained_model_name_or_path {str(folder)!r} is a PixArtAlphaPipeline with `transformer`"
        " PixArtTransformer2DModel: the trainer fine-tunes a pipeline whose one denoiser (its `unet` or `transformer`)"
        " is one of SculptUNet2DModel, SculptDiT2DModel, UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        script.main(args)


def test_the_stock_unet_has_no_null_class_to_tune(ddpm_folder, tmp_path):
    script = load_script()
    args = script.parse_args(
        ["--output_dir", str(tmp_path / "out"), "--pretrained_model_name_or_path", str(ddpm_folder)]
        + ["--conditioning_dropout_prob", "0.2", "--report_to", "none"]
    )
    with pytest.raises(ValueError, match=r"the stock UNet2DModel of .* has no setting for it: drop the flag"):
        script.main(args)
