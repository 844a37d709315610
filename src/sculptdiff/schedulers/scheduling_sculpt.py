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
"""DDPM and DDIM in one scheduler: the generalized DDIM step with a single `eta` knob (0 = DDIM, 1 = DDPM)."""

import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, betas_for_alpha_bar, rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
# The sampler of each reference scheduler, as values of this scheduler's config: what `from_config` gives a config of
# that scheduler that sets neither key (DDIMScheduler's `step` keeps the model's noise after clipping x_0)
REFERENCE_SAMPLERS = {
    DDPMScheduler: {"eta": 1.0},
    DDIMScheduler: {"eta": 0.0, "use_clipped_model_output": False},
}


@dataclass
class SculptSchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            Computed sample `x_{t-1}` of the previous timestep; the next model input of the denoising loop.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            The predicted denoised sample `x_0` (after clipping or thresholding), for previews or guidance.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Linear betas of DDPM (Ho et al. 2020, https://huggingface.co/papers/2006.11239, section 4)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas linear in sqrt(beta), of latent diffusion (Rombach et al., https://huggingface.co/papers/2112.10752)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def sigmoid_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Sigmoid betas of GeoDiff (Xu et al. 2022, https://huggingface.co/papers/2203.02923), as DDPMScheduler."""
    return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start


class SculptScheduler(SchedulerMixin, ConfigMixin):
    """
    `SculptScheduler` samples with the generalized DDIM update (DDIM, https://huggingface.co/papers/2010.02502,
    formula (12)). One knob, `eta`, moves it from deterministic DDIM (`eta=0`) to the ancestral sampler of DDPM
    (https://huggingface.co/papers/2006.11239, `eta=1`). With equal settings it reproduces `DDIMScheduler` (eta=0)
    and `DDPMScheduler` (eta=1, same generator) step for step, and it loads from either one's config.

    A config keeps its sampler: `from_config` and `from_pretrained` of a config saved by `DDPMScheduler` give `eta=1`
    (DDPM's ancestral sampler), of one saved by `DDIMScheduler` `eta=0` and `use_clipped_model_output=False` (DDIM's
    step), so that `pipe.scheduler = SculptScheduler.from_config(pipe.scheduler.config)` does not change the sampler
    of a `DDPMPipeline`. The saving class is the config's `_class_name` (`save_pretrained` writes it, `from_config`
    keeps it); a config built in memory has none and is told by its keys (every `__init__` argument of exactly one of
    the two). An `eta` or `use_clipped_model_output` in the config or among the keyword arguments always wins; any
    other config gets this class's defaults.

    The previous timestep of a step from an entry of `self.timesteps` is the next entry (as
    `DDPMScheduler.previous_timestep`), not DDIM's `t - num_train_timesteps // num_inference_steps`. The two agree for
    "leading" spacing and for "trailing" spacing when `num_inference_steps` divides `num_train_timesteps`; elsewhere
    ("linspace", other "trailing" step counts, custom `timesteps`) DDIM's `t - T // n` is not a point of the grid, so
    DDIM steps to a noise level that the next step does not start from, while this scheduler always lands on the next
    grid point. A step from any other integer timestep in `[0, num_train_timesteps)` lands where `DDIMScheduler`'s
    lands, on `t - num_train_timesteps // num_inference_steps`, whatever `eta`: `DDPMScheduler` defines no step from
    off its grid (it raises an IndexError after `set_timesteps`; before it, every integer timestep is on the grid,
    where its `t - 1` is the next grid point, as here). After custom `timesteps`, which have no step size, off-grid
    timesteps are refused.

    This model inherits from [`SchedulerMixin`] and [`ConfigMixin`]: `from_config`, `save_pretrained` and
    `from_pretrained` come from there.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            The number of diffusion steps used to train the model, T.
        beta_start (`float`, defaults to 0.0001):
            The first beta of the "linear", "scaled_linear" and "sigmoid" schedules.
        beta_end (`float`, defaults to 0.02):
            The last beta of the "linear", "scaled_linear" and "sigmoid" schedules.
        beta_schedule (`"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"` or `"sigmoid"`, defaults to `"linear"`):
            How betas go from `beta_start` to `beta_end` ("squaredcos_cap_v2" is the cosine schedule of improved DDPM
            and ignores both). Ignored when `trained_betas` is given.
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            The betas themselves, one per training timestep; overrides `beta_schedule`.
        variance_type (`"fixed_small"`, `"fixed_small_log"`, `"fixed_large"`, `"fixed_large_log"`, `"learned"` or `"learned_range"`, defaults to `"fixed_small"`):
            The variance of the noise added by ancestral steps (`eta > 0`), as `DDPMScheduler`: the posterior
            variance beta_tilde_t ("fixed_small"), beta_t ("fixed_large"), or read from the model output's second half
            of channels ("learned": the variance itself, as diffusers reads it; "learned_range": an interpolation
            between log beta_tilde_t and log beta_t, improved DDPM). The "_log" variants give the same standard
            deviation as their plain counterparts.
        clip_sample (`bool`, defaults to `True`):
            Clip the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
        clip_sample_range (`float`, defaults to 1.0):
            The maximum magnitude of the predicted `x_0` when `clip_sample=True`.
        thresholding (`bool`, defaults to `False`):
            Use dynamic thresholding of the predicted `x_0` (Imagen, https://huggingface.co/papers/2205.11487)
            instead of clipping. Unsuitable for latent diffusion models.
        dynamic_thresholding_ratio (`float`, defaults to 0.995):
            The percentile of absolute `x_0` values used as the threshold when `thresholding=True`.
        sample_max_value (`float`, defaults to 1.0):
            The largest threshold when `thresholding=True`.
        prediction_type (`"epsilon"`, `"v_prediction"` or `"sample"`, defaults to `"epsilon"`):
            What the model predicts: the noise, the velocity (section 2.4 of https://huggingface.co/papers/2210.02303)
            or `x_0`.
        timestep_spacing (`"leading"`, `"trailing"` or `"linspace"`, defaults to `"leading"`):
            How the inference timesteps are spread over the training ones; Table 2 of
            https://huggingface.co/papers/2305.08891.
        steps_offset (`int`, defaults to 0):
            An offset added to the "leading" inference timesteps, as some model families (Stable Diffusion) need.
        set_alpha_to_one (`bool`, defaults to `True`):
            The cumulative alpha after the last step: 1 (a clean sample), or `alphas_cumprod[0]` when `False`.
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the betas to zero terminal SNR (https://huggingface.co/papers/2305.08891, Algorithm 1). Then
            `alphas_cumprod[-1]` is 0, as in DDIMScheduler and DDPMScheduler, and stepping from that timestep needs
            `prediction_type="v_prediction"` or `"sample"` (the paper's section 3.2).
        eta (`float`, defaults to 0.0):
            The weight of the noise of each step, in [0, 1]: 0 is deterministic DDIM, 1 is DDPM's ancestral sampling
            (the default when loading a `DDPMScheduler` config). `step(eta=...)` overrides it for one call.
        use_clipped_model_output (`bool`, defaults to `True`):
            When x_0 is clipped or thresholded, re-derive the noise from the clipped x_0 so that the step stays on the
            path of the x_0 it moves towards. DDPM's posterior mean does this implicitly; `DDIMScheduler` does not by
            default (its `step(use_clipped_model_output=False)`), and then deterministic sampling with strong
            classifier-free guidance in pixel space saturates. Set `False` to reproduce `DDIMScheduler` step for
            step (the default when loading a `DDIMScheduler` config); `step(use_clipped_model_output=...)` overrides
            it for one call.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: Literal[
            "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"
        ] = "fixed_small",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        rescale_betas_zero_snr: bool = False,
        eta: float = 0.0,
        use_clipped_model_output: bool = True,
    ):
        for name, value, allowed in (
            ("beta_schedule", beta_schedule, BETA_SCHEDULES),
            ("prediction_type", prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS),
            ("variance_type", variance_type, VARIANCE_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"`eta` must be in [0, 1] (0 = DDIM, 1 = DDPM), got {eta}.")
        for name, value in (
            ("beta_start", beta_start),
            ("beta_end", beta_end),
            ("clip_sample_range", clip_sample_range),
            ("dynamic_thresholding_ratio", dynamic_thresholding_ratio),
            ("sample_max_value", sample_max_value),
        ):
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value}.")

        if trained_betas is not None:
            self.betas = torch.tensor(trained_betas, dtype=torch.float32)
            if not torch.isfinite(self.betas).all():
                raise ValueError(f"`trained_betas` must be finite numbers, got {self.betas.tolist()}.")
        elif beta_schedule == "linear":
            self.betas = linear_betas(num_train_timesteps, beta_start, beta_end)
        elif beta_schedule == "scaled_linear":
            self.betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
        elif beta_schedule == "squaredcos_cap_v2":
            self.betas = betas_for_alpha_bar(num_train_timesteps)
        else:
            self.betas = sigmoid_betas(num_train_timesteps, beta_start, beta_end)
        if len(self.betas) != num_train_timesteps:
            raise ValueError(
                f"`trained_betas` has {len(self.betas)} values but `num_train_timesteps` is {num_train_timesteps};"
                " pass one beta per training timestep."
            )

        # alphas_cumprod[-1] stays 0 here (DDIMScheduler and DDPMScheduler keep it; Euler and DPM-Solver clamp it to
        # 2**-24 because their sigma would be infinite, which this scheduler never computes).
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)

        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # abar after the last step, where there is no previous timestep
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0

        # settable values; without set_timesteps the chain is all training timesteps, as DDPMScheduler
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs) -> tuple[dict, dict, dict]:
        """
        `ConfigMixin.extract_init_dict` (the step of `from_config` and `from_pretrained` that turns a config into
        `__init__` arguments), plus the sampler of the reference scheduler that saved the config, for the keys that
        neither the config nor `kwargs` set (see the class docstring), and without DPM-Solver's `variance_type=None`.
        """
        init_dict, unused_kwargs, hidden_config_dict = super().extract_init_dict(config_dict, **kwargs)
        # DPM-Solver's saved configs say `variance_type: null` for a model that predicts no variance: the default here
        if "variance_type" in init_dict and init_dict["variance_type"] is None:
            del init_dict["variance_type"]
        class_name = config_dict.get("_class_name")
        if class_name is None:
            # a config built in memory names no class: tell DDPMScheduler's from DDIMScheduler's by their keys
            saved_by = [
                reference
                for reference in REFERENCE_SAMPLERS
                if inspect.signature(reference.__init__).parameters.keys() - {"self"} <= config_dict.keys()
            ]
        else:
            saved_by = [reference for reference in REFERENCE_SAMPLERS if reference.__name__ == class_name]
        if len(saved_by) == 1:
            for key, value in REFERENCE_SAMPLERS[saved_by[0]].items():
                if key not in config_dict and key not in init_dict:
                    init_dict[key] = value
        return init_dict, unused_kwargs, hidden_config_dict

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """
        Returns `sample` unchanged: the model input of DDPM/DDIM is x_t itself. Kept for interchangeability with
        schedulers that scale the model input.

        Args:
            sample (`torch.Tensor`):
                The input sample.
            timestep (`int`, *optional*):
                The current timestep in the diffusion chain.
        """
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ):
        """
        Sets the timesteps of the sampling chain (to be run before inference).

        Custom `sigmas` are not accepted: this scheduler has no sigma parameterization, and diffusers' pipelines
        (`retrieve_timesteps`) then refuse `sigmas=` with a clear error before calling it.

        Args:
            num_inference_steps (`int`, *optional*):
                The number of sampling steps, spread over the training timesteps by `config.timestep_spacing`.
                Pass exactly one of `num_inference_steps` and `timesteps`.
            device (`str` or `torch.device`, *optional*):
                The device to move the timesteps to.
            timesteps (`list[int]`, *optional*):
                Custom timesteps, strictly descending, in `[0, num_train_timesteps)`.
        """
        num_train_timesteps = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` and `timesteps` to `set_timesteps`.")

        custom_timesteps = timesteps is not None
        if custom_timesteps:
            timesteps = np.array(timesteps, dtype=np.int64)
            if timesteps.ndim != 1 or len(timesteps) == 0 or np.any(np.diff(timesteps) >= 0):
                raise ValueError(
                    f"`timesteps` must be a non-empty, strictly descending list, got {timesteps.tolist()}."
                )
            if timesteps[0] >= num_train_timesteps or timesteps[-1] < 0:
                raise ValueError(
                    f"`timesteps` must lie in [0, {num_train_timesteps}) (`num_train_timesteps`),"
                    f" got {timesteps.tolist()}."
                )
        else:
            if not 1 <= num_inference_steps <= num_train_timesteps:
                raise ValueError(
                    f"`num_inference_steps` must be between 1 and `num_train_timesteps` ({num_train_timesteps}), got"
                    f" {num_inference_steps}: the model was trained on {num_train_timesteps} timesteps only."
                )
            # "linspace", "leading", "trailing": Table 2 of https://huggingface.co/papers/2305.08891
            if self.config.timestep_spacing == "linspace":
                timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
            elif self.config.timestep_spacing == "leading":
                step_ratio = num_train_timesteps // num_inference_steps
                timesteps = (np.arange(0, num_inference_steps) * step_ratio)[::-1].astype(np.int64)
                timesteps += self.config.steps_offset
            else:
                step_ratio = num_train_timesteps / num_inference_steps
                timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1

        self.num_inference_steps = len(timesteps)
        self.custom_timesteps = custom_timesteps
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """
        The timestep a step from `timestep` lands on: from an entry of `self.timesteps` the next entry, -1 after the
        last one (as `DDPMScheduler.previous_timestep`); from any other integer timestep `DDIMScheduler`'s
        `timestep - num_train_timesteps // num_inference_steps` (see the class docstring).

        Args:
            timestep (`int` or `torch.Tensor`):
                An integer timestep in `[0, num_train_timesteps)`.

        Returns:
            `int` or `torch.Tensor`:
                The previous timestep, a tensor for a tensor `timestep` (as `DDPMScheduler`); negative after the
                last step.
        """
        num_train_timesteps = self.config.num_train_timesteps
        integer_timestep = int(timestep)
        if integer_timestep != timestep or not 0 <= integer_timestep < num_train_timesteps:
            raise ValueError(
                f"`timestep` must be an integer in [0, {num_train_timesteps}) (`num_train_timesteps`), got {timestep}."
            )
        (index,) = (self.timesteps == integer_timestep).nonzero(as_tuple=True)
        if len(index) > 0:
            index = index[0].item()
            prev_timestep = self.timesteps[index + 1].item() if index + 1 < len(self.timesteps) else -1
        elif self.custom_timesteps:
            raise ValueError(
                f"`timestep` {integer_timestep} is not one of the custom `timesteps` {self.timesteps.tolist()}, which"
                " have no step size to step from other timesteps: step with the timesteps you passed."
            )
        else:
            # DDIMScheduler's off-grid step
            prev_timestep = integer_timestep - num_train_timesteps // self.num_inference_steps
        if isinstance(timestep, torch.Tensor):
            return torch.tensor(prev_timestep, device=timestep.device)
        return prev_timestep

    # Copied from diffusers.schedulers.scheduling_ddpm.DDPMScheduler._threshold_sample
    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """
        Dynamic thresholding of the predicted x_0 (Imagen, https://huggingface.co/papers/2205.11487): per sample,
        take s = the `dynamic_thresholding_ratio` percentile of |x_0|, clamp s to [1, `sample_max_value`], clip x_0 to
        [-s, s] and divide by s.
        """
        dtype = sample.dtype
        batch_size, channels, *remaining_dims = sample.shape

        if dtype not in (torch.float32, torch.float64):
            sample = sample.float()  # upcast for quantile calculation, and clamp not implemented for cpu half

        # Flatten sample for doing quantile calculation along each image
        sample = sample.reshape(batch_size, channels * np.prod(remaining_dims))

        abs_sample = sample.abs()  # "a certain percentile absolute pixel value"

        s = torch.quantile(abs_sample, self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(
            s, min=1, max=self.config.sample_max_value
        )  # When clamped to min=1, equivalent to standard clipping to [-1, 1]
        s = s.unsqueeze(1)  # (batch_size, 1) because clamp will broadcast along dim=0
        sample = torch.clamp(sample, -s, s) / s  # "we threshold xt0 to the range [-s, s] and then divide by s"

        sample = sample.reshape(batch_size, channels, *remaining_dims)
        sample = sample.to(dtype)

        return sample

    def _get_noise_std(
        self,
        posterior_variance: torch.Tensor,
        current_beta_t: torch.Tensor,
        predicted_variance: torch.Tensor | None,
    ) -> torch.Tensor:
        """
        The standard deviation of the noise an ancestral step adds, before the `eta` factor, for
        `config.variance_type` (DDPM formulas (6)-(7); improved DDPM https://huggingface.co/papers/2102.09672 formula
        (15) for "learned_range"), computed as DDPMScheduler computes it.
        """
        variance_type = self.config.variance_type
        if variance_type in ("learned", "learned_range") and predicted_variance is None:
            raise ValueError(
                f"`variance_type={variance_type!r}` reads the variance from the model: `model_output` must have twice"
                " the channels of `sample`. Use a fixed `variance_type` for a model that predicts no variance."
            )
        # log(0) is -inf: beta_tilde is 0 on the last step
        posterior_variance = torch.clamp(posterior_variance, min=1e-20)
        if variance_type == "fixed_small":
            return posterior_variance**0.5
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior_variance))
        if variance_type in ("fixed_large", "fixed_large_log"):
            # DDPMScheduler takes the square root of log(beta_t) for "fixed_large_log" (NaN); Glide's "max_log" is the
            # log of this variance
            return current_beta_t**0.5
        if variance_type == "learned":
            # diffusers' DDPMScheduler reads this channel as the variance itself (improved-diffusion: its log)
            return predicted_variance**0.5
        frac = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (frac * torch.log(current_beta_t) + (1 - frac) * torch.log(posterior_variance)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SculptSchedulerOutput | tuple:
        """
        One reverse step x_t -> x_{t-1} of the generalized DDIM process.

        Args:
            model_output (`torch.Tensor`):
                The output of the diffusion model (twice the channels of `sample` for learned variances).
            timestep (`int` or `torch.Tensor`):
                The current timestep t, an entry of `self.timesteps` or any other integer timestep (see the class
                docstring for where a step from off the grid lands).
            sample (`torch.Tensor`):
                The current sample x_t.
            eta (`float`, *optional*):
                The noise weight in [0, 1] for this step; `None` uses `config.eta`. 0 is DDIM, 1 is DDPM.
            use_clipped_model_output (`bool`, *optional*):
                Re-derive the noise prediction from the clipped (or thresholded) x_0; `None` uses
                `config.use_clipped_model_output`. Without clipping or thresholding there is nothing to re-derive.
            generator (`torch.Generator`, *optional*):
                The random number generator of the step noise.
            variance_noise (`torch.Tensor`, *optional*):
                The step noise itself, instead of drawing it with `generator` (e.g. for CycleDiffusion).
            return_dict (`bool`, defaults to `True`):
                Return a [`SculptSchedulerOutput`] instead of a tuple `(prev_sample, pred_original_sample)`.

        Returns:
            [`SculptSchedulerOutput`] or `tuple`.
        """
        # Formula (12) of DDIM, https://huggingface.co/papers/2010.02502:
        #   x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma_t^2) eps + sigma_t z
        # with sigma_t^2 = eta^2 beta_tilde_t (formula (16)), beta_tilde_t the posterior variance of DDPM
        # (https://huggingface.co/papers/2006.11239, formula (7)). For eta = 1 the first two terms equal DDPM's
        # posterior mean mu_tilde_t(x_t, x_0) (formula (7)); the noise term uses `config.variance_type` (formula (6)).
        #
        # Notation (<variable name> -> <name in paper>)
        # - alpha_prod_t -> abar_t (DDPM), alpha_t (DDIM)
        # - alpha_prod_t_prev -> abar_{t-1}, t-1 being the next entry of self.timesteps (off the grid t - T // n)
        # - current_alpha_t, current_beta_t -> alpha_t, beta_t of the strided chain: 1 - beta_t = abar_t / abar_{t-1}
        # - posterior_variance -> beta_tilde_t
        # - pred_epsilon -> eps_theta(x_t, t)
        # - pred_original_sample -> f_theta(x_t, t), the "predicted x_0"
        # - eta -> η
        # - eta**2 * posterior_variance -> sigma_t(η)^2
        # - pred_sample_direction -> "direction pointing to x_t"
        # - pred_original_sample_coeff, current_sample_coeff -> the weights of x_0 and x_t in mu_tilde_t (DDPM (7))
        # - noise_std -> the standard deviation of the added noise, η * sqrt(variance of variance_type)
        # - prev_sample -> x_{t-1}
        eta = self.config.eta if eta is None else eta
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"`eta` must be in [0, 1] (0 = DDIM, 1 = DDPM), got {eta}.")
        if variance_noise is not None and generator is not None:
            raise ValueError("Pass `generator` or `variance_noise` to `step`, not both.")
        if use_clipped_model_output is None:
            use_clipped_model_output = self.config.use_clipped_model_output
        learned_variance = self.config.variance_type in ("learned", "learned_range")
        if model_output.shape != sample.shape and not (
            learned_variance and model_output.shape == (sample.shape[0], 2 * sample.shape[1], *sample.shape[2:])
        ):
            raise ValueError(
                f"`model_output` has shape {tuple(model_output.shape)} but `sample` has shape {tuple(sample.shape)}:"
                " they must be equal"
                + (
                    f" (or `model_output` has twice the channels, for `variance_type={self.config.variance_type!r}`)."
                    if learned_variance
                    else "."
                )
            )

        # 1. get previous step value (the next grid point, "t-1"; off the grid DDIM's t - T // n)
        prev_timestep = int(self.previous_timestep(timestep))
        timestep = int(timestep)

        # 2. compute alphas, betas
        if learned_variance and model_output.shape[1] == 2 * sample.shape[1]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        # 3. compute predicted original sample and noise: "predicted x_0" of formula (12) (DDIM), (15) (DDPM)
        if self.config.prediction_type == "epsilon":
            if alpha_prod_t == 0:
                raise ValueError(
                    f"`timestep` {timestep} has zero signal (`rescale_betas_zero_snr=True`), where x_0 cannot be"
                    " recovered from a noise prediction: use `prediction_type='v_prediction'`, or a"
                    " `timestep_spacing` that does not start at the last training timestep."
                )
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            pred_epsilon = model_output
        elif self.config.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
        else:
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample

        # 4. clip or threshold "predicted x_0"
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range
            )

        # 5. compute variance: "sigma_t(η)^2" of formula (16), η^2 * beta_tilde_t
        posterior_variance = beta_prod_t_prev / beta_prod_t * current_beta_t

        # the noise consistent with the clipped x_0 (Glide; DDPM's posterior mean uses it implicitly)
        clips_x_0 = self.config.clip_sample or self.config.thresholding
        if use_clipped_model_output and clips_x_0:
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5

        if eta == 1.0 and (use_clipped_model_output or not clips_x_0):
            # 6.-7. compute x_{t-1} without "random noise": for η = 1 formula (12) is DDPM's posterior mean
            # mu_tilde_t(x_t, x_0) (DDPM formula (7)), computed as DDPMScheduler computes it so that chains of any
            # length agree with it to float32 rounding
            pred_original_sample_coeff = alpha_prod_t_prev**0.5 * current_beta_t / beta_prod_t
            current_sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
            prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
        else:
            # 6. compute "direction pointing to x_t" of formula (12), sqrt(1 - abar_{t-1} - sigma_t^2) * eps, with
            #   1 - abar_{t-1} - η^2 beta_tilde_t
            #     = (1 - η^2)(1 - abar_{t-1}) + η^2 alpha_t (1 - abar_{t-1})^2 / (1 - abar_t)
            # (exact, as 1 - abar_t - beta_t = alpha_t (1 - abar_{t-1})). The right side avoids beta_t = 1 - abar_t /
            # abar_{t-1}, whose float32 rounding is ~1e-4 relative when abar_{t-1} -> 1, and never turns negative.
            deterministic_variance = (1 - eta**2) * beta_prod_t_prev
            ancestral_variance = eta**2 * current_alpha_t * beta_prod_t_prev**2 / beta_prod_t
            direction_variance = deterministic_variance + ancestral_variance
            pred_sample_direction = direction_variance**0.5 * pred_epsilon

            # 7. compute x_{t-1} without "random noise" of formula (12)
            prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

        # 8. add noise; none on a step from t = 0 (it returns x_0), as DDPMScheduler, so that a seeded generator is
        # consumed exactly as DDPMScheduler consumes it
        if eta > 0 and timestep > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            noise_std = eta * self._get_noise_std(posterior_variance, current_beta_t, predicted_variance)
            prev_sample = prev_sample + noise_std * variance_noise

        if not return_dict:
            return (prev_sample, pred_original_sample)

        return SculptSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """
        The forward process in one jump, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM formula (4)).

        Args:
            original_samples (`torch.Tensor`):
                The clean samples x_0.
            noise (`torch.Tensor`):
                The noise eps, of the shape of `original_samples`.
            timesteps (`torch.IntTensor`):
                One timestep per sample (or one for all), in `[0, num_train_timesteps)`.
        """
        alpha_prod_t = self._alpha_prod_at(timesteps, original_samples)
        return alpha_prod_t**0.5 * original_samples + (1 - alpha_prod_t) ** 0.5 * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """
        The velocity target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (section 2.4 of
        https://huggingface.co/papers/2210.02303), for training v-prediction models.

        Args:
            sample (`torch.Tensor`):
                The clean samples x_0.
            noise (`torch.Tensor`):
                The noise eps.
            timesteps (`torch.IntTensor`):
                One timestep per sample (or one for all), in `[0, num_train_timesteps)`.
        """
        alpha_prod_t = self._alpha_prod_at(timesteps, sample)
        return alpha_prod_t**0.5 * noise - (1 - alpha_prod_t) ** 0.5 * sample

    def _alpha_prod_at(self, timesteps: torch.IntTensor, sample: torch.Tensor) -> torch.Tensor:
        """
        abar_t of each timestep, shaped `(N, 1, ..., 1)` to broadcast over `sample`. Timesteps outside the training
        range are refused: indexing would wrap a negative one around to the end of the schedule.
        """
        num_train_timesteps = self.config.num_train_timesteps
        timesteps = timesteps.to(sample.device)
        if ((timesteps < 0) | (timesteps >= num_train_timesteps)).any():
            raise ValueError(
                f"`timesteps` must lie in [0, {num_train_timesteps}) (`num_train_timesteps`), got {timesteps.tolist()}."
            )
        alphas_cumprod = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        alpha_prod_t = alphas_cumprod[timesteps].flatten()
        if len(alpha_prod_t) not in (1, len(sample)):
            raise ValueError(
                f"`timesteps` must hold one timestep per sample ({len(sample)}) or one for all, got"
                f" {len(alpha_prod_t)}."
            )
        # (N,) -> (N, 1, ..., 1) to broadcast over the sample dimensions
        return alpha_prod_t.reshape(-1, *([1] * (sample.ndim - 1)))

    def __len__(self) -> int:
        return self.config.num_train_timesteps
