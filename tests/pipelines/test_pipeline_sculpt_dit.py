"""SculptPipeline with a diffusion transformer as its denoiser (`transformer`): SculptDiT2DModel and diffusers' own
DiTTransformer2DModel, class-, text- and unconditional, diffusion and flow objectives, saving and loading.

The folder and Hub loading doors in fresh processes are in tests/hub/test_hub_pipeline_dit.py.
"""

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

from sculptdiff import SculptDiT2DModel, SculptFlowScheduler, SculptPipeline, SculptScheduler


def generate(pipe, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0), "output_type": "np", **kwargs}
    return pipe(**kwargs).images


def sample_by_hand(pipe, batch_size, condition, null_condition, guidance_scale, num_inference_steps=2) -> np.ndarray:
    """The guided loop written out with the pipeline's transformer and scheduler, from the noise of seed 0:
    out_uncond + w * (out_cond - out_uncond) per step, each branch its own forward pass; `condition` and
    `null_condition` are the forward's keyword arguments of each branch. Images as numpy in [0, 1]."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(num_inference_steps)
    latents = torch.randn((batch_size, 1, 8, 8), generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = (
                scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            )
            output_cond = transformer(model_input, t, **condition).sample
            output_uncond = transformer(model_input, t, **null_condition).sample
            model_output = output_uncond + guidance_scale * (output_cond - output_uncond)
            latents = scheduler.step(model_output, t, latents, generator=generator).prev_sample
    return (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


class TransformerCalls:
    """Records the batch size and class labels of every forward pass of the pipeline's transformer."""

    def __init__(self, transformer):
        self.batch_sizes, self.class_labels = [], []
        transformer.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.batch_sizes.append(args[0].shape[0])
        self.class_labels.append(kwargs["class_labels"].tolist())


# the transformer slot


