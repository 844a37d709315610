"""What both denoisers, SculptUNet2DModel and SculptDiT2DModel, promise alike, tested once on each: the forward
contract of diffusers' U-Nets, class and text conditioning, attention processors, training machinery, saving and
loading, and diffusers' own pipelines running them. What only one of them has is in test_unet_sculpt.py and
test_dit_sculpt.py."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from safetensors.torch import load_file, save_file


# What differs between the two tiny denoisers of tests/conftest.py (5 classes + the null class 5, 8x8 grey images):
# - attention layers once they read 12-d text: the U-Net's 4 attention blocks (down, mid, 2 up) and the 2-block DiT
#   (`num_layers=2` below), each with a self- and a cross-attention;
# - the blocks gradient checkpointing wraps: the U-Net's residual blocks (down 1 + 1, mid 2, up 2 + 2) and attention
#   blocks (1 down, 2 up, 1 mid), the DiT's transformer blocks;
# - two tensors of each, for the missing-tensor check;
# - what makes each downsample by 4 (a third U-Net level, 4x4 patches), and how its error says so.
FACTS = {
    "unet": {
        "attention_layers": 8,
        "checkpointed": {"ResBlock": 8, "AttentionBlock": 4},
        "tensors": ["conv_out.bias", "time_embedding.linear_1.weight"],
        "downsampling_by_4": (
            {"block_out_channels": (8, 16, 16), "attention_levels": (False, False, True)},
            r"multiples of 4 \(2 \*\* \(number of levels - 1\)\)",
        ),
    },
    "dit": {
        "attention_layers": 4,
        "checkpointed": {"DiTBlock": 2},
        "tensors": ["proj_out.bias", "transformer_blocks.1.norm1.linear.weight"],
        "downsampling_by_4": ({"patch_size": 4}, r"multiples of 4 \(`patch_size`\)"),
    },
}
DENOISERS = [("unet", 8), ("dit", 4)]


@pytest.fixture(params=sorted(FACTS))
def backbone(request) -> str:
    return request.param


@pytest.fixture
def build_denoiser(backbone, build_tiny_unet, build_tiny_dit):
    """`build_denoiser(**overrides)`: the suite's tiny U-Net, or its DiT with 2 blocks, for the `backbone` param."""

    def build(**overrides) -> torch.nn.Module:
        if backbone == "dit":
            return build_tiny_dit(**{"num_layers": 2, **overrides})
        return build_tiny_unet(**overrides)

    return build


@pytest.fixture
def build_text_denoiser(build_tiny_unet, build_tiny_dit):
    """`build_text_denoiser(backbone)`: the suite's tiny U-Net or 2-block DiT, reading 12-d text."""

    def build(backbone: str) -> torch.nn.Module:
        if backbone == "dit":
            return build_tiny_dit(cross_attention_dim=12, num_layers=2)
        return build_tiny_unet(cross_attention_dim=12)

    return build


def make_inputs(
    batch_size: int = 2, seed: int = 1, channels: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8x8 samples, two timesteps and 5 tokens of 12-d text, from fixed seeds."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch_size, channels, 8, 8, generator=generator)
    text = torch.randn(batch_size, 5, 12, generator=generator)
    return sample, torch.tensor([10, 700, 300])[:batch_size], text


# ---------------------------------------------------------------- timesteps and input checks


@pytest.mark.parametrize(
    "timestep", [10, 10.0, torch.tensor(10), torch.tensor([10]), torch.tensor([10, 10]), torch.tensor(10.0)]
)
def test_timestep_forms_broadcast_to_the_batch(build_denoiser, timestep):
    model = build_denoiser()
    sample, _, _ = make_inputs()
    expected = model(sample, torch.tensor([10, 10])).sample
    torch.testing.assert_close(model(sample, timestep).sample, expected)


def test_float_timesteps_are_not_rounded_and_time_reaches_the_output(build_denoiser):
    # flow-matching schedulers pass sigma * num_train_timesteps
    model = build_denoiser()
    sample, _, _ = make_inputs()
    assert not torch.allclose(model(sample, 10.25).sample, model(sample, 10).sample)
    assert not torch.allclose(model(sample, 500).sample, model(sample, 10).sample)


def test_timestep_of_wrong_length_is_rejected(build_denoiser):
    model = build_denoiser()
    sample, _, _ = make_inputs()
    with pytest.raises(ValueError, match=r"`timestep` must be a number or a tensor of 1 or 2 \(batch size\)"):
        model(sample, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 8), (2, 1, 1, 8, 8)])
