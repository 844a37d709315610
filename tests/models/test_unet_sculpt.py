import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from safetensors.torch import load_file, save_file

from sculptdiff.models.unet_sculpt import LabelEmbedder, SculptUNet2DModel, SculptUNet2DOutput


def make_inputs(batch_size: int = 2, channels: int = 1, height: int = 8, width: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch_size, channels, height, width, generator=generator)
    timestep = torch.tensor([10, 700])[:batch_size]
    return sample, timestep


def make_text(batch_size: int = 2, sequence_length: int = 5, width: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, sequence_length, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- architecture and shapes


@pytest.mark.parametrize(
    "overrides, conditioning",
    [
        ({"block_out_channels": (8,), "attention_levels": (False,)}, {}),
        ({"attention_levels": (False, False)}, {}),
        ({"block_out_channels": (8, 16, 16), "layers_per_block": 2, "attention_levels": (True, True, True)}, {}),
        ({}, {"class_labels": torch.tensor([0, 2])}),
        ({"num_class_embeds": None, "id2label": None}, {}),
        ({"cross_attention_dim": 12}, {"encoder_hidden_states": make_text()}),
        ({"in_channels": 4, "out_channels": 2, "cross_attention_dim": 12}, {}),
    ],
)
@pytest.mark.parametrize("height, width", [(8, 8), (4, 12)])
def test_output_shape(overrides, conditioning, height, width, build_tiny_unet):
    model = build_tiny_unet(**overrides)
    sample, timestep = make_inputs(channels=model.config.in_channels, height=height, width=width)
    if model.config.cross_attention_dim is not None:
        conditioning = {"encoder_hidden_states": make_text(), **conditioning}

    output = model(sample, timestep, **conditioning)

    assert isinstance(output, SculptUNet2DOutput)
    assert output.sample.shape == (2, model.config.out_channels, height, width)
    assert torch.isfinite(output.sample).all()
    assert model(sample, timestep, return_dict=False, **conditioning)[0].shape == output.sample.shape


def test_zero_initialised_model_predicts_zero(build_tiny_unet):
    # ADM: the output conv, the last conv of every residual block and every attention output start at zero
    # (from_config builds the tiny U-Net's architecture afresh, without the builder's random draws)
    model = SculptUNet2DModel.from_config(build_tiny_unet(cross_attention_dim=12).config)
    sample, timestep = make_inputs()
    for name, parameter in model.named_parameters():
        if name.endswith(("conv2.weight", "to_out.0.weight")) or name.startswith("conv_out"):
            assert not parameter.any(), name
    output = model(sample, timestep, encoder_hidden_states=make_text(), class_labels=torch.tensor([0, 1])).sample
    assert torch.equal(output, torch.zeros_like(output))


def test_skip_connections_and_time_embedding_reach_the_output(build_tiny_unet):
    model = build_tiny_unet()
    sample, timestep = make_inputs()
    reference = model(sample, timestep).sample
    # a later timestep changes the prediction: the time embedding enters the blocks
    assert not torch.allclose(model(sample, timestep + 100).sample, reference)
    # the input reaches the output through the network: perturbing one pixel changes its neighbourhood
    perturbed = sample.clone()
    perturbed[:, :, 0, 0] += 1.0
    assert not torch.allclose(model(perturbed, timestep).sample[:, :, 0, 0], reference[:, :, 0, 0])


def test_each_sample_is_computed_independently_of_its_batch(build_tiny_unet):
    # each image's timestep, label and text reach that image alone, and nothing (a norm, the attention) mixes the
    # batch: the pipeline's guided batch [uncond, cond] and a batch of mixed classes rely on it
    model = build_tiny_unet(cross_attention_dim=12)
    sample, _ = make_inputs(batch_size=3)
    timestep = torch.tensor([10, 700, 300])
    labels = torch.tensor([0, 4, 5])
    text = make_text(batch_size=3)
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


def test_golden_numbers(build_tiny_unet):
    # the shape these numbers were pinned on (RGB, 3 classes, text), kept so that they stay comparable
    model = build_tiny_unet(in_channels=3, out_channels=3, num_class_embeds=3, id2label=None, cross_attention_dim=12)
    sample, timestep = make_inputs(channels=3)
    with torch.no_grad():
        output = model(sample, timestep, encoder_hidden_states=make_text(), class_labels=torch.tensor([0, 3])).sample
    expected = torch.tensor(GOLDEN_SLICE)
    torch.testing.assert_close(output[0, 0, 0, :4], expected[:4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output[1, 2, -1, -4:], expected[4:], atol=1e-4, rtol=1e-4)


GOLDEN_SLICE = [0.500952, 0.469951, -0.057881, -0.580545, -0.430706, -0.032686, 0.521798, 0.893437]


# ---------------------------------------------------------------- timesteps and input checks


@pytest.mark.parametrize(
    "timestep", [10, 10.0, torch.tensor(10), torch.tensor([10]), torch.tensor([10, 10]), torch.tensor(10.0)]
)
def test_timestep_forms_broadcast_to_the_batch(timestep, build_tiny_unet):
    model = build_tiny_unet()
    sample, _ = make_inputs()
    expected = model(sample, torch.tensor([10, 10])).sample
    torch.testing.assert_close(model(sample, timestep).sample, expected)


def test_float_timesteps_are_not_rounded(build_tiny_unet):
    # flow-matching schedulers pass sigma * num_train_timesteps
    model = build_tiny_unet()
    sample, _ = make_inputs()
    assert not torch.allclose(model(sample, 10.25).sample, model(sample, 10).sample)


def test_timestep_of_wrong_length_is_rejected(build_tiny_unet):
    model = build_tiny_unet()
    sample, _ = make_inputs()
    with pytest.raises(ValueError, match="timestep"):
        model(sample, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("height, width", [(6, 8), (8, 10)])
def test_spatial_size_must_be_a_multiple_of_the_downsampling_factor(height, width, build_tiny_unet):
    model = build_tiny_unet(block_out_channels=(8, 16, 16), attention_levels=(False, False, True))
    sample, timestep = make_inputs(height=height, width=width)
    with pytest.raises(ValueError, match=rf"\({height}, {width}\).*multiples of 4"):
        model(sample, timestep)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"attention_levels": (True,)}, "attention_levels"),
        ({"block_out_channels": (8, 18)}, "norm_num_groups"),
        ({"block_out_channels": (8, 12)}, "attention_head_dim"),
        ({"attention_levels": (False, False), "cross_attention_dim": 12}, "cross_attention_dim"),
        ({"conditioning_dropout_prob": 1.0}, "conditioning_dropout_prob"),
    ],
)
def test_bad_config_is_rejected(overrides, match, build_tiny_unet):
    config = build_tiny_unet().config
    with pytest.raises(ValueError, match=match):
        SculptUNet2DModel.from_config(config, **overrides)


