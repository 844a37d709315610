"""SculptScheduler swapped into stock diffusers pipelines (DDPMPipeline, StableDiffusionPipeline) with tiny real
components: it runs, and with settings equal to DDIMScheduler's or DDPMScheduler's it gives the same images."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler


PROMPT = "a photo of digit one"
# Stable Diffusion's own scheduler settings (steps_offset=1 and clip_sample=False, so that the pipeline does not
# rewrite the config)
SD_SCHEDULER_CONFIG = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def run_ddpm_pipeline(unet, scheduler, num_inference_steps=2) -> np.ndarray:
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=2, generator=generator, num_inference_steps=num_inference_steps, output_type="np").images


@pytest.fixture
def run_sd_pipeline(build_stable_diffusion, tiny_stock_text_unet):
    """`run_sd_pipeline(scheduler, output_type="np", **call_kwargs)`: PROMPT through the tiny StableDiffusionPipeline
    with `scheduler`, guided at 7.5, from seed 0, in 2 steps unless `call_kwargs` say otherwise."""

    def run(scheduler, output_type="np", **call_kwargs) -> np.ndarray:
        pipe = build_stable_diffusion(tiny_stock_text_unet, scheduler)
        generator = torch.Generator().manual_seed(0)
        call_kwargs = {"num_inference_steps": 2, **call_kwargs}
        return pipe(PROMPT, generator=generator, guidance_scale=7.5, output_type=output_type, **call_kwargs).images

    return run


def test_ddpm_pipeline_with_ddim_settings_matches_ddim(tiny_stock_unet):
    reference = run_ddpm_pipeline(tiny_stock_unet, DDIMScheduler())
    # DDIM's settings include keeping the model's noise after clipping x_0
    ours = run_ddpm_pipeline(tiny_stock_unet, SculptScheduler(use_clipped_model_output=False))
    assert ours.shape == (2, 8, 8, 3)
    assert np.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("reference_class", [DDPMScheduler, DDIMScheduler])
def test_swap_from_config_keeps_the_pipelines_sampler(tiny_stock_unet, reference_class):
    # the README's swap, `SculptScheduler.from_config(pipe.scheduler.config)`, in a 50-step DDPMPipeline loop with the
    # same generator: DDPM stays ancestral (eta = 1), DDIM stays DDIM (eta = 0, the model's noise kept after clipping)
    reference_scheduler = reference_class()
    reference = run_ddpm_pipeline(tiny_stock_unet, reference_scheduler, num_inference_steps=50)
    ours_scheduler = SculptScheduler.from_config(reference_scheduler.config)
    ours = run_ddpm_pipeline(tiny_stock_unet, ours_scheduler, num_inference_steps=50)
    assert ours_scheduler.config.eta == (1.0 if reference_class is DDPMScheduler else 0.0)
    assert np.abs(ours - reference).max() < 1e-5
    # the test can fail: the other sampler gives another image
    other_eta = 0.0 if reference_class is DDPMScheduler else 1.0
    other = run_ddpm_pipeline(
        tiny_stock_unet, SculptScheduler.from_config(reference_scheduler.config, eta=other_eta), num_inference_steps=50
    )
    assert np.abs(other - reference).max() > 0.1


def test_swap_in_a_ddpm_pipeline_loaded_from_a_folder(tiny_stock_unet, tmp_path):
    DDPMPipeline(unet=tiny_stock_unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config["_class_name"] == "DDPMScheduler"
    reference = run_ddpm_pipeline(pipe.unet, pipe.scheduler, num_inference_steps=20)
    ours = run_ddpm_pipeline(pipe.unet, SculptScheduler.from_config(pipe.scheduler.config), num_inference_steps=20)
    assert np.abs(ours - reference).max() < 1e-5


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_stable_diffusion_pipeline_matches_ddim(run_sd_pipeline, eta):
    # StableDiffusionPipeline passes its own `eta` (default 0.0) because `step` accepts one
    reference_scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    ours_scheduler = SculptScheduler.from_config(reference_scheduler.config)
    reference = run_sd_pipeline(reference_scheduler, eta=eta)
    ours = run_sd_pipeline(ours_scheduler, eta=eta)
    assert ours.shape == (1, 16, 16, 3)
    assert np.allclose(ours, reference, atol=1e-5)
    latents = run_sd_pipeline(ours_scheduler, output_type="latent", eta=eta)
    reference_latents = run_sd_pipeline(reference_scheduler, output_type="latent", eta=eta)
    assert latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(latents, reference_latents, atol=1e-5, rtol=1e-5)


def test_stable_diffusion_pipeline_custom_timesteps_match_ddpm(run_sd_pipeline):
    # retrieve_timesteps passes `timesteps=` to set_timesteps; DDIMScheduler does not accept it, DDPMScheduler does
    ddpm_config = {key: value for key, value in SD_SCHEDULER_CONFIG.items() if key != "set_alpha_to_one"}
    reference_scheduler = DDPMScheduler(**ddpm_config)
    ours_scheduler = SculptScheduler.from_config(reference_scheduler.config, eta=1.0)
    timesteps = [901, 501, 1]
    reference = run_sd_pipeline(reference_scheduler, output_type="latent", timesteps=timesteps)
    ours = run_sd_pipeline(ours_scheduler, output_type="latent", timesteps=timesteps, eta=1.0)
    assert ours_scheduler.timesteps.tolist() == timesteps
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_stable_diffusion_pipeline_refuses_sigmas(run_sd_pipeline):
    # SculptScheduler has no sigma parameterization: set_timesteps takes no `sigmas`, so the pipeline refuses it
    with pytest.raises(ValueError, match="sigmas"):
        run_sd_pipeline(SculptScheduler(**SD_SCHEDULER_CONFIG), num_inference_steps=None, sigmas=[1.0, 0.5])