def test_sample_of_wrong_shape_is_rejected(build_denoiser, shape):
    with pytest.raises(ValueError, match=r"`sample` must have shape \(batch_size, 1, height, width\)"):
        build_denoiser()(torch.zeros(shape), 10)


@pytest.mark.parametrize("height, width", [(6, 8), (8, 10)])
def test_spatial_size_must_be_a_multiple_of_the_downsampling_factor(backbone, build_denoiser, height, width):
    overrides, message = FACTS[backbone]["downsampling_by_4"]
    model = build_denoiser(**overrides)
    with pytest.raises(ValueError, match=rf"\({height}, {width}\).*{message}"):
        model(torch.zeros(2, 1, height, width), 10)


def test_each_sample_is_computed_independently_of_its_batch(build_denoiser):
    # each image's timestep, label and text reach that image alone, and nothing (a norm, the attention) mixes the
    # batch: the pipeline's guided batch [uncond, cond] and a batch of mixed classes rely on it
    model = build_denoiser(cross_attention_dim=12)
    sample, timestep, text = make_inputs(batch_size=3)
    labels = torch.tensor([0, 4, 5])
    with torch.no_grad():
        batched = model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample
        for index in range(3):
            alone = model(
                sample[index : index + 1],
                timestep[index : index + 1],
                encoder_hidden_states=text[index : index + 1],
                class_labels=labels[index : index + 1],
            ).sample
            torch.testing.assert_close(batched[index : index + 1], alone, rtol=1e-5, atol=1e-5)
    # the three images differ: each entry of timestep, label and text was read
    assert not torch.allclose(batched[0], batched[1]) and not torch.allclose(batched[1], batched[2])


def test_stable_diffusion_keywords(build_denoiser):
    model = build_denoiser(cross_attention_dim=12)
    sample, timestep, text = make_inputs()
    expected = model(sample, timestep, encoder_hidden_states=text).sample
    for added_cond_kwargs in (None, {}):
        output = model(
            sample,
            timestep,
            encoder_hidden_states=text,
            timestep_cond=None,
            cross_attention_kwargs=None,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        torch.testing.assert_close(output, expected)
    # the LoRA scale is taken out of cross_attention_kwargs before they reach the attention processors
    scaled = model(sample, timestep, encoder_hidden_states=text, cross_attention_kwargs={"scale": 1.0}).sample
    torch.testing.assert_close(scaled, expected)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        model(sample, timestep, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="timestep_cond"):
        model(sample, timestep, encoder_hidden_states=text, timestep_cond=torch.zeros(2, 4))


def test_time_cond_proj_dim_adds_timestep_cond(build_denoiser):
    model = build_denoiser(time_cond_proj_dim=4)
    sample, timestep, _ = make_inputs()
    without = model(sample, timestep).sample
    with_condition = model(sample, timestep, timestep_cond=torch.ones(2, 4)).sample
    assert not torch.allclose(without, with_condition)
    with pytest.raises(RuntimeError):
        model(sample, timestep, timestep_cond=torch.ones(2, 3))


# ---------------------------------------------------------------- class conditioning


def test_class_table_has_a_null_row_used_for_missing_labels(build_denoiser):
    model = build_denoiser()
    assert model.class_embedding.embedding_table.num_embeddings == 6
    sample, timestep, _ = make_inputs()
    null_output = model(sample, timestep).sample
    torch.testing.assert_close(model(sample, timestep, class_labels=torch.tensor([5, 5])).sample, null_output)
    assert not torch.allclose(model(sample, timestep, class_labels=torch.tensor([0, 0])).sample, null_output)
    # a single label broadcasts to the batch
    torch.testing.assert_close(
        model(sample, timestep, class_labels=torch.tensor(1)).sample,
        model(sample, timestep, class_labels=torch.tensor([1, 1])).sample,
    )


@pytest.mark.parametrize(
    "labels, match",
    [
        ([-1, 0], r"in \[0, 5\]"),
        ([0, 6], r"in \[0, 5\]"),
        ([0.0, 1.0], "integer class indices"),
        ([True, False], "integer class indices"),
        ([0, 1, 2], "1 or 2 \\(batch size\\)"),
    ],
)
def test_bad_class_labels_are_rejected(build_denoiser, labels, match):
    model = build_denoiser()
    sample, timestep, _ = make_inputs()
    with pytest.raises(ValueError, match=f"class_labels.*{match}"):
        model(sample, timestep, class_labels=torch.tensor(labels))


def test_class_labels_on_an_unconditional_model_are_rejected(build_denoiser):
    model = build_denoiser(num_class_embeds=None, id2label=None)
    sample, timestep, _ = make_inputs()
    with pytest.raises(ValueError, match="class_labels.*num_class_embeds"):
        model(sample, timestep, class_labels=torch.tensor([0, 1]))


def test_label_dropout_uses_the_null_class_only_in_training_and_follows_the_seed(build_denoiser):
    model = build_denoiser(conditioning_dropout_prob=0.5)
    sample, timestep, _ = make_inputs(batch_size=1)
    sample, timestep = sample.repeat(32, 1, 1, 1), timestep.repeat(32)
    labels = torch.full((32,), 1)
    conditional = model(sample, timestep, class_labels=labels).sample
    unconditional = model(sample, timestep).sample
    assert not torch.allclose(conditional[0], unconditional[0])

    model.train()
    torch.manual_seed(0)
    trained = model(sample, timestep, class_labels=labels).sample
    is_dropped = torch.isclose(trained, unconditional, atol=1e-6).flatten(1).all(dim=1)
    is_kept = torch.isclose(trained, conditional, atol=1e-6).flatten(1).all(dim=1)
    assert torch.all(is_dropped ^ is_kept)
    assert 0 < is_dropped.sum() < 32
    # the draw comes from torch's global generator: the same seed drops the same labels, another seed others
    torch.manual_seed(0)
    torch.testing.assert_close(model(sample, timestep, class_labels=labels).sample, trained)
    torch.manual_seed(1)
    assert not torch.allclose(model(sample, timestep, class_labels=labels).sample, trained)

    model.eval()
    torch.testing.assert_close(model(sample, timestep, class_labels=labels).sample, conditional)


def test_id2label_is_stored_with_integer_keys(tmp_path, build_denoiser):
    model = build_denoiser(num_class_embeds=2, id2label={0: "zero", "1": "one"})
    assert model.config.id2label == {0: "zero", 1: "one"}
    model.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).config.id2label == {0: "zero", 1: "one"}


