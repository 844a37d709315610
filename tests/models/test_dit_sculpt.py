"""What only SculptDiT2DModel has: its architecture, its config checks and its golden numbers. What both denoisers
promise alike (conditioning, attention, saving and loading, diffusers' pipelines) is in test_denoisers.py."""

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from test_unet_sculpt import golden_slice, make_inputs, make_text

import sculptdiff
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
    sample, timestep = make_inputs(model, height=height, width=width)

    output = model(sample, timestep, **conditioning)

    assert isinstance(output, SculptDiT2DOutput)
    assert output.sample.shape == (2, model.config.out_channels, height, width)
    assert torch.isfinite(output.sample).all()
    assert model(sample, timestep, return_dict=False, **conditioning)[0].shape == output.sample.shape


@pytest.mark.parametrize(("num_layers", "long_skip_connections"), [(2, False), (4, True)])
def test_fresh_model_is_the_identity_on_its_residual_stream_and_predicts_zero(num_layers, long_skip_connections):
    # adaLN-Zero (DiT section 3.2): zero modulation, so every gate is 0; zero final layer; zero cross-attention output;
    # the long skips' merges start as the mean of their two inputs, which a fresh model makes equal
    torch.manual_seed(0)
    config = tiny_config(num_class_embeds=3, cross_attention_dim=12, num_layers=num_layers)
    model = SculptDiT2DModel(**config, long_skip_connections=long_skip_connections).eval()
    sample, timestep = make_inputs(model)
    records = record_blocks(model)

    output = model(sample, timestep, encoder_hidden_states=make_text(), class_labels=torch.tensor([0, 1])).sample

    assert len(records) == num_layers
    for block_input, block_output in records:
        assert block_input.abs().max() > 0.1
        # (x + x) / 2 may round in the last bit
        torch.testing.assert_close(block_output, block_input, rtol=0, atol=1e-6 if long_skip_connections else 0)
    assert torch.equal(output, torch.zeros_like(output))
    merges = [block.skip_linear for block in model.transformer_blocks if block.skip_linear is not None]
    assert len(merges) == num_layers // 2 if long_skip_connections else not merges
    for merge in merges:
        assert torch.equal(merge.weight, torch.cat([torch.eye(16), torch.eye(16)], dim=1) / 2) and not merge.bias.any()
    # the branches themselves are not zero: the gates close them
    block = model.transformer_blocks[0]
    assert block.self_attention.to_out[0].weight.any() and block.feed_forward.net[2].weight.any()
    for layer in (block.norm1.linear, block.cross_attention.to_out[0], model.norm_out.linear, model.proj_out):
        assert not layer.weight.any() and not layer.bias.any()


def test_blocks_change_the_stream_once_the_gates_open():
    model = build_model(cross_attention_dim=12)
    sample, timestep = make_inputs(model)
    records = record_blocks(model)
    model(sample, timestep, encoder_hidden_states=make_text())
    for block_input, block_output in records:
        assert not torch.allclose(block_output, block_input)


def test_a_fresh_model_learns_every_layer():
    # the zero-initialised layers do not block the gradient: after one step the final layer opens, then the gates
    torch.manual_seed(0)
    model = SculptDiT2DModel(**tiny_config(num_class_embeds=3, cross_attention_dim=12)).train()
    sample, timestep = make_inputs(model)
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


@pytest.mark.parametrize("num_layers", [4, 5])
def test_long_skips_join_each_block_of_the_first_half_to_its_mirror(num_layers):
    # U-ViT: block i of the first num_layers // 2 feeds block num_layers - 1 - i; an odd middle block has none
    model = build_model(num_layers=num_layers, long_skip_connections=True)
    has_skip = [block.skip_linear is not None for block in model.transformer_blocks]
    assert has_skip == [False] * (num_layers - num_layers // 2) + [True] * (num_layers // 2)
    # the skip is read: another skip tensor changes the block's output
    last, stream, embedding = model.transformer_blocks[-1], torch.randn(2, 16, 16), torch.randn(2, 16)
    assert not torch.allclose(last(stream, embedding, skip=stream), last(stream, embedding, skip=stream + 1))

    index_of = {block: index for index, block in enumerate(model.transformer_blocks)}
    outputs, skips = {}, {}

    def record_output(block, inputs, output):
        outputs[index_of[block]] = output

    def record_skip(block, inputs):
        skips[index_of[block]] = inputs[4]

    for block in model.transformer_blocks:
        block.register_forward_hook(record_output)
        block.register_forward_pre_hook(record_skip)
    sample, timestep = make_inputs(model)
    model(sample, timestep)
    for index in range(num_layers):
        mirror = num_layers - 1 - index
        if has_skip[index]:
            assert skips[index] is outputs[mirror]
        else:
            assert skips[index] is None


def test_gradient_checkpointing_with_long_skips_gives_the_same_gradients():
    model = build_model(num_layers=4, long_skip_connections=True, num_class_embeds=3).train()
    sample, timestep = make_inputs(model)

    def gradients():
        model.zero_grad()
        model(sample, timestep, class_labels=torch.tensor([0, 2])).sample.square().mean().backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    reference = gradients()
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert reference["transformer_blocks.3.skip_linear.weight"].any()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], msg=name)


