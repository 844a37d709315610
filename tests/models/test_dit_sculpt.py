import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file

import sculptdiff
from sculptdiff import SculptScheduler
from sculptdiff.models.transformers.dit_sculpt import DiTBlock, SculptDiT2DModel, SculptDiT2DOutput


def tiny_config(**overrides) -> dict:
    config = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "patch_size": 2,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
    }
    config.update(overrides)
    return config


def build_model(**overrides) -> SculptDiT2DModel:
    """A tiny DiT whose zero-initialised layers (adaLN-Zero, final layer, biases) are drawn at random."""
    torch.manual_seed(0)
    model = SculptDiT2DModel(**tiny_config(**overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return model.eval()


def make_inputs(batch_size: int = 2, channels: int = 3, height: int = 8, width: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch_size, channels, height, width, generator=generator)
    timestep = torch.tensor([10, 700])[:batch_size]
    return sample, timestep


def make_text(batch_size: int = 2, sequence_length: int = 5, width: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, sequence_length, width, generator=torch.Generator().manual_seed(seed))


def record_blocks(model: SculptDiT2DModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hooks every transformer block; the returned list fills with (input stream, output stream) on each forward."""
    records = []

    def record(block, inputs, output):
        records.append((inputs[0], output))

    for block in model.transformer_blocks:
        block.register_forward_hook(record)
    return records


# ---------------------------------------------------------------- architecture and shapes


def test_exported_from_the_package():
    assert sculptdiff.SculptDiT2DModel is SculptDiT2DModel
    assert sculptdiff.models.SculptDiT2DOutput is SculptDiT2DOutput


@pytest.mark.parametrize(
    "overrides, conditioning",
    [
        ({}, {}),
        ({"num_class_embeds": 3}, {"class_labels": torch.tensor([0, 2])}),
        ({"cross_attention_dim": 12}, {"encoder_hidden_states": make_text()}),
        (
            {"in_channels": 4, "out_channels": 2, "num_class_embeds": 3, "cross_attention_dim": 12},
            {"class_labels": torch.tensor([1, 3]), "encoder_hidden_states": make_text()},
        ),
        ({"patch_size": 1, "num_layers": 1}, {}),
        ({"patch_size": 4, "mlp_ratio": 2.0}, {}),
    ],
)
# (4, 12): not square; (16, 16): not the trained sample_size, so the position embedding is interpolated
@pytest.mark.parametrize("height, width", [(8, 8), (4, 12), (16, 16)])
def test_output_shape(overrides, conditioning, height, width):
    model = build_model(**overrides)
    sample, timestep = make_inputs(channels=model.config.in_channels, height=height, width=width)

    output = model(sample, timestep, **conditioning)

    assert isinstance(output, SculptDiT2DOutput)
    assert output.sample.shape == (2, model.config.out_channels, height, width)
    assert torch.isfinite(output.sample).all()
    assert model(sample, timestep, return_dict=False, **conditioning)[0].shape == output.sample.shape


def test_fresh_model_is_the_identity_on_its_residual_stream_and_predicts_zero():
    # adaLN-Zero (DiT section 3.2): zero modulation, so every gate is 0; zero final layer; zero cross-attention output
    torch.manual_seed(0)
    model = SculptDiT2DModel(**tiny_config(num_class_embeds=3, cross_attention_dim=12)).eval()
    sample, timestep = make_inputs()
    records = record_blocks(model)

    output = model(sample, timestep, encoder_hidden_states=make_text(), class_labels=torch.tensor([0, 1])).sample

    assert len(records) == 2
    for block_input, block_output in records:
        assert block_input.abs().max() > 0.1
        assert torch.equal(block_output, block_input)
    assert torch.equal(output, torch.zeros_like(output))
    # the branches themselves are not zero: the gates close them
    block = model.transformer_blocks[0]
    assert block.self_attention.to_out[0].weight.any() and block.feed_forward.net[2].weight.any()
    for layer in (block.norm1.linear, block.cross_attention.to_out[0], model.norm_out.linear, model.proj_out):
        assert not layer.weight.any() and not layer.bias.any()


def test_blocks_change_the_stream_once_the_gates_open():
    model = build_model(cross_attention_dim=12)
    sample, timestep = make_inputs()
    records = record_blocks(model)
    model(sample, timestep, encoder_hidden_states=make_text())
    for block_input, block_output in records:
        assert not torch.allclose(block_output, block_input)


def test_a_fresh_model_learns_every_layer():
    # the zero-initialised layers do not block the gradient: after one step the final layer opens, then the gates
    torch.manual_seed(0)
    model = SculptDiT2DModel(**tiny_config(num_class_embeds=3, cross_attention_dim=12)).train()
    sample, timestep = make_inputs()
    text, labels = make_text(), torch.tensor([0, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    received_gradient = {name: False for name, _ in model.named_parameters()}
    losses = []
    for _ in range(3):
        loss = (model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample - sample).square()
        loss.mean().backward()
        losses.append(loss.mean().item())
        for name, parameter in model.named_parameters():
            received_gradient[name] |= bool(parameter.grad is not None and parameter.grad.any())
        optimizer.step()
        optimizer.zero_grad()
    assert [name for name, received in received_gradient.items() if not received] == []
    assert losses[-1] < losses[0]


def test_position_embedding_is_the_fixed_2d_sincos_table():
    model = build_model()
    # 8x8 pixels in 2x2 patches: a 4x4 grid of tokens of width 2 * 8
    expected = get_2d_sincos_pos_embed(16, 4, base_size=4, output_type="pt").float()
    torch.testing.assert_close(model.pos_embed.pos_embed[0], expected)
    # fixed, not learned, and not saved: it is a function of the config
    assert "pos_embed.pos_embed" not in model.state_dict()
    assert all("pos_embed.pos_embed" not in name for name, _ in model.named_parameters())


def test_positions_break_the_permutation_symmetry_of_attention():
    # without a position embedding, swapping two patches of the input would only swap them in the output
    model = build_model()
    sample, timestep = make_inputs()
    swapped = sample.clone()
    swapped[:, :, 0:2, 0:2], swapped[:, :, 6:8, 6:8] = sample[:, :, 6:8, 6:8], sample[:, :, 0:2, 0:2]
    output = model(sample, timestep).sample
    output_of_swapped = model(swapped, timestep).sample
    assert not torch.allclose(output_of_swapped[:, :, 0:2, 0:2], output[:, :, 6:8, 6:8], atol=1e-3)


@pytest.mark.parametrize("height, width", [(8, 8), (4, 12)])
def test_unpatchify_puts_every_token_back_at_its_patch(height, width):
    # DiT's unpatchify: (N, h*w, p*p*C) -> (N, h, w, p, p, C) -> einsum("nhwpqc->nchpwq") -> (N, C, h*p, w*p)
    model = build_model(out_channels=2)
    sample, timestep = make_inputs(height=height, width=width)
    tokens = []

    def record(layer, inputs, output):
        tokens.append(output)

    model.proj_out.register_forward_hook(record)
    output = model(sample, timestep).sample

    patch_size = 2
    grid = tokens[0].reshape(2, height // patch_size, width // patch_size, patch_size, patch_size, 2)
    expected = torch.einsum("nhwpqc->nchpwq", grid).reshape(2, 2, height, width)
    assert torch.equal(output, expected)


def test_determinism_same_seed_same_output():
    sample, timestep = make_inputs()
    first = build_model(num_class_embeds=3)(sample, timestep, class_labels=torch.tensor([1, 2])).sample
    second = build_model(num_class_embeds=3)(sample, timestep, class_labels=torch.tensor([1, 2])).sample
    assert torch.equal(first, second)


def test_golden_numbers():
    model = build_model(num_class_embeds=3, cross_attention_dim=12)
    sample, timestep = make_inputs()
    with torch.no_grad():
        output = model(sample, timestep, encoder_hidden_states=make_text(), class_labels=torch.tensor([0, 3])).sample
    expected = torch.tensor(GOLDEN_SLICE)
    torch.testing.assert_close(output[0, 0, 0, :4], expected[:4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output[1, 2, -1, -4:], expected[4:], atol=1e-4, rtol=1e-4)


GOLDEN_SLICE = [-0.482002, 0.270686, -0.328984, 0.79017, 0.749434, 0.369993, -0.667889, -0.453087]


# ---------------------------------------------------------------- timesteps and input checks


@pytest.mark.parametrize(
    "timestep", [10, 10.0, torch.tensor(10), torch.tensor([10]), torch.tensor([10, 10]), torch.tensor(10.0)]
)
def test_timestep_forms_broadcast_to_the_batch(timestep):
    model = build_model()
    sample, _ = make_inputs()
    expected = model(sample, torch.tensor([10, 10])).sample
    torch.testing.assert_close(model(sample, timestep).sample, expected)


def test_float_timesteps_are_not_rounded_and_time_reaches_the_output():
    # flow-matching schedulers pass sigma * num_train_timesteps
    model = build_model()
    sample, _ = make_inputs()
    assert not torch.allclose(model(sample, 10.25).sample, model(sample, 10).sample)
    assert not torch.allclose(model(sample, 500).sample, model(sample, 10).sample)


def test_timestep_of_wrong_length_is_rejected():
    model = build_model()
    sample, _ = make_inputs()
    with pytest.raises(ValueError, match="timestep"):
        model(sample, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("height, width", [(6, 8), (8, 10)])
def test_spatial_size_must_be_a_multiple_of_the_patch_size(height, width):
    model = build_model(patch_size=4)
    sample, timestep = make_inputs(height=height, width=width)
    with pytest.raises(ValueError, match=rf"\({height}, {width}\).*multiples of 4 \(`patch_size`\)"):
        model(sample, timestep)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 3, 8), (2, 1, 3, 8, 8)])
def test_sample_of_wrong_shape_is_rejected(shape):
    model = build_model()
    with pytest.raises(ValueError, match=r"`sample` must have shape \(batch_size, 3, height, width\)"):
        model(torch.zeros(shape), 10)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"sample_size": 9}, "sample_size.*multiple of `patch_size`"),
        ({"sample_size": (8, 8)}, "sample_size"),
        ({"patch_size": 0}, "patch_size.*positive integer"),
        ({"num_attention_heads": 3, "attention_head_dim": 2}, "multiple of 4"),
        ({"conditioning_dropout_prob": 1.0}, "conditioning_dropout_prob"),
        ({"conditioning_dropout_prob": -0.1}, "conditioning_dropout_prob"),
    ],
)
def test_bad_config_is_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        SculptDiT2DModel(**tiny_config(**overrides))


@pytest.mark.parametrize("prediction_type", [None, "epsilon", "v_prediction", "sample", "flow"])
def test_prediction_type_is_stored(prediction_type):
    assert SculptDiT2DModel(**tiny_config(prediction_type=prediction_type)).config.prediction_type == prediction_type


def test_stable_diffusion_keywords():
    model = build_model(cross_attention_dim=12)
    sample, timestep = make_inputs()
    text = make_text()
    expected = model(sample, timestep, encoder_hidden_states=text).sample
    output = model(
        sample,
        timestep,
        encoder_hidden_states=text,
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs={},
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


def test_time_cond_proj_dim_adds_timestep_cond():
    model = build_model(time_cond_proj_dim=4)
    assert model.config.time_cond_proj_dim == 4
    sample, timestep = make_inputs()
    without = model(sample, timestep).sample
    with_condition = model(sample, timestep, timestep_cond=torch.ones(2, 4)).sample
    assert not torch.allclose(without, with_condition)


# ---------------------------------------------------------------- class conditioning


def test_class_table_has_a_null_row_used_for_missing_labels():
    model = build_model(num_class_embeds=3)
    assert model.class_embedding.embedding_table.num_embeddings == 4
    sample, timestep = make_inputs()
    null_output = model(sample, timestep).sample
    torch.testing.assert_close(model(sample, timestep, class_labels=torch.tensor([3, 3])).sample, null_output)
    assert not torch.allclose(model(sample, timestep, class_labels=torch.tensor([0, 0])).sample, null_output)
    # a single label broadcasts to the batch
    torch.testing.assert_close(
        model(sample, timestep, class_labels=torch.tensor(1)).sample,
        model(sample, timestep, class_labels=torch.tensor([1, 1])).sample,
    )


@pytest.mark.parametrize(
    "labels, match",
    [
        ([-1, 0], r"in \[0, 3\]"),
        ([0, 4], r"in \[0, 3\]"),
        ([0.0, 1.0], "integer class indices"),
        ([True, False], "integer class indices"),
        ([0, 1, 2], "1 or 2 \\(batch size\\)"),
    ],
)
def test_bad_class_labels_are_rejected(labels, match):
    model = build_model(num_class_embeds=3)
    sample, timestep = make_inputs()
    with pytest.raises(ValueError, match=f"class_labels.*{match}"):
        model(sample, timestep, class_labels=torch.tensor(labels))


def test_class_labels_on_an_unconditional_model_are_rejected():
    model = build_model()
    sample, timestep = make_inputs()
    with pytest.raises(ValueError, match="class_labels.*num_class_embeds"):
        model(sample, timestep, class_labels=torch.tensor([0, 1]))


def test_label_dropout_uses_the_null_class_only_in_training_and_follows_the_seed():
    model = build_model(num_class_embeds=3, conditioning_dropout_prob=0.5)
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
    # the draw comes from torch's global generator: the same seed drops the same labels, another seed others
    torch.manual_seed(0)
    torch.testing.assert_close(model(sample, timestep, class_labels=labels).sample, trained)
    torch.manual_seed(1)
    assert not torch.allclose(model(sample, timestep, class_labels=labels).sample, trained)

    model.eval()
    torch.testing.assert_close(model(sample, timestep, class_labels=labels).sample, conditional)


def test_id2label_is_stored_with_integer_keys(tmp_path):
    model = SculptDiT2DModel(**tiny_config(num_class_embeds=2, id2label={0: "zero", "1": "one"}))
    assert model.config.id2label == {0: "zero", 1: "one"}
    model.save_pretrained(tmp_path)
    assert SculptDiT2DModel.from_pretrained(tmp_path).config.id2label == {0: "zero", 1: "one"}


# ---------------------------------------------------------------- text conditioning and attention


def test_cross_attention_reads_the_text():
    model = build_model(cross_attention_dim=12)
    sample, timestep = make_inputs()
    first = model(sample, timestep, encoder_hidden_states=make_text(seed=2)).sample
    second = model(sample, timestep, encoder_hidden_states=make_text(seed=3)).sample
    assert not torch.allclose(first, second)
    # keys and values come from the text, so its length is free
    assert model(sample, timestep, encoder_hidden_states=make_text(sequence_length=9)).sample.shape == first.shape


def test_encoder_hidden_states_required_exactly_for_text_models_and_of_the_right_shape():
    sample, timestep = make_inputs()
    text_model = build_model(cross_attention_dim=12)
    with pytest.raises(ValueError, match="encoder_hidden_states.*required"):
        text_model(sample, timestep)
    with pytest.raises(ValueError, match="encoder_hidden_states.*cross_attention_dim"):
        build_model()(sample, timestep, encoder_hidden_states=make_text())
    for text in (make_text(width=8), make_text(batch_size=1), make_text()[0]):
        with pytest.raises(ValueError, match=r"`encoder_hidden_states` must have shape \(2, sequence_length, 12\)"):
            text_model(sample, timestep, encoder_hidden_states=text)


def test_attention_processors_are_diffusers_and_swappable():
    model = build_model(cross_attention_dim=12)
    sample, timestep = make_inputs()
    text = make_text()
    processors = model.attn_processors
    # 2 blocks with a self- and a cross-attention each
    assert len(processors) == 4
    # scaled_dot_product_attention by default
    assert all(isinstance(processor, AttnProcessor2_0) for processor in processors.values())
    expected = model(sample, timestep, encoder_hidden_states=text).sample

    model.set_attn_processor(AttnProcessor())

    assert all(isinstance(processor, AttnProcessor) for processor in model.attn_processors.values())
    torch.testing.assert_close(model(sample, timestep, encoder_hidden_states=text).sample, expected)


def test_peft_lora_with_nonzero_init_changes_the_output_at_once():
    from peft import LoraConfig

    model = build_model()
    sample, timestep = make_inputs()
    base = model(sample, timestep).sample
    # init_lora_weights=False: B is random too, so the adapter is active before any training
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        assert not torch.allclose(model(sample, timestep).sample, base)


# ---------------------------------------------------------------- training machinery


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build_model(num_class_embeds=3, cross_attention_dim=12).train()
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
    assert checkpointed_blocks == ["DiTBlock", "DiTBlock"]
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], msg=name)
    # no checkpointing without gradients (inference)
    with torch.no_grad():
        model(sample, timestep, encoder_hidden_states=text, class_labels=labels)
    assert len(checkpointed_blocks) == 2


def test_no_split_modules_names_the_block():
    model = build_model()
    assert {type(module).__name__ for module in model.modules() if isinstance(module, DiTBlock)} == set(
        model._no_split_modules
    )


def test_torch_compile_traces_the_whole_graph():
    # aot_eager: Dynamo + AOTAutograd without the C++ compile of inductor (see the slow test below)
    model = build_model(num_class_embeds=3, cross_attention_dim=12)
    sample, timestep = make_inputs()
    text = make_text()
    labels = torch.tensor([0, 3])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
            model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
        )


def test_compile_repeated_blocks_compiles_each_transformer_block():
    model = build_model(num_class_embeds=3)
    sample, timestep = make_inputs()
    labels = torch.tensor([0, 3])
    expected = model(sample, timestep, class_labels=labels).sample
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(sample, timestep, class_labels=labels).sample, expected)


@pytest.mark.slow
def test_torch_compile_inductor():
    # inductor compiles C++ kernels: minutes with a cold cache on the shared 2-core machine
    model = build_model(num_class_embeds=3, cross_attention_dim=12)
    sample, timestep = make_inputs()
    text = make_text()
    labels = torch.tensor([0, 3])
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
            model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
            atol=1e-5,
            rtol=1e-5,
        )


# ---------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip_bit_exactly(tmp_path):
    model = build_model(num_class_embeds=3, cross_attention_dim=12, prediction_type="flow")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "diffusion_pytorch_model.bin").exists()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "SculptDiT2DModel"

    loaded = SculptDiT2DModel.from_pretrained(tmp_path).eval()

    loaded_config = json.loads(loaded.to_json_string())
    assert loaded_config.pop("_name_or_path") == str(tmp_path)
    assert loaded_config == json.loads(model.to_json_string())
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded_state[name], tensor), name
    sample, timestep = make_inputs()
    text = make_text()
    labels = torch.tensor([2, 0])
    assert torch.equal(
        loaded(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
        model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample,
    )


def test_runs_in_bfloat16():
    model = build_model(num_class_embeds=3, cross_attention_dim=12)
    sample, timestep = make_inputs()
    text, labels = make_text(), torch.tensor([0, 3])
    reference = model(sample, timestep, encoder_hidden_states=text, class_labels=labels).sample
    model.to(torch.bfloat16)
    with torch.no_grad():
        output = model(sample.bfloat16(), timestep, encoder_hidden_states=text.bfloat16(), class_labels=labels).sample
    assert output.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa
    torch.testing.assert_close(output.float(), reference, atol=0.1, rtol=0.05)


def test_load_in_float16(tmp_path):
    build_model().save_pretrained(tmp_path)
    loaded = SculptDiT2DModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float16}


@pytest.mark.parametrize("loading", [{"device_map": "cpu"}, {"low_cpu_mem_usage": False}])
def test_load_with_device_map_or_without_low_cpu_mem_usage(tmp_path, loading):
    model = build_model(num_class_embeds=3)
    model.save_pretrained(tmp_path)
    loaded = SculptDiT2DModel.from_pretrained(tmp_path, **loading)
    sample, timestep = make_inputs()
    assert torch.equal(loaded(sample, timestep).sample, model(sample, timestep).sample)


class CodeRunningPayload:
    """A pickle payload whose unpickling would create `marker`: proof of code execution if it ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_loads_tensors_only(tmp_path):
    model = build_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()

    # as diffusers: use_safetensors=None falls back to the .bin, read with torch.load(weights_only=True)
    for loaded in (
        SculptDiT2DModel.from_pretrained(tmp_path),
        SculptDiT2DModel.from_pretrained(tmp_path, use_safetensors=False),
    ):
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name

    # use_safetensors=True is strict, and says which folder holds the pickle and how to load it
    with pytest.raises(OSError, match=f"{tmp_path}.*use_safetensors=False"):
        SculptDiT2DModel.from_pretrained(tmp_path, use_safetensors=True)
    model.save_pretrained(tmp_path / "transformer", safe_serialization=False)
    with pytest.raises(OSError, match=f"{tmp_path / 'transformer'}.*use_safetensors=False"):
        SculptDiT2DModel.from_pretrained(tmp_path, subfolder="transformer", use_safetensors=True)


def test_code_running_pickle_runs_no_code(tmp_path):
    build_model().save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"proj_out.weight": CodeRunningPayload(marker)}, tmp_path / "diffusion_pytorch_model.bin")

    for use_safetensors in (None, False):
        with pytest.raises(OSError, match="Unable to load weights"):
            SculptDiT2DModel.from_pretrained(tmp_path, use_safetensors=use_safetensors)
    assert not marker.exists()


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_checkpoint_missing_a_tensor_is_refused(tmp_path, low_cpu_mem_usage):
    build_model(num_class_embeds=3).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    del state_dict["proj_out.bias"], state_dict["transformer_blocks.1.norm1.linear.weight"]
    save_file(state_dict, weights)

    # diffusers only warns and leaves the two parameters on the meta device (or randomly initialised)
    with pytest.raises(
        ValueError, match=r"lacks 2 tensor.*\['proj_out.bias', 'transformer_blocks.1.norm1.linear.weight'\]"
    ):
        SculptDiT2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)