# ---------------------------------------------------------------- text conditioning and attention


def test_cross_attention_reads_the_text(build_denoiser):
    model = build_denoiser(cross_attention_dim=12)
    sample, timestep, text = make_inputs()
    _, _, other_text = make_inputs(seed=2)
    first = model(sample, timestep, encoder_hidden_states=text).sample
    assert not torch.allclose(first, model(sample, timestep, encoder_hidden_states=other_text).sample)
    # keys and values come from the text, so its length is free
    longer = torch.cat([text, text[:, :4]], dim=1)
    assert model(sample, timestep, encoder_hidden_states=longer).sample.shape == first.shape


def test_encoder_hidden_states_required_exactly_for_text_models_and_of_the_right_shape(build_denoiser):
    sample, timestep, text = make_inputs()
    text_model = build_denoiser(cross_attention_dim=12)
    with pytest.raises(ValueError, match="encoder_hidden_states.*required"):
        text_model(sample, timestep)
    with pytest.raises(ValueError, match="encoder_hidden_states.*cross_attention_dim"):
        build_denoiser()(sample, timestep, encoder_hidden_states=text)
    for wrong in (text[..., :8], text[:1], text[0]):
        with pytest.raises(ValueError, match=r"`encoder_hidden_states` must have shape \(2, sequence_length, 12\)"):
            text_model(sample, timestep, encoder_hidden_states=wrong)


def test_attention_processors_are_diffusers_and_swappable(backbone, build_denoiser):
    model = build_denoiser(cross_attention_dim=12)
    sample, timestep, text = make_inputs()
    processors = model.attn_processors
    assert len(processors) == FACTS[backbone]["attention_layers"]
    # scaled_dot_product_attention by default
    assert all(isinstance(processor, AttnProcessor2_0) for processor in processors.values())
    expected = model(sample, timestep, encoder_hidden_states=text).sample

    model.set_attn_processor(AttnProcessor())

    assert all(isinstance(processor, AttnProcessor) for processor in model.attn_processors.values())
    torch.testing.assert_close(model(sample, timestep, encoder_hidden_states=text).sample, expected)


