# Copyright 2026 The sculptdiff developers. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""SculptUNet2DModel: the ADM / Stable Diffusion U-Net, written to be read.

References:
    - Ho et al., "Denoising Diffusion Probabilistic Models" (DDPM), https://huggingface.co/papers/2006.11239
    - Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (ADM), https://huggingface.co/papers/2105.05233
    - Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
      https://huggingface.co/papers/2112.10752
    - Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT), https://huggingface.co/papers/2212.09748
"""

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import WEIGHTS_NAME, BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale


PREDICTION_TYPES = (None, "epsilon", "v_prediction", "sample", "flow")


@dataclass
class SculptUNet2DOutput(BaseOutput):
    """
    The output of [`SculptUNet2DModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The model's prediction (noise, velocity or clean sample, see `config.prediction_type`).
    """

    sample: torch.Tensor


class ResBlock(nn.Module):
    """ADM's residual block: GroupNorm, SiLU, conv, then the time embedding as scale-shift (FiLM) on the second norm."""

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, norm_num_groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(time_embed_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # zero-init of the last conv makes every block start as the identity (ADM's zero_module)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.conv_shortcut = nn.Identity()

    def forward(self, hidden_states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        residual = self.conv_shortcut(hidden_states)

        hidden_states = self.norm1(hidden_states)
        hidden_states = F.silu(hidden_states)
        hidden_states = self.conv1(hidden_states)

        # FiLM, ADM's use_scale_shift_norm: h = norm(h) * (1 + scale) + shift
        # (N, 2 * C) -> (N, 2 * C, 1, 1)
        scale_shift = self.time_emb_proj(F.silu(embedding))[:, :, None, None]
        scale, shift = scale_shift.chunk(2, dim=1)
        hidden_states = self.norm2(hidden_states)
        hidden_states = torch.addcmul(shift, hidden_states, 1 + scale)
        hidden_states = F.silu(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        return residual + hidden_states


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over the H*W positions, then (optional) cross-attention to the text tokens.

    Queries come from the image features; in the cross-attention, keys and values come from `encoder_hidden_states`.
    Both are diffusers' `Attention` (scaled_dot_product_attention through `AttnProcessor2_0`), so
    `set_attn_processor` and PEFT LoRA on `to_q`, `to_k`, `to_v`, `to_out.0` work as on diffusers' U-Nets.
    """

    def __init__(
        self,
        channels: int,
        attention_head_dim: int,
        cross_attention_dim: int | None,
        dropout: float,
    ):
        super().__init__()
        heads = channels // attention_head_dim
        self.norm1 = nn.LayerNorm(channels)
        self.self_attention = Attention(
            query_dim=channels, heads=heads, dim_head=attention_head_dim, dropout=dropout, bias=True
        )
        # zero-init of the output projection makes the block start as the identity (ADM's zero_module(proj_out))
        nn.init.zeros_(self.self_attention.to_out[0].weight)
        nn.init.zeros_(self.self_attention.to_out[0].bias)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(channels)
            self.cross_attention = Attention(
                query_dim=channels,
                cross_attention_dim=cross_attention_dim,
                heads=heads,
                dim_head=attention_head_dim,
                dropout=dropout,
                bias=True,
            )
            nn.init.zeros_(self.cross_attention.to_out[0].weight)
            nn.init.zeros_(self.cross_attention.to_out[0].bias)
        else:
            self.norm2 = None
            self.cross_attention = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        cross_attention_kwargs = cross_attention_kwargs or {}
        batch_size, channels, height, width = hidden_states.shape

        # (N, C, H, W) -> (N, H*W, C)
        hidden_states = hidden_states.flatten(2).transpose(1, 2)

        hidden_states = hidden_states + self.self_attention(self.norm1(hidden_states), **cross_attention_kwargs)
        if self.cross_attention is not None:
            hidden_states = hidden_states + self.cross_attention(
                self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states, **cross_attention_kwargs
            )

        # (N, H*W, C) -> (N, C, H, W)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, channels, height, width)
        return hidden_states


class Downsample(nn.Module):
    """Halves H and W with a strided 3x3 convolution (ADM's Downsample with conv_resample=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour interpolation, then a 3x3 convolution (ADM's Upsample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        return self.conv(hidden_states)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with DiT's `token_drop` for classifier-free guidance.

    The table has `num_classes + 1` rows: row `num_classes` is the NULL class, the "no condition" of classifier-free
    guidance. In training mode each label is replaced by the null class with probability `dropout_prob`.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor) -> torch.Tensor:
        drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.embedding_table(labels)


class UNetLevel(nn.Module):
    """The layers of one resolution level of the U-Net (a container: the U-Net's forward calls each layer)."""

    def __init__(self, resnets: list[ResBlock], attentions: list[AttentionBlock], resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        # empty when the level has no attention
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class SculptUNet2DModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A U-Net in the spirit of ADM and Stable Diffusion: it takes a noisy sample, a timestep and optionally text
    embeddings or class labels, and returns a sample-shaped prediction.

    Down path: `conv_in`, then per level `layers_per_block` residual blocks (each followed by an attention block where
    `attention_levels` says so) and a downsampler (all but the last level). Mid: residual, attention, residual. Up path:
    per level `layers_per_block + 1` residual blocks, each fed the concatenation of the features and one skip
    connection from the same level of the down path, then an upsampler. The time embedding (sinusoid -> MLP, plus the
    class embedding) modulates every residual block by scale and shift.

    Args:
        sample_size (`int` or `tuple[int, int]`, *optional*, defaults to `None`):
            Height and width of the samples the model was trained on (read by pipelines for the default size).
        in_channels (`int`, defaults to 3): Number of channels of the input sample.
        out_channels (`int`, defaults to 3): Number of channels of the output.
        block_out_channels (`tuple[int]`, defaults to `(32, 64, 128, 160)`):
            Channels of each resolution level, from the highest resolution to the lowest. The input height and width
            must be multiples of `2 ** (len(block_out_channels) - 1)`. The default puts the width where the
            resolution is low: a 3x3 convolution costs C_in * C_out * 9 parameters at every resolution but H * W
            times that in FLOPs, so at equal parameters this layout needs ~2.6x fewer FLOPs than DDPM's (1, 2, 2, 2)
            multipliers (see benchmarks/bench_unet.py).
        layers_per_block (`int`, defaults to 2):
            Residual blocks per level on the down path (the up path has one more per level).
        attention_levels (`tuple[bool]`, defaults to `(False, False, True, True)`):
            One flag per level: whether its residual blocks are followed by attention blocks. The mid block has
            attention when the last level has.
        attention_head_dim (`int`, defaults to 32): Channels per attention head.
        dropout (`float`, defaults to 0.0): Dropout probability in the residual and attention blocks.
        norm_num_groups (`int`, defaults to 16):
            Groups of the GroupNorm layers; must divide every block's channels (16 keeps >= 2 channels per group at
            the 32-channel first level).
        num_class_embeds (`int`, *optional*, defaults to `None`):
            Number of classes for class conditioning. The embedding table has one more row: index `num_class_embeds`
            is the NULL class used for classifier-free guidance (and for `class_labels=None`).
        conditioning_dropout_prob (`float`, defaults to 0.0):
            In training mode, the probability that a class label is replaced by the null class (DiT's token_drop);
            the training script also uses it for the text condition. A value > 0 tells pipelines the model learned an
            unconditional prediction.
        cross_attention_dim (`int`, *optional*, defaults to `None`):
            Width of `encoder_hidden_states`; when set, every attention block also cross-attends to them.
        id2label (`dict[int, str]`, *optional*, defaults to `None`):
            Class names by index, stored for pipelines and model cards (keys are stored as integers).
        prediction_type (`str`, *optional*, defaults to `None`):
            What the model was trained to predict: `"epsilon"`, `"v_prediction"`, `"sample"` or `"flow"` (stored
            only; pipelines read it to refuse a scheduler of the wrong family).
        time_cond_proj_dim (`int`, *optional*, defaults to `None`):
            Width of an extra `timestep_cond` vector added to the sinusoidal time embedding (LCM's guidance
            embedding, read by StableDiffusionPipeline).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResBlock", "AttentionBlock"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 160),
        layers_per_block: int = 2,
        attention_levels: tuple[bool, ...] = (False, False, True, True),
        attention_head_dim: int = 32,
        dropout: float = 0.0,
        norm_num_groups: int = 16,
        num_class_embeds: int | None = None,
        conditioning_dropout_prob: float = 0.0,
        cross_attention_dim: int | None = None,
        id2label: dict[int, str] | None = None,
        prediction_type: str | None = None,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()

        num_levels = len(block_out_channels)
        if len(attention_levels) != num_levels:
            raise ValueError(
                f"`attention_levels` ({attention_levels}) must give one flag per level of `block_out_channels` "
                f"({block_out_channels})."
            )
        for channels in block_out_channels:
            if channels % norm_num_groups != 0:
                raise ValueError(
                    f"`norm_num_groups` ({norm_num_groups}) must divide every entry of `block_out_channels` "
                    f"({block_out_channels})."
                )
        for channels, has_attention in zip(block_out_channels, attention_levels):
            if has_attention and channels % attention_head_dim != 0:
                raise ValueError(
                    f"`attention_head_dim` ({attention_head_dim}) must divide the channels ({channels}) of every level "
                    f"with attention (`attention_levels`={attention_levels})."
                )
        if cross_attention_dim is not None and not any(attention_levels):
            raise ValueError(
                "`cross_attention_dim` is set but `attention_levels` has no True entry: the text would never be "
                "attended to. Turn on attention for at least one level."
            )
        if not 0.0 <= conditioning_dropout_prob < 1.0:
            raise ValueError(f"`conditioning_dropout_prob` must be in [0, 1), got {conditioning_dropout_prob}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if id2label is not None:
            # JSON turns the integer keys into strings: store them as integers whichever way the config came in
            self.register_to_config(id2label={int(index): label for index, label in id2label.items()})

        # ADM: the time embedding is 4x the first level's width
        time_embed_dim = block_out_channels[0] * 4

        # time
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(
            block_out_channels[0], time_embed_dim, cond_proj_dim=time_cond_proj_dim
        )

        # class embedding, added to the time embedding (ADM, DiT)
        if num_class_embeds is not None:
            self.class_embedding = LabelEmbedder(num_class_embeds, time_embed_dim, conditioning_dropout_prob)
        else:
            self.class_embedding = None

        # input
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)

        # down: remember the channels of every skip connection, the up path consumes them in reverse
        skip_channels = [block_out_channels[0]]
        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for level, level_channels in enumerate(block_out_channels):
            resnets, attentions = [], []
            for _ in range(layers_per_block):
                resnets.append(ResBlock(channels, level_channels, time_embed_dim, norm_num_groups, dropout))
                channels = level_channels
                if attention_levels[level]:
                    attentions.append(AttentionBlock(channels, attention_head_dim, cross_attention_dim, dropout))
                skip_channels.append(channels)
            is_last_level = level == num_levels - 1
            downsample = None if is_last_level else Downsample(channels)
            if not is_last_level:
                skip_channels.append(channels)
            self.down_blocks.append(UNetLevel(resnets, attentions, downsample))

        # mid
        self.mid_block = UNetLevel(
            [
                ResBlock(channels, channels, time_embed_dim, norm_num_groups, dropout),
                ResBlock(channels, channels, time_embed_dim, norm_num_groups, dropout),
            ],
            [AttentionBlock(channels, attention_head_dim, cross_attention_dim, dropout)]
            if attention_levels[-1]
            else [],
            None,
        )

        # up
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(num_levels)):
            level_channels = block_out_channels[level]
            resnets, attentions = [], []
            for _ in range(layers_per_block + 1):
                in_channels_with_skip = channels + skip_channels.pop()
                resnets.append(
                    ResBlock(in_channels_with_skip, level_channels, time_embed_dim, norm_num_groups, dropout)
                )
                channels = level_channels
                if attention_levels[level]:
                    attentions.append(AttentionBlock(channels, attention_head_dim, cross_attention_dim, dropout))
            upsample = Upsample(channels) if level > 0 else None
            self.up_blocks.append(UNetLevel(resnets, attentions, upsample))

        # out
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0])
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)
        # zero-init output: the untrained model predicts 0 (ADM)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

        self.gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "SculptUNet2DModel":
        r"""
        [`ModelMixin.from_pretrained`], with diffusers' weight formats (`use_safetensors=None` prefers safetensors and
        falls back to `.bin`, read with `torch.load(weights_only=True)`, so a pickle runs no code) and two refusals:

        - a checkpoint that lacks some of the model's tensors is refused with an error naming them (diffusers only
          warns, and leaves those parameters uninitialised, on the meta device by default, to crash later);
        - `use_safetensors=True` on a folder holding only a pickle checkpoint says which folder and how to load it.
        """
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if (
            kwargs.get("use_safetensors")
            and os.path.isfile(os.path.join(folder, WEIGHTS_NAME))
            and not any(name.endswith(".safetensors") for name in os.listdir(folder))
        ):
            raise OSError(
                f"{folder} holds only a pickle checkpoint ({WEIGHTS_NAME}) and `use_safetensors=True` accepts "
                "safetensors only. Pass `use_safetensors=False` (or leave it unset) to read it with "
                "`torch.load(weights_only=True)`, or convert it to safetensors."
            )
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        if loading_info["missing_keys"]:
            raise ValueError(
                f"The checkpoint in {folder} lacks {len(loading_info['missing_keys'])} tensor(s) of "
                f"{cls.__name__}: {sorted(loading_info['missing_keys'])}. It is truncated or was saved from another "
                "configuration: save the model again, or load the checkpoint that matches this `config.json`."
            )
        return (model, loading_info) if output_loading_info else model

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> SculptUNet2DOutput | tuple:
        r"""
        The [`SculptUNet2DModel`] forward method.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                The noisy input x_t. Height and width must be multiples of `2 ** (len(block_out_channels) - 1)`.
            timestep (`torch.Tensor`, `float` or `int`):
                The timestep t: a number, a 0-d tensor, or a 1-d tensor of 1 or `batch_size` entries (broadcast to the
                batch). Floats are fine (flow-matching schedulers use `sigma * num_train_timesteps`).
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, sequence_length, cross_attention_dim)`, *optional*):
                Text embeddings for cross-attention; required exactly when `config.cross_attention_dim` is set.
            class_labels (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, num_class_embeds]`; index `num_class_embeds` (and `None`) is the null class.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`SculptUNet2DOutput`] instead of a plain tuple.
            timestep_cond (`torch.Tensor` of shape `(batch_size, time_cond_proj_dim)`, *optional*):
                Added to the sinusoidal time embedding; only for models with `config.time_cond_proj_dim`.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to every attention processor; `scale` sets the LoRA scale (as in `UNet2DConditionModel`).
            added_cond_kwargs (`dict`, *optional*):
                Accepted because StableDiffusionPipeline passes it; this model has no added conditions (IP-Adapter), so
                a non-empty dict is an error.

        Returns:
            [`SculptUNet2DOutput`] or `tuple`: the prediction, of shape `(batch_size, out_channels, height, width)`.
        """
        # 0. check inputs
        if added_cond_kwargs:
            raise ValueError(
                f"`added_cond_kwargs` ({sorted(added_cond_kwargs)}) is not supported: SculptUNet2DModel has no added "
                "conditions (IP-Adapter image embeddings). Pass None."
            )
        if timestep_cond is not None and self.config.time_cond_proj_dim is None:
            raise ValueError("`timestep_cond` was given but the model has no `time_cond_proj_dim`; pass None.")
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`sample` must have shape (batch_size, {self.config.in_channels}, height, width) "
                f"(`in_channels`={self.config.in_channels}), got {tuple(sample.shape)}."
            )
        downsampling_factor = 2 ** (len(self.config.block_out_channels) - 1)
        if sample.shape[-2] % downsampling_factor or sample.shape[-1] % downsampling_factor:
            raise ValueError(
                f"`sample` height and width ({sample.shape[-2]}, {sample.shape[-1]}) must be multiples of "
                f"{downsampling_factor} (2 ** (number of levels - 1)); resize or pad the input."
            )
        if self.config.cross_attention_dim is None and encoder_hidden_states is not None:
            raise ValueError(
                "`encoder_hidden_states` was given but the model has no cross-attention (`cross_attention_dim` is "
                "None); pass None."
            )
        batch_size = sample.shape[0]
        if self.config.cross_attention_dim is not None:
            if encoder_hidden_states is None:
                raise ValueError(
                    "`encoder_hidden_states` is required: the model cross-attends to text embeddings of width "
                    f"{self.config.cross_attention_dim}."
                )
            if (
                encoder_hidden_states.ndim != 3
                or encoder_hidden_states.shape[0] != batch_size
                or encoder_hidden_states.shape[-1] != self.config.cross_attention_dim
            ):
                raise ValueError(
                    f"`encoder_hidden_states` must have shape ({batch_size}, sequence_length, "
                    f"{self.config.cross_attention_dim}) (batch size, any length, `cross_attention_dim`), got "
                    f"{tuple(encoder_hidden_states.shape)}."
                )

        # 1. time
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim > 1 or timesteps.numel() not in (1, batch_size):
            raise ValueError(
                f"`timestep` must be a number or a tensor of 1 or {batch_size} (batch size) entries, got shape "
                f"{tuple(timesteps.shape)}."
            )
        timesteps = timesteps.reshape(-1).expand(batch_size)
        # Timesteps has no weights and returns float32; the MLP may run in another dtype
        time_features = self.time_proj(timesteps).to(dtype=self.dtype)
        embedding = self.time_embedding(time_features, timestep_cond)

        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((batch_size,), self.config.num_class_embeds, device=sample.device)
            class_labels = self._check_class_labels(class_labels, batch_size)
            embedding = embedding + self.class_embedding(class_labels).to(dtype=self.dtype)
        elif class_labels is not None:
            raise ValueError(
                "`class_labels` was given but the model is not class-conditional (`num_class_embeds` is None); "
                "pass None."
            )

        # 2. pre-process
        hidden_states = self.conv_in(sample)

        # 3. down
        skip_connections = [hidden_states]
        for down_block in self.down_blocks:
            for layer_index, resnet in enumerate(down_block.resnets):
                hidden_states = self._call_layer(resnet, hidden_states, embedding)
                if down_block.attentions:
                    attention = down_block.attentions[layer_index]
                    hidden_states = self._call_layer(
                        attention, hidden_states, encoder_hidden_states, cross_attention_kwargs
                    )
                skip_connections.append(hidden_states)
            if down_block.resample is not None:
                hidden_states = down_block.resample(hidden_states)
                skip_connections.append(hidden_states)

        # 4. mid
        hidden_states = self._call_layer(self.mid_block.resnets[0], hidden_states, embedding)
        if self.mid_block.attentions:
            hidden_states = self._call_layer(
                self.mid_block.attentions[0], hidden_states, encoder_hidden_states, cross_attention_kwargs
            )
        hidden_states = self._call_layer(self.mid_block.resnets[1], hidden_states, embedding)

        # 5. up
        for up_block in self.up_blocks:
            for layer_index, resnet in enumerate(up_block.resnets):
                # skip connection from the same level of the down path: (N, C, H, W), (N, C_skip, H, W) -> (N, C + C_skip, H, W)
                hidden_states = torch.cat([hidden_states, skip_connections.pop()], dim=1)
                hidden_states = self._call_layer(resnet, hidden_states, embedding)
                if up_block.attentions:
                    attention = up_block.attentions[layer_index]
                    hidden_states = self._call_layer(
                        attention, hidden_states, encoder_hidden_states, cross_attention_kwargs
                    )
            if up_block.resample is not None:
                hidden_states = up_block.resample(hidden_states)

        # 6. post-process
        hidden_states = self.conv_norm_out(hidden_states)
        hidden_states = F.silu(hidden_states)
        hidden_states = self.conv_out(hidden_states)

        if not return_dict:
            return (hidden_states,)
        return SculptUNet2DOutput(sample=hidden_states)

    def _call_layer(self, layer: nn.Module, *inputs) -> torch.Tensor:
        # gradient checkpointing: keep only the layer's inputs and recompute its activations in the backward pass
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(layer, *inputs)
        return layer(*inputs)

    def _check_class_labels(self, class_labels: torch.Tensor, batch_size: int) -> torch.Tensor:
        num_class_embeds = self.config.num_class_embeds
        class_labels = torch.as_tensor(class_labels, device=self.device)
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise ValueError(f"`class_labels` must hold integer class indices, got dtype {class_labels.dtype}.")
        if class_labels.ndim > 1 or class_labels.numel() not in (1, batch_size):
            raise ValueError(
                f"`class_labels` must be a number or a tensor of 1 or {batch_size} (batch size) entries, got shape "
                f"{tuple(class_labels.shape)}."
            )
        # reading the values needs them on the host, which would split a compiled graph: check them in eager mode only
        if not torch.compiler.is_compiling() and (class_labels.min() < 0 or class_labels.max() > num_class_embeds):
            raise ValueError(
                f"`class_labels` must be in [0, {num_class_embeds}] ({num_class_embeds} classes, index "
                f"{num_class_embeds} is the null class), got values in [{class_labels.min()}, {class_labels.max()}]."
            )
        return class_labels.reshape(-1).expand(batch_size)