# ---------------------------------------------------------------- class conditioning


def test_class_table_has_a_null_row_used_for_missing_labels(build_tiny_unet):
    model = build_tiny_unet()
    assert model.class_embedding.embedding_table.num_embeddings == 6
    sample, timestep = make_inputs()
    null_output = model(sample, timestep).sample
    torch.testing.assert_close(model(sample, timestep, class_labels=torch.tensor([5, 5])).sample, null_output)
    assert not torch.allclose(model(sample, timestep, class_labels=torch.tensor([0, 0])).sample, null_output)
    # a single label broadcasts to the batch
    torch.testing.assert_close(
        model(sample, timestep, class_labels=torch.tensor(1)).sample,
        model(sample, timestep, class_labels=torch.tensor([1, 1])).sample,
    )


@pytest.mark.parametrize("labels", [[-1, 0], [0, 6], [0.0, 1.0], [0, 1, 2]])
def test_bad_class_labels_are_rejected(labels, build_tiny_unet):
    model = build_tiny_unet()
    sample, timestep = make_inputs()
    with pytest.raises(ValueError, match="class_labels"):
        model(sample, timestep, class_labels=torch.tensor(labels))


def test_class_labels_on_an_unconditional_model_are_rejected(build_tiny_unet):
    model = build_tiny_unet(num_class_embeds=None, id2label=None)
    sample, timestep = make_inputs()
    with pytest.raises(ValueError, match="class_labels.*num_class_embeds"):
        model(sample, timestep, class_labels=torch.tensor([0, 1]))


