# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""The denoising objective: noise a clean batch in one step, ask the network for the target, return the MSE.

One implementation for the training scripts and the benchmarks. It is model-agnostic: any network called as
`model(sample, timestep, **conditions)` that returns `.sample` (SculptUNet2DModel, diffusers' UNet2DModel /
UNet2DConditionModel) and any scheduler with `add_noise` (and `get_velocity` for
`v_prediction` and `flow`) works.
"""

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def diffusion_loss(
    model: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    prediction_type: str,
    class_labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The mean training loss of one batch.

    Args:
        model: the network being trained.
        noise_scheduler: the forward process (`SculptScheduler`, `DDPMScheduler`, `SculptFlowScheduler`, ...).
        latents: the clean batch x_0 (pixels in [-1, 1], or scaled VAE latents), `(N, C, H, W)`.
        prediction_type: what the network predicts: `"epsilon"`, `"v_prediction"`, `"sample"` or `"flow"`.
        class_labels: class ids for a class-conditional network (null-class dropout is the embedder's job).
        encoder_hidden_states: text embeddings for a text-conditional network.
        snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023); DDPM family only; `None` for plain MSE.
        noise_offset: scale of the offset noise (a per-channel constant added to the noise); 0 disables it.
        weighting_scheme: how flow training samples t in [0, 1]: `"uniform"` or `"logit_normal"` (SD3).
        logit_mean, logit_std: the logit-normal distribution of t.
        generator: the random draws (noise, then timesteps); `None` draws from the global RNG.

    Draws, in this order: the noise, the offset noise (if any), the timesteps.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
    if snr_gamma is not None and prediction_type == "flow":
        raise ValueError("snr_gamma weights DDPM-family losses; it has no meaning with prediction_type 'flow'.")
    bsz = latents.shape[0]
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    # eps ~ N(0, I)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device)
        noise = noise + noise_offset * offset

    if prediction_type == "flow":
        # rectified flow: t ~ p(t) on [0, 1], x_t = (1 - t) x_0 + t eps, target v = eps - x_0
        sigmas = compute_density_for_timestep_sampling(
            weighting_scheme, bsz, logit_mean, logit_std, device=latents.device, generator=generator
        )
        timesteps = sigmas * num_train_timesteps
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        # DDPM: t ~ U{0, T-1}, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps in one step (Ho et al. eq. 4)
        timesteps = torch.randint(0, num_train_timesteps, (bsz,), generator=generator, device=latents.device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents

    # only the conditions given: diffusers' UNet2DModel takes class_labels but no encoder_hidden_states
    conditions = {}
    if class_labels is not None:
        conditions["class_labels"] = class_labels
    if encoder_hidden_states is not None:
        conditions["encoder_hidden_states"] = encoder_hidden_states
    # a model that also learns its variance (out_channels = 2 x in_channels, diffusers' DiT checkpoints) is trained on
    # its prediction only: the pipeline drops the variance channels and samples with the scheduler's, as DiTPipeline
    model_pred = model(noisy_latents, timesteps, **conditions).sample[:, : latents.shape[1]]

    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    # Min-SNR-gamma (Hang et al. 2023, eq. 7), as diffusers' train_text_to_image.py
    snr = compute_snr(noise_scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()
