"""Contract: SculptUNet2DModel is a drop-in `unet` for diffusers' own DDPMPipeline and StableDiffusionPipeline."""

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler


def test_ddpm_pipeline_with_sculpt_unet(build_tiny_unet):
    # DDPMPipeline calls unet(sample, t): an unconditional RGB model
    unet = build_tiny_unet(in_channels=3, out_channels=3, num_class_embeds=None, id2label=None)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)

    images = pipeline(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images

    # DDPMPipeline's loop written out: our prediction goes to the scheduler as diffusers' UNet2DModel's would
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 3, 8, 8), generator=generator)
    scheduler.set_timesteps(2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = scheduler.step(unet(sample, t).sample, t, sample, generator=generator).prev_sample
    expected = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(images, expected, atol=1e-6)


def test_stable_diffusion_pipeline_with_sculpt_unet(build_tiny_unet, build_stable_diffusion):
    # Stable Diffusion's U-Net: the VAE's 4 latent channels, text through cross-attention, no classes
    unet = build_tiny_unet(in_channels=4, out_channels=4, num_class_embeds=None, id2label=None, cross_attention_dim=32)
    pipeline = build_stable_diffusion(unet)
    assert pipeline.vae_scale_factor == 2

    def generate(prompt: str, guidance_scale: float) -> np.ndarray:
        return pipeline(
            prompt,
            num_inference_steps=2,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    guided = generate("a photo of digit seven", 7.5)
    assert pipeline.do_classifier_free_guidance
    plain = generate("a photo of digit seven", 1.0)
    assert not pipeline.do_classifier_free_guidance
    other_prompt = generate("a photo of digit two", 1.0)

    # default size: unet.config.sample_size (8) * vae_scale_factor (2)
    for images in (guided, plain, other_prompt):
        assert images.shape == (1, 16, 16, 3)
        assert np.isfinite(images).all()
    # guidance and the prompt reach the U-Net
    assert not np.allclose(guided, plain)
    assert not np.allclose(plain, other_prompt)
    np.testing.assert_array_equal(generate("a photo of digit seven", 7.5), guided)