def test_token_drop_replaces_labels_by_the_null_class():
    embedder = LabelEmbedder(num_classes=10, hidden_size=4, dropout_prob=0.3)
    labels = torch.arange(10).repeat(100)
    torch.manual_seed(0)
    dropped = embedder.token_drop(labels)
    is_null = dropped == 10
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert 0.25 < is_null.float().mean() < 0.35


def test_conditioning_dropout_only_in_training_mode(build_tiny_unet):
    model = build_tiny_unet(conditioning_dropout_prob=0.5)
    sample, timestep = make_inputs(batch_size=1)
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

    model.eval()
    torch.testing.assert_close(model(sample, timestep, class_labels=labels).sample, conditional)


def test_id2label_is_stored_with_integer_keys(tmp_path, build_tiny_unet):
    model = build_tiny_unet(num_class_embeds=2, id2label={0: "zero", "1": "one"})
    assert model.config.id2label == {0: "zero", 1: "one"}
    model.save_pretrained(tmp_path)
    assert SculptUNet2DModel.from_pretrained(tmp_path).config.id2label == {0: "zero", 1: "one"}


# ---------------------------------------------------------------- text conditioning and attention


def test_cross_attention_reads_the_text(build_tiny_unet):
    model = build_tiny_unet(cross_attention_dim=12)
    sample, timestep = make_inputs()
    first = model(sample, timestep, encoder_hidden_states=make_text(seed=2)).sample
    second = model(sample, timestep, encoder_hidden_states=make_text(seed=3)).sample
    assert not torch.allclose(first, second)
    # keys and values come from the text, so its length is free
    assert model(sample, timestep, encoder_hidden_states=make_text(sequence_length=9)).sample.shape == first.shape


def test_encoder_hidden_states_required_exactly_for_text_models(build_tiny_unet):
    sample, timestep = make_inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states.*required"):
        build_tiny_unet(cross_attention_dim=12)(sample, timestep)
    with pytest.raises(ValueError, match="encoder_hidden_states.*cross_attention_dim"):
        build_tiny_unet()(sample, timestep, encoder_hidden_states=make_text())


def test_attention_processors_are_diffusers_and_swappable(build_tiny_unet):
    model = build_tiny_unet(cross_attention_dim=12)
    sample, timestep = make_inputs()
    text = make_text()
    processors = model.attn_processors
    # down level 1 (self + cross), mid (self + cross), up level 1 with 2 blocks (self + cross each)
    assert len(processors) == 8
    assert all(isinstance(processor, AttnProcessor2_0) for processor in processors.values())
    expected = model(sample, timestep, encoder_hidden_states=text).sample

    model.set_attn_processor(AttnProcessor())

    assert all(isinstance(processor, AttnProcessor) for processor in model.attn_processors.values())
    torch.testing.assert_close(model(sample, timestep, encoder_hidden_states=text).sample, expected)


def test_lora_target_names_exist(build_tiny_unet):
    # PEFT's LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"]) matches module names by suffix
    model = build_tiny_unet(cross_attention_dim=12)
    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in ("to_q", "to_k", "to_v", "to_out.0"):
        # 4 attention blocks (down, mid, 2 up) with a self- and a cross-attention each
        assert len([name for name in linear_names if name.endswith("." + target)]) == 8, target


def test_stable_diffusion_keywords(build_tiny_unet):
    model = build_tiny_unet(cross_attention_dim=12)
    sample, timestep = make_inputs()
    text = make_text()
    expected = model(sample, timestep, encoder_hidden_states=text).sample
    output = model(
        sample,
        timestep,
        encoder_hidden_states=text,
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
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


def test_time_cond_proj_dim_adds_timestep_cond(build_tiny_unet):
    model = build_tiny_unet(time_cond_proj_dim=4)
    sample, timestep = make_inputs()
    without = model(sample, timestep).sample
    with_condition = model(sample, timestep, timestep_cond=torch.ones(2, 4)).sample
    assert not torch.allclose(without, with_condition)


# ---------------------------------------------------------------- training machinery


def test_gradient_checkpointing_gives_the_same_gradients(build_tiny_unet):
    model = build_tiny_unet(cross_attention_dim=12).train()
    sample, timestep = make_inputs()
    text = make_text()
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
    # down 1 + 1, mid 2, up 2 + 2 residual blocks; attention at level 1 (1 down, 2 up) and in the mid block
    assert checkpointed_blocks.count("ResBlock") == 8
    assert checkpointed_blocks.count("AttentionBlock") == 4
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], msg=name)


