"""sculptdiff.training.lora: the LoRA adapter the trainer adds, saves in diffusers' format and averages with EMA."""

import json
import os

import pytest
import torch
from diffusers.training_utils import EMAModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from sculptdiff.training.lora import (
    add_lora_adapter,
    fuse_lora_adapter,
    load_lora_weights,
    lora_state_dict,
    lora_target_modules,
    save_lora_weights,
)


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def build_denoiser(build_tiny_unet, build_tiny_dit, tiny_stock_unet, tiny_stock_text_unet, tiny_stock_dit):
    """`build_denoiser(name)`: the tiny backbone of that class: ours, or diffusers' own (UNet2DConditionModel with
    32-d text)."""

    def build(name: str) -> torch.nn.Module:
        if name == "SculptUNet2DModel":
            return build_tiny_unet()
        if name == "SculptDiT2DModel":
            return build_tiny_dit()
        stock = {
            "UNet2DModel": tiny_stock_unet,
            "UNet2DConditionModel": tiny_stock_text_unet,
            "DiTTransformer2DModel": tiny_stock_dit,
        }
        return stock[name]

    return build


def randomize_lora_b(denoiser: torch.nn.Module, seed: int = 1):
    # a fresh adapter is the identity (B = 0); a trained one is not
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def predict(denoiser: torch.nn.Module) -> torch.Tensor:
    sample = torch.randn(2, denoiser.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return denoiser(sample, torch.tensor([10, 700]), return_dict=False)[0]


def adapted_layers(denoiser: torch.nn.Module) -> set[str]:
    return {name for name, module in denoiser.named_modules() if isinstance(module, BaseTunerLayer)}


@pytest.mark.parametrize(
    "name, feed_forward",
    [
        ("SculptUNet2DModel", ["conv1", "conv2"]),
        ("SculptDiT2DModel", ["feed_forward.net.0.proj", "feed_forward.net.2"]),
        ("UNet2DModel", ["conv1", "conv2"]),
        ("UNet2DConditionModel", ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]),
        ("DiTTransformer2DModel", ["ff.net.0.proj", "ff.net.2"]),
    ],
)
def test_default_targets_per_backbone_adapt_exactly_those_layers(build_denoiser, name, feed_forward):
    denoiser = build_denoiser(name)
    assert lora_target_modules(denoiser) == ATTENTION
    assert lora_target_modules(denoiser, "attention,feed_forward") == ATTENTION + feed_forward
    assert lora_target_modules(denoiser, " to_q , to_v ") == ["to_q", "to_v"]

    expected = {
        layer
        for layer, module in denoiser.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        and any(layer.endswith(f".{target}") for target in ATTENTION + feed_forward)
    }
    add_lora_adapter(denoiser, rank=2, target_modules="attention,feed_forward")
    assert adapted_layers(denoiser) == expected
    assert any(layer.endswith("to_q") for layer in expected) and any(
        layer.endswith(feed_forward[-1]) for layer in expected
    )


def test_add_lora_adapter_freezes_the_base_and_starts_as_the_identity(build_tiny_unet):
    denoiser = build_tiny_unet()
    base = predict(denoiser)
    parameters = add_lora_adapter(denoiser, rank=4, alpha=8)
    trainable = {name for name, parameter in denoiser.named_parameters() if parameter.requires_grad}
    # one A and one B for each of the 4 projections of the 4 attention layers (down, mid, 2 up)
    assert len(parameters) == len(trainable) == 2 * 4 * 4
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert denoiser.peft_config["default"].lora_alpha == 8 and denoiser.peft_config["default"].r == 4
    torch.testing.assert_close(predict(denoiser), base)


def test_adapter_of_a_half_precision_base_trains_in_float32(build_tiny_dit):
    denoiser = build_tiny_dit().to(torch.bfloat16)
    parameters = add_lora_adapter(denoiser, rank=4)
    assert {parameter.dtype for parameter in parameters} == {torch.float32}
    assert {parameter.dtype for parameter in denoiser.parameters() if not parameter.requires_grad} == {torch.bfloat16}


def test_bad_arguments_are_clear_errors(build_tiny_unet):
    denoiser = build_tiny_unet()
    for rank in (0, 2.0, True):
        with pytest.raises(ValueError, match="`rank` must be a positive integer"):
            add_lora_adapter(denoiser, rank=rank)
    with pytest.raises(ValueError, match="`alpha` must be a positive number"):
        add_lora_adapter(denoiser, rank=4, alpha=0)
    with pytest.raises(ValueError, match=r"\['to_x'\] match none.*'to_q'"):
        add_lora_adapter(denoiser, rank=4, target_modules="to_q,to_x")
    with pytest.raises(ValueError, match="names no layer"):
        add_lora_adapter(denoiser, rank=4, target_modules=" , ")
    with pytest.raises(ValueError, match="LoRA targets are known for .* got a Linear"):
        lora_target_modules(torch.nn.Linear(2, 2), "feed_forward")
    # nothing was added along the way
    assert not adapted_layers(denoiser)


