import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from PIL import Image

from sculptdiff import SculptFlowScheduler, SculptPipeline, SculptScheduler, SculptUNet2DModel


FIXTURES = Path(__file__).parent / "fixtures"
DIGITS = {str(index): name for index, name in enumerate(["zero", "one", "two", "three", "four"])}


def make_unet(**overrides) -> SculptUNet2DModel:
    torch.manual_seed(0)
    config = {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "attention_levels": (False, True),
        "attention_head_dim": 8,
        "norm_num_groups": 4,
        "num_class_embeds": 5,
        "conditioning_dropout_prob": 0.1,
        "id2label": DIGITS,
        "prediction_type": "epsilon",
    }
    config.update(overrides)
    unet = SculptUNet2DModel(**config).eval()
    # the output layer is zero-initialised; give it weights so that guidance has something to act on
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.abs().sum() == 0 and parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    return unet


def make_pipeline(**unet_overrides) -> SculptPipeline:
    pipe = SculptPipeline(unet=make_unet(**unet_overrides), scheduler=SculptScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_text_pipeline(tiny_text_encoder, tiny_tokenizer, **unet_overrides) -> SculptPipeline:
    unet = make_unet(num_class_embeds=None, id2label=None, cross_attention_dim=32, **unet_overrides)
    pipe = SculptPipeline(
        unet=unet, scheduler=SculptScheduler(), text_encoder=tiny_text_encoder, tokenizer=tiny_tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(**kwargs).images


class UNetCalls:
    """Records the batch size of every U-Net forward pass through a forward hook on the real module."""

    def __init__(self, unet):
        self.batch_sizes = []
        self.handle = unet.register_forward_hook(self.record)

    def record(self, module, args, output):
        self.batch_sizes.append(args[0].shape[0])


# classifier-free guidance


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_guided_step_equals_the_formula(prediction_type, guidance_rescale):
    pipe = make_pipeline(prediction_type=prediction_type)
    pipe.scheduler = SculptScheduler(prediction_type=prediction_type)
    guidance_scale, labels = 4.0, torch.tensor([1, 3])

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


def test_guidance_one_makes_one_unet_call_per_step_with_batch_b():
    pipe = make_pipeline()
    calls = UNetCalls(pipe.unet)
    generate(pipe, class_labels=[0, 1, 2], num_inference_steps=3, guidance_scale=1.0)
    assert calls.batch_sizes == [3, 3, 3]


def test_guidance_above_one_makes_one_unet_call_per_step_with_batch_2b():
    pipe = make_pipeline()
    calls = UNetCalls(pipe.unet)
    generate(pipe, class_labels=[0, 1, 2], num_inference_steps=3, guidance_scale=2.5)
    assert calls.batch_sizes == [6, 6, 6]


def test_guidance_one_equals_plain_conditional_sampling():
    pipe = make_pipeline()
    unguided = generate(pipe, class_labels=[0, 4], guidance_scale=1.0)
    guided = generate(pipe, class_labels=[0, 4], guidance_scale=2.0)
    assert not np.allclose(unguided, guided, atol=1e-4)
    # w -> 1 from above converges to the unguided result: the formula, not a switch, decides
    nearly_unguided = generate(pipe, class_labels=[0, 4], guidance_scale=1.0 + 1e-6)
    np.testing.assert_allclose(nearly_unguided, unguided, atol=1e-4)


# generation modes and arguments


def test_unconditional_generation():
    pipe = make_pipeline(num_class_embeds=None, id2label=None, conditioning_dropout_prob=0.0)
    images = generate(pipe, batch_size=3)
    assert images.shape == (3, 8, 8, 1)
    assert images.min() >= 0 and images.max() <= 1


def test_class_names_and_ids_are_the_same_condition():
    pipe = make_pipeline()
    by_id = generate(pipe, class_labels=[2, 4], guidance_scale=3.0)
    by_name = generate(pipe, class_labels=["two", "four"], guidance_scale=3.0)
    np.testing.assert_array_equal(by_id, by_name)
    other = generate(pipe, class_labels=[1, 4], guidance_scale=3.0)
    assert not np.allclose(other[0], by_id[0])
    np.testing.assert_allclose(other[1], by_id[1], atol=1e-6)


def test_generator_makes_it_deterministic():
    pipe = make_pipeline()
    first = generate(pipe, class_labels=[1, 2], guidance_scale=2.0)
    second = generate(pipe, class_labels=[1, 2], guidance_scale=2.0)
    third = generate(pipe, class_labels=[1, 2], guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, third)


def test_num_images_per_prompt_and_a_list_of_generators():
    pipe = make_pipeline()
    images = generate(pipe, class_labels=[1, 2], num_images_per_prompt=3)
    assert images.shape == (6, 8, 8, 1)

    generators = [torch.Generator().manual_seed(seed) for seed in (10, 11, 12, 13)]
    batched = generate(pipe, class_labels=[1, 3], num_images_per_prompt=2, generator=generators)
    # image k depends on generator k alone: the second image of class 3 alone reproduces it
    alone = generate(pipe, class_labels=[3], generator=[torch.Generator().manual_seed(13)])
    np.testing.assert_allclose(batched[3], alone[0], atol=1e-5)

    with pytest.raises(ValueError, match="list of 3 generators"):
        generate(pipe, class_labels=[1, 3], generator=[torch.Generator()] * 3)


def test_latents_in_give_the_same_output():
    pipe = make_pipeline()
    latents = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    from_generator = generate(pipe, class_labels=[1, 2])
    from_latents = generate(pipe, class_labels=[1, 2], latents=latents, generator=None)
    np.testing.assert_array_equal(from_generator, from_latents)
    with pytest.raises(ValueError, match="`latents` have shape"):
        generate(pipe, class_labels=[1, 2], latents=latents[:1])


def test_every_output_type():
    pipe = make_pipeline()
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


def test_callback_reads_and_replaces_latents():
    pipe = make_pipeline()
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


def test_custom_timesteps():
    pipe = make_pipeline()
    calls = UNetCalls(pipe.unet)
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
def test_runs_with_the_diffusion_schedulers_of_diffusers(scheduler_class):
    pipe = make_pipeline()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    images = generate(pipe, class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=3)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


@pytest.mark.parametrize("scheduler_class", [SculptFlowScheduler, FlowMatchEulerDiscreteScheduler])
def test_flow_model_runs_with_flow_schedulers(scheduler_class):
    pipe = make_pipeline(prediction_type="flow")
    pipe.scheduler = scheduler_class()
    images = generate(pipe, class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=3)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


# text and latents


def test_text_to_image(tiny_text_encoder, tiny_tokenizer):
    pipe = make_text_pipeline(tiny_text_encoder, tiny_tokenizer)
    images = generate(pipe, prompt=["a photo of digit seven", "digit one"], guidance_scale=3.0)
    assert images.shape == (2, 8, 8, 1)

    with_negative = generate(
        pipe, prompt=["a photo of digit seven", "digit one"], negative_prompt="digit eight", guidance_scale=3.0
    )
    assert not np.allclose(images, with_negative, atol=1e-4)


def test_prompt_embeds_equal_the_prompt_path(tiny_text_encoder, tiny_tokenizer):
    pipe = make_text_pipeline(tiny_text_encoder, tiny_tokenizer)
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


def test_latent_space_with_a_vae(tiny_text_encoder, tiny_tokenizer, tiny_vae):
    vae = tiny_vae
    unet = make_unet(in_channels=4, out_channels=4, num_class_embeds=None, id2label=None, cross_attention_dim=32)
    pipe = SculptPipeline(
        unet=unet, scheduler=SculptScheduler(), text_encoder=tiny_text_encoder, tokenizer=tiny_tokenizer, vae=vae
    )
    pipe.set_progress_bar_config(disable=True)
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


def test_save_and_load_through_both_doors(tmp_path):
    pipe = make_pipeline()
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


def test_text_pipeline_round_trip(tmp_path, tiny_text_encoder, tiny_tokenizer):
    pipe = make_text_pipeline(tiny_text_encoder, tiny_tokenizer)
    expected = generate(pipe, prompt="digit nine", guidance_scale=2.0)
    pipe.save_pretrained(tmp_path)
    loaded = SculptPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(loaded, prompt="digit nine", guidance_scale=2.0), expected)


def test_save_keeps_other_files_and_replaces_components(tmp_path):
    (tmp_path / "README.md").write_text("my model card")
    (tmp_path / "checkpoint-10").mkdir()
    make_pipeline().save_pretrained(tmp_path)
    second = make_pipeline(layers_per_block=2)
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


def test_pickle_weights_are_refused_unless_asked_for(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(EnvironmentError, match="safetensors|diffusion_pytorch_model"):
        SculptPipeline.from_pretrained(tmp_path)
    loaded = SculptPipeline.from_pretrained(tmp_path, use_safetensors=False)
    torch.testing.assert_close(loaded.unet.state_dict(), pipe.unet.state_dict(), rtol=0, atol=0)


def test_torch_dtype_reaches_our_components(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    pipe = SculptPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16


# bad input


def test_prompt_and_prompt_embeds_both_given(tiny_text_encoder, tiny_tokenizer):
    pipe = make_text_pipeline(tiny_text_encoder, tiny_tokenizer)
    embeds, _ = pipe.encode_prompt("digit one", torch.device("cpu"))
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        generate(pipe, prompt="digit one", prompt_embeds=embeds)


@pytest.mark.parametrize("label", [5, -1, "six"])
def test_class_label_out_of_range(label):
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="class_labels|Unknown class name"):
        generate(pipe, class_labels=[label])


def test_class_labels_for_an_unconditional_unet():
    pipe = make_pipeline(num_class_embeds=None, id2label=None)
    with pytest.raises(ValueError, match="not class-conditional"):
        generate(pipe, class_labels=[1])


def test_prompt_for_a_unet_without_cross_attention():
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="no cross-attention"):
        generate(pipe, prompt="digit one")


def test_height_not_divisible_by_the_unet_factor():
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(pipe, class_labels=[1], height=9)


def test_guidance_on_a_model_trained_without_a_null_condition():
    pipe = make_pipeline(conditioning_dropout_prob=0.0)
    with pytest.raises(ValueError, match="conditioning_dropout_prob"):
        generate(pipe, class_labels=[1], guidance_scale=3.0)
    generate(pipe, class_labels=[1], guidance_scale=1.0)


def test_guidance_without_a_condition():
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="needs a condition"):
        generate(pipe, batch_size=2, guidance_scale=3.0)


def test_scheduler_of_the_wrong_family():
    flow_model = make_pipeline(prediction_type="flow")
    with pytest.raises(ValueError, match="flow-matching objective"):
        generate(flow_model, class_labels=[1])

    diffusion_model = make_pipeline()
    diffusion_model.scheduler = SculptFlowScheduler()
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        generate(diffusion_model, class_labels=[1])

    diffusion_model.scheduler = DDIMScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match='prediction_type="epsilon"'):
        generate(diffusion_model, class_labels=[1])