def test_output_loading_info_is_still_returned(tmp_path):
    build_model().save_pretrained(tmp_path)
    model, loading_info = SculptDiT2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, SculptDiT2DModel)
    assert loading_info["missing_keys"] == [] and loading_info["unexpected_keys"] == []


# ---------------------------------------------------------------- inside diffusers' own pipeline loop


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, SculptScheduler])
def test_runs_as_the_unet_of_ddpm_pipeline(scheduler_class):
    # DDPMPipeline calls unet(image, t).sample and reads unet.config.sample_size and in_channels
    model = build_model()
    pipeline = DDPMPipeline(unet=model, scheduler=scheduler_class(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)

    images = pipeline(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )

    assert images.images.shape == (2, 8, 8, 3)
    assert np.isfinite(images.images).all()
    # the same loop by hand: the pipeline's images are the model's denoising, step for step
    generator = torch.Generator().manual_seed(0)
    scheduler = scheduler_class(num_train_timesteps=1000)
    scheduler.set_timesteps(2)
    sample = randn_tensor((2, 3, 8, 8), generator=generator)
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            sample = scheduler.step(model(sample, timestep).sample, timestep, sample, generator=generator).prev_sample
    expected = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images.images, expected, atol=1e-6)
    # and the model matters: a fresh (zero-predicting) model gives other images
    pipeline.unet = SculptDiT2DModel(**tiny_config()).eval()
    fresh = pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert not np.allclose(fresh.images, images.images, atol=1e-3)


