import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from sculptdiff.training.objective import diffusion_loss
from sculptdiff.training.recipe import build_noise_scheduler


@pytest.fixture
def unet(build_tiny_unet):
    # the suite's tiny U-Net with its zero-initialised layers drawn at random, so that predictions are not all zero
    return build_tiny_unet()


def latents():
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_loss_is_the_mse_to_the_objectives_target(unet, prediction_type):
    scheduler = build_noise_scheduler(prediction_type, num_train_timesteps=100)
    x0, labels = latents(), torch.tensor([0, 1, 2, 0])
    loss = diffusion_loss(unet, scheduler, x0, prediction_type, class_labels=labels, generator=torch.manual_seed(3))

    # the same draws by hand: noise, then timesteps
    generator = torch.manual_seed(3)
    noise = torch.randn(x0.shape, generator=generator)
    if prediction_type == "flow":
        timesteps = torch.rand(4, generator=generator) * 100
        noisy = (1 - timesteps / 100)[:, None, None, None] * x0 + (timesteps / 100)[:, None, None, None] * noise
        target = noise - x0
    else:
        timesteps = torch.randint(0, 100, (4,), generator=generator)
        alpha = scheduler.alphas_cumprod[timesteps][:, None, None, None]
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        target = {"epsilon": noise, "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * x0, "sample": x0}
        target = target[prediction_type]
    expected = F.mse_loss(unet(noisy, timesteps, class_labels=labels).sample, target)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_min_snr_weights_epsilon_by_min_snr_gamma_over_snr(unet):
    scheduler = build_noise_scheduler(num_train_timesteps=100)
    x0, labels = latents(), torch.tensor([0, 1, 2, 0])
    plain = diffusion_loss(unet, scheduler, x0, "epsilon", class_labels=labels, generator=torch.manual_seed(3))
    # gamma above every SNR of the schedule: every weight min(snr, gamma) / snr is 1
    huge = diffusion_loss(
        unet, scheduler, x0, "epsilon", class_labels=labels, snr_gamma=1e12, generator=torch.manual_seed(3)
    )
    torch.testing.assert_close(huge, plain)
    small = diffusion_loss(
        unet, scheduler, x0, "epsilon", class_labels=labels, snr_gamma=1e-3, generator=torch.manual_seed(3)
    )
    assert small < plain / 10


def test_uses_the_generator_only_and_runs_a_stock_unet():
    torch.manual_seed(0)
    stock = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    state = torch.get_rng_state()
    first = diffusion_loss(stock, DDPMScheduler(), latents(), "epsilon", generator=torch.manual_seed(5))
    torch.set_rng_state(state)
    second = diffusion_loss(stock, DDPMScheduler(), latents(), "epsilon", generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_objective_is_refused(unet):
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        diffusion_loss(unet, build_noise_scheduler(), latents(), "noise")
    with pytest.raises(ValueError, match="snr_gamma weights DDPM-family losses"):
        diffusion_loss(unet, build_noise_scheduler("flow"), latents(), "flow", snr_gamma=5.0)


def test_learned_variance_channels_are_left_out_of_the_loss():
    # diffusers' DiT layout: 4 latent channels in, the prediction and a learned variance (8 channels) out
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    ).eval()  # fmt: skip
    with torch.no_grad():
        # its adaLN-Zero output layer starts at zero: drawn at random so that the prediction is not all zero
        dit.proj_out_2.weight.normal_(0, 0.2)
    scheduler = build_noise_scheduler(num_train_timesteps=100)
    x0, labels = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3])
    loss = diffusion_loss(dit, scheduler, x0, "epsilon", class_labels=labels, generator=torch.manual_seed(3))

    generator = torch.manual_seed(3)
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, 100, (2,), generator=generator)
    prediction = dit(scheduler.add_noise(x0, noise, timesteps), timesteps, class_labels=labels).sample
    assert prediction.shape[1] == 8
    torch.testing.assert_close(loss, F.mse_loss(prediction[:, :4], noise), rtol=1e-5, atol=1e-6)
