import pytest
import torch
from safetensors.torch import load_file

from sculptdiff.models.transformers.dit_sculpt import SculptDiT2DModel
from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler
from sculptdiff.training import recipe


DIGITS = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "num_class_embeds": 10}


def test_default_unet_is_the_measured_digits_model():
    unet = recipe.build_unet(**DIGITS, prediction_type=recipe.RECIPE.prediction_type)
    # the size the README and the benchmarks quote for the default run
    assert sum(parameter.numel() for parameter in unet.parameters()) == 1_192_641
    assert tuple(unet.config.block_out_channels) == (32, 64, 64)
    assert tuple(unet.config.attention_levels) == (False, False, True)
    assert unet.config.prediction_type == "epsilon"


def test_build_unet_overrides_a_given_config_and_returns_fresh_dicts():
    tiny = {**recipe.default_unet_config(), "block_out_channels": (8, 16), "attention_levels": (False, True)}
    tiny["layers_per_block"] = 2
    unet = recipe.build_unet(tiny, attention_head_dim=8, **DIGITS)
    assert tuple(unet.config.block_out_channels) == (8, 16)
    config = recipe.default_unet_config()
    config["block_out_channels"] = (1,)
    assert recipe.default_unet_config()["block_out_channels"] == (32, 64, 64)
    # the norm groups of the given config stay, the recipe's do not come back
    assert unet.config.norm_num_groups == 8 and unet.config.layers_per_block == 2


def test_default_dit_is_the_size_of_the_default_unet():
    torch.manual_seed(0)
    dit = recipe.build_dit(**DIGITS, prediction_type="flow")
    assert type(dit) is SculptDiT2DModel
    # the size the help of train_sculpt.py's DiT flags quotes: about the default U-Net's 1.19M
    assert sum(parameter.numel() for parameter in dit.parameters()) == 1_114_084
    assert (dit.config.patch_size, dit.config.num_layers) == (2, 6)
    # U-ViT's long skips into the last three blocks
    assert [block.skip_linear is not None for block in dit.transformer_blocks] == [False] * 3 + [True] * 3
    assert (dit.config.num_attention_heads, dit.config.attention_head_dim) == (6, 16)
    assert dit.config.prediction_type == "flow" and dit.config.num_class_embeds == 10


def test_build_dit_overrides_a_given_config_and_returns_fresh_dicts():
    config = {**recipe.default_dit_config(), "num_layers": 1, "mlp_ratio": 2.0}
    dit = recipe.build_dit(config, num_attention_heads=2, attention_head_dim=8, **DIGITS)
    assert len(dit.transformer_blocks) == 1 and dit.config.mlp_ratio == 2.0 and dit.config.num_attention_heads == 2
    config["patch_size"] = 4
    assert recipe.default_dit_config()["patch_size"] == 2
    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        recipe.build_dit(patch_size=3, **DIGITS)


def test_noise_scheduler_of_each_objective():
    scheduler = recipe.build_noise_scheduler()
    assert type(scheduler) is SculptScheduler
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.clip_sample is True and scheduler.config.num_train_timesteps == 1000

    latent = recipe.build_noise_scheduler(
        "v_prediction", 100, "linear", rescale_betas_zero_snr=True, clip_sample=False
    )
    assert latent.config.prediction_type == "v_prediction" and latent.config.clip_sample is False
    assert latent.alphas_cumprod[-1] == 0 and latent.config.num_train_timesteps == 100

    flow = recipe.build_noise_scheduler("flow", 100)
    assert type(flow) is SculptFlowScheduler and flow.config.num_train_timesteps == 100
    with pytest.raises(ValueError, match="rescale_betas_zero_snr changes a beta schedule"):
        recipe.build_noise_scheduler("flow", rescale_betas_zero_snr=True)


def test_ema_warms_up_and_saves_a_folder_of_the_models_class(tmp_path):
    torch.manual_seed(0)
    unet = recipe.build_unet(
        **DIGITS, block_out_channels=(8, 16), attention_levels=(False, True), attention_head_dim=8, norm_num_groups=4
    )
    ema = recipe.build_ema(unet)
    # crowsonkb's warm-up: 1 - (1 + step / inv_gamma) ** -power, capped at ema_decay
    assert ema.get_decay(11) == pytest.approx(1 - 11 ** (-3 / 4))
    assert ema.get_decay(10**9) == recipe.RECIPE.ema_decay
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(1.0)
    ema.step(unet.parameters())
    ema.save_pretrained(tmp_path / "ema")
    saved = SculptUNet2DModel.from_pretrained(tmp_path / "ema")
    weights = load_file(tmp_path / "ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[name], value) for name, value in unet.state_dict().items())
    assert saved.config.num_class_embeds == 10


def test_ema_of_some_parameters_averages_only_those():
    """A LoRA run's EMA: only the adapter's parameters are averaged, the frozen rest is not copied."""
    torch.manual_seed(0)
    tiny = {**recipe.default_unet_config(), "block_out_channels": (8, 16), "attention_levels": (False, True)}
    unet = recipe.build_unet(tiny, attention_head_dim=8, norm_num_groups=4, **DIGITS)
    trained = [unet.conv_out.weight, unet.conv_out.bias]
    ema = recipe.build_ema(unet, parameters=trained)
    assert len(ema.shadow_params) == 2 and ema.model_cls is None
    frozen = unet.conv_in.weight.detach().clone()
    # the warm-up: the first step copies (decay 0), the second averages with decay 1 - 2^-3/4
    with torch.no_grad():
        for parameter in trained:
            parameter.add_(1.0)
    ema.step(trained)
    first = [parameter.detach().clone() for parameter in trained]
    with torch.no_grad():
        for parameter in trained:
            parameter.add_(1.0)
    ema.step(trained)
    decay = 1 - 2 ** (-3 / 4)
    for shadow, old, new in zip(ema.shadow_params, first, trained):
        torch.testing.assert_close(shadow, decay * old + (1 - decay) * new)
    assert torch.equal(unet.conv_in.weight, frozen)