def test_the_transformer_is_registered_as_transformer_and_runs_as_the_denoiser(build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit")
    assert pipe.unet is None and pipe.denoiser is pipe.transformer
    assert {name for name, component in pipe.components.items() if component is not None} == {
        "transformer",
        "scheduler",
    }
    assert pipe.hub_allow_patterns() == [
        "model_index.json",
        "pipeline_sculpt.py",
        "README.md",
        "transformer/*",
        "scheduler/*",
    ]
    calls = TransformerCalls(pipe.transformer)
    images = generate(pipe, class_labels=[1, 2], guidance_scale=3.0)
    assert images.shape == (2, 8, 8, 1)
    # one batched pass per step: (null, null, class 1, class 2)
    assert calls.batch_sizes == [4, 4]
    assert calls.class_labels == [[5, 5, 1, 2], [5, 5, 1, 2]]


def test_a_unet_pipeline_has_no_transformer(build_tiny_unet):
    pipe = SculptPipeline(unet=build_tiny_unet(), scheduler=SculptScheduler())
    assert pipe.transformer is None and pipe.denoiser is pipe.unet


def test_a_unet_folder_saved_before_the_transformer_slot_loads(tmp_path, build_tiny_unet):
    pipe = SculptPipeline(unet=build_tiny_unet(), scheduler=SculptScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    # folders saved before the `transformer` slot existed have no entry for it
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index.pop("transformer") == [None, None]
    (tmp_path / "model_index.json").write_text(json.dumps(model_index))

    loaded = SculptPipeline.from_pretrained(tmp_path)
    assert loaded.transformer is None and loaded.denoiser is loaded.unet
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        generate(loaded, class_labels=[1, 2], guidance_scale=2.0),
        generate(pipe, class_labels=[1, 2], guidance_scale=2.0),
    )


@pytest.mark.parametrize("given", ["both", "neither"])
def test_exactly_one_denoiser(given, build_tiny_unet, build_tiny_dit):
    denoisers = {"unet": build_tiny_unet(), "transformer": build_tiny_dit()} if given == "both" else {}
    with pytest.raises(ValueError, match=r"exactly one denoiser.*`unet`.*`transformer`, got unet=.* and transformer="):
        SculptPipeline(scheduler=SculptScheduler(), **denoisers)


def test_model_cpu_offload_hooks_the_transformer(build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit")
    expected = generate(pipe, class_labels=[1], guidance_scale=2.0)
    # (no accelerator here: offloading "to" the CPU still installs the hooks, in `model_cpu_offload_seq` order)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook") and len(pipe._all_hooks) == 1
    np.testing.assert_array_equal(generate(pipe, class_labels=[1], guidance_scale=2.0), expected)


# generation


@pytest.mark.parametrize("guidance_scale", [0.0, 0.5, 3.0])
def test_class_guidance_equals_the_hand_written_loop(guidance_scale, build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit")
    labels = torch.tensor([1, 3])
    images = generate(pipe, class_labels=labels, guidance_scale=guidance_scale)
    expected = sample_by_hand(
        pipe, 2, {"class_labels": labels}, {"class_labels": torch.tensor([5, 5])}, guidance_scale=guidance_scale
    )
    # (one batch of 4 against two batches of 2: float32 rounding may differ slightly)
    np.testing.assert_allclose(images, expected, atol=1e-5)
    # w = 0 is the null class alone, whatever the labels; any other w follows them
    other_classes = generate(pipe, class_labels=[2, 4], guidance_scale=guidance_scale)
    assert np.allclose(images, other_classes, atol=1e-3) == (guidance_scale == 0)


def test_class_names_and_deterministic_generation(build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit")
    expected = generate(pipe, class_labels=[3, 1], guidance_scale=2.0)
    np.testing.assert_array_equal(generate(pipe, class_labels=["three", "one"], guidance_scale=2.0), expected)
    np.testing.assert_array_equal(generate(pipe, class_labels=[3, 1], guidance_scale=2.0), expected)
    other_noise = generate(pipe, class_labels=[3, 1], guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert not np.allclose(other_noise, expected, atol=1e-3)


def test_unlabelled_images_of_a_class_model_get_the_null_class(build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit")
    expected = sample_by_hand(pipe, 2, {"class_labels": torch.tensor([5, 5])}, {}, guidance_scale=1.0)
    calls = TransformerCalls(pipe.transformer)
    images = generate(pipe, batch_size=2)
    assert calls.class_labels == [[5, 5], [5, 5]]
    np.testing.assert_allclose(images, expected, atol=1e-6)


def test_text_conditional_dit(build_tiny_text_pipeline):
    pipe = build_tiny_text_pipeline(backbone="dit")
    prompts = ["digit one", "digit seven"]
    images = generate(pipe, prompt=prompts, guidance_scale=4.0)
    assert images.shape == (2, 8, 8, 1)

    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(prompts, torch.device("cpu"))
    expected = sample_by_hand(
        pipe,
        2,
        {"encoder_hidden_states": prompt_embeds},
        {"encoder_hidden_states": negative_prompt_embeds},
        guidance_scale=4.0,
    )
    np.testing.assert_allclose(images, expected, atol=1e-5)
    assert not np.allclose(images, generate(pipe, prompt=["digit two", "digit nine"], guidance_scale=4.0), atol=1e-3)


def test_unconditional_dit(build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit", num_class_embeds=None, id2label=None)
    images = generate(pipe, batch_size=3)
    assert images.shape == (3, 8, 8, 1)
    # each image from its own noise, through the transformer: not a constant
    assert not np.allclose(images[0], images[1]) and images.std() > 0.05
    with pytest.raises(ValueError, match="needs a condition"):
        generate(pipe, batch_size=3, guidance_scale=2.0)
    with pytest.raises(ValueError, match="SculptDiT2DModel is not class-conditional"):
        generate(pipe, class_labels=[1])


@pytest.mark.parametrize("scheduler_class", [SculptFlowScheduler, FlowMatchEulerDiscreteScheduler])
def test_flow_objective(scheduler_class, build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit", scheduler=scheduler_class(), prediction_type="flow")
    labels = torch.tensor([0, 4])
    images = generate(pipe, class_labels=labels, guidance_scale=2.0)
    expected = sample_by_hand(
        pipe, 2, {"class_labels": labels}, {"class_labels": torch.tensor([5, 5])}, guidance_scale=2.0
    )
    np.testing.assert_allclose(images, expected, atol=1e-5)

    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="trained with the flow-matching objective"):
        generate(pipe, class_labels=labels)


def test_latent_dit_with_a_vae(tiny_vae, build_tiny_dit):
    # the DiT paper's setting: the transformer denoises the VAE's latents, 4 x 4 here for 8 x 8 images
    transformer = build_tiny_dit(sample_size=4, in_channels=4, out_channels=4)
    pipe = SculptPipeline(transformer=transformer, scheduler=SculptScheduler(), vae=tiny_vae)
    pipe.set_progress_bar_config(disable=True)
    assert generate(pipe, class_labels=[1], guidance_scale=2.0).shape == (1, 8, 8, 3)
    assert generate(pipe, class_labels=[1], output_type="latent").shape == (1, 4, 4, 4)


def test_size_must_be_a_multiple_of_the_patch_size(build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit", patch_size=4)
    assert generate(pipe, class_labels=[1], height=12, width=16).shape == (1, 12, 16, 1)
    with pytest.raises(ValueError, match=r"multiples of 4 .*transformer's `patch_size`, 4\), got 10x16"):
        generate(pipe, class_labels=[1], height=10, width=16)


# saving and loading


def test_save_and_load_round_trip_is_bit_exact(tmp_path, build_tiny_pipeline):
    pipe = build_tiny_pipeline(backbone="dit")
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["transformer"] == ["sculptdiff.models.transformers.dit_sculpt", "SculptDiT2DModel"]
    assert model_index["unet"] == [None, None]
    # the module's own source beside the weights, for the trust_remote_code door
    code_file = tmp_path / "transformer" / "sculptdiff.models.transformers.dit_sculpt.py"
    assert code_file.read_text() == inspect.getsource(inspect.getmodule(SculptDiT2DModel))
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "unet").exists()

    loaded = SculptPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is SculptDiT2DModel and loaded.unet is None
    assert loaded.transformer.config.id2label == dict(enumerate(["zero", "one", "two", "three", "four"]))
    torch.testing.assert_close(loaded.transformer.state_dict(), pipe.transformer.state_dict(), rtol=0, atol=0)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        generate(loaded, class_labels=[1, 3], guidance_scale=2.0),
        generate(pipe, class_labels=[1, 3], guidance_scale=2.0),
    )


# diffusers' DiTTransformer2DModel as the backbone


def build_diffusers_dit(out_channels: int) -> DiTTransformer2DModel:
    """diffusers' DiT for the tiny VAE's 4 x 4 x 4 latents, with ImageNet's 1000 classes (DiTPipeline's null class is
    index 1000), 1 block of width 16; `out_channels` 8 adds learned variance channels, as DiT's checkpoints have."""
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=out_channels,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


@pytest.mark.parametrize("out_channels", [4, 8])
def test_diffusers_dit_transformer_equals_dit_pipeline(tiny_vae, out_channels):
    transformer = build_diffusers_dit(out_channels)
    pipe = SculptPipeline(transformer=transformer, scheduler=DDIMScheduler(), vae=tiny_vae)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.num_classes() == 1000
    dit_pipe = DiTPipeline(transformer=transformer, vae=tiny_vae, scheduler=DDIMScheduler())
    dit_pipe.set_progress_bar_config(disable=True)

    images = generate(pipe, class_labels=[1, 7], guidance_scale=4.0)
    assert images.shape == (2, 8, 8, 3)
    # DiTPipeline runs (cond, null) in one batch, guides the first 4 channels and drops the learned variance
    expected = generate(dit_pipe, class_labels=[1, 7], guidance_scale=4.0)
    np.testing.assert_allclose(images, expected, atol=1e-5)

    # images without class labels: the null class, spelled out for a model that has no default for it
    calls = TransformerCalls(transformer)
    generate(pipe, batch_size=2)
    assert calls.class_labels == [[1000, 1000], [1000, 1000]]


def test_diffusers_dit_pipeline_saves_and_loads(tmp_path, tiny_vae):
    pipe = SculptPipeline(transformer=build_diffusers_dit(8), scheduler=DDIMScheduler(), vae=tiny_vae)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    loaded = SculptPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is DiTTransformer2DModel and loaded.unet is None
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        generate(loaded, class_labels=[5], guidance_scale=3.0), generate(pipe, class_labels=[5], guidance_scale=3.0)
    )


def test_diffusers_dit_refuses_non_square_sizes(tiny_vae):
    pipe = SculptPipeline(transformer=build_diffusers_dit(8), scheduler=DDIMScheduler(), vae=tiny_vae)
    pipe.set_progress_bar_config(disable=True)
    assert generate(pipe, class_labels=[1], height=16, width=16).shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="DiTTransformer2DModel generates square images only.*got 8x16"):
        generate(pipe, class_labels=[1], height=8, width=16)


def test_output_channels_other_than_the_prediction_and_its_variance_are_refused(tiny_vae):
    pipe = SculptPipeline(transformer=build_diffusers_dit(6), scheduler=DDIMScheduler(), vae=tiny_vae)
    with pytest.raises(ValueError, match=r"`out_channels=6` for `in_channels=4`.*4 channels, or 8"):
        generate(pipe, class_labels=[1])
