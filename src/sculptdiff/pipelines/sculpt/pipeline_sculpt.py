# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
#
# This file is self-contained on purpose: `save_pretrained` copies it beside the weights so that
# `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` loads a saved SculptPipeline with only
# diffusers installed. It may import torch, transformers and diffusers, never sculptdiff.
import importlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, hf_hub_download, snapshot_download
from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.get_logger(__name__)

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
        ```
"""

# Components whose module path starts with this are loaded with the installed classes by `from_pretrained`.
PACKAGE_NAME = "sculptdiff"
# Objectives a denoiser can be trained for; `flow` needs a rectified-flow scheduler, the others a DDPM-family one.
DIFFUSION_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class SculptPipeline(DiffusionPipeline):
    r"""
    Image generation with classifier-free guidance (Ho & Salimans, arXiv 2207.12598): unconditional, class-conditional
    or text-conditional, in pixel space or in the latent space of a VAE.

    This model inherits from [`DiffusionPipeline`]; check its documentation for the generic methods (downloading,
    saving, running on a device, offloading).

    Args:
        unet ([`ModelMixin`]):
            The denoiser, usually a `sculptdiff.SculptUNet2DModel`; any diffusers U-Net with the same `forward`
            (e.g. `UNet2DConditionModel`) works. Its config says how it is conditioned: `num_class_embeds` (with the
            null class at index `num_class_embeds`), `cross_attention_dim` (text), or neither (unconditional).
        scheduler ([`SchedulerMixin`]):
            Owns the reverse update: `sculptdiff.SculptScheduler`, `sculptdiff.SculptFlowScheduler`, or a diffusers
            scheduler of the family the U-Net was trained for (DDIM, DDPM, DPMSolverMultistep, Euler, UniPC;
            FlowMatchEulerDiscrete for flow models).
        text_encoder ([`~transformers.PreTrainedModel`], *optional*):
            Frozen text encoder whose `last_hidden_state` feeds the U-Net's cross-attention (CLIPTextModel, a
            BERT-style encoder, ...).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The tokenizer of `text_encoder`.
        vae ([`AutoencoderKL`], *optional*):
            When present, denoising happens in its latent space and the result is decoded, as in Stable Diffusion.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        unet: ModelMixin,
        scheduler: SchedulerMixin,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self) -> bool:
        # w = 1 is plain conditional sampling: eps_uncond + 1 * (eps_cond - eps_uncond) = eps_cond
        return self._guidance_scale > 1 and self._is_conditional

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        Encodes the prompt into the text encoder's last hidden states, `(batch * num_images_per_prompt, tokens, dim)`.
        The training script calls this too, so that training and sampling see the same embeddings; the null
        condition of classifier-free guidance is the embedding of the empty prompt.
        """
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

    def prepare_class_labels(self, class_labels: int | str | list[int | str] | torch.Tensor) -> torch.Tensor:
        r"""Turns class ids or names (looked up in the U-Net config's `id2label`) into a tensor of ids."""
        num_classes = self.unet.config.get("num_class_embeds")
        if num_classes is None:
            raise ValueError(
                "`class_labels` were given but this U-Net is not class-conditional (its config has no "
                "`num_class_embeds`): drop `class_labels`, or load a class-conditional model."
            )
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        class_labels = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)

        label2id = {label: int(index) for index, label in (self.unet.config.get("id2label") or {}).items()}
        class_ids = []
        for label in class_labels:
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
            class_ids.append(label)
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

    def check_inputs(
        self,
        prompt,
        class_labels,
        height,
        width,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        guidance_scale,
        callback_on_step_end_tensor_inputs,
    ):
        downsample_factor = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % downsample_factor != 0 or width % downsample_factor != 0:
            raise ValueError(
                f"`height` and `width` must be multiples of {downsample_factor} for this model (VAE factor "
                f"{self.vae_scale_factor} times the U-Net's downsampling), got {height}x{width}."
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both: `prompt_embeds` replaces the prompt.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
                )
        has_text = prompt is not None or prompt_embeds is not None
        if has_text and self.unet.config.get("cross_attention_dim") is None:
            raise ValueError(
                "A prompt was given but this U-Net has no cross-attention (`cross_attention_dim` is None): "
                "it cannot read text. Drop the prompt, or load a text-conditional model."
            )
        if class_labels is None and not has_text and guidance_scale > 1:
            raise ValueError(
                f"`guidance_scale={guidance_scale}` needs a condition to guide towards: pass `class_labels` or a "
                "`prompt`, or use `guidance_scale=1.0` for unconditional sampling."
            )
        if guidance_scale > 1 and self.unet.config.get("conditioning_dropout_prob", 1.0) <= 0:
            raise ValueError(
                "Classifier-free guidance needs a model trained with a null condition, and this U-Net's config "
                "says `conditioning_dropout_prob=0`. Use `guidance_scale=1.0`, or train with "
                "`--conditioning_dropout_prob 0.1`."
            )
        if callback_on_step_end_tensor_inputs is not None and not all(
            name in self._callback_tensor_inputs for name in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )

        # The U-Net config records the objective it was trained on; a scheduler of the other family (or another
        # prediction type) would silently turn its output into noise, so refuse it here.
        objective = self.unet.config.get("prediction_type")
        scheduler_is_flow = (
            self.scheduler.config.get("prediction_type") == "flow"
            or "FlowMatch" in type(self.scheduler).__name__
            or self.scheduler.config.get("use_flow_sigmas", False)
        )
        if objective == "flow" and not scheduler_is_flow:
            raise ValueError(
                f"This U-Net was trained with the flow-matching objective but the scheduler is "
                f"{type(self.scheduler).__name__}, a DDPM-family scheduler. Use `SculptFlowScheduler` or diffusers' "
                "`FlowMatchEulerDiscreteScheduler`."
            )
        if objective in DIFFUSION_PREDICTION_TYPES:
            if scheduler_is_flow:
                raise ValueError(
                    f"This U-Net predicts `{objective}` (a diffusion objective) but the scheduler is "
                    f"{type(self.scheduler).__name__}, a flow-matching scheduler. Use `SculptScheduler` or a "
                    "diffusers DDPM-family scheduler."
                )
            if self.scheduler.config.get("prediction_type", objective) != objective:
                raise ValueError(
                    f"This U-Net predicts `{objective}` but the scheduler is configured for "
                    f"`{self.scheduler.config.prediction_type}`: set "
                    f"`pipe.scheduler = {type(self.scheduler).__name__}.from_config(pipe.scheduler.config, "
                    f'prediction_type="{objective}")`.'
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
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
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
                The prompt(s) for a text-conditional U-Net.
            class_labels (`int`, `str`, `list` or `torch.Tensor`, *optional*):
                Class ids, or class names when the U-Net config carries `id2label`, for a class-conditional U-Net.
            batch_size (`int`, defaults to 1):
                Number of images when there is neither a prompt nor class labels.
            height (`int`, *optional*, defaults to `unet.config.sample_size * vae_scale_factor`):
                Image height in pixels; a multiple of the VAE and U-Net downsampling factors.
            width (`int`, *optional*, defaults to `unet.config.sample_size * vae_scale_factor`):
                Image width in pixels.
            num_inference_steps (`int`, defaults to 50):
                Number of denoising steps.
            timesteps (`list[int]`, *optional*):
                Custom descending timesteps for schedulers whose `set_timesteps` accepts them; overrides
                `num_inference_steps`.
            guidance_scale (`float`, defaults to 1.0):
                w in `eps = eps_uncond + w * (eps_cond - eps_uncond)`. w = 1 is plain conditional sampling (one U-Net
                pass per step); w > 1 follows the condition more strongly (two branches in one batched pass).
            guidance_rescale (`float`, defaults to 0.0):
                phi of arXiv 2305.08891, Sec. 3.4: rescales the guided output towards the conditional one's standard
                deviation to counter over-exposure.
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
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each step as `callback_on_step_end(self, i, t, callback_kwargs)`; the tensors it returns
                replace the pipeline's (e.g. `{"latents": ...}`).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Which of `_callback_tensor_inputs` go into `callback_kwargs`; defaults to `["latents"]`.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        sample_size = self.unet.config.sample_size
        height = height or sample_size * self.vae_scale_factor
        width = width or sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            class_labels,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            guidance_scale,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._is_conditional = class_labels is not None or prompt is not None or prompt_embeds is not None
        device = self._execution_device

        # 2. Encode the condition: the conditional branch, and the null branch when guiding
        encoder_hidden_states = None
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
            encoder_hidden_states = prompt_embeds
            if self.do_classifier_free_guidance:
                # unconditional first, so that `chunk(2)` below gives (uncond, cond)
                encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds])

        class_ids = None
        if class_labels is not None:
            class_ids = self.prepare_class_labels(class_labels)
            if prompt_embeds is not None and class_ids.shape[0] != batch_size:
                raise ValueError(
                    f"{class_ids.shape[0]} class labels for {batch_size} prompts: give one label per prompt."
                )
            batch_size = class_ids.shape[0]
            class_ids = class_ids.repeat_interleave(num_images_per_prompt).to(device)
            if self.do_classifier_free_guidance:
                # the reserved null class, index `num_class_embeds`, is the unconditional branch
                null_ids = torch.full_like(class_ids, self.unet.config.num_class_embeds)
                class_ids = torch.cat([null_ids, class_ids])

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
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype if prompt_embeds is not None else self.unet.dtype,
            device,
            generator,
            latents,
        )

        # 5. Prepare the scheduler's extra step arguments: `eta` and `generator` only where `step` takes them
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra_step_kwargs = {}
        if eta is not None and "eta" in step_parameters:
            extra_step_kwargs["eta"] = eta
        if "generator" in step_parameters:
            extra_step_kwargs["generator"] = generator

        # 6. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                # diffusers' flow-matching schedulers define no `scale_model_input`: their inputs need no scaling
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                model_output = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=encoder_hidden_states,
                    class_labels=class_ids,
                    return_dict=False,
                )[0]

                # classifier-free guidance on whatever the model predicts (eps, v, x0 or velocity): the scheduler
                # receives one guided output and converts it as it would an unguided one
                if self.do_classifier_free_guidance:
                    model_output_uncond, model_output_cond = model_output.chunk(2)
                    model_output = model_output_uncond + guidance_scale * (model_output_cond - model_output_uncond)
                    if guidance_rescale > 0:
                        model_output = rescale_noise_cfg(model_output, model_output_cond, guidance_rescale)

                latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]  # a loop: a comprehension has its own locals()
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

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

        With `push_to_hub=True` the folder is then uploaded to `repo_id` (keyword arguments as diffusers':
        `repo_id`, `commit_message`, `private`, `token`, `create_pr`); a model card already in `save_directory` is
        uploaded as it is, otherwise a minimal one tagged `sculptdiff` is created.
        """
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-save-") as staging:
            super().save_pretrained(staging, safe_serialization=safe_serialization, variant=variant)
            self._write_custom_code(staging)
            for name in sorted(os.listdir(staging)):
                _replace(os.path.join(staging, name), os.path.join(save_directory, name))

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

    def _write_custom_code(self, folder: str):
        model_index_path = os.path.join(folder, "model_index.json")
        with open(model_index_path, encoding="utf-8") as f:
            model_index = json.load(f)
        pipeline_module = os.path.splitext(os.path.basename(inspect.getsourcefile(type(self))))[0]
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
    def load_config(cls, *args, **kwargs):
        # A saved SculptPipeline names its own code file in `_class_name` for the trust_remote_code door. Loaded
        # through this (installed) class, that entry is ours: keep the installed class instead of the file copy.
        outputs = super().load_config(*args, **kwargs)
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        if isinstance(config.get("_class_name"), list) and config["_class_name"][1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return outputs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Loads a saved SculptPipeline from a folder or a Hub repo id with the installed sculptdiff classes (no
        `trust_remote_code` needed). Takes diffusers' `from_pretrained` arguments (`revision`, `dtype`,
        `variant`, `cache_dir`, `token`, `local_files_only`, components to replace, ...).

        diffusers 0.42 cannot download a repo whose components come from another library through
        `DiffusionPipeline.download`, so a repo id is fetched here with `snapshot_download` first; the components
        whose module the folder records from sculptdiff are loaded with the installed classes, the rest by
        diffusers.
        """
        folder = str(pretrained_model_name_or_path)
        hub_kwargs = {
            name: kwargs[name]
            for name in ("cache_dir", "revision", "token", "local_files_only", "force_download")
            if name in kwargs
        }
        if not os.path.isdir(folder):
            model_index = hf_hub_download(folder, cls.config_name, **hub_kwargs)
            with open(model_index, encoding="utf-8") as f:
                component_folders = [name for name, entry in json.load(f).items() if isinstance(entry, list)]
            folder = snapshot_download(
                folder,
                allow_patterns=[cls.config_name, "*.py"] + [f"{name}/*" for name in component_folders],
                ignore_patterns=["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"],
                **hub_kwargs,
            )
        with open(os.path.join(folder, cls.config_name), encoding="utf-8") as f:
            model_index = json.load(f)

        # weights in safetensors only: a pickle checkpoint can run code on load, so it takes `use_safetensors=False`
        kwargs.setdefault("use_safetensors", True)
        load_kwargs = {
            name: kwargs[name] for name in ("dtype", "torch_dtype", "variant", "use_safetensors") if name in kwargs
        }
        for name, entry in model_index.items():
            if not isinstance(entry, list) or name in kwargs or entry[0] is None:
                continue
            if entry[0].split(".")[0] == PACKAGE_NAME:
                component_class = getattr(importlib.import_module(entry[0]), entry[1])
                if issubclass(component_class, SchedulerMixin):
                    kwargs[name] = component_class.from_pretrained(folder, subfolder=name)
                else:
                    kwargs[name] = component_class.from_pretrained(folder, subfolder=name, **load_kwargs)

        for name in ("cache_dir", "revision", "token", "force_download"):
            kwargs.pop(name, None)
        pipeline = super().from_pretrained(folder, **kwargs)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline


def _replace(source: str, target: str):
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
