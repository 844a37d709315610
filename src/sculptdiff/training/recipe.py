# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""The default training recipe, defined once: the U-Net and DiT shapes, the objective, the noise schedule, the optimiser, EMA.

`training_scripts/train_sculpt.py` takes its defaults from here and the benchmarks train with it, so a change of
the recipe changes both. See training_scripts/README.md ("Defaults and how they were chosen") for the measurements
behind the numbers.
"""

from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.training_utils import EMAModel

from ..models.transformers.dit_sculpt import SculptDiT2DModel
from ..models.unet_sculpt import SculptUNet2DModel
from ..schedulers.scheduling_sculpt import SculptScheduler
from ..schedulers.scheduling_sculpt_flow import SculptFlowScheduler


@dataclass(frozen=True)
class TrainingRecipe:
    """The training hyperparameters of the default run (each one is the default of the train_sculpt.py flag of the
    same name).

    Args:
        prediction_type: what the U-Net predicts; DDPM's noise (Ho et al. 2020).
        conditioning_dropout_prob: how often the condition is replaced by the null condition during training, for
            classifier-free guidance; 10% is the best range of Ho & Salimans 2022.
        num_train_timesteps: the number of diffusion steps T.
        beta_schedule: the cosine schedule of Nichol & Dhariwal 2021, which keeps small images from being destroyed
            too early.
        learning_rate, lr_scheduler, lr_warmup_steps: AdamW's peak learning rate, its decay and its linear warm-up.
        adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon: AdamW's other settings.
        max_grad_norm: the gradient clipping norm.
        train_batch_size: the batch size per process.
        max_train_steps: the number of optimisation steps.
        ema_decay, ema_inv_gamma, ema_power: the EMA of the weights with crowsonkb's warm-up,
            decay = min(ema_decay, 1 - (1 + step / inv_gamma) ** -power).
    """

    prediction_type: str = "epsilon"
    conditioning_dropout_prob: float = 0.1
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    train_batch_size: int = 32
    max_train_steps: int = 2000
    ema_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_power: float = 3 / 4


RECIPE = TrainingRecipe()


def default_unet_config() -> dict:
    """The shape of the default U-Net: 3 levels of 32, 64, 64 channels, attention at the lowest level only (1.19M
    parameters for 1-channel 16 px digits; the cheapest of five measured shapes)."""
    return {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "attention_levels": (False, False, True),
        "attention_head_dim": 32,
        "norm_num_groups": 8,
        "dropout": 0.0,
    }


def build_unet(config: dict | None = None, **overrides) -> SculptUNet2DModel:
    """A new, randomly initialised SculptUNet2DModel.

    Args:
        config: the config to start from (e.g. a loaded `config.json`); defaults to `default_unet_config()`.
        overrides: config entries set on top, such as what the data decides (`sample_size`, `in_channels`,
            `out_channels`, `num_class_embeds`, `id2label`, `cross_attention_dim`) and the objective
            (`prediction_type`, `conditioning_dropout_prob`).
    """
    config = {**(default_unet_config() if config is None else config), **overrides}
    return SculptUNet2DModel.from_config(config)


def default_dit_config() -> dict:
    """The shape of the default Diffusion Transformer: DiT-S's 6 heads narrowed to 16 channels each (width 96), 6
    blocks over 2x2 patches (64 tokens at 16 px), with U-ViT's long skips from the first three blocks to the last
    three. 1.11M parameters for 1-channel 16 px digits, the size of the default U-Net, so that the two backbones of
    the digits run compare at equal size; small enough for a CPU."""
    return {
        "patch_size": 2,
        "num_layers": 6,
        "num_attention_heads": 6,
        "attention_head_dim": 16,
        "mlp_ratio": 4.0,
        "dropout": 0.0,
        # U-ViT's long skips: over six seeds of a 10-minute budget, FD 3.5 +- 1.5 lower at half the budget (in every
        # seed) and level at its end, 0.3 +- 2.2 (benchmarks/results/backbones-2026-12-02-6-seeds.md)
        "long_skip_connections": True,
    }


def build_dit(config: dict | None = None, **overrides) -> SculptDiT2DModel:
    """A new, randomly initialised SculptDiT2DModel (DiT's initialisation, adaLN-Zero) from `config` (default:
    `default_dit_config()`) with `overrides` set on top, as `build_unet` builds a U-Net."""
    config = {**(default_dit_config() if config is None else config), **overrides}
    return SculptDiT2DModel.from_config(config)


def build_noise_scheduler(
    prediction_type: str = RECIPE.prediction_type,
    num_train_timesteps: int = RECIPE.num_train_timesteps,
    beta_schedule: str = RECIPE.beta_schedule,
    rescale_betas_zero_snr: bool = False,
    clip_sample: bool = True,
) -> SculptScheduler | SculptFlowScheduler:
    """The forward process of the recipe: DDPM family (Ho et al. 2020) or, for `prediction_type="flow"`, rectified
    flow (Liu et al. 2022). It is also the sampler saved with the pipeline.

    Args:
        prediction_type: `"epsilon"`, `"v_prediction"`, `"sample"` or `"flow"`.
        num_train_timesteps: the number of diffusion steps T.
        beta_schedule: the beta schedule of the DDPM family (ignored by flow, which has none).
        rescale_betas_zero_snr: rescale the betas to zero terminal SNR (Lin et al. 2023); DDPM family only.
        clip_sample: clip the predicted x_0 to [-1, 1]; true for pixels, false for latents (which are not confined).
    """
    if prediction_type == "flow":
        if rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr changes a beta schedule; prediction_type 'flow' has none.")
        return SculptFlowScheduler(num_train_timesteps=num_train_timesteps)
    return SculptScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
        clip_sample=clip_sample,
        # "trailing" starts sampling at t = T, where training put pure noise (Lin et al. 2023, table 2)
        timestep_spacing="trailing",
    )


def build_ema(
    model: ModelMixin,
    decay: float = RECIPE.ema_decay,
    inv_gamma: float = RECIPE.ema_inv_gamma,
    power: float = RECIPE.ema_power,
    parameters: list[torch.nn.Parameter] | None = None,
) -> EMAModel:
    """An EMA of `model`'s weights (Polyak averaging, as in DDPM's released models) with crowsonkb's warm-up, so that
    short runs average recent weights rather than the random initialisation. It saves as a `save_pretrained` folder
    of `model`'s class.

    With `parameters` (the trainable part of `model`, e.g. a LoRA adapter's), only those are averaged; such an EMA
    has no `save_pretrained` folder: checkpoint it with `accelerator.register_for_checkpointing`."""
    if parameters is not None:
        return EMAModel(parameters, decay=decay, use_ema_warmup=True, inv_gamma=inv_gamma, power=power)
    return EMAModel(
        model.parameters(),
        decay=decay,
        use_ema_warmup=True,
        inv_gamma=inv_gamma,
        power=power,
        model_cls=type(model),
        model_config=model.config,
    )
