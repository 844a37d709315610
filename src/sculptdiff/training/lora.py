# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""LoRA fine-tuning of a denoiser, as diffusers' LoRA examples do it (`train_text_to_image_lora.py`): a PEFT LoRA
adapter on the attention projections, the base model frozen, the adapter saved in diffusers' LoRA format as
`pytorch_lora_weights.safetensors`, which `SculptPipeline.load_lora_weights` reads:

    lora_parameters = add_lora_adapter(denoiser, rank=args.lora_rank, alpha=args.lora_alpha)
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate)
    ...
    save_lora_weights(args.output_dir, accelerator.unwrap_model(denoiser))

EMA of the adapter alone: diffusers' `EMAModel` averages any list of parameters, so `EMAModel(lora_parameters)`
keeps a shadow of the adapter only (`ema.step(lora_parameters)` after each optimizer step; `ema.store`,
`ema.copy_to`, `ema.restore` around validation and before the final `save_lora_weights`; `ema.state_dict()` /
`ema.load_state_dict()` in checkpoints, since an `EMAModel` built from parameters has no `save_pretrained`).
"""

import os
import tempfile

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.loaders import PeftAdapterMixin
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from ..models.transformers.dit_sculpt import SculptDiT2DModel
from ..models.unet_sculpt import SculptUNet2DModel
from ..pipelines.sculpt.pipeline_sculpt import SculptPipeline


__all__ = [
    "LORA_WEIGHT_NAME",
    "add_lora_adapter",
    "denoiser_component_name",
    "fuse_lora_adapter",
    "load_lora_weights",
    "lora_state_dict",
    "lora_target_modules",
    "save_lora_weights",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers' Attention in every supported backbone: the query, key, value and output projections, the layers
# diffusers' LoRA examples adapt
ATTENTION_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# `feed_forward` in `lora_target_modules` adds the layers next to attention: the transformer blocks' feed-forward
# (and, in UNet2DConditionModel, the projections into and out of them); U-Nets without feed-forward layers get their
# residual blocks' convolutions instead, which PEFT adapts as Conv2d LoRA
FEED_FORWARD_TARGET_MODULES = {
    SculptUNet2DModel: ["conv1", "conv2"],
    SculptDiT2DModel: ["feed_forward.net.0.proj", "feed_forward.net.2"],
    UNet2DModel: ["conv1", "conv2"],
    UNet2DConditionModel: ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    DiTTransformer2DModel: ["ff.net.0.proj", "ff.net.2"],
}


def _supported_class(denoiser: torch.nn.Module) -> type:
    for denoiser_class in FEED_FORWARD_TARGET_MODULES:
        if isinstance(denoiser, denoiser_class):
            return denoiser_class
    raise ValueError(
        f"LoRA targets are known for {sorted(cls.__name__ for cls in FEED_FORWARD_TARGET_MODULES)}, got a "
        f"{type(denoiser).__name__}: name its Linear or Conv2d layers instead of `feed_forward`."
    )


def lora_target_modules(denoiser: torch.nn.Module, spec: str | list[str] | None = None) -> list[str]:
    r"""
    The layers a LoRA adapter adapts on `denoiser`, from `spec` (the trainer's `--lora_target_modules`): layer names
    (a list, or one comma-separated string such as `"to_q,to_v"`), where `attention` stands for the attention
    projections `to_q`, `to_k`, `to_v`, `to_out.0` (the default, `spec=None`) and `feed_forward` for the layers next
    to them that `FEED_FORWARD_TARGET_MODULES` lists for the denoiser's class (SculptUNet2DModel, SculptDiT2DModel,
    UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel), e.g. `"attention,feed_forward"`.
    """
    names = ["attention"] if spec is None else spec.split(",") if isinstance(spec, str) else list(spec)
    targets = []
    for name in (name.strip() for name in names):
        if name == "attention":
            targets += ATTENTION_TARGET_MODULES
        elif name == "feed_forward":
            targets += FEED_FORWARD_TARGET_MODULES[_supported_class(denoiser)]
        elif name:
            targets.append(name)
    if not targets:
        raise ValueError(f"`target_modules` names no layer: got {spec!r}; the default is `attention`.")
    return list(dict.fromkeys(targets))


def denoiser_component_name(denoiser: torch.nn.Module) -> str:
    r"""The name a SculptPipeline registers `denoiser` under, and so the prefix of its LoRA file's keys."""
    return "transformer" if isinstance(denoiser, (SculptDiT2DModel, DiTTransformer2DModel)) else "unet"