def test_torch_compile_traces_the_whole_graph(build_tiny_unet):
    # aot_eager: Dynamo + AOTAutograd without the C++ compile of inductor (see the slow test below)
    model = build_tiny_unet(cross_attention_dim=12)
    sample, timestep = make_inputs()
    text = make_text()
    labels = torch.tensor([0, 3])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
            model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
        )


@pytest.mark.slow
def test_torch_compile_inductor(build_tiny_unet):
    # inductor compiles C++ kernels: 1.5-3 min with a cold cache on the shared 2-core machine
    model = build_tiny_unet()
    sample, timestep = make_inputs()
    labels = torch.tensor([0, 3])
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(sample, timestep, class_labels=labels).sample,
            model(sample, timestep, class_labels=labels).sample,
            atol=1e-5,
            rtol=1e-5,
        )


# ---------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip_bit_exactly(tmp_path, build_tiny_unet):
    model = build_tiny_unet(cross_attention_dim=12, prediction_type="v_prediction")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "diffusion_pytorch_model.bin").exists()

    loaded = SculptUNet2DModel.from_pretrained(tmp_path).eval()

    loaded_config = json.loads(loaded.to_json_string())
    assert loaded_config.pop("_name_or_path") == str(tmp_path)
    assert loaded_config == json.loads(model.to_json_string())
    loaded_state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded_state[name], tensor), name
    sample, timestep = make_inputs()
    text = make_text()
    assert torch.equal(
        loaded(sample, timestep, encoder_hidden_states=text).sample,
        model(sample, timestep, encoder_hidden_states=text).sample,
    )


def test_load_in_float16(tmp_path, build_tiny_unet):
    build_tiny_unet().save_pretrained(tmp_path)
    loaded = SculptUNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float16}


class CodeRunningPayload:
    """A pickle payload whose unpickling would create `marker`: proof of code execution if it ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_loads_tensors_only(tmp_path, build_tiny_unet):
    model = build_tiny_unet()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()

    # as diffusers: use_safetensors=None falls back to the .bin, read with torch.load(weights_only=True)
    for loaded in (
        SculptUNet2DModel.from_pretrained(tmp_path),
        SculptUNet2DModel.from_pretrained(tmp_path, use_safetensors=False),
    ):
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name

    # use_safetensors=True is strict, and says which folder holds the pickle and how to load it
    with pytest.raises(OSError, match=f"{tmp_path}.*use_safetensors=False"):
        SculptUNet2DModel.from_pretrained(tmp_path, use_safetensors=True)
    with pytest.raises(OSError, match=f"{tmp_path / 'unet'}.*use_safetensors=False"):
        model.save_pretrained(tmp_path / "unet", safe_serialization=False)
        SculptUNet2DModel.from_pretrained(tmp_path, subfolder="unet", use_safetensors=True)


def test_code_running_pickle_runs_no_code(tmp_path, build_tiny_unet):
    build_tiny_unet().save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"conv_in.weight": CodeRunningPayload(marker)}, tmp_path / "diffusion_pytorch_model.bin")

    for use_safetensors in (None, False):
        with pytest.raises(OSError, match="Unable to load weights"):
            SculptUNet2DModel.from_pretrained(tmp_path, use_safetensors=use_safetensors)
    assert not marker.exists()


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_checkpoint_missing_a_tensor_is_refused(tmp_path, low_cpu_mem_usage, build_tiny_unet):
    build_tiny_unet().save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    del state_dict["conv_out.bias"], state_dict["time_embedding.linear_1.weight"]
    save_file(state_dict, weights)

    # diffusers only warns and leaves the two parameters on the meta device (or randomly initialised)
    with pytest.raises(ValueError, match=r"lacks 2 tensor.*\['conv_out.bias', 'time_embedding.linear_1.weight'\]"):
        SculptUNet2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)


def test_output_loading_info_is_still_returned(tmp_path, build_tiny_unet):
    build_tiny_unet().save_pretrained(tmp_path)
    model, loading_info = SculptUNet2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, SculptUNet2DModel)
    assert loading_info["missing_keys"] == [] and loading_info["unexpected_keys"] == []
