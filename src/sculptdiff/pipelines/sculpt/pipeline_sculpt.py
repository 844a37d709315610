# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
#
# This file is self-contained on purpose: `save_pretrained` copies it beside the weights so that
# `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` loads a saved SculptPipeline with only
# diffusers installed. It may import torch, transformers and diffusers, never sculptdiff.
import importlib
import inspect
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DiTTransformer2DModel,
    ImagePipelineOutput,
    ModelMixin,
    SchedulerMixin,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import PeftAdapterMixin
from diffusers.loaders.lora_base import LoraBaseMixin
from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from diffusers.utils.peft_utils import require_peft_backend
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, upload_folder
from transformers import PreTrainedModel, PreTrainedTokenizerBase


# Logs under diffusers' pipeline loader, where diffusers' own "Loaded unet as ... from `unet` subfolder of ..." go, so
# that `diffusers.utils.logging.set_verbosity_info()` shows the components loaded here too.
logger = logging.get_logger("diffusers.pipelines.pipeline_utils")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from sculptdiff import SculptPipeline

        >>> pipe = SculptPipeline.from_pretrained("sculpt-digits")
        >>> generator = torch.Generator().manual_seed(0)
        >>> # one image of each digit, guided towards its class with w = 3
        >>> images = pipe(class_labels=list(range(10)), guidance_scale=3.0, generator=generator).images
        >>> images[7].save("seven.png")

        >>> # or one of diffusers' guiders, e.g. guidance on the middle of the trajectory only (arXiv 2404.07724)
        >>> from diffusers.guiders import ClassifierFreeGuidance

        >>> pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=3.0, start=0.2, stop=0.8))
        >>> images = pipe(class_labels=list(range(10)), generator=torch.Generator().manual_seed(0)).images
        ```
"""

# Components whose module path starts with this are loaded with the installed classes by `from_pretrained`.
PACKAGE_NAME = "sculptdiff"
# Objectives a denoiser can be trained for; `flow` needs a rectified-flow scheduler, the others a DDPM-family one.
DIFFUSION_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class SculptLoraLoaderMixin(LoraBaseMixin):
    r"""
    Loads LoRA adapters into the pipeline's denoiser as diffusers' LoRA loader mixins do: `load_lora_weights`,
    `save_lora_weights`, `fuse_lora` / `unfuse_lora` here, and `set_adapters`, `unload_lora_weights`,
    `delete_adapters`, `disable_lora`, `get_active_adapters`, ... from [`~loaders.lora_base.LoraBaseMixin`]. The
    denoiser is the pipeline's `unet` or its `transformer`; a LoRA file prefixes its keys with that name (`unet.` or
    `transformer.`), as the files of diffusers' Stable Diffusion and transformer pipelines do. The denoiser needs
    diffusers' `PeftAdapterMixin` (both sculptdiff denoisers and `UNet2DConditionModel` have it).
    """

    # both names: LoraBaseMixin's methods (set_adapters, fuse_lora, unload_lora_weights, ...) skip the one that is None
    _lora_loadable_modules = ["unet", "transformer"]

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor], **kwargs):
        r"""
        Reads a LoRA state dict from a folder, a Hub repo (`weight_name=` picks the file), a file path or a dict, as
        diffusers' single-denoiser pipelines read it (see [`~loaders.StableDiffusionLoraLoaderMixin.lora_state_dict`]).
        """
        return SanaLoraLoaderMixin.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)

    @require_peft_backend
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        r"""
        Loads a LoRA adapter into the denoiser (see [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`]):
        a folder or Hub repo holding `pytorch_lora_weights.safetensors` (or the file `weight_name`), a file path,
        or a state dict, as `save_lora_weights` writes it. `adapter_name` names it for `set_adapters`; at sampling
        time `cross_attention_kwargs={"scale": s}` scales it.
        """
        denoiser_name = "unet" if self.unet is not None else "transformer"
        denoiser = getattr(self, denoiser_name)
        if not isinstance(denoiser, PeftAdapterMixin):
            raise TypeError(
                f"This pipeline's {denoiser_name} is a {type(denoiser).__name__}, which cannot hold LoRA adapters in "
                "diffusers (it lacks `PeftAdapterMixin`): use a denoiser that has it (SculptUNet2DModel, "
                "SculptDiT2DModel, UNet2DConditionModel), or fuse the adapter into the weights."
            )
        # a dict passed in is copied, not consumed, as diffusers' loaders do
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)

        # diffusers warns and loads nothing when no key has the denoiser's prefix, and warns about keys that match no
        # layer: either way the adapter would silently not apply, so both are errors here
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError(
                "Invalid LoRA checkpoint: every tensor name of a LoRA file contains `lora` (e.g. "
                "`unet.down_blocks.1.attentions.0.self_attention.to_q.lora_A.weight`), and this one has "
                f"{sorted(state_dict)[:3]}. Pass a file written by `save_lora_weights`."
            )
        prefixes = sorted({key.split(".")[0] for key in state_dict})
        if prefixes != [denoiser_name]:
            raise ValueError(
                f"This LoRA checkpoint holds weights for {prefixes} (the first part of its tensor names), but this "
                f"pipeline's denoiser is its `{denoiser_name}` ({type(denoiser).__name__}): load an adapter trained "
                f"for a {denoiser_name}. (A file written by `{denoiser_name}.save_lora_adapter` has no prefix: load "
                f"it with `pipe.{denoiser_name}.load_lora_adapter(path, prefix=None)`.)"
            )
        layer_names = {name for name, _ in denoiser.named_modules()}
        unknown_layers = sorted(
            {key.removeprefix(f"{denoiser_name}.").split(".lora")[0] for key in state_dict} - layer_names
        )
        if unknown_layers:
            raise ValueError(
                f"This LoRA checkpoint adapts {len(unknown_layers)} layer(s) that this {type(denoiser).__name__} does "
                f"not have, e.g. {unknown_layers[:3]}: it was trained for another architecture or configuration."
            )
        denoiser.load_lora_adapter(
            state_dict,
            prefix=denoiser_name,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        unet_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        unet_lora_adapter_metadata: dict | None = None,
        transformer_lora_adapter_metadata: dict | None = None,
    ):
        r"""
        Saves the LoRA layers of the denoiser (`unet_lora_layers` or `transformer_lora_layers`: a state dict in
        diffusers' format, `convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))`) to
        `save_directory/pytorch_lora_weights.safetensors` (see
        [`~loaders.StableDiffusionLoraLoaderMixin.save_lora_weights`]); `*_lora_adapter_metadata`
        (`LoraConfig.to_dict()`) lets `load_lora_weights` rebuild the exact config (rank, alpha, targets).
        """
        lora_layers = {}
        lora_metadata = {}
        if unet_lora_layers:
            lora_layers["unet"] = unet_lora_layers
            lora_metadata["unet"] = unet_lora_adapter_metadata
        if transformer_lora_layers:
            lora_layers["transformer"] = transformer_lora_layers
            lora_metadata["transformer"] = transformer_lora_adapter_metadata
        if len(lora_layers) != 1:
            raise ValueError(
                "Pass the LoRA layers of the one denoiser: `unet_lora_layers` or `transformer_lora_layers`, got "
                f"{sorted(lora_layers) or 'neither'}."
            )
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=lora_layers,
            lora_metadata=lora_metadata,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        r"""
        Merges the active adapters, times `lora_scale`, into the denoiser's weights (see
        [`~loaders.lora_base.LoraBaseMixin.fuse_lora`]); `unfuse_lora` takes them out again.
        """
        super().fuse_lora(
            components=components or self._lora_loadable_modules,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        r"""Reverses `fuse_lora` (see [`~loaders.lora_base.LoraBaseMixin.unfuse_lora`])."""
        super().unfuse_lora(components=components or self._lora_loadable_modules, **kwargs)


class SculptPipeline(DiffusionPipeline, SculptLoraLoaderMixin):
    r"""
    Image generation with classifier-free guidance (Ho & Salimans, arXiv 2207.12598): unconditional, class-conditional
    or text-conditional, in pixel space or in the latent space of a VAE.

    This model inherits from [`DiffusionPipeline`]; check its documentation for the generic methods (downloading,
    saving, running on a device, offloading).

    The denoiser is either a U-Net, registered as `unet`, or a diffusion transformer, registered as `transformer`
    (the name diffusers' DiT, PixArt and SD3 pipelines give it); exactly one of them is given, and the pipeline runs
    whichever it is as [`~SculptPipeline.denoiser`]. Its config says how it is conditioned: `num_class_embeds` (with the
    null class at index `num_class_embeds`; diffusers' `DiTTransformer2DModel` says `num_embeds_ada_norm`),
    `cross_attention_dim` (text), or neither (unconditional). A denoiser with twice as many output channels as input
    channels also predicts its variance (improved DDPM's learned sigma, as diffusers' DiT checkpoints do): that half
    is dropped, as `DiTPipeline` drops it, and the scheduler samples with its own variance.

    Args:
        scheduler ([`SchedulerMixin`]):
            Owns the reverse update: `sculptdiff.SculptScheduler`, `sculptdiff.SculptFlowScheduler`, or a diffusers
            scheduler of the family the denoiser was trained for (DDIM, DDPM, DPMSolverMultistep, Euler, UniPC;
            FlowMatchEulerDiscrete for flow models).
        unet ([`ModelMixin`], *optional*):
            A U-Net denoiser, usually a `sculptdiff.SculptUNet2DModel`; any diffusers U-Net with the same `forward`
            (e.g. `UNet2DConditionModel`) works. Give either `unet` or `transformer`.
        transformer ([`ModelMixin`], *optional*):
            A diffusion transformer denoiser, usually a `sculptdiff.SculptDiT2DModel`; diffusers'
            `DiTTransformer2DModel` works too (class-conditional). Give either `unet` or `transformer`.
        text_encoder ([`~transformers.PreTrainedModel`], *optional*):
            Frozen text encoder whose `last_hidden_state` feeds the denoiser's cross-attention (CLIPTextModel, a
            BERT-style encoder, ...).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The tokenizer of `text_encoder`.
        vae ([`AutoencoderKL`], *optional*):
            When present, denoising happens in its latent space and the result is decoded, as in Stable Diffusion.
        guider ([`~diffusers.guiders.BaseGuidance`], *optional*):
            One of diffusers' guiders (`ClassifierFreeGuidance` with `start`/`stop`, `AdaptiveProjectedGuidance`,
            `ClassifierFreeZeroStarGuidance`, `TangentialClassifierFreeGuidance`, `FrequencyDecoupledGuidance`, ...),
            driven in the denoising loop as diffusers' HunyuanVideo 1.5 pipeline drives it. It then owns guidance, its
            scale included, and `__call__` refuses `guidance_scale` and `guidance_rescale`. Without one the pipeline
            applies classifier-free guidance itself, with `guidance_scale` and `guidance_rescale`. Give a pipeline
            a guider with `pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=3.0, stop=0.5))` (a plain
            `pipe.guider = ...` does not record it in the config of a pipeline that has none, so it would not be
            saved); it is saved in the `guider/` subfolder and loaded with the pipeline.
    """

    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "text_encoder", "tokenizer", "vae", "guider"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        scheduler: SchedulerMixin,
        unet: ModelMixin | None = None,
        transformer: ModelMixin | None = None,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        vae: AutoencoderKL | None = None,
        guider: BaseGuidance | None = None,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError(
                "SculptPipeline needs exactly one denoiser: a U-Net as `unet` or a diffusion transformer as "
                f"`transformer`, got unet={type(unet).__name__} and transformer={type(transformer).__name__}."
            )
        self.register_modules(
            unet=unet,
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            guider=guider,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def denoiser(self) -> ModelMixin:
        r"""The denoising network the pipeline runs: its `unet` or its `transformer`, whichever it has."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def guidance_scale(self) -> float | None:
        # `None` when a guider owns guidance
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float | None:
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self) -> bool:
        # a guider decides per step whether it needs the unconditional branch (`start`/`stop`), so an enabled one
        # gets it prepared for every step, as diffusers' guider pipelines check `guider._enabled`
        if self.guider is not None:
            return self.guider._enabled and self._is_conditional
        # a guidance-distilled denoiser (LCM, `time_cond_proj_dim`) takes w as an input: one conditional pass per step
        if self.denoiser.config.get("time_cond_proj_dim") is not None:
            return False
        # w = 1 is plain conditional sampling: eps_uncond + 1 * (eps_cond - eps_uncond) = eps_cond; any other w needs
        # both branches (w = 0 is unconditional, 0 < w < 1 interpolates, w > 1 extrapolates)
        return self._guidance_scale != 1 and self._is_conditional

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        Encodes the prompt into the text encoder's last hidden states, `(batch * num_images_per_prompt, tokens, dim)`.
        The training script calls this too, so that training and sampling see the same embeddings; the null
        condition of classifier-free guidance is the embedding of the empty prompt. With
        `do_classifier_free_guidance` (the default, as in diffusers' SD3, PixArt and Sana pipelines) the embeddings of
        `negative_prompt` (or of the empty prompt) are returned as well, otherwise `None`.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self._encode_text(prompt, device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.text_encoder.dtype if self.text_encoder else None)
        batch_size = prompt_embeds.shape[0]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but the prompt batch has {batch_size}: "
                    "pass one negative prompt, or one per prompt."
                )
            negative_prompt_embeds = self._encode_text(negative_prompt, device)

        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=prompt_embeds.dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _encode_text(self, texts: list[str], device: torch.device) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "Encoding a prompt needs a `text_encoder` and a `tokenizer`, and this pipeline has none: pass "
                "`prompt_embeds` instead, or load the pipeline with its text encoder."
            )
        text_inputs = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        # The mask keeps padding out of the encoder's own attention; training encodes the same way.
        return self.text_encoder(
            text_inputs.input_ids.to(device), attention_mask=text_inputs.attention_mask.to(device)
        ).last_hidden_state

    def num_classes(self) -> int | None:
        r"""
        The number of classes of a class-conditional denoiser, whose reserved null class has this index; `None` for a
        denoiser without classes.
        """
        config = self.denoiser.config
        # diffusers' DiT (DiTTransformer2DModel, and Transformer2DModel with adaLN-Zero) keeps its class table in its
        # adaLN-Zero norms: `num_embeds_ada_norm` classes, and the null class at that index (DiTPipeline's
        # `class_null`). With any other norm, `num_embeds_ada_norm` counts timesteps, not classes.
        if config.get("norm_type") == "ada_norm_zero":
            return config.num_embeds_ada_norm
        return config.get("num_class_embeds")

    def prepare_class_labels(self, class_labels: int | str | list[int | str] | torch.Tensor) -> torch.Tensor:
        r"""Turns class ids or names (looked up in the denoiser config's `id2label`) into a tensor of ids."""
        num_classes = self.num_classes()
        if num_classes is None:
            raise ValueError(
                f"`class_labels` were given but this {type(self.denoiser).__name__} is not class-conditional (its "
                "config has no `num_class_embeds`): drop `class_labels`, or load a class-conditional model."
            )
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise ValueError(
                    f"`class_labels` must hold integer class ids, got a tensor of dtype {class_labels.dtype}."
                )
            class_labels = class_labels.reshape(-1).tolist()
        class_labels = [class_labels] if isinstance(class_labels, (numbers.Integral, str)) else list(class_labels)
        if not class_labels:
            raise ValueError("`class_labels` is empty: pass at least one class id or name.")

        label2id = {label: int(index) for index, label in (self.denoiser.config.get("id2label") or {}).items()}
        class_ids = []
        for label in class_labels:
            # numpy integers are integers; a float such as 3.7 is not a class (and would be truncated to 3)
            if isinstance(label, bool) or not isinstance(label, (numbers.Integral, str)):
                raise ValueError(
                    f"`class_labels` may hold integer class ids or class names, got {label!r} "
                    f"({type(label).__name__})."
                )
            if isinstance(label, str):
                if label not in label2id:
                    raise ValueError(
                        f"Unknown class name {label!r} in `class_labels`; this model knows {sorted(label2id)}."
                    )
                label = label2id[label]
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"`class_labels` holds {label}, outside [0, {num_classes - 1}] for this model's "
                    f"{num_classes} classes (index {num_classes} is the reserved null class)."
                )
            class_ids.append(int(label))
        return torch.tensor(class_ids, dtype=torch.long)

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You passed a list of {len(generator)} generators for a batch of {batch_size} images: pass one "
                "generator, or one per image (batch size times `num_images_per_prompt`)."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` have shape {tuple(latents.shape)}, expected {shape}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        # the scheduler decides the scale of the starting noise (sigma_max for Euler); flow-matching schedulers
        # of diffusers do not define it because theirs is always 1
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    # Copied from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img.LatentConsistencyModelPipeline.get_guidance_scale_embedding
    def get_guidance_scale_embedding(
        self, w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """
        See https://github.com/google-research/vdm/blob/dc27b98a554f65cdc654b800da5aa1846545d41b/model_vdm.py#L298

        Args:
            w (`torch.Tensor`):
                Generate embedding vectors with a specified guidance scale to subsequently enrich timestep embeddings.
            embedding_dim (`int`, *optional*, defaults to 512):
                Dimension of the embeddings to generate.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
                Data type of the generated embeddings.

        Returns:
            `torch.Tensor`: Embedding vectors with shape `(len(w), embedding_dim)`.
        """
        assert len(w.shape) == 1
        w = w * 1000.0

        half_dim = embedding_dim // 2
        emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, dtype=dtype) * -emb)
        emb = w.to(dtype)[:, None] * emb[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
        if embedding_dim % 2 == 1:  # zero pad
            emb = torch.nn.functional.pad(emb, (0, 1))
        assert emb.shape == (w.shape[0], embedding_dim)
        return emb

    def _predict(
        self,
        latent_model_input: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        One pass of the denoiser on a batch of (scaled) latents at timestep `t`: its prediction (noise, v, x0 or
        velocity, as it was trained), without learned variance channels. `timestep_cond` is the guidance-scale
        embedding of a guidance-distilled denoiser (`time_cond_proj_dim`).
        """
        # one timestep per sample, as diffusers' transformer pipelines pass it (its DiT embeds only a 1-d tensor);
        # text only to a denoiser that reads it (diffusers' DiT takes no `encoder_hidden_states`), and likewise the
        # guidance embedding and the attention kwargs (diffusers' UNet2DModel takes no `cross_attention_kwargs`)
        timestep = t.expand(latent_model_input.shape[0])
        optional_inputs = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        if timestep_cond is not None:
            optional_inputs["timestep_cond"] = timestep_cond
        if self.cross_attention_kwargs is not None:
            optional_inputs["cross_attention_kwargs"] = self.cross_attention_kwargs
        model_output = self.denoiser(
            latent_model_input,
            timestep,
            class_labels=class_labels,
            return_dict=False,
            **optional_inputs,
        )[0]
        # learned variance channels (out_channels = 2 * in_channels) are dropped, as DiTPipeline drops them: the
        # scheduler samples with its own variance
        return model_output[:, : latent_model_input.shape[1]]

    def check_inputs(
        self,
        prompt,
        class_labels,
        batch_size,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        guidance_rescale,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        num_images_per_prompt,
        eta,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("num_images_per_prompt", num_images_per_prompt),
            ("height", height),
            ("width", width),
            ("num_inference_steps", num_inference_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        # a U-Net halves the resolution at every level but the last; a transformer cuts the sample into patches
        if self.unet is not None:
            denoiser_factor, factor_name = 2 ** (len(self.unet.config.block_out_channels) - 1), "U-Net's downsampling"
        else:
            denoiser_factor, factor_name = self.transformer.config.patch_size, "transformer's `patch_size`"
        downsample_factor = self.vae_scale_factor * denoiser_factor
        if height % downsample_factor != 0 or width % downsample_factor != 0:
            raise ValueError(
                f"`height` and `width` must be multiples of {downsample_factor} for this model (VAE factor "
                f"{self.vae_scale_factor} times the {factor_name}, {denoiser_factor}), got {height}x{width}."
            )
        # diffusers' DiT unpatchifies its tokens into a square (`height = width = sqrt(tokens)`)
        if isinstance(self.denoiser, DiTTransformer2DModel) and height != width:
            raise ValueError(
                f"diffusers' DiTTransformer2DModel generates square images only: pass `height` equal to `width`, got "
                f"{height}x{width}."
            )
        config = self.denoiser.config
        in_channels, out_channels = config.in_channels, config.get("out_channels") or config.in_channels
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(
                f"The denoiser has `out_channels={out_channels}` for `in_channels={in_channels}`: the pipeline needs "
                f"a prediction with {in_channels} channels, or {2 * in_channels} (the prediction and a learned "
                "variance, which is dropped)."
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f'`output_type` must be "pil", "np", "pt" or "latent", got {output_type!r}.')

        # a guidance-distilled denoiser (LCM) takes the guidance scale as an input, in one conditional pass
        if config.get("time_cond_proj_dim") is not None:
            if self.guider is not None:
                raise ValueError(
                    f"This {type(self.denoiser).__name__} was distilled with the guidance scale as an input "
                    f"(`time_cond_proj_dim={config.time_cond_proj_dim}`): it guides itself in one pass, so it takes "
                    f"no `guider` ({type(self.guider).__name__}). Remove it (`pipe.guider = None`) and pass "
                    "`guidance_scale`."
                )
            if guidance_rescale:
                raise ValueError(
                    f"`guidance_rescale={guidance_rescale}` rescales a two-branch guided prediction, but this "
                    "guidance-distilled denoiser (`time_cond_proj_dim`) makes one conditional pass: drop it."
                )

        if self.guider is not None:
            if not isinstance(self.guider, BaseGuidance):
                raise TypeError(
                    f"`guider` must be one of diffusers' guiders (a `diffusers.guiders.BaseGuidance`), got "
                    f"{type(self.guider).__name__}."
                )
            # as in diffusers' guider pipelines, the guider owns the scale: two owners would silently disagree
            for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
                if value is not None:
                    raise ValueError(
                        f"`{name}={value}` was given, but this pipeline has a `guider` "
                        f"({type(self.guider).__name__}), which owns guidance: set it on the guider, e.g. "
                        f"`pipe.guider = pipe.guider.new({name}={value})`, or remove the guider (`pipe.guider = None`) "
                        f"to use `{name}`."
                    )
        else:
            # guidance: eps = eps_uncond + w * (eps_cond - eps_uncond) holds for any finite w >= 0
            if not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale) or guidance_scale < 0:
                raise ValueError(
                    f"`guidance_scale` must be a finite number >= 0 (0 unconditional, 1 plain conditional sampling, "
                    f"> 1 guided), got {guidance_scale!r}."
                )
            if not isinstance(guidance_rescale, numbers.Real) or not 0 <= guidance_rescale <= 1:
                raise ValueError(f"`guidance_rescale` must be a number in [0, 1], got {guidance_rescale!r}.")

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both: `prompt_embeds` replaces the prompt.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt is not None and (isinstance(prompt, list) and not prompt or not isinstance(prompt, (str, list))):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        cross_attention_dim = config.get("cross_attention_dim")
        has_text = prompt is not None or prompt_embeds is not None
        if has_text and cross_attention_dim is None:
            raise ValueError(
                f"A prompt was given but this {type(self.denoiser).__name__} has no cross-attention "
                "(`cross_attention_dim` is None): "
                "it cannot read text. Drop the prompt, or load a text-conditional model."
            )
        if not has_text and (negative_prompt is not None or negative_prompt_embeds is not None):
            raise ValueError(
                "`negative_prompt` / `negative_prompt_embeds` replace the empty prompt of a text model's "
                "unconditional branch; without a `prompt` or `prompt_embeds` there is none. Drop them (a class "
                "model's unconditional branch is its null class)."
            )
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (embeds.ndim != 3 or embeds.shape[-1] != cross_attention_dim):
                raise ValueError(
                    f"`{name}` must have shape (batch, tokens, {cross_attention_dim}) for this denoiser's "
                    f"`cross_attention_dim`, got {tuple(embeds.shape)}."
                )
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
                )
        if class_labels is None and not has_text and self.guider is not None:
            raise ValueError(
                f"The pipeline's `guider` ({type(self.guider).__name__}) needs a condition to guide towards: pass "
                "`class_labels` or a `prompt`, or remove the guider (`pipe.guider = None`) for unconditional sampling."
            )
        if class_labels is None and not has_text and guidance_scale != 1:
            raise ValueError(
                f"`guidance_scale={guidance_scale}` needs a condition to guide towards: pass `class_labels` or a "
                "`prompt`, or use `guidance_scale=1.0` for unconditional sampling."
            )
        guided = self.guider is not None or guidance_scale != 1
        if guided and config.get("conditioning_dropout_prob", 1.0) <= 0:
            raise ValueError(
                "Classifier-free guidance needs a model trained with a null condition, and this denoiser's config "
                "says `conditioning_dropout_prob=0`. Use `guidance_scale=1.0` without a guider, or train with "
                "`--conditioning_dropout_prob 0.1`."
            )
        if callback_on_step_end_tensor_inputs is not None and not all(
            name in self._callback_tensor_inputs for name in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )

        # The denoiser's config records the objective it was trained on; a scheduler of the other family (or another
        # prediction type) would silently turn its output into noise, so refuse it here. A DDPM-family scheduler is
        # defined by its `alphas_cumprod` table (which Stable Diffusion pipelines read); flow-matching schedulers
        # have none. DPMSolver/UniPC with `use_flow_sigmas=True` run flow sigmas over such a table.
        objective = config.get("prediction_type")
        scheduler_is_flow = not hasattr(self.scheduler, "alphas_cumprod") or self.scheduler.config.get(
            "use_flow_sigmas", False
        )
        if objective == "flow" and not scheduler_is_flow:
            raise ValueError(
                f"This denoiser was trained with the flow-matching objective but the scheduler is "
                f"{type(self.scheduler).__name__}, a DDPM-family scheduler. Use `SculptFlowScheduler` or diffusers' "
                "`FlowMatchEulerDiscreteScheduler`."
            )
        if objective in DIFFUSION_PREDICTION_TYPES:
            if scheduler_is_flow:
                raise ValueError(
                    f"This denoiser predicts `{objective}` (a diffusion objective) but the scheduler is "
                    f"{type(self.scheduler).__name__}, a flow-matching scheduler. Use `SculptScheduler` or a "
                    "diffusers DDPM-family scheduler."
                )
            if self.scheduler.config.get("prediction_type", objective) != objective:
                raise ValueError(
                    f"This denoiser predicts `{objective}` but the scheduler is configured for "
                    f"`{self.scheduler.config.prediction_type}`: set "
                    f"`pipe.scheduler = {type(self.scheduler).__name__}.from_config(pipe.scheduler.config, "
                    f'prediction_type="{objective}")`.'
                )
        if eta is not None and "eta" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(
                f"`eta` was given but {type(self.scheduler).__name__}.step takes none (it is a DDIM-style "
                "stochasticity of DDPM-family schedulers such as SculptScheduler and DDIMScheduler): drop `eta`."
            )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        batch_size: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images, unconditionally (`batch_size`), for classes (`class_labels`) or for text (`prompt`).

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s) for a text-conditional denoiser.
            class_labels (`int`, `str`, `list` or `torch.Tensor`, *optional*):
                Class ids, or class names when the denoiser's config carries `id2label`, for a class-conditional
                denoiser.
            batch_size (`int`, defaults to 1):
                Number of images when there is neither a prompt nor class labels.
            height (`int`, *optional*, defaults to `denoiser.config.sample_size * vae_scale_factor`):
                Image height in pixels; a multiple of the VAE factor times the U-Net's downsampling or the
                transformer's patch size.
            width (`int`, *optional*, defaults to `denoiser.config.sample_size * vae_scale_factor`):
                Image width in pixels.
            num_inference_steps (`int`, defaults to 50):
                Number of denoising steps.
            timesteps (`list[int]`, *optional*):
                Custom descending timesteps for schedulers whose `set_timesteps` accepts them; overrides
                `num_inference_steps`.
            guidance_scale (`float`, *optional*, defaults to 1.0 without a `guider`):
                w >= 0 in `eps = eps_uncond + w * (eps_cond - eps_uncond)`. w = 1 is plain conditional sampling (one
                denoiser pass per step); w > 1 follows the condition more strongly, w = 0 samples unconditionally (the
                null condition) and 0 < w < 1 interpolates (two branches in one batched pass). A pipeline with a
                `guider` refuses it: the guider owns its scale (`pipe.guider = pipe.guider.new(guidance_scale=3.0)`).
                A guidance-distilled denoiser (an LCM student of `distill_sculpt.py`, whose config has
                `time_cond_proj_dim`) reads w as an input (embedded as w - 1, as `LatentConsistencyModelPipeline`
                does): one conditional pass per step at any w.
            guidance_rescale (`float`, *optional*, defaults to 0.0 without a `guider`):
                phi of arXiv 2305.08891, Sec. 3.4: rescales the guided output towards the conditional one's standard
                deviation to counter over-exposure. Refused with a `guider`, which has its own `guidance_rescale`.
            negative_prompt (`str` or `list[str]`, *optional*):
                What the unconditional branch encodes instead of the empty prompt.
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed text embeddings `(batch, tokens, dim)`, instead of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed embeddings of the unconditional branch.
            num_images_per_prompt (`int`, defaults to 1):
                Images per prompt or class label.
            eta (`float`, *optional*):
                Passed to schedulers whose `step` takes it (0 deterministic DDIM, 1 DDPM's ancestral sampler). `None`
                keeps the scheduler's own choice: the `eta` a saved `SculptScheduler` config records, 0 for
                `DDIMScheduler`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per image, for reproducible results.
            latents (`torch.Tensor`, *optional*):
                Starting noise `(batch, channels, height / f, width / f)`; drawn from `generator` when omitted.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"`, or `"latent"` (the denoised latents, not decoded).
            return_dict (`bool`, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the denoiser's attention processors, e.g. `{"scale": 0.5}` for the scale of loaded LoRA layers.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each step as `callback_on_step_end(self, i, t, callback_kwargs)`; the tensors it returns
                replace the pipeline's (e.g. `{"latents": ...}`), and the next step reads `prompt_embeds`,
                `negative_prompt_embeds` and `pipe._guidance_scale` again. As in diffusers' pipelines, a callback that
                lowers `_guidance_scale` to 1 or below turns guidance off (diffusers' `SDCFGCutoffCallback`). With a
                `guider` the guider decides each step (its `start`/`stop` limit guidance to an interval), and a
                callback that sets `_guidance_scale` is refused.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Which of `_callback_tensor_inputs` go into `callback_kwargs`; defaults to `["latents"]`.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if height is None:
            height = self.denoiser.config.sample_size * self.vae_scale_factor
        if width is None:
            width = self.denoiser.config.sample_size * self.vae_scale_factor
        if self.guider is None:
            guidance_scale = 1.0 if guidance_scale is None else guidance_scale
            guidance_rescale = 0.0 if guidance_rescale is None else guidance_rescale

        # 1. Check inputs
        self.check_inputs(
            prompt,
            class_labels,
            batch_size,
            height,
            width,
            num_inference_steps if timesteps is None else len(timesteps),
            guidance_scale,
            guidance_rescale,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            num_images_per_prompt,
            eta,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._is_conditional = class_labels is not None or prompt is not None or prompt_embeds is not None
        device = self._execution_device

        # 2. Encode the condition: the conditional branch, and the null branch when guiding
        if prompt is not None or prompt_embeds is not None:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
            )
            batch_size = prompt_embeds.shape[0] // num_images_per_prompt

        class_ids = null_ids = None
        if class_labels is not None:
            class_ids = self.prepare_class_labels(class_labels)
            if prompt_embeds is not None and class_ids.shape[0] != batch_size:
                raise ValueError(
                    f"{class_ids.shape[0]} class labels for {batch_size} prompts: give one label per prompt."
                )
            batch_size = class_ids.shape[0]
            class_ids = class_ids.repeat_interleave(num_images_per_prompt).to(device)
        num_classes = self.num_classes()
        if num_classes is not None:
            # the reserved null class, index `num_classes`, is the unconditional branch, and the condition of images
            # drawn without class labels (spelled out: diffusers' DiT has no default for `class_labels`)
            null_ids = torch.full((batch_size * num_images_per_prompt,), num_classes, device=device)
            if class_ids is None:
                class_ids = null_ids

        # 3. Prepare timesteps: the scheduler owns the grid, custom `timesteps` pass through to it. (This is
        # diffusers' `retrieve_timesteps`, inline: importing it from the Stable Diffusion pipeline module would load
        # transformers' CLIP image processors with every `import sculptdiff`.)
        if timesteps is not None:
            if "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"{type(self.scheduler).__name__}.set_timesteps does not take custom `timesteps`: pass "
                    "`num_inference_steps` instead, or use a scheduler that does (e.g. SculptScheduler)."
                )
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
            num_inference_steps = len(timesteps)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 4. Prepare latents
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.denoiser.config.in_channels,
            height,
            width,
            prompt_embeds.dtype if prompt_embeds is not None else self.denoiser.dtype,
            device,
            generator,
            latents,
        )

        # 5. Prepare the scheduler's extra step arguments: `eta` (checked above) and `generator` where `step` takes it
        extra_step_kwargs = {}
        if eta is not None:
            extra_step_kwargs["eta"] = eta
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            extra_step_kwargs["generator"] = generator

        # 6. Denoising loop. The conditioning is built each step from what a callback may have changed
        # (`prompt_embeds`, `negative_prompt_embeds`, `self._guidance_scale`).
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        # guiders that leave the denoiser as it is (CFG, APG, CFG-Zero*, TCFG, FDG) differ only in their inputs, so
        # their batches run as one batched pass; one that changes the denoiser per batch (PAG's and SLG's hooks)
        # gets a pass per batch
        guider_batches_in_one_pass = (
            self.guider is not None
            and type(self.guider).prepare_models is BaseGuidance.prepare_models
            and type(self.guider).cleanup_models is BaseGuidance.cleanup_models
        )
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.guider is None:
                    encoder_hidden_states, class_input = prompt_embeds, class_ids
                    latent_model_input = latents
                    if self.do_classifier_free_guidance:
                        # unconditional first, so that `chunk(2)` below gives (uncond, cond)
                        latent_model_input = torch.cat([latents] * 2)
                        if prompt_embeds is not None:
                            encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds])
                        if class_ids is not None:
                            class_input = torch.cat([null_ids, class_ids])
                    # diffusers' flow-matching schedulers define no `scale_model_input`: their inputs need no scaling
                    if hasattr(self.scheduler, "scale_model_input"):
                        latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                    timestep_cond = None
                    if self.denoiser.config.get("time_cond_proj_dim") is not None:
                        # LCM's w embedding, of w - 1 as LatentConsistencyModelPipeline embeds its guidance scale
                        w = torch.full((latent_model_input.shape[0],), self.guidance_scale - 1)
                        timestep_cond = self.get_guidance_scale_embedding(
                            w, embedding_dim=self.denoiser.config.time_cond_proj_dim
                        ).to(device=device, dtype=latent_model_input.dtype)
                    model_output = self._predict(
                        latent_model_input, t, encoder_hidden_states, class_input, timestep_cond
                    )

                    # classifier-free guidance on whatever the model predicts (eps, v, x0 or velocity): the scheduler
                    # receives one guided output and converts it as it would an unguided one
                    if self.do_classifier_free_guidance:
                        model_output_uncond, model_output_cond = model_output.chunk(2)
                        model_output = model_output_uncond + self.guidance_scale * (
                            model_output_cond - model_output_uncond
                        )
                        if self.guidance_rescale > 0:
                            model_output = rescale_noise_cfg(model_output, model_output_cond, self.guidance_rescale)
                else:
                    # diffusers' guider protocol, as its HunyuanVideo 1.5 pipeline runs it: the guider says which
                    # conditionings this step needs (the conditional one first, the unconditional one where it
                    # guides), the denoiser predicts each, and the guider combines the predictions
                    latent_model_input = latents
                    if hasattr(self.scheduler, "scale_model_input"):
                        latent_model_input = self.scheduler.scale_model_input(latents, t)
                    guider_inputs = {}
                    if prompt_embeds is not None:
                        guider_inputs["encoder_hidden_states"] = (prompt_embeds, negative_prompt_embeds)
                    if class_ids is not None:
                        guider_inputs["class_labels"] = (class_ids, null_ids)
                    # the loop's length, not `num_inference_steps`: a second-order scheduler loops 2n - 1 times, and
                    # the guider's `start`/`stop` are fractions of the loop
                    self.guider.set_state(step=i, num_inference_steps=len(timesteps), timestep=t)
                    guider_state = self.guider.prepare_inputs(guider_inputs)
                    if guider_batches_in_one_pass:
                        for guider_state_batch in guider_state:
                            self.guider.prepare_models(self.denoiser)
                        batched_inputs = {
                            name: torch.cat([getattr(guider_state_batch, name) for guider_state_batch in guider_state])
                            for name in guider_inputs
                        }
                        predictions = self._predict(
                            torch.cat([latent_model_input] * len(guider_state)), t, **batched_inputs
                        ).chunk(len(guider_state))
                        for guider_state_batch, prediction in zip(guider_state, predictions):
                            guider_state_batch.noise_pred = prediction
                            self.guider.cleanup_models(self.denoiser)
                    else:
                        for guider_state_batch in guider_state:
                            self.guider.prepare_models(self.denoiser)
                            guider_state_batch.noise_pred = self._predict(
                                latent_model_input,
                                t,
                                **{name: getattr(guider_state_batch, name) for name in guider_inputs},
                            )
                            self.guider.cleanup_models(self.denoiser)
                    model_output = self.guider(guider_state)[0]

                latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    guidance_scale_before = self._guidance_scale
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]  # a loop: a comprehension has its own locals()
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if self.guider is not None and self._guidance_scale is not None:
                        raise ValueError(
                            f"A `callback_on_step_end` set `_guidance_scale` to {self._guidance_scale}, but this "
                            f"pipeline's `guider` ({type(self.guider).__name__}) owns guidance: limit guidance to "
                            "part of the steps with the guider's `start`/`stop` instead, e.g. "
                            "`pipe.guider = pipe.guider.new(stop=0.5)`."
                        )
                    # diffusers' CFG-cutoff callbacks end guidance by setting `_guidance_scale = 0`, which diffusers'
                    # pipelines read as "no guidance" (w <= 1); here w = 0 would mean unconditional sampling, so a
                    # callback's lowering to <= 1 is read as diffusers means it: plain conditional sampling
                    if self._guidance_scale != guidance_scale_before and self._guidance_scale <= 1:
                        self._guidance_scale = 1.0

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 7. Decode: from the VAE's latent space when there is one
        if output_type == "latent":
            image = latents
        else:
            if self.vae is not None:
                latents = latents / self.vae.config.scaling_factor
                image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            else:
                image = latents
            image = self.image_processor.postprocess(image, output_type=output_type)

        # 8. Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        r"""
        Saves the pipeline as diffusers does, plus what diffusers' custom-code mechanism needs so that
        `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` works without sculptdiff: this
        file beside `model_index.json` (whose `_class_name` becomes `["pipeline_sculpt", "SculptPipeline"]`), and
        the source of each non-diffusers component in its subfolder, named after the module path that
        `model_index.json` records. Everything is written to a temporary folder first and renamed into place, so
        an interrupted save never leaves a half-written component, and files of `save_directory` that the
        pipeline does not own (a model card, sample grids, logs, checkpoints) are kept.

        With `push_to_hub=True` the files the pipeline owns (`hub_allow_patterns`) and the model card are then
        uploaded to `repo_id`, nothing else of the folder (keyword arguments as diffusers': `repo_id`,
        `commit_message`, `private`, `token`, `create_pr`); a model card already in `save_directory` is uploaded as
        it is, otherwise a minimal one tagged `sculptdiff` is created.
        """
        # diffusers would write a loaded LoRA adapter's PEFT layers (`to_q.base_layer.weight`, `to_q.lora_A...`) into
        # the denoiser's weights, a checkpoint whose layers then load as random: refuse instead, and say what works
        if getattr(self.denoiser, "peft_config", None):
            raise ValueError(
                f"The {type(self.denoiser).__name__} holds LoRA adapter(s) {sorted(self.denoiser.peft_config)}, and "
                "its weights would be saved with their adapter layers, which no loader reads. Save the adapter with "
                "`save_lora_weights`, or bake it in first: `pipe.fuse_lora()`, then `pipe.unload_lora_weights()`, "
                "then `save_pretrained`; `pipe.unload_lora_weights()` alone saves the base model."
            )
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-save-") as staging:
            super().save_pretrained(staging, safe_serialization=safe_serialization, variant=variant)
            self._write_custom_code(staging)
            for name in sorted(os.listdir(staging)):
                replace_path(os.path.join(staging, name), os.path.join(save_directory, name))

        if push_to_hub:
            token = kwargs.pop("token", None)
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            repo_id = create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None), token=token).repo_id
            card_path = os.path.join(save_directory, "README.md")
            if not os.path.isfile(card_path):
                model_card = load_or_create_model_card(repo_id, token=token, is_pipeline=True)
                populate_model_card(model_card, tags=["sculptdiff"]).save(card_path)
            self._upload_folder(
                save_directory,
                repo_id,
                token=token,
                commit_message=kwargs.pop("commit_message", None),
                create_pr=kwargs.pop("create_pr", False),
            )

    def hub_allow_patterns(self) -> list[str]:
        r"""
        The files of a `save_pretrained` folder that belong on the Hub, as glob patterns relative to the folder
        (`huggingface_hub.upload_folder(..., allow_patterns=...)`): `model_index.json`, the pipeline's code file,
        one subfolder per registered component (weights, configs, the component code files), and the model card
        `README.md`. Everything else a folder may hold (training checkpoints, logs, dotfiles such as `.env`,
        staging folders) stays local. `push_to_hub` and `save_pretrained(..., push_to_hub=True)` upload exactly
        these; the training scripts' publish code adds its own files (sample grid, run arguments) to them.
        """
        patterns = [self.config_name, f"{self._pipeline_module_name()}.py", "README.md"]
        for name, component in self.components.items():
            if component is not None:
                patterns.append(f"{name}/*")
        return patterns

    def _upload_folder(
        self,
        working_dir: str | os.PathLike,
        repo_id: str,
        token: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        subfolder: str | None = None,
    ):
        # diffusers' PushToHubMixin uploads the whole folder; a training output folder also holds checkpoints, logs
        # and secrets, so both push paths (`push_to_hub`, `save_pretrained(push_to_hub=True)`) go through the allowlist
        return upload_folder(
            repo_id=repo_id,
            folder_path=working_dir,
            path_in_repo=subfolder,
            commit_message=commit_message or f"Upload {type(self).__name__}",
            token=token,
            create_pr=create_pr,
            allow_patterns=self.hub_allow_patterns(),
        )

    def _pipeline_module_name(self) -> str:
        return os.path.splitext(os.path.basename(inspect.getsourcefile(type(self))))[0]

    def _write_custom_code(self, folder: str):
        model_index_path = os.path.join(folder, "model_index.json")
        with open(model_index_path, encoding="utf-8") as f:
            model_index = json.load(f)
        pipeline_module = self._pipeline_module_name()
        model_index["_class_name"] = [pipeline_module, type(self).__name__]
        shutil.copyfile(inspect.getsourcefile(type(self)), os.path.join(folder, f"{pipeline_module}.py"))

        for name, entry in model_index.items():
            # diffusers records components from outside diffusers/transformers by their full module path
            if not isinstance(entry, list) or entry[0] is None or "." not in entry[0]:
                continue
            module = importlib.import_module(entry[0])
            shutil.copyfile(inspect.getsourcefile(module), os.path.join(folder, name, f"{entry[0]}.py"))

        with open(model_index_path, "w", encoding="utf-8") as f:
            json.dump(model_index, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # A saved SculptPipeline names its own code file in `_class_name` (["pipeline_sculpt", "SculptPipeline"]) for
        # the trust_remote_code door. Read through this installed class, that entry means this class; without the
        # rewrite diffusers' `download` and `from_pretrained` would insist on running the saved copy as remote code.
        config = super()._dict_from_json_file(json_file)
        if isinstance(config.get("_class_name"), list) and config["_class_name"][1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Loads a saved SculptPipeline from a folder or a Hub repo id with the installed sculptdiff classes (no
        `trust_remote_code` needed). Takes diffusers' `from_pretrained` arguments (`revision`, `dtype` or a
        per-component dict of dtypes, `variant`, `use_safetensors`, `device_map`, `low_cpu_mem_usage`,
        `quantization_config`, `cache_dir`, `token`, `local_files_only`, components to replace, ...), with diffusers'
        meaning: `use_safetensors=None` prefers safetensors and falls back to `.bin`, which is read with
        `torch.load(weights_only=True)` (tensors only, no code runs); `use_safetensors=True` accepts safetensors only.

        diffusers does all of the work except one thing: a component whose code file was saved beside its weights
        (which `save_pretrained` writes for the trust_remote_code door) is loaded by diffusers only as remote code.
        The components the folder records from sculptdiff are therefore loaded here with the installed classes and
        the loading arguments diffusers gives its own models, then handed to `DiffusionPipeline.from_pretrained`.
        """
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            folder = cls.download(folder, **kwargs)
        model_index = cls.load_config(folder)

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        quantization_config = kwargs.get("quantization_config")
        # diffusers resolves "balanced" over accelerators for the components it loads itself (ours keep the device
        # they load on); a device name reaches every model's own loading, as diffusers passes it
        device_map = kwargs.get("device_map")
        model_kwargs = {
            name: kwargs[name]
            for name in ("use_safetensors", "low_cpu_mem_usage", "max_memory", "offload_folder", "disable_mmap")
            if name in kwargs
        }
        for name, entry in model_index.items():
            if not isinstance(entry, list) or entry[0] is None or name in kwargs:
                continue
            if entry[0].split(".")[0] != PACKAGE_NAME:
                continue
            component_class = _installed_class(name, entry)
            if issubclass(component_class, SchedulerMixin):
                kwargs[name] = component_class.from_pretrained(folder, subfolder=name)
            else:
                # as diffusers' `load_sub_model`: a dict of dtypes resolves per component, a variant applies to the
                # components that have its files, a pipeline quantization config resolves per component
                component_dtype = (
                    dtype.get(name, dtype.get("default", torch.float32)) if isinstance(dtype, dict) else dtype
                )
                variant = kwargs.get("variant")
                has_variant = variant is not None and any(
                    filename.split(".")[1].startswith(variant)
                    for filename in os.listdir(os.path.join(folder, name))
                    if "." in filename
                )
                quantization = (
                    quantization_config._resolve_quant_config(is_diffusers=True, module_name=name)
                    if quantization_config is not None
                    else None
                )
                kwargs[name] = component_class.from_pretrained(
                    folder,
                    subfolder=name,
                    torch_dtype=component_dtype,
                    variant=variant if has_variant else None,
                    device_map=None if device_map == "balanced" else device_map,
                    quantization_config=quantization,
                    **model_kwargs,
                )
            logger.info(f"Loaded {name} as {entry[1]} from `{name}` subfolder of {pretrained_model_name_or_path}.")

        pipeline = super().from_pretrained(folder, **kwargs)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline


def _installed_class(name: str, entry: list[str]) -> type:
    """The installed class a `model_index.json` entry `name: [module, class]` names, or an error that says what to do."""
    module_name, class_name = entry
    fix = (
        "The folder was probably saved by another sculptdiff version: install that version (`pip install -U "
        "sculptdiff`), or load the code saved beside the weights with `DiffusionPipeline.from_pretrained(folder, "
        "trust_remote_code=True)`."
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"`model_index.json` entry `{name}` names module `{module_name}`, which the installed sculptdiff does not "
            f"have. {fix}"
        ) from error
    if not isinstance(getattr(module, class_name, None), type):
        raise ValueError(
            f"`model_index.json` entry `{name}` names class `{class_name}` in `{module_name}`, which has no such "
            f"class. {fix}"
        )
    return getattr(module, class_name)


def replace_path(source: str, target: str):
    """Moves `source` onto `target`; an existing `target` is set aside first and deleted only once replaced."""
    if not os.path.exists(target):
        os.replace(source, target)
        return
    backup = f"{target}.old-{os.getpid()}"
    os.replace(target, backup)
    os.replace(source, target)
    if os.path.isdir(backup):
        shutil.rmtree(backup)
    else:
        os.remove(backup)
