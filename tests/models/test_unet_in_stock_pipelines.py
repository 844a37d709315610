"""Contract: SculptUNet2DModel is a drop-in `unet` for diffusers' own DDPMPipeline and StableDiffusionPipeline."""

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

from sculptdiff.models.unet_sculpt import SculptUNet2DModel


def build_unet(**config) -> SculptUNet2DModel:
    """A tiny U-Net whose zero-initialised layers are drawn at random, so that its prediction is not zero."""
    torch.manual_seed(0)
    unet = SculptUNet2DModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        attention_levels=(False, True),
        attention_head_dim=8,
        norm_num_groups=4,
        **config,
    )
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return unet.eval()


def test_ddpm_pipeline_with_sculpt_unet():
    unet = build_unet(sample_size=8, in_channels=3, out_channels=3)
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)

    images = pipeline(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    repeated = pipeline(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )

    assert images.images.shape == (2, 8, 8, 3)
    assert np.isfinite(images.images).all()
    np.testing.assert_array_equal(images.images, repeated.images)


def build_stable_diffusion(tokenizer, text_encoder, vae) -> StableDiffusionPipeline:
    unet = build_unet(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32)
    # Stable Diffusion's scheduler settings
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_stable_diffusion_pipeline_with_sculpt_unet(tiny_tokenizer, tiny_text_encoder, tiny_vae):
    pipeline = build_stable_diffusion(tiny_tokenizer, tiny_text_encoder, tiny_vae)
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