@pytest.mark.parametrize("backbone, component", [("unet", "unet"), ("dit", "transformer")])
def test_saved_adapter_is_diffusers_format_and_loads_into_the_pipeline(
    tmp_path, build_tiny_unet, build_tiny_dit, build_tiny_pipeline, backbone, component
):
    denoiser = build_tiny_dit() if backbone == "dit" else build_tiny_unet()
    add_lora_adapter(denoiser, rank=4, alpha=8)
    randomize_lora_b(denoiser)
    tuned = predict(denoiser)

    state_dict = lora_state_dict(denoiser)
    # diffusers' format, as its LoRA examples save it (PEFT's lora_A / lora_B are lora.down / lora.up)
    assert all(key.endswith((".lora.down.weight", ".lora.up.weight")) for key in state_dict)
    path = save_lora_weights(tmp_path, denoiser)
    assert path == os.path.join(tmp_path, "pytorch_lora_weights.safetensors")
    # written under a temporary name: nothing else is left in the folder
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"]
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{component}.{key}" for key in state_dict)
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata[f"{component}.lora_alpha"] == 8 and metadata[f"{component}.r"] == 4

    pipe = build_tiny_pipeline(backbone=backbone)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(predict(pipe.denoiser), tuned)

    # a second save replaces the file
    randomize_lora_b(denoiser, seed=2)
    save_lora_weights(tmp_path, denoiser)
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"]
    with safe_open(path, framework="pt") as f:
        key = next(key for key in f.keys() if "lora.up" in key)
        torch.testing.assert_close(f.get_tensor(key), lora_state_dict(denoiser)[key.split(".", 1)[1]])


def test_ema_averages_the_adapter_only_and_saves_its_average(tmp_path, build_tiny_unet, build_tiny_pipeline):
    denoiser = build_tiny_unet()
    parameters = add_lora_adapter(denoiser, rank=4)
    ema = EMAModel(parameters, decay=0.9)
    assert len(ema.shadow_params) == len(parameters)

    randomize_lora_b(denoiser, seed=1)
    first = [parameter.detach().clone() for parameter in parameters]
    ema.step(parameters)  # EMAModel's first step copies the parameters (decay 0)
    randomize_lora_b(denoiser, seed=2)
    second = [parameter.detach().clone() for parameter in parameters]
    ema.step(parameters)
    decay = ema.get_decay(2)  # min(0.9, (1 + 1) / (10 + 1))
    expected = [decay * old + (1 - decay) * new for old, new in zip(first, second)]
    for shadow, value in zip(ema.shadow_params, expected):
        torch.testing.assert_close(shadow, value)

    # the average is what gets saved, and training goes on with the live weights
    ema.store(parameters)
    ema.copy_to(parameters)
    averaged = predict(denoiser)
    save_lora_weights(tmp_path, denoiser)
    ema.restore(parameters)
    for parameter, value in zip(parameters, second):
        torch.testing.assert_close(parameter.detach(), value)
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(predict(pipe.denoiser), averaged)

    # a checkpoint keeps the EMA as its state dict
    resumed = EMAModel(parameters, decay=0.9)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.optimization_step == 2
    for shadow, value in zip(resumed.shadow_params, expected):
        torch.testing.assert_close(shadow, value)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_resume_loads_the_saved_adapter_back(tmp_path, build_tiny_unet, build_tiny_dit, backbone):
    build = build_tiny_dit if backbone == "dit" else build_tiny_unet
    trained = build()
    add_lora_adapter(trained, rank=4, alpha=8)
    randomize_lora_b(trained)
    save_lora_weights(tmp_path, trained)

    resumed = build()
    parameters = add_lora_adapter(resumed, rank=4, alpha=8)
    load_lora_weights(resumed, tmp_path)
    torch.testing.assert_close(predict(resumed), predict(trained))
    assert all(parameter.requires_grad and parameter.dtype == torch.float32 for parameter in parameters)

    # an adapter of another rank or on other layers is not the one that was saved
    other_rank = build()
    add_lora_adapter(other_rank, rank=2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_lora_weights(other_rank, tmp_path)
    other_targets = build()
    add_lora_adapter(other_targets, rank=4, target_modules="to_q")
    with pytest.raises(ValueError, match="do not match the adapter `default`.*--lora_rank"):
        load_lora_weights(other_targets, tmp_path)


@pytest.mark.parametrize("name", ["SculptUNet2DModel", "UNet2DModel"])
def test_fused_adapter_saves_as_a_plain_model(tmp_path, build_denoiser, name):
    # UNet2DModel has no PeftAdapterMixin: PEFT injects the adapter, and fusing is how it is saved
    denoiser = build_denoiser(name)
    plain_keys = set(denoiser.state_dict())
    add_lora_adapter(denoiser, rank=4)
    randomize_lora_b(denoiser)
    tuned = predict(denoiser)
    assert lora_state_dict(denoiser)

    fuse_lora_adapter(denoiser)
    assert not adapted_layers(denoiser) and not getattr(denoiser, "peft_config", None)
    assert set(denoiser.state_dict()) == plain_keys
    torch.testing.assert_close(predict(denoiser), tuned, atol=1e-5, rtol=1e-5)
    denoiser.save_pretrained(tmp_path)
    reloaded = type(denoiser).from_pretrained(tmp_path)
    torch.testing.assert_close(predict(reloaded), predict(denoiser))