def test_runs_as_the_unet_of_stable_diffusion_pipeline(build_stable_diffusion):
    # StableDiffusionPipeline passes timestep_cond, cross_attention_kwargs and added_cond_kwargs, and reads
    # unet.config.time_cond_proj_dim, sample_size and in_channels
    pipeline = build_stable_diffusion(build_model(in_channels=4, out_channels=4, cross_attention_dim=32))

    def generate(prompt: str, guidance_scale: float) -> np.ndarray:
        return pipeline(
            prompt,
            num_inference_steps=2,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    guided = generate("a photo of digit seven", 7.5)
    plain = generate("a photo of digit seven", 1.0)
    other_prompt = generate("a photo of digit two", 1.0)

    # default size: sample_size (8) * vae_scale_factor (2)
    for images in (guided, plain, other_prompt):
        assert images.shape == (1, 16, 16, 3)
        assert np.isfinite(images).all()
    # guidance and the prompt reach the transformer
    assert not np.allclose(guided, plain)
    assert not np.allclose(plain, other_prompt)


def test_module_is_self_contained_and_its_copies_match_the_unet():
    # the trust_remote_code door runs this file alone, beside the weights: it may not import sculptdiff
    import ast
    import inspect

    from sculptdiff.models import unet_sculpt
    from sculptdiff.models.transformers import dit_sculpt

    tree = ast.parse(inspect.getsource(dit_sculpt))
    # a relative import (`from ..unet_sculpt import ...`) has level > 0: it counts as sculptdiff
    imported = ["." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [module for module in imported if module.startswith(("sculptdiff", "."))], imported
    assert dit_sculpt.PREDICTION_TYPES == unet_sculpt.PREDICTION_TYPES
    assert inspect.getsource(dit_sculpt.LabelEmbedder) == inspect.getsource(unet_sculpt.LabelEmbedder)
