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
"""SculptDiT2DModel: the Diffusion Transformer (DiT) with adaLN-Zero, and PixArt-alpha's cross-attention to text.

References:
    - Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT), https://huggingface.co/papers/2212.09748
    - Chen et al., "PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image Synthesis",
      https://huggingface.co/papers/2310.00426
    - Dosovitskiy et al., "An Image is Worth 16x16 Words" (ViT patches), https://huggingface.co/papers/2010.11929
    - Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models" (U-ViT, long skip connections),
      https://huggingface.co/papers/2209.12152
"""

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from diffusers.utils import WEIGHTS_NAME, BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale


# This module imports only torch and diffusers, never sculptdiff: `save_pretrained` of a pipeline copies it beside the
# weights for `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`, where sculptdiff may not be installed.
# So the pieces it shares with the U-Net are copies, marked as diffusers marks them, and tested equal.

# Copied from sculptdiff.models.unet_sculpt.PREDICTION_TYPES
PREDICTION_TYPES = (None, "epsilon", "v_prediction", "sample", "flow")
# DiT's frequency_embedding_size: the sinusoidal features of the timestep before the MLP
TIMESTEP_FREQUENCY_CHANNELS = 256


# Copied from sculptdiff.models.unet_sculpt.LabelEmbedder
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


@dataclass
class SculptDiT2DOutput(BaseOutput):
    """
    The output of [`SculptDiT2DModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The model's prediction (noise, velocity or clean sample, see `config.prediction_type`).
    """

    sample: torch.Tensor


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero: self-attention, optional cross-attention to text (PixArt-alpha), MLP.

    The conditioning vector c (time + class) regresses, per block, a shift and scale for the norm in front of the
    self-attention and of the MLP, and a gate on each of their residual branches. The regression is zero-initialised,
    so every gate starts at 0 and the block starts as the identity (DiT section 3.2, "adaLN-Zero").

    With `skip`, the block first merges a long skip connection from an earlier block into its input (U-ViT): a linear
    map of the two concatenated, initialised to their mean, so that a fresh block stays the identity.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        mlp_ratio: float,
        cross_attention_dim: int | None,
        dropout: float,
        skip: bool = False,
    ):
        super().__init__()
        # named as in diffusers' HunyuanDiTBlock, which has the same long skips
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        # LayerNorm without affine parameters (eps 1e-6 in every norm, DiT's value), then (shift, scale, gate) x
        # (attention, MLP) from c
        self.norm1 = AdaLayerNormZero(dim)
        self.self_attention = Attention(
            query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout, bias=True
        )
        if cross_attention_dim is not None:
            # PixArt-alpha feeds the raw residual stream to the cross-attention; a pre-norm (as in Stable Diffusion's
            # transformer blocks and our U-Net) keeps the queries at unit scale as the stream grows with depth
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attention = Attention(
                query_dim=dim,
                cross_attention_dim=cross_attention_dim,
                heads=num_attention_heads,
                dim_head=attention_head_dim,
                dropout=dropout,
                bias=True,
            )
        else:
            self.norm2 = None
            self.cross_attention = None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.feed_forward = FeedForward(dim, mult=mlp_ratio, dropout=dropout, activation_fn="gelu-approximate")

    def forward(
        self,
        hidden_states: torch.Tensor,
        embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cross_attention_kwargs = cross_attention_kwargs or {}

        # 0. long skip: x = W [x; skip] (U-ViT)
        if self.skip_linear is not None:
            hidden_states = self.skip_linear(torch.cat([hidden_states, skip], dim=-1))

        # 1. self-attention: norm(x) * (1 + scale) + shift, then x + gate * attention
        norm_hidden_states, gate_attention, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=embedding)
        attention_output = self.self_attention(norm_hidden_states, **cross_attention_kwargs)
        # (N, D) -> (N, 1, D): one gate per sample, broadcast over the tokens
        hidden_states = hidden_states + gate_attention[:, None] * attention_output

        # 2. cross-attention: queries from the patches, keys and values from the text; not modulated (PixArt-alpha)
        if self.cross_attention is not None:
            hidden_states = hidden_states + self.cross_attention(
                self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states, **cross_attention_kwargs
            )

        # 3. MLP: norm(x) * (1 + scale) + shift, then x + gate * MLP
        norm_hidden_states = torch.addcmul(shift_mlp[:, None], self.norm3(hidden_states), 1 + scale_mlp[:, None])
        hidden_states = hidden_states + gate_mlp[:, None] * self.feed_forward(norm_hidden_states)
        return hidden_states