@pytest.mark.parametrize("backbone, num_attention_layers", DENOISERS)
def test_peft_lora_trains_saves_loads_and_scales(tmp_path, build_text_denoiser, backbone, num_attention_layers):
    # the diffusers LoRA recipe (train_text_to_image_lora.py) on our denoisers, with the real peft
    from peft import LoraConfig

    model = build_text_denoiser(backbone)
    sample, timestep, text = make_inputs()
    base = model(sample, timestep, encoder_hidden_states=text).sample

    model.requires_grad_(False)
    target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=target_modules))
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    # one A and one B matrix for each projection of each attention layer
    assert len(trainable) == 2 * num_attention_layers * len(target_modules)
    assert all("lora_" in name for name in trainable)
    # LoRA's B starts at zero: the adapter starts as the identity
    torch.testing.assert_close(model(sample, timestep, encoder_hidden_states=text).sample, base)

    frozen = {name: parameter.clone() for name, parameter in model.named_parameters() if not parameter.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(3):
        loss = model(sample, timestep, encoder_hidden_states=text).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        tuned = model(sample, timestep, encoder_hidden_states=text).sample
        assert not torch.allclose(tuned, base)
        for name, parameter in model.named_parameters():
            if name in frozen:
                assert torch.equal(parameter, frozen[name]), name
        # cross_attention_kwargs={"scale": 0} switches the adapter off, as on diffusers' U-Nets
        off = model(sample, timestep, encoder_hidden_states=text, cross_attention_kwargs={"scale": 0.0}).sample
        torch.testing.assert_close(off, base)

    model.save_lora_adapter(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = build_text_denoiser(backbone)
    # diffusers' load_lora_adapter looks for a pickle unless told otherwise
    fresh.load_lora_adapter(str(tmp_path / "lora"), prefix=None, use_safetensors=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(sample, timestep, encoder_hidden_states=text).sample, tuned)
        fresh.disable_adapters()
        torch.testing.assert_close(fresh(sample, timestep, encoder_hidden_states=text).sample, base)


# ---------------------------------------------------------------- training machinery


def test_gradient_checkpointing_gives_the_same_gradients(backbone, build_denoiser):
    model = build_denoiser(cross_attention_dim=12).train()
    sample, timestep, text = make_inputs()
    labels = torch.tensor([0, 2])

    def gradients():
        model.zero_grad()
        model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample.square().mean().backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    reference = gradients()
    checkpointed_blocks = []

    def counting_checkpoint(module, *args):
        checkpointed_blocks.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(counting_checkpoint)
    checkpointed = gradients()
    counts = {name: checkpointed_blocks.count(name) for name in set(checkpointed_blocks)}
    assert counts == FACTS[backbone]["checkpointed"]
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], msg=name)
    # no checkpointing without gradients (inference)
    with torch.no_grad():
        model(sample, timestep, encoder_hidden_states=text, class_labels=labels)
    assert len(checkpointed_blocks) == sum(counts.values())


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_traces_the_whole_graph(build_denoiser, compiler):
    # aot_eager: Dynamo + AOTAutograd without the C++ compile of inductor (minutes with a cold cache on the shared
    # 2-core machine, hence behind RUN_SLOW=1)
    model = build_denoiser(cross_attention_dim=12)
    sample, timestep, text = make_inputs()
    labels = torch.tensor([0, 3])
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
            model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
            atol=1e-5,
            rtol=1e-5,
        )


def test_runs_in_bfloat16(build_denoiser):
    model = build_denoiser(cross_attention_dim=12)
    sample, timestep, text = make_inputs()
    labels = torch.tensor([0, 3])
    reference = model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample
    model.to(torch.bfloat16)
    with torch.no_grad():
        output = model(sample.bfloat16(), timestep, encoder_hidden_states=text.bfloat16(), class_labels=labels).sample
    assert output.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa
    torch.testing.assert_close(output.float(), reference, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip_bit_exactly(tmp_path, build_denoiser):
    model = build_denoiser(cross_attention_dim=12, prediction_type="v_prediction")
    model_class = type(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "diffusion_pytorch_model.bin").exists()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == model_class.__name__

    loaded = model_class.from_pretrained(tmp_path).eval()

    loaded_config = json.loads(loaded.to_json_string())
    assert loaded_config.pop("_name_or_path") == str(tmp_path)
    assert loaded_config == json.loads(model.to_json_string())
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded_state[name], tensor), name
    sample, timestep, text = make_inputs()
    labels = torch.tensor([2, 0])
    assert torch.equal(
        loaded(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
        model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
    )


def test_load_in_float16(tmp_path, build_denoiser):
    model = build_denoiser()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float16}


@pytest.mark.parametrize("loading", [{"device_map": "cpu"}, {"low_cpu_mem_usage": False}])
def test_load_with_device_map_or_without_low_cpu_mem_usage(tmp_path, build_denoiser, loading):
    model = build_denoiser()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, **loading)
    sample, timestep, _ = make_inputs()
    assert torch.equal(loaded(sample, timestep).sample, model(sample, timestep).sample)


