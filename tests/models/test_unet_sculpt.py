"""What only SculptUNet2DModel has: its architecture, its config checks and its golden numbers. What both denoisers
promise alike (conditioning, attention, saving and loading, diffusers' pipelines) is in test_denoisers.py."""

import pytest
import torch

from sculptdiff.models.unet_sculpt import LabelEmbedder, SculptUNet2DModel, SculptUNet2DOutput


# The inputs and golden slice of both denoisers (test_dit_sculpt.py imports them).


def make_inputs(model, batch_size: int = 2, height: int = 8, width: int = 8, seed: int = 1):
    """Samples with the channels `model` takes in and two timesteps, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch_size, model.config.in_channels, height, width, generator=generator)
    timestep = torch.tensor([10, 700])[:batch_size]
    return sample, timestep


def make_text(batch_size: int = 2, sequence_length: int = 5, width: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, sequence_length, width, generator=torch.Generator().manual_seed(seed))


def golden_slice(model) -> torch.Tensor:
    """What the golden numbers pin: `model` on `make_inputs` with 12-d text and the classes [0, 3], the first 4
    values of image 0's first row in channel 0 and the last 4 of image 1's last row in channel 2."""
    sample, timestep = make_inputs(model)
    with torch.no_grad():
        output = model(sample, timestep, encoder_hidden_states=make_text(), class_labels=torch.tensor([0, 3])).sample
    return torch.cat([output[0, 0, 0, :4], output[1, 2, -1, -4:]])


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
    sample, timestep = make_inputs(model, height=height, width=width)
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
    sample, timestep = make_inputs(model)
    for name, parameter in model.named_parameters():
        if name.endswith(("conv2.weight", "to_out.0.weight")) or name.startswith("conv_out"):
            assert not parameter.any(), name
    output = model(sample, timestep, encoder_hidden_states=make_text(), class_labels=torch.tensor([0, 1])).sample
    assert torch.equal(output, torch.zeros_like(output))


def test_skip_connections_and_time_embedding_reach_the_output(build_tiny_unet):
    model = build_tiny_unet()
    sample, timestep = make_inputs(model)
    reference = model(sample, timestep).sample
    # a later timestep changes the prediction: the time embedding enters the blocks
    assert not torch.allclose(model(sample, timestep + 100).sample, reference)
    # the input reaches the output through the network: perturbing one pixel changes its neighbourhood
    perturbed = sample.clone()
    perturbed[:, :, 0, 0] += 1.0
    assert not torch.allclose(model(perturbed, timestep).sample[:, :, 0, 0], reference[:, :, 0, 0])


def test_golden_numbers(build_tiny_unet):
    # the shape these numbers were pinned on (RGB, 3 classes, text), kept so that they stay comparable
    model = build_tiny_unet(in_channels=3, out_channels=3, num_class_embeds=3, id2label=None, cross_attention_dim=12)
    torch.testing.assert_close(golden_slice(model), torch.tensor(GOLDEN_SLICE), atol=1e-4, rtol=1e-4)


GOLDEN_SLICE = [0.500952, 0.469951, -0.057881, -0.580545, -0.430706, -0.032686, 0.521798, 0.893437]


# ---------------------------------------------------------------- timesteps and input checks


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


def test_token_drop_replaces_labels_by_the_null_class():
    embedder = LabelEmbedder(num_classes=10, hidden_size=4, dropout_prob=0.3)
    labels = torch.arange(10).repeat(100)
    torch.manual_seed(0)
    dropped = embedder.token_drop(labels)
    is_null = dropped == 10
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert 0.25 < is_null.float().mean() < 0.35