def add_lora_adapter(
    denoiser: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: str | list[str] | None = None,
    adapter_name: str = "default",
) -> list[torch.nn.Parameter]:
    r"""
    Freezes `denoiser` and adds a trainable LoRA adapter of `rank` (scale `alpha / rank`; `alpha` defaults to `rank`,
    as in diffusers' examples) on the layers `lora_target_modules(denoiser, target_modules)` names (by default the
    attention projections). The adapter's parameters are cast to float32, as diffusers' examples do for a
    half-precision base, and returned: give them to the optimizer, the gradient clipping and `EMAModel`.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"`alpha` must be a positive number (the LoRA scale is alpha / rank), got {alpha!r}.")
    target_modules = lora_target_modules(denoiser, target_modules)
    # PEFT matches a target by the end of a layer's name and silently skips targets that match nothing
    layer_names = [
        name for name, module in denoiser.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    unmatched = [
        target
        for target in target_modules
        if not any(name == target or name.endswith(f".{target}") for name in layer_names)
    ]
    if unmatched:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in layer_names})
        raise ValueError(
            f"`target_modules` must name Linear or Conv2d layers of the {type(denoiser).__name__}; "
            f"{unmatched} match none. Its layers end in {suffixes}."
        )

    denoiser.requires_grad_(False)
    # LoRA's B starts at zero, so the adapter starts as the identity; A is Gaussian, as in diffusers' examples
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    if isinstance(denoiser, PeftAdapterMixin):
        denoiser.add_adapter(config, adapter_name=adapter_name)
    else:
        # diffusers gives UNet2DModel and DiTTransformer2DModel no PeftAdapterMixin; PEFT injects the same layers
        inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    cast_training_params(denoiser, dtype=torch.float32)
    return [parameter for parameter in denoiser.parameters() if parameter.requires_grad]


def lora_state_dict(denoiser: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    r"""
    The adapter's weights in diffusers' LoRA format (`...to_q.lora.down.weight`, as diffusers' LoRA examples save
    them), without the component prefix.
    """
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=adapter_name))


def save_lora_weights(
    output_dir: str | os.PathLike,
    denoiser: torch.nn.Module,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
) -> str:
    r"""
    Saves the adapter `adapter_name` of `denoiser` as `output_dir/weight_name` through
    `SculptPipeline.save_lora_weights` (keys prefixed `unet.` or `transformer.`, the adapter's `LoraConfig` in the
    safetensors metadata so that loading rebuilds its rank, alpha and targets), written under a temporary name and
    renamed into place. Returns the file's path.
    """
    config = denoiser.peft_config[adapter_name]
    component = denoiser_component_name(denoiser)
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-lora-") as staging:
        SculptPipeline.save_lora_weights(
            staging,
            weight_name=weight_name,
            **{
                f"{component}_lora_layers": lora_state_dict(denoiser, adapter_name),
                f"{component}_lora_adapter_metadata": config.to_dict(),
            },
        )
        path = os.path.join(output_dir, weight_name)
        os.replace(os.path.join(staging, weight_name), path)
    return path


def load_lora_weights(denoiser: torch.nn.Module, folder: str | os.PathLike, adapter_name: str = "default"):
    r"""
    Loads what `save_lora_weights` wrote into `folder` back into the adapter `add_lora_adapter` added to `denoiser`
    (to resume a run), as the load hooks of diffusers' LoRA examples do; the adapter's parameters stay float32. An
    adapter of another rank raises torch's size-mismatch error; one for other layers, a ValueError.
    """
    state_dict = SculptPipeline.lora_state_dict(folder, weight_name=LORA_WEIGHT_NAME)
    prefix = f"{denoiser_component_name(denoiser)}."
    state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    incompatible_keys = set_peft_model_state_dict(
        denoiser, convert_unet_state_dict_to_peft(state_dict), adapter_name=adapter_name
    )
    # strict=False underneath: every base weight is "missing", so only the adapter's own keys count
    missing = [key for key in incompatible_keys.missing_keys if ".lora_" in key and f".{adapter_name}." in key]
    if missing or incompatible_keys.unexpected_keys:
        raise ValueError(
            f"The LoRA weights in {folder} do not match the adapter `{adapter_name}` of this "
            f"{type(denoiser).__name__}: missing {missing[:3]}, unexpected {incompatible_keys.unexpected_keys[:3]}. "
            "Resume with the `--lora_rank` and `--lora_target_modules` the run was started with."
        )
    cast_training_params(denoiser, dtype=torch.float32)


def fuse_lora_adapter(denoiser: torch.nn.Module):
    r"""
    Merges the active adapter(s) into the base weights and removes the LoRA layers, so that `save_pretrained` writes
    a plain model. This is how a LoRA-trained UNet2DModel or DiTTransformer2DModel is saved: diffusers cannot load
    an adapter into them (they have no PeftAdapterMixin).
    """
    if isinstance(denoiser, PeftAdapterMixin):
        denoiser.fuse_lora()
        denoiser.unload_lora()
        return
    for module in denoiser.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(denoiser)
    del denoiser.peft_config