class CodeRunningPayload:
    """A pickle payload whose unpickling would create `marker`: proof of code execution if it ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_loads_tensors_only(tmp_path, build_denoiser):
    model = build_denoiser()
    model_class = type(model)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()

    # as diffusers: use_safetensors=None falls back to the .bin, read with torch.load(weights_only=True)
    for loaded in (
        model_class.from_pretrained(tmp_path),
        model_class.from_pretrained(tmp_path, use_safetensors=False),
    ):
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name

    # use_safetensors=True is strict, and says which folder holds the pickle and how to load it
    with pytest.raises(OSError, match=f"{tmp_path}.*use_safetensors=False"):
        model_class.from_pretrained(tmp_path, use_safetensors=True)
    model.save_pretrained(tmp_path / "denoiser", safe_serialization=False)
    with pytest.raises(OSError, match=f"{tmp_path / 'denoiser'}.*use_safetensors=False"):
        model_class.from_pretrained(tmp_path, subfolder="denoiser", use_safetensors=True)


def test_code_running_pickle_runs_no_code(tmp_path, backbone, build_denoiser):
    model = build_denoiser()
    model.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({FACTS[backbone]["tensors"][0]: CodeRunningPayload(marker)}, tmp_path / "diffusion_pytorch_model.bin")

    for use_safetensors in (None, False):
        with pytest.raises(OSError, match="Unable to load weights"):
            type(model).from_pretrained(tmp_path, use_safetensors=use_safetensors)
    assert not marker.exists()


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_checkpoint_missing_a_tensor_is_refused(tmp_path, backbone, build_denoiser, low_cpu_mem_usage):
    model = build_denoiser()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    missing = FACTS[backbone]["tensors"]
    for name in missing:
        del state_dict[name]
    save_file(state_dict, weights)

    # diffusers only warns and leaves the two parameters on the meta device (or randomly initialised)
    with pytest.raises(ValueError, match=rf"lacks 2 tensor.*\['{missing[0]}', '{missing[1]}'\]"):
        type(model).from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)


def test_output_loading_info_is_still_returned(tmp_path, build_denoiser):
    model = build_denoiser()
    model.save_pretrained(tmp_path)
    loaded, loading_info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, type(model))
    assert loading_info["missing_keys"] == [] and loading_info["unexpected_keys"] == []


# ---------------------------------------------------------------- inside diffusers' own pipeline loops


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, "SculptScheduler"])
def test_runs_as_the_unet_of_ddpm_pipeline(build_denoiser, scheduler_class):
    # DDPMPipeline calls unet(sample, t).sample and reads unet.config.sample_size and in_channels: an unconditional
    # RGB model
    from sculptdiff import SculptScheduler

    scheduler_class = SculptScheduler if scheduler_class == "SculptScheduler" else scheduler_class
    model = build_denoiser(in_channels=3, out_channels=3, num_class_embeds=None, id2label=None)
    pipeline = DDPMPipeline(unet=model, scheduler=scheduler_class(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)

    images = pipeline(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images

    # DDPMPipeline's loop written out: our prediction goes to the scheduler as diffusers' UNet2DModel's would
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 3, 8, 8), generator=generator)
    scheduler = scheduler_class(num_train_timesteps=1000)
    scheduler.set_timesteps(2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = scheduler.step(model(sample, t).sample, t, sample, generator=generator).prev_sample
    expected = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(images, expected, atol=1e-6)
    # and the model matters: a fresh (zero-predicting) model gives other images
    pipeline.unet = type(model).from_config(model.config).eval()
    fresh = pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert not np.allclose(fresh.images, images, atol=1e-3)


def test_runs_as_the_unet_of_stable_diffusion_pipeline(build_denoiser, build_stable_diffusion):
    # Stable Diffusion's U-Net: the VAE's 4 latent channels, text through cross-attention, no classes.
    # StableDiffusionPipeline passes timestep_cond, cross_attention_kwargs and added_cond_kwargs, and reads
    # unet.config.time_cond_proj_dim, sample_size and in_channels
    denoiser = build_denoiser(
        in_channels=4, out_channels=4, num_class_embeds=None, id2label=None, cross_attention_dim=32
    )
    pipeline = build_stable_diffusion(denoiser)
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

    # default size: sample_size (8) * vae_scale_factor (2)
    for images in (guided, plain, other_prompt):
        assert images.shape == (1, 16, 16, 3)
        assert np.isfinite(images).all()
    # guidance and the prompt reach the denoiser
    assert not np.allclose(guided, plain)
    assert not np.allclose(plain, other_prompt)
    np.testing.assert_array_equal(generate("a photo of digit seven", 7.5), guided)
