"""What both denoisers, SculptUNet2DModel and SculptDiT2DModel, promise alike, tested once on each."""

import pytest
import torch


def make_inputs(batch_size: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8x8 grey samples, two timesteps and 5 tokens of 12-d text, from fixed seeds."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch_size, 1, 8, 8, generator=generator)
    text = torch.randn(batch_size, 5, 12, generator=generator)
    return sample, torch.tensor([10, 700])[:batch_size], text


# (backbone, attention layers of the tiny text model: the U-Net's 4 blocks (down, mid, 2 up) and the 2-block DiT,
# each with a self- and a cross-attention)
DENOISERS = [("unet", 8), ("dit", 4)]


@pytest.fixture
def build_text_denoiser(build_tiny_unet, build_tiny_dit):
    """`build_text_denoiser(backbone)`: the suite's tiny U-Net or 2-block DiT, reading 12-d text."""

    def build(backbone: str) -> torch.nn.Module:
        if backbone == "dit":
            return build_tiny_dit(cross_attention_dim=12, num_layers=2)
        return build_tiny_unet(cross_attention_dim=12)

    return build


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
