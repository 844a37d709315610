import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    BitsAndBytesConfig,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.quantizers import PipelineQuantizationConfig
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file, save_file

from sculptdiff import SculptFlowScheduler, SculptPipeline, SculptScheduler, SculptUNet2DModel


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def text_pipeline(build_tiny_text_pipeline) -> SculptPipeline:
    """The tiny pipeline conditioned on text (cross-attention to the tiny CLIP encoder) instead of classes."""
    return build_tiny_text_pipeline()


def generate(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(**kwargs).images


def sample_by_hand(pipe, batch_size, class_labels=None, guidance_scale=1.0, num_inference_steps=2) -> np.ndarray:
    """The sampling loop written out with the pipeline's U-Net and scheduler, from the noise of seed 0: per step
    eps_uncond + w * (eps_cond - eps_uncond) (the conditional prediction alone when w = 1), then the scheduler's
    step (which takes the same generator when it draws noise); images as numpy in [0, 1]."""
    unet, scheduler = pipe.unet, pipe.scheduler
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(num_inference_steps)
    latents = torch.randn((batch_size, 1, 8, 8), generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = (
                scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            )
            if guidance_scale == 1.0:
                model_output = unet(model_input, t, class_labels=class_labels).sample
            else:
                # one batch [uncond, cond] as the pipeline runs it, so that float32 rounds the same way
                labels = torch.cat([torch.full((batch_size,), unet.config.num_class_embeds), class_labels])
                model_output_uncond, model_output_cond = unet(
                    torch.cat([model_input] * 2), t, class_labels=labels
                ).sample.chunk(2)
                model_output = model_output_uncond + guidance_scale * (model_output_cond - model_output_uncond)
            latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
    return (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


class DenoiserCalls:
    """Records the batch size of every denoiser forward pass through a forward hook on the real module."""

    def __init__(self, denoiser):
        self.batch_sizes = []
        self.handle = denoiser.register_forward_hook(self.record)

    def record(self, module, args, output):
        self.batch_sizes.append(args[0].shape[0])


# classifier-free guidance


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
# w = 0 is the unconditional branch alone, 0 < w < 1 interpolates, w > 1 extrapolates: one formula for all
@pytest.mark.parametrize("guidance_scale", [0.0, 0.5, 4.0])
def test_guided_step_equals_the_formula(prediction_type, guidance_rescale, guidance_scale, build_tiny_pipeline):
    pipe = build_tiny_pipeline(prediction_type=prediction_type)
    pipe.scheduler = SculptScheduler(prediction_type=prediction_type)
    labels = torch.tensor([1, 3])

    latents = pipe(
        class_labels=labels,
        num_inference_steps=1,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images

    # by hand: eps = eps_uncond + w * (eps_cond - eps_uncond), the null class being index num_class_embeds
    scheduler = SculptScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model_output_cond = pipe.unet(noise, t, class_labels=labels).sample
        model_output_uncond = pipe.unet(noise, t, class_labels=torch.tensor([5, 5])).sample
    guided = model_output_uncond + guidance_scale * (model_output_cond - model_output_uncond)
    if guidance_rescale > 0:
        guided = rescale_noise_cfg(guided, model_output_cond, guidance_rescale)
    expected = scheduler.step(guided, t, noise).prev_sample

    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents, scheduler.step(model_output_cond, t, noise).prev_sample, atol=1e-3)


def test_guidance_one_makes_one_unet_call_per_step_with_batch_b(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    calls = DenoiserCalls(pipe.unet)
    generate(pipe, class_labels=[0, 1, 2], num_inference_steps=3, guidance_scale=1.0)
    assert calls.batch_sizes == [3, 3, 3]


def test_guidance_above_one_makes_one_unet_call_per_step_with_batch_2b(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    calls = DenoiserCalls(pipe.unet)
    generate(pipe, class_labels=[0, 1, 2], num_inference_steps=3, guidance_scale=2.5)
    assert calls.batch_sizes == [6, 6, 6]


def test_guidance_one_equals_plain_conditional_sampling(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    unguided = generate(pipe, class_labels=[0, 4], guidance_scale=1.0)
    guided = generate(pipe, class_labels=[0, 4], guidance_scale=2.0)
    assert not np.allclose(unguided, guided, atol=1e-4)
    # w -> 1 from above converges to the unguided result: the formula, not a switch, decides
    nearly_unguided = generate(pipe, class_labels=[0, 4], guidance_scale=1.0 + 1e-6)
    np.testing.assert_allclose(nearly_unguided, unguided, atol=1e-4)


# generation modes and arguments


def test_unconditional_generation(build_tiny_pipeline):
    pipe = build_tiny_pipeline(num_class_embeds=None, id2label=None, conditioning_dropout_prob=0.0)
    images = generate(pipe, batch_size=3)
    assert images.shape == (3, 8, 8, 1)
    # the U-Net called without a condition, step by step: the images are the model's, not just any in [0, 1]
    np.testing.assert_allclose(images, sample_by_hand(pipe, batch_size=3), atol=1e-6)


def test_class_names_and_ids_are_the_same_condition(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    by_id = generate(pipe, class_labels=[2, 4], guidance_scale=3.0)
    by_name = generate(pipe, class_labels=["two", "four"], guidance_scale=3.0)
    np.testing.assert_array_equal(by_id, by_name)
    other = generate(pipe, class_labels=[1, 4], guidance_scale=3.0)
    assert not np.allclose(other[0], by_id[0])
    np.testing.assert_allclose(other[1], by_id[1], atol=1e-6)


def test_generator_makes_it_deterministic(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    first = generate(pipe, class_labels=[1, 2], guidance_scale=2.0)
    second = generate(pipe, class_labels=[1, 2], guidance_scale=2.0)
    third = generate(pipe, class_labels=[1, 2], guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, third)


def test_num_images_per_prompt_and_a_list_of_generators(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    images = generate(pipe, class_labels=[1, 2], num_images_per_prompt=3)
    assert images.shape == (6, 8, 8, 1)

    generators = [torch.Generator().manual_seed(seed) for seed in (10, 11, 12, 13)]
    batched = generate(pipe, class_labels=[1, 3], num_images_per_prompt=2, generator=generators)
    # image k depends on generator k alone: the second image of class 3 alone reproduces it
    alone = generate(pipe, class_labels=[3], generator=[torch.Generator().manual_seed(13)])
    np.testing.assert_allclose(batched[3], alone[0], atol=1e-5)

    with pytest.raises(ValueError, match="list of 3 generators"):
        generate(pipe, class_labels=[1, 3], generator=[torch.Generator()] * 3)


def test_latents_in_give_the_same_output(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    latents = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    from_generator = generate(pipe, class_labels=[1, 2])
    from_latents = generate(pipe, class_labels=[1, 2], latents=latents, generator=None)
    np.testing.assert_array_equal(from_generator, from_latents)
    with pytest.raises(ValueError, match="`latents` have shape"):
        generate(pipe, class_labels=[1, 2], latents=latents[:1])


def test_every_output_type(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    as_np = generate(pipe, class_labels=[1, 2])
    as_pt = generate(pipe, class_labels=[1, 2], output_type="pt")
    as_pil = generate(pipe, class_labels=[1, 2], output_type="pil")
    latent = generate(pipe, class_labels=[1, 2], output_type="latent")
    assert as_pt.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    assert all(isinstance(image, Image.Image) and image.size == (8, 8) for image in as_pil)
    np.testing.assert_allclose((latent / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    (images,) = pipe(class_labels=[1], num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (1, 8, 8, 1)


def test_callback_reads_and_replaces_latents(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    seen = []

    def zero_latents_after_first_step(pipeline, step, timestep, callback_kwargs):
        seen.append((step, int(timestep), callback_kwargs["latents"].shape))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 0 else {}

    pipe(class_labels=[1, 2], num_inference_steps=2, callback_on_step_end=zero_latents_after_first_step)
    assert [(step, shape) for step, _, shape in seen] == [(0, (2, 1, 8, 8)), (1, (2, 1, 8, 8))]

    # the second step ran on the replaced latents: the same as running it by hand from zeros
    images = generate(pipe, class_labels=[1, 2], callback_on_step_end=zero_latents_after_first_step, output_type="pt")
    scheduler = SculptScheduler()
    scheduler.set_timesteps(2)
    zeros = torch.zeros((2, 1, 8, 8))
    with torch.no_grad():
        model_output = pipe.unet(zeros, scheduler.timesteps[1], class_labels=torch.tensor([1, 2])).sample
    expected = scheduler.step(model_output, scheduler.timesteps[1], zeros).prev_sample
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_custom_timesteps(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    calls = DenoiserCalls(pipe.unet)
    generate(pipe, class_labels=[1], timesteps=[900, 500, 100])
    assert len(calls.batch_sizes) == 3
    assert pipe.scheduler.timesteps.tolist() == [900, 500, 100]


@pytest.mark.parametrize(
    "scheduler_class",
    [
        SculptScheduler,
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    ],
)
def test_guided_sampling_with_the_diffusion_schedulers_of_diffusers(scheduler_class, build_tiny_pipeline):
    # each scheduler's input scaling, initial noise sigma, multistep state and noise draws (DDPM, Euler) are used
    # as its own pipelines use them: the pipeline equals the guided loop written out with that scheduler
    pipe = build_tiny_pipeline()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    images = generate(pipe, class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=3)
    expected = sample_by_hand(pipe, 2, torch.tensor([1, 2]), guidance_scale=2.0, num_inference_steps=3)
    # float32 rounding of a 3-step chain reaches ~1e-5 (the pipeline passes the timestep as a batch, the loop as a
    # scalar); a missing scaling, noise draw or guidance term moves pixels by far more than 1e-4
    np.testing.assert_allclose(images, expected, atol=1e-4)


@pytest.mark.parametrize("scheduler_class", [SculptFlowScheduler, FlowMatchEulerDiscreteScheduler])
def test_flow_model_samples_with_flow_schedulers(scheduler_class, build_tiny_pipeline):
    # guidance on the predicted velocity, then the flow scheduler's step (no input scaling): the loop written out
    pipe = build_tiny_pipeline(prediction_type="flow")
    pipe.scheduler = scheduler_class()
    images = generate(pipe, class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=3)
    expected = sample_by_hand(pipe, 2, torch.tensor([1, 2]), guidance_scale=2.0, num_inference_steps=3)
    # float32 rounding of a 3-step chain reaches ~1e-5 (the pipeline passes the timestep as a batch, the loop as a
    # scalar); a missing scaling, noise draw or guidance term moves pixels by far more than 1e-4
    np.testing.assert_allclose(images, expected, atol=1e-4)


def test_guidance_zero_samples_with_the_null_condition(text_pipeline):
    # w = 0 leaves eps_uncond alone: the same images as plain sampling with the null condition (the empty prompt)
    pipe = text_pipeline
    unconditional = generate(pipe, prompt="digit two", guidance_scale=0.0)
    null_condition = generate(pipe, prompt="", guidance_scale=1.0)
    np.testing.assert_allclose(unconditional, null_condition, atol=1e-5)
    assert not np.allclose(unconditional, generate(pipe, prompt="digit two", guidance_scale=1.0), atol=1e-4)


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"guidance_scale": float("nan")}, "`guidance_scale` must be a finite number >= 0"),
        ({"guidance_scale": float("inf")}, "`guidance_scale` must be a finite number >= 0"),
        ({"guidance_scale": -1.0}, "`guidance_scale` must be a finite number >= 0"),
        ({"guidance_scale": 2.0, "guidance_rescale": -0.1}, r"`guidance_rescale` must be a number in \[0, 1\]"),
        ({"guidance_scale": 2.0, "guidance_rescale": 1.5}, r"`guidance_rescale` must be a number in \[0, 1\]"),
        (
            {"guidance_scale": 2.0, "guidance_rescale": float("nan")},
            r"`guidance_rescale` must be a number in \[0, 1\]",
        ),
    ],
)
def test_bad_guidance_values_are_refused(arguments, match, build_tiny_pipeline):
    with pytest.raises(ValueError, match=match):
        generate(build_tiny_pipeline(), class_labels=[1], **arguments)


def test_cross_attention_kwargs_reach_the_unet_and_scale_lora(text_pipeline):
    pipe = text_pipeline
    base = generate(pipe, prompt="digit two", guidance_scale=2.0)
    target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=target_modules))
    with_lora = generate(pipe, prompt="digit two", guidance_scale=2.0)
    assert not np.allclose(with_lora, base, atol=1e-4)
    # a LoRA scale set at call time: 0 switches the adapter off, 1 is the adapter as loaded
    np.testing.assert_allclose(
        generate(pipe, prompt="digit two", guidance_scale=2.0, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-6
    )
    np.testing.assert_array_equal(
        generate(pipe, prompt="digit two", guidance_scale=2.0, cross_attention_kwargs={"scale": 1.0}), with_lora
    )


def test_sd_cfg_cutoff_callback_stops_guidance(text_pipeline):
    pipe = text_pipeline
    calls = DenoiserCalls(pipe.unet)
    images = generate(
        pipe,
        prompt="digit two",
        guidance_scale=3.0,
        num_inference_steps=3,
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0),
        output_type="latent",
    )
    # guided on the first step (two branches), plain conditional sampling after the cutoff (one branch)
    assert calls.batch_sizes == [2, 1, 1]

    # the same three steps by hand: w = 3 on the first, the conditional prediction alone on the others
    scheduler = SculptScheduler()
    scheduler.set_timesteps(3)
    cond, uncond = pipe.encode_prompt("digit two", torch.device("cpu"))
    latents = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model_output = pipe.unet(latents, t, encoder_hidden_states=cond).sample
            if i == 0:
                model_output_uncond = pipe.unet(latents, t, encoder_hidden_states=uncond).sample
                model_output = model_output_uncond + 3.0 * (model_output - model_output_uncond)
            latents = scheduler.step(model_output, t, latents).prev_sample
    # (batch 2 on the first step against two batch-1 passes here: float32 rounding differs slightly)
    torch.testing.assert_close(images, latents, rtol=1e-4, atol=1e-4)


def test_encode_prompt_gives_the_null_branch_by_default(text_pipeline):
    pipe = text_pipeline
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt("digit two", torch.device("cpu"))
    torch.testing.assert_close(negative_prompt_embeds, pipe.encode_prompt("", torch.device("cpu"))[0])
    assert not torch.allclose(prompt_embeds, negative_prompt_embeds)
    assert pipe.encode_prompt("digit two", torch.device("cpu"), do_classifier_free_guidance=False)[1] is None
    # the device defaults to the pipeline's, as in diffusers' SD3 and PixArt pipelines
    torch.testing.assert_close(pipe.encode_prompt("digit two")[0], prompt_embeds)


# text and latents


def test_text_to_image(text_pipeline):
    pipe = text_pipeline
    images = generate(pipe, prompt=["a photo of digit seven", "digit one"], guidance_scale=3.0)
    assert images.shape == (2, 8, 8, 1)

    with_negative = generate(
        pipe, prompt=["a photo of digit seven", "digit one"], negative_prompt="digit eight", guidance_scale=3.0
    )
    assert not np.allclose(images, with_negative, atol=1e-4)


def test_prompt_embeds_equal_the_prompt_path(text_pipeline):
    pipe = text_pipeline
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        ["digit two"], torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt="digit five"
    )
    from_prompt = generate(pipe, prompt="digit two", negative_prompt="digit five", guidance_scale=2.0)
    from_embeds = generate(
        pipe, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, guidance_scale=2.0
    )
    np.testing.assert_array_equal(from_prompt, from_embeds)

    # the null condition of a text model is the empty prompt
    _, empty = pipe.encode_prompt(["digit two"], torch.device("cpu"), do_classifier_free_guidance=True)
    torch.testing.assert_close(empty, pipe.encode_prompt([""], torch.device("cpu"))[0])


def test_latent_space_with_a_vae(build_tiny_text_pipeline, tiny_vae):
    vae = tiny_vae
    pipe = build_tiny_text_pipeline(vae=vae, in_channels=4, out_channels=4)
    assert pipe.vae_scale_factor == 2

    images = generate(pipe, prompt="digit three", guidance_scale=2.0)
    latents = generate(pipe, prompt="digit three", guidance_scale=2.0, output_type="latent")
    assert images.shape == (1, 16, 16, 3)
    assert latents.shape == (1, 4, 8, 8)
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    np.testing.assert_allclose(images, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 4"):
        generate(pipe, prompt="digit three", height=18, width=16)


# saving and loading, through both doors


def test_save_and_load_through_both_doors(tmp_path, build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    expected = generate(pipe, class_labels=[1, 2], guidance_scale=3.0)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)

    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == ["pipeline_sculpt", "SculptPipeline"]
    assert model_index["unet"] == ["sculptdiff.models.unet_sculpt", "SculptUNet2DModel"]
    assert (folder / "pipeline_sculpt.py").is_file()
    assert (folder / "unet" / "sculptdiff.models.unet_sculpt.py").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.glob("**/*.bin"))

    loaded = SculptPipeline.from_pretrained(folder)
    assert type(loaded) is SculptPipeline and type(loaded.unet) is SculptUNet2DModel
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(loaded, class_labels=[1, 2], guidance_scale=3.0), expected)

    # the trust_remote_code door, in a fresh process in which sculptdiff cannot be imported
    script = f"""
import sys
sys.modules["sculptdiff"] = None  # prove that the saved folder needs only diffusers
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert type(pipe).__name__ == "SculptPipeline" and type(pipe.unet).__name__ == "SculptUNet2DModel"
images = pipe(class_labels=[1, 2], guidance_scale=3.0, num_inference_steps=2, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
np.save({str(tmp_path / "remote.npy")!r}, images)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "remote.npy"), expected)


def test_text_pipeline_round_trip(tmp_path, text_pipeline):
    pipe = text_pipeline
    expected = generate(pipe, prompt="digit nine", guidance_scale=2.0)
    pipe.save_pretrained(tmp_path)
    loaded = SculptPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(loaded, prompt="digit nine", guidance_scale=2.0), expected)


def test_save_keeps_other_files_and_replaces_components(tmp_path, build_tiny_pipeline):
    (tmp_path / "README.md").write_text("my model card")
    (tmp_path / "checkpoint-10").mkdir()
    build_tiny_pipeline().save_pretrained(tmp_path)
    second = build_tiny_pipeline(layers_per_block=2)
    second.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my model card"
    assert (tmp_path / "checkpoint-10").is_dir()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp") or ".old-" in name]
    assert SculptPipeline.from_pretrained(tmp_path).unet.config.layers_per_block == 2


def test_a_folder_saved_by_version_0_1_keeps_loading(tmp_path):
    """The committed fixture holds the config files written by sculptdiff 0.1; the weights are generated here."""
    folder = tmp_path / "v0.1"
    shutil.copytree(FIXTURES / "sculpt_pipeline_v0.1", folder)
    torch.manual_seed(0)
    unet = SculptUNet2DModel.from_config(SculptUNet2DModel.load_config(folder / "unet"))
    unet.save_pretrained(folder / "unet")

    pipe = SculptPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is SculptScheduler
    assert pipe.unet.config.id2label[3] == "3"
    torch.testing.assert_close(pipe.unet.state_dict(), unet.state_dict(), rtol=0, atol=0)
    images = generate(pipe, class_labels=["3", 7], guidance_scale=3.0)
    assert images.shape == (2, 16, 16, 1)


class CodeRunningPayload:
    """A pickle payload whose unpickling would create `marker`: proof of code execution if it ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def load_in_fresh_process_without_sculptdiff(folder, **kwargs) -> subprocess.CompletedProcess:
    """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **kwargs)` where sculptdiff is unimportable."""
    script = f"""
import sys
sys.modules["sculptdiff"] = None
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True, **{kwargs!r})
print(type(pipe.unet).__name__, pipe.unet.dtype)
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))


def test_pickle_weights_load_as_tensors_only_and_strict_safetensors_says_how(tmp_path, build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()

    # diffusers' contract: use_safetensors=None prefers safetensors and falls back to the .bin (weights_only=True)
    for loaded in (
        SculptPipeline.from_pretrained(tmp_path),
        SculptPipeline.from_pretrained(tmp_path, use_safetensors=False),
    ):
        torch.testing.assert_close(loaded.unet.state_dict(), pipe.unet.state_dict(), rtol=0, atol=0)
    with pytest.raises(OSError, match=f"{tmp_path / 'unet'} holds only a pickle.*use_safetensors=False"):
        SculptPipeline.from_pretrained(tmp_path, use_safetensors=True)


def test_code_running_pickle_runs_no_code_through_either_door(tmp_path, build_tiny_pipeline):
    build_tiny_pipeline().save_pretrained(tmp_path)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"conv_in.weight": CodeRunningPayload(marker)}, tmp_path / "unet" / "diffusion_pytorch_model.bin")

    with pytest.raises(OSError, match="Unable to load weights"):
        SculptPipeline.from_pretrained(tmp_path)
    result = load_in_fresh_process_without_sculptdiff(tmp_path)
    assert result.returncode != 0 and "Unable to load weights" in result.stderr, result.stderr[-2000:]
    assert not marker.exists()


def test_dtype_resolves_per_component(tmp_path, text_pipeline):
    text_pipeline.save_pretrained(tmp_path)
    pipe = SculptPipeline.from_pretrained(tmp_path, dtype={"unet": torch.bfloat16, "default": torch.float16})
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float16
    pipe = SculptPipeline.from_pretrained(tmp_path, dtype={"text_encoder": torch.bfloat16})
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.bfloat16
    assert SculptPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_device_map_low_cpu_mem_usage_and_quantization_reach_our_components(
    tmp_path, monkeypatch, build_tiny_pipeline
):
    build_tiny_pipeline().save_pretrained(tmp_path)
    assert SculptPipeline.from_pretrained(tmp_path, device_map="cpu").unet.hf_device_map == {"": torch.device("cpu")}

    # low_cpu_mem_usage changes nothing observable on a complete checkpoint: record what our U-Net class receives
    received = []
    from_pretrained = SculptUNet2DModel.from_pretrained.__func__

    def recording_from_pretrained(cls, *args, **kwargs):
        received.append(kwargs.get("low_cpu_mem_usage"))
        return from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(SculptUNet2DModel, "from_pretrained", classmethod(recording_from_pretrained))
    SculptPipeline.from_pretrained(tmp_path, low_cpu_mem_usage=False)
    assert received == [False]
    monkeypatch.undo()

    # the bitsandbytes quantizer reaches our U-Net, and refuses this CPU-only machine
    quantization_config = PipelineQuantizationConfig(quant_mapping={"unet": BitsAndBytesConfig(load_in_8bit=True)})
    with pytest.raises(RuntimeError, match="GPU is needed for quantization"):
        SculptPipeline.from_pretrained(tmp_path, quantization_config=quantization_config)


def test_variants(tmp_path, build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = SculptPipeline.from_pretrained(tmp_path / "fp16", variant="fp16")
    torch.testing.assert_close(loaded.unet.state_dict(), pipe.unet.state_dict(), rtol=0, atol=0)

    pipe.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="variant=fp16"):
        SculptPipeline.from_pretrained(tmp_path / "plain", variant="fp16")


def test_loading_logs_what_diffusers_logs(tmp_path, text_pipeline):
    text_pipeline.save_pretrained(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_info()
    try:
        SculptPipeline.from_pretrained(tmp_path)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
        diffusers_logger.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    for name, class_name in [
        ("unet", "SculptUNet2DModel"),
        ("scheduler", "SculptScheduler"),
        ("text_encoder", "CLIPTextModel"),
    ]:
        assert f"Loaded {name} as {class_name} from `{name}` subfolder of {tmp_path}." in messages, messages


@pytest.mark.parametrize(
    "entry, match",
    [
        (
            ["sculptdiff.models.unet_gone", "SculptUNet2DModel"],
            "entry `unet` names module `sculptdiff.models.unet_gone`",
        ),
        (["sculptdiff.models.unet_sculpt", "SculptUNet3000"], "entry `unet` names class `SculptUNet3000`"),
    ],
)
def test_model_index_naming_a_missing_module_or_class(tmp_path, entry, match, build_tiny_pipeline):
    build_tiny_pipeline().save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    model_index["unet"] = entry
    (tmp_path / "model_index.json").write_text(json.dumps(model_index))
    with pytest.raises(ValueError, match=f"{match}.*trust_remote_code=True"):
        SculptPipeline.from_pretrained(tmp_path)


def test_safetensors_missing_a_tensor_is_refused_through_both_doors(tmp_path, build_tiny_pipeline):
    build_tiny_pipeline().save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    del state_dict["conv_out.weight"]
    save_file(state_dict, weights)

    with pytest.raises(ValueError, match=r"lacks 1 tensor.*\['conv_out.weight'\]"):
        SculptPipeline.from_pretrained(tmp_path)
    result = load_in_fresh_process_without_sculptdiff(tmp_path)
    assert result.returncode != 0 and "['conv_out.weight']" in result.stderr, result.stderr[-2000:]


# bad input


def test_prompt_and_prompt_embeds_both_given(text_pipeline):
    pipe = text_pipeline
    embeds, _ = pipe.encode_prompt("digit one", torch.device("cpu"))
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        generate(pipe, prompt="digit one", prompt_embeds=embeds)


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"batch_size": 0}, r"`batch_size` must be a positive integer, got 0"),
        ({"batch_size": -2}, r"`batch_size` must be a positive integer, got -2"),
        ({"class_labels": [1], "num_images_per_prompt": 0}, "`num_images_per_prompt` must be a positive integer"),
        ({"class_labels": []}, "`class_labels` is empty"),
        ({"class_labels": [1], "height": 0}, "`height` must be a positive integer, got 0"),
        ({"class_labels": [1], "width": -8}, "`width` must be a positive integer, got -8"),
        ({"class_labels": [1], "num_inference_steps": 2.5}, "`num_inference_steps` must be a positive integer"),
        ({"class_labels": [3.7]}, r"`class_labels` may hold integer class ids or class names, got 3.7"),
        ({"class_labels": torch.tensor([1.0])}, "`class_labels` must hold integer class ids"),
        ({"class_labels": [1], "output_type": "jpeg"}, '`output_type` must be "pil", "np", "pt" or "latent"'),
        ({"class_labels": [1], "negative_prompt": "digit one"}, "`negative_prompt`.*Drop them"),
    ],
)
def test_bad_pipeline_arguments_are_refused(arguments, match, build_tiny_pipeline):
    with pytest.raises(ValueError, match=match):
        generate(build_tiny_pipeline(), **arguments)


def test_text_arguments_are_checked(text_pipeline):
    pipe = text_pipeline
    with pytest.raises(ValueError, match="`prompt` must be a string or a non-empty list"):
        generate(pipe, prompt=[])
    with pytest.raises(ValueError, match=r"`prompt_embeds` must have shape \(batch, tokens, 32\).*got \(1, 16, 24\)"):
        generate(pipe, prompt_embeds=torch.randn(1, 16, 24))


def test_eta_on_a_scheduler_without_eta_is_refused(build_tiny_pipeline):
    pipe = build_tiny_pipeline(prediction_type="flow")
    pipe.scheduler = SculptFlowScheduler()
    with pytest.raises(ValueError, match="`eta` was given but SculptFlowScheduler.step takes none"):
        generate(pipe, class_labels=[1], eta=0.5)


def test_numpy_integer_class_labels_are_class_ids(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    expected = generate(pipe, class_labels=[3], guidance_scale=2.0)
    np.testing.assert_array_equal(generate(pipe, class_labels=np.int64(3), guidance_scale=2.0), expected)
    np.testing.assert_array_equal(generate(pipe, class_labels=[np.int32(3)], guidance_scale=2.0), expected)


@pytest.mark.parametrize("label", [5, -1, "six"])
def test_class_label_out_of_range(label, build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="class_labels|Unknown class name"):
        generate(pipe, class_labels=[label])


def test_class_labels_for_an_unconditional_unet(build_tiny_pipeline):
    pipe = build_tiny_pipeline(num_class_embeds=None, id2label=None)
    with pytest.raises(ValueError, match="not class-conditional"):
        generate(pipe, class_labels=[1])


def test_prompt_for_a_unet_without_cross_attention(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="no cross-attention"):
        generate(pipe, prompt="digit one")


def test_height_not_divisible_by_the_unet_factor(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(pipe, class_labels=[1], height=9)


def test_guidance_on_a_model_trained_without_a_null_condition(build_tiny_pipeline):
    pipe = build_tiny_pipeline(conditioning_dropout_prob=0.0)
    with pytest.raises(ValueError, match="conditioning_dropout_prob"):
        generate(pipe, class_labels=[1], guidance_scale=3.0)
    generate(pipe, class_labels=[1], guidance_scale=1.0)


def test_guidance_without_a_condition(build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="needs a condition"):
        generate(pipe, batch_size=2, guidance_scale=3.0)


def test_scheduler_of_the_wrong_family(build_tiny_pipeline):
    flow_model = build_tiny_pipeline(prediction_type="flow")
    with pytest.raises(ValueError, match="flow-matching objective"):
        generate(flow_model, class_labels=[1])

    diffusion_model = build_tiny_pipeline()
    diffusion_model.scheduler = SculptFlowScheduler()
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        generate(diffusion_model, class_labels=[1])

    diffusion_model.scheduler = DDIMScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match='prediction_type="epsilon"'):
        generate(diffusion_model, class_labels=[1])


class RectifiedFlowEuler(FlowMatchEulerDiscreteScheduler):
    """A flow scheduler whose name does not say so."""


class FlowMatchingStyleDDIM(DDIMScheduler):
    """A DDPM-family scheduler whose name mentions flow matching."""


def test_scheduler_family_is_read_from_the_scheduler_not_its_name(build_tiny_pipeline):
    flow_model = build_tiny_pipeline(prediction_type="flow")
    flow_model.scheduler = RectifiedFlowEuler()
    generate(flow_model, class_labels=[1], guidance_scale=2.0)
    flow_model.scheduler = FlowMatchingStyleDDIM()
    with pytest.raises(ValueError, match="flow-matching objective"):
        generate(flow_model, class_labels=[1])

    diffusion_model = build_tiny_pipeline()
    diffusion_model.scheduler = FlowMatchingStyleDDIM()
    generate(diffusion_model, class_labels=[1], guidance_scale=2.0)
    diffusion_model.scheduler = RectifiedFlowEuler()
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        generate(diffusion_model, class_labels=[1])
    # flow sigmas over a DDPM table are flow sampling too
    diffusion_model.scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        generate(diffusion_model, class_labels=[1])


@pytest.mark.parametrize("prediction_type", [None, "epsilon", "v_prediction", "sample", "flow"])
def test_the_unet_prediction_type_decides_which_schedulers_run(prediction_type, build_tiny_pipeline):
    # the objective in the U-Net config is what the pipeline checks each scheduler against; a U-Net that records
    # none (None) leaves the choice to the user
    pipe = build_tiny_pipeline(prediction_type=prediction_type)
    for scheduler_prediction_type in ("epsilon", "v_prediction", "sample"):
        pipe.scheduler = DDIMScheduler(prediction_type=scheduler_prediction_type)
        if prediction_type in (None, scheduler_prediction_type):
            generate(pipe, class_labels=[1])
        elif prediction_type == "flow":
            with pytest.raises(ValueError, match="trained with the flow-matching objective but the scheduler"):
                generate(pipe, class_labels=[1])
        else:
            with pytest.raises(ValueError, match=f"predicts `{prediction_type}` but the scheduler is configured for "):
                generate(pipe, class_labels=[1])
    pipe.scheduler = SculptFlowScheduler()
    if prediction_type in (None, "flow"):
        generate(pipe, class_labels=[1])
    else:
        with pytest.raises(ValueError, match=f"predicts `{prediction_type}` .*a flow-matching scheduler"):
            generate(pipe, class_labels=[1])