class SculptDiT2DModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A Diffusion Transformer (DiT): the sample is cut into `patch_size` x `patch_size` patches, each patch becomes a
    token (a linear projection plus a fixed 2-D sin-cos position embedding), `num_layers` transformer blocks process
    the tokens, and a final adaLN-modulated linear layer turns every token back into a patch of the prediction.

    The timestep (sinusoid -> MLP) and the class embedding are summed into one vector c that conditions every block
    through adaLN-Zero. With `cross_attention_dim`, every block also cross-attends to text embeddings between its
    self-attention and its MLP, as PixArt-alpha does. With `long_skip_connections`, the blocks of the second half
    also take the output of their mirror image in the first half (U-ViT). A fresh model is the identity on its
    residual stream and predicts zeros (zero-initialised gates and final layer, skip merges that start as the mean).

    Args:
        sample_size (`int`, defaults to 32):
            Height and width of the samples the model is trained on (read by pipelines for the default size); the
            position embedding is laid out for this grid and interpolated for other sizes (PixArt-alpha's
            `base_size`). Must be a multiple of `patch_size`.
        in_channels (`int`, defaults to 3): Number of channels of the input sample.
        out_channels (`int`, defaults to 3): Number of channels of the output.
        patch_size (`int`, defaults to 2):
            Height and width of a patch; a sample of H x W pixels becomes H * W / patch_size**2 tokens.
        num_layers (`int`, defaults to 12): Number of transformer blocks (the default size is DiT-S).
        num_attention_heads (`int`, defaults to 6): Number of attention heads per block.
        attention_head_dim (`int`, defaults to 64):
            Channels per head; the transformer's width is `num_attention_heads * attention_head_dim` and must be a
            multiple of 4 (the 2-D sin-cos position embedding gives each axis a sine and a cosine half).
        mlp_ratio (`float`, defaults to 4.0): Width of the MLP's hidden layer relative to the transformer's width.
        dropout (`float`, defaults to 0.0): Dropout probability in the attention and MLP layers.
        num_class_embeds (`int`, *optional*, defaults to `None`):
            Number of classes for class conditioning. The embedding table has one more row: index `num_class_embeds`
            is the NULL class used for classifier-free guidance (and for `class_labels=None`).
        conditioning_dropout_prob (`float`, defaults to 0.0):
            In training mode, the probability that a class label is replaced by the null class (DiT's token_drop);
            the training script also uses it for the text condition. A value > 0 tells pipelines the model learned an
            unconditional prediction.
        cross_attention_dim (`int`, *optional*, defaults to `None`):
            Width of `encoder_hidden_states`; when set, every block also cross-attends to them.
        id2label (`dict[int, str]`, *optional*, defaults to `None`):
            Class names by index, stored for pipelines and model cards (keys are stored as integers).
        prediction_type (`str`, *optional*, defaults to `None`):
            What the model was trained to predict: `"epsilon"`, `"v_prediction"`, `"sample"` or `"flow"` (stored
            only; pipelines read it to refuse a scheduler of the wrong family).
        time_cond_proj_dim (`int`, *optional*, defaults to `None`):
            Width of an extra `timestep_cond` vector added to the sinusoidal time features (LCM's guidance
            embedding, read by StableDiffusionPipeline).
        long_skip_connections (`bool`, defaults to `False`):
            Connect block `i` of the first `num_layers // 2` to block `num_layers - 1 - i` (U-ViT's long skips, also
            in Hunyuan-DiT): the later block starts from a linear map of its input and the earlier block's output.
            The digits recipe turns them on: its DiT learns faster with them early on; after 10 CPU minutes the
            plain stack has caught up (benchmarks/bench_backbones.py).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    # regional compilation (`compile_repeated_blocks`): compile one block, reuse it for all
    _repeated_blocks = ["DiTBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        patch_size: int = 2,
        num_layers: int = 12,
        num_attention_heads: int = 6,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_class_embeds: int | None = None,
        conditioning_dropout_prob: float = 0.0,
        cross_attention_dim: int | None = None,
        id2label: dict[int, str] | None = None,
        prediction_type: str | None = None,
        time_cond_proj_dim: int | None = None,
        long_skip_connections: bool = False,
    ):
        super().__init__()

        inner_dim = num_attention_heads * attention_head_dim
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"`patch_size` must be a positive integer, got {patch_size!r}.")
        if not isinstance(sample_size, int) or sample_size <= 0 or sample_size % patch_size != 0:
            raise ValueError(
                f"`sample_size` must be a positive integer multiple of `patch_size` ({patch_size}), got "
                f"{sample_size!r}."
            )
        if inner_dim % 4 != 0:
            raise ValueError(
                f"`num_attention_heads * attention_head_dim` ({num_attention_heads} * {attention_head_dim} = "
                f"{inner_dim}) must be a multiple of 4 for the 2-D sin-cos position embedding."
            )
        if not 0.0 <= conditioning_dropout_prob < 1.0:
            raise ValueError(f"`conditioning_dropout_prob` must be in [0, 1), got {conditioning_dropout_prob}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if id2label is not None:
            # JSON turns the integer keys into strings: store them as integers whichever way the config came in
            self.register_to_config(id2label={int(index): label for index, label in id2label.items()})

        # time: sinusoid -> MLP (DiT's TimestepEmbedder)
        self.time_proj = Timesteps(TIMESTEP_FREQUENCY_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(
            TIMESTEP_FREQUENCY_CHANNELS, inner_dim, cond_proj_dim=time_cond_proj_dim
        )

        # class embedding, added to the time embedding: c = t + y (DiT's LabelEmbedder)
        if num_class_embeds is not None:
            self.class_embedding = LabelEmbedder(num_class_embeds, inner_dim, conditioning_dropout_prob)
        else:
            self.class_embedding = None

        # patchify: a conv with stride patch_size is a linear map of every patch; fixed (not learned) sin-cos
        # position embedding, not saved with the weights
        self.pos_embed = PatchEmbed(
            height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels, embed_dim=inner_dim
        )

        self.transformer_blocks = nn.ModuleList(
            [
                DiTBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    mlp_ratio,
                    cross_attention_dim,
                    dropout,
                    skip=long_skip_connections and index >= num_layers - num_layers // 2,
                )
                for index in range(num_layers)
            ]
        )

        # final layer: adaLN (shift and scale from c, no gate), then a linear map of every token to a patch
        self.norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * out_channels)

        # DiT's initialize_weights: Xavier-uniform linear layers (the patch projection seen as one) with zero bias ...
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.pos_embed.proj.weight.view(inner_dim, -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        # ... except the conditioning: DiT draws the class table and the timestep MLP from N(0, 0.02), which makes c
        # tiny; over DiT's 400k steps that washes out, over a few thousand the class pathway stays unused (a digits DiT
        # sampled at chance class accuracy after 400 steps). The class table keeps nn.Embedding's N(0, 1), as in the
        # U-Net and diffusers' DiTTransformer2DModel, the timestep MLP Xavier: 64% class accuracy after 400 steps.
        # ... and adaLN-Zero: zero modulation, so every gate is 0 and every block the identity; zero final layer, so
        # the model predicts 0; zero cross-attention output (PixArt-alpha), since that branch has no gate
        zero_layers = [self.norm_out.linear, self.proj_out]
        for block in self.transformer_blocks:
            zero_layers.append(block.norm1.linear)
            if block.cross_attention is not None:
                zero_layers.append(block.cross_attention.to_out[0])
        for layer in zero_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # ... and the long skips start as the mean of their two inputs, which are equal in a fresh model (every
        # block before them is the identity), so the stream passes unchanged. Measured on the digits (DiT S, 1500
        # steps): FD 38 against 43 with Xavier's init, which would also break the identity.
        for block in self.transformer_blocks:
            if block.skip_linear is not None:
                nn.init.zeros_(block.skip_linear.bias)
                with torch.no_grad():
                    block.skip_linear.weight.copy_(torch.eye(inner_dim).repeat(1, 2) / 2)

        self.gradient_checkpointing = False

    # Copied from sculptdiff.models.unet_sculpt.SculptUNet2DModel.from_pretrained (one loading policy for both models)
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "SculptDiT2DModel":
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
    ) -> SculptDiT2DOutput | tuple:
        r"""
        The [`SculptDiT2DModel`] forward method.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                The noisy input x_t. Height and width must be multiples of `patch_size`.
            timestep (`torch.Tensor`, `float` or `int`):
                The timestep t: a number, a 0-d tensor, or a 1-d tensor of 1 or `batch_size` entries (broadcast to the
                batch). Floats are fine (flow-matching schedulers use `sigma * num_train_timesteps`).
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, sequence_length, cross_attention_dim)`, *optional*):
                Text embeddings for cross-attention; required exactly when `config.cross_attention_dim` is set.
            class_labels (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, num_class_embeds]`; index `num_class_embeds` (and `None`) is the null class.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`SculptDiT2DOutput`] instead of a plain tuple.
            timestep_cond (`torch.Tensor` of shape `(batch_size, time_cond_proj_dim)`, *optional*):
                Added to the sinusoidal time features; only for models with `config.time_cond_proj_dim`.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to every attention processor; `scale` sets the LoRA scale (as in `UNet2DConditionModel`).
            added_cond_kwargs (`dict`, *optional*):
                Accepted because StableDiffusionPipeline passes it; this model has no added conditions (IP-Adapter), so
                a non-empty dict is an error.

        Returns:
            [`SculptDiT2DOutput`] or `tuple`: the prediction, of shape `(batch_size, out_channels, height, width)`.
        """
        # 0. check inputs
        if added_cond_kwargs:
            raise ValueError(
                f"`added_cond_kwargs` ({sorted(added_cond_kwargs)}) is not supported: SculptDiT2DModel has no added "
                "conditions (IP-Adapter image embeddings). Pass None."
            )
        if timestep_cond is not None and self.config.time_cond_proj_dim is None:
            raise ValueError("`timestep_cond` was given but the model has no `time_cond_proj_dim`; pass None.")
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`sample` must have shape (batch_size, {self.config.in_channels}, height, width) "
                f"(`in_channels`={self.config.in_channels}), got {tuple(sample.shape)}."
            )
        patch_size = self.config.patch_size
        if sample.shape[-2] % patch_size or sample.shape[-1] % patch_size:
            raise ValueError(
                f"`sample` height and width ({sample.shape[-2]}, {sample.shape[-1]}) must be multiples of "
                f"{patch_size} (`patch_size`); resize or pad the input."
            )
        batch_size, _, height, width = sample.shape
        if self.config.cross_attention_dim is None and encoder_hidden_states is not None:
            raise ValueError(
                "`encoder_hidden_states` was given but the model has no cross-attention (`cross_attention_dim` is "
                "None); pass None."
            )
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

        # 1. conditioning: c = time embedding + class embedding, (N,) -> (N, D)
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

        # 2. patchify, plus the position embedding: (N, C, H, W) -> (N, H*W/p^2, D)
        hidden_states = self.pos_embed(sample)

        # 3. transformer blocks: (N, H*W/p^2, D) -> (N, H*W/p^2, D); with long skips, the outputs of the first half
        # are stacked and taken back in reverse order by the blocks of the second half
        skips = []
        for index, block in enumerate(self.transformer_blocks):
            skip = skips.pop() if block.skip_linear is not None else None
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                # keep only the block's inputs and recompute its activations in the backward pass
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, embedding, encoder_hidden_states, cross_attention_kwargs, skip
                )
            else:
                hidden_states = block(hidden_states, embedding, encoder_hidden_states, cross_attention_kwargs, skip)
            if self.config.long_skip_connections and index < len(self.transformer_blocks) // 2:
                skips.append(hidden_states)

        # 4. final layer: norm(x) * (1 + scale) + shift, then a linear map of every token to a patch
        # (N, H*W/p^2, D) -> (N, H*W/p^2, p*p*C_out)
        hidden_states = self.norm_out(hidden_states, embedding)
        hidden_states = self.proj_out(hidden_states)

        # 5. unpatchify
        # (N, H*W/p^2, p*p*C_out) -> (N, H/p, W/p, p, p, C_out) -> (N, C_out, H/p, p, W/p, p) -> (N, C_out, H, W)
        out_channels = self.config.out_channels
        hidden_states = hidden_states.reshape(
            batch_size, height // patch_size, width // patch_size, patch_size, patch_size, out_channels
        )
        hidden_states = hidden_states.permute(0, 5, 1, 3, 2, 4)
        output = hidden_states.reshape(batch_size, out_channels, height, width)

        if not return_dict:
            return (output,)
        return SculptDiT2DOutput(sample=output)

    # the same checks and messages as SculptUNet2DModel._check_class_labels
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
