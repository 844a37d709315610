"""Latent diffusion on our own autoencoder: train_vae.py a few steps, then train_sculpt.py --vae_name_or_path on its
latents, and the saved pipeline samples through the VAE's decoder from both loading doors."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from test_train_sculpt import TINY, TINY_DIT, train
from test_train_vae import train_vae

from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A 2-level autoencoder (f = 2) trained 2 steps on 16 px digits: 8x8x4 latents."""
    output_dir = tmp_path_factory.mktemp("latent") / "vae"
    train_vae(output_dir, "--max_train_steps", "2", "--resolution", "16")
    return output_dir


@pytest.mark.parametrize("model, component", [(TINY, "unet"), (TINY_DIT, "transformer")], ids=["unet", "dit"])
def test_latent_pipeline_samples_through_the_vae_from_both_doors(vae_dir, tmp_path, model, component):
    output_dir = tmp_path / "latent-digits"
    train(output_dir, "--max_train_steps", "2", "--resolution", "16", "--vae_name_or_path", str(vae_dir), model=model)

    vae = AutoencoderKL.from_pretrained(vae_dir)
    config = json.loads((output_dir / component / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"], config["sample_size"]) == (4, 4, 8)
    # latents are not confined to [-1, 1]: no x_0 clipping
    assert json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False

    pipes = [
        SculptPipeline.from_pretrained(output_dir),
        DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True),
    ]
    images = []
    for pipe in pipes:
        # the shipped VAE is the trained one, with the scale measured on the data
        assert pipe.vae.config.scaling_factor == vae.config.scaling_factor != 0.18215
        assert pipe.vae_scale_factor == 2
        pipe.set_progress_bar_config(disable=True)
        generator = torch.manual_seed(0)
        images.append(pipe(class_labels=[1, 7], num_inference_steps=2, generator=generator, output_type="np").images)
    assert images[0].shape == (2, 16, 16, 1) and np.isfinite(images[0]).all()
    np.testing.assert_array_equal(images[0], images[1])

    # sampling ends in the VAE's decoder: the images are the decode of the unscaled final latents
    pipe = pipes[0]
    latents = pipe(
        class_labels=[1, 7], num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent"
    ).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    expected = pipe.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_allclose(images[0], expected, atol=1e-6)