def test_the_conditioning_starts_at_the_scale_of_the_other_layers():
    # DiT's N(0, 0.02) class table and timestep MLP make c tiny, and a digits DiT then sampled at chance class
    # accuracy after 400 steps: the table keeps nn.Embedding's N(0, 1), the MLP is Xavier-uniform like every layer
    torch.manual_seed(0)
    model = SculptDiT2DModel(**tiny_config(num_attention_heads=4, attention_head_dim=16, num_class_embeds=10))
    assert 0.9 < model.class_embedding.embedding_table.weight.std() < 1.1
    for layer in (model.time_embedding.linear_1, model.time_embedding.linear_2):
        fan_out, fan_in = layer.weight.shape
        xavier_std = (2 / (fan_in + fan_out)) ** 0.5
        assert 0.9 < layer.weight.std() / xavier_std < 1.1
        assert not layer.bias.any()


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
    sample, timestep = make_inputs(model)
    swapped = sample.clone()
    swapped[:, :, 0:2, 0:2], swapped[:, :, 6:8, 6:8] = sample[:, :, 6:8, 6:8], sample[:, :, 0:2, 0:2]
    output = model(sample, timestep).sample
    output_of_swapped = model(swapped, timestep).sample
    assert not torch.allclose(output_of_swapped[:, :, 0:2, 0:2], output[:, :, 6:8, 6:8], atol=1e-3)


@pytest.mark.parametrize("height, width", [(8, 8), (4, 12)])
def test_unpatchify_puts_every_token_back_at_its_patch(height, width):
    # DiT's unpatchify: (N, h*w, p*p*C) -> (N, h, w, p, p, C) -> einsum("nhwpqc->nchpwq") -> (N, C, h*p, w*p)
    model = build_model(out_channels=2)
    sample, timestep = make_inputs(model, height=height, width=width)
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
    first_model = build_model(num_class_embeds=3)
    sample, timestep = make_inputs(first_model)
    first = first_model(sample, timestep, class_labels=torch.tensor([1, 2])).sample
    second = build_model(num_class_embeds=3)(sample, timestep, class_labels=torch.tensor([1, 2])).sample
    assert torch.equal(first, second)


def test_golden_numbers():
    model = build_model(num_class_embeds=3, cross_attention_dim=12)
    torch.testing.assert_close(golden_slice(model), torch.tensor(GOLDEN_SLICE), atol=1e-4, rtol=1e-4)


GOLDEN_SLICE = [-0.110716, 0.696978, -0.816124, -0.1819, -0.910833, 1.033062, -0.734157, 1.172551]


# ---------------------------------------------------------------- timesteps and input checks


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


# ---------------------------------------------------------------- training machinery


def test_no_split_modules_names_the_block():
    model = build_model()
    assert {type(module).__name__ for module in model.modules() if isinstance(module, DiTBlock)} == set(
        model._no_split_modules
    )


def test_torch_compile_traces_the_long_skips_in_one_graph():
    model = build_model(num_class_embeds=3, num_layers=5, long_skip_connections=True)
    sample, timestep = make_inputs(model)
    labels = torch.tensor([0, 3])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(sample, timestep, class_labels=labels).sample
        torch.testing.assert_close(compiled(sample, timestep, class_labels=labels).sample, expected)


@pytest.mark.parametrize("long_skip_connections", [False, True])
def test_compile_repeated_blocks_compiles_each_transformer_block(long_skip_connections):
    # with long skips, the blocks of the second half take one more input: one graph for each kind of block
    model = build_model(num_class_embeds=3, num_layers=4, long_skip_connections=long_skip_connections)
    sample, timestep = make_inputs(model)
    labels = torch.tensor([0, 3])
    expected = model(sample, timestep, class_labels=labels).sample
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(sample, timestep, class_labels=labels).sample, expected)


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
