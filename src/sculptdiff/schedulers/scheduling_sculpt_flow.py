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
"""Rectified-flow scheduler: Euler and Heun sampling of the flow ODE, and the training-side interpolation."""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class SculptFlowSchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function output.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            Computed sample `x_{t'}` at the next (smaller) time of the grid. `prev_sample` should be used as next
            model input in the denoising loop.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            The predicted clean sample `x0_hat = x_t - t * v` from the model output of this call. It can be used to
            preview progress or for guidance.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def shift_sigmas(sigmas: np.ndarray | torch.Tensor, shift: float) -> np.ndarray | torch.Tensor:
    """Shift a rectified-flow time grid towards noise, Esser et al. 2024 (arXiv:2403.03206), Sec. 5.3.2."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class SculptFlowScheduler(SchedulerMixin, ConfigMixin):
    """
    `SculptFlowScheduler` samples rectified-flow models (Liu et al. 2022, arXiv:2209.03003; Lipman et al. 2022,
    arXiv:2210.02747; Esser et al. 2024, arXiv:2403.03206). The forward path is the straight line
    `x_t = (1 - t) * x_0 + t * eps` with `t = sigma` in [0, 1], the model predicts the velocity `v = eps - x_0`, and
    sampling integrates the ODE `dx_t / dt = v(x_t, t)` from `t = 1` (pure noise) to `t = 0` with Euler's method
    or Heun's second-order method. Model timesteps are `sigma * num_train_timesteps`, as in diffusers'
    `FlowMatchEulerDiscreteScheduler`, and with equal settings both give the same timesteps and samples; the Heun
    solver gives the same samples as `FlowMatchHeunDiscreteScheduler`.

    Of `FlowMatchEulerDiscreteScheduler`'s options only `shift` and `stochastic_sampling` are kept. The others
    (`use_dynamic_shifting` with `mu`, `shift_terminal`, `invert_sigmas`, Karras/exponential/beta sigmas) serve
    particular latent models. Loading such a config ignores them (diffusers keeps the keys as hidden config entries,
    so swapping back restores them); a custom grid can be passed as `sigmas` to `set_timesteps`. A pipeline that
    passes `mu=` to `set_timesteps` (Flux, or SD3 with `use_dynamic_shifting=True`) stops with a TypeError naming
    `mu`: it needs diffusers' scheduler.

    This model inherits from [`SchedulerMixin`] and [`ConfigMixin`]. Check the superclass documentation for the generic
    methods the library implements for all schedulers such as loading and saving.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            The scale of the model's timestep input: the model sees `timestep = t * num_train_timesteps`.
        shift (`float`, defaults to 1.0):
            Shift of the sampling grid towards noise, `t' = shift * t / (1 + (shift - 1) * t)` (SD3 uses 3.0).
            Must be > 0; 1.0 leaves the grid uniform in `t`.
        solver (`str`, defaults to `"euler"`):
            `"euler"` (one model call per step) or `"heun"` (Karras et al. 2022 Algorithm 1: two model calls per step
            except the last, `order = 2`; the timesteps repeat so a stock pipeline loop makes both calls). Not in
            diffusers' configs: pass `solver="heun"` to `from_config` when replacing `FlowMatchHeunDiscreteScheduler`.
        stochastic_sampling (`bool`, defaults to False):
            Euler only. Instead of moving along the velocity, predict `x0_hat` and re-noise it to the next time with
            fresh noise, `x_{t'} = (1 - t') * x0_hat + t' * noise`, as `FlowMatchEulerDiscreteScheduler` does.
        prediction_type (`str`, defaults to `"flow"`):
            Not a choice but the family's mark in saved configs: the config of a DDPM-family scheduler carries
            `"epsilon"`, `"v_prediction"` or `"sample"` here, and `from_config` of it raises (such models need
            `SculptScheduler`); diffusers' flow-matching configs have no such key and load. Any value other than
            `"flow"` raises.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        solver: str = "euler",
        stochastic_sampling: bool = False,
        prediction_type: str = "flow",
    ):
        if solver not in ("euler", "heun"):
            raise ValueError(f"`solver` must be 'euler' or 'heun', got {solver!r}.")
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"`shift` must be a finite number > 0 (1.0 = no shift, SD3 uses 3.0), got {shift}.")
        if stochastic_sampling and solver != "euler":
            raise ValueError("`stochastic_sampling=True` is defined for `solver='euler'` only; set one of them back.")
        if prediction_type != "flow":
            raise ValueError(
                f"`prediction_type` of SculptFlowScheduler is always 'flow', got {prediction_type!r}: a model trained"
                " for 'epsilon', 'v_prediction' or 'sample' needs SculptScheduler (or another DDPM-family scheduler)."
            )

        # The (shifted) training table of FlowMatchEulerDiscreteScheduler, built with the same float32 operations:
        # its ends are the ends of the default sampling grid, so both schedulers give bit-identical timesteps.
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = shift_sigmas(torch.from_numpy(timesteps) / num_train_timesteps, shift)

        self.sigmas = sigmas
        self.timesteps = sigmas * num_train_timesteps
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        # standard deviation of the initial noise distribution: x_1 = eps ~ N(0, I)
        self.init_noise_sigma = 1.0

        self.num_inference_steps = None
        self._reset_sampling_state()

    @property
    def order(self) -> int:
        """Model calls per sampling step: the pipeline loop runs `len(timesteps)` calls, `order` per step."""
        return 2 if self.config.solver == "heun" else 1

    @property
    def step_index(self) -> int | None:
        """The index of the next `step` call into `timesteps`; it increases by 1 after each call."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first index into `timesteps`, set by img2img-style pipelines with `set_begin_index`."""
        return self._begin_index

    @property
    def state_in_first_order(self) -> bool:
        """False only between Heun's predictor and corrector calls."""
        return self._heun_sample is None

    def set_begin_index(self, begin_index: int = 0):
        """
        Sets the begin index for the scheduler. This function should be run from pipeline before the inference.

        Args:
            begin_index (`int`, defaults to `0`):
                The begin index for the scheduler.
        """
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """
        Returns `sample` unchanged: a flow model takes `x_t` as it is. Kept for interchangeability with schedulers that
        scale the model input.

        Args:
            sample (`torch.Tensor`):
                The input sample.
            timestep (`float` or `torch.Tensor`, *optional*):
                The current timestep in the diffusion chain.

        Returns:
            `torch.Tensor`:
                The same sample.
        """
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        timesteps: list[float] | None = None,
    ):
        """
        Sets the time grid used for sampling (to be run before inference).

        The default grid runs from `t = 1` to the end of the shifted training table, uniformly, and is then shifted,
        exactly as `FlowMatchEulerDiscreteScheduler.set_timesteps` does (so its last time is shifted twice, a quirk
        kept for identical timesteps: 1/1000 becomes 0.009 with shift 3); custom `sigmas` are shifted too. Custom
        `timesteps` (model scale) are used as given, unshifted, with `sigmas = timesteps / num_train_timesteps`
        (diffusers' scheduler shifts its sigmas but not its timesteps there, so the two disagree unless `shift=1`).
        A terminal `t = 0` is appended to the sigmas. With `solver="heun"` every timestep after the first is repeated
        (predictor and corrector call), as in diffusers' Heun schedulers.

        Args:
            num_inference_steps (`int`, *optional*):
                The number of sampling steps. Optional if `sigmas` or `timesteps` are given, else equal to their length.
            device (`str` or `torch.device`, *optional*):
                The device to which the timesteps should be moved to. If `None`, the timesteps are not moved.
            sigmas (`list[float]`, *optional*):
                Custom times `t`, strictly decreasing in (0, 1], before the shift.
            timesteps (`list[float]`, *optional*):
                Custom model timesteps, strictly decreasing in (0, num_train_timesteps]. If given with `sigmas`, they
                must equal the shifted `sigmas` times `num_train_timesteps`.
        """
        num_train_timesteps = self.config.num_train_timesteps
        if num_inference_steps is None and sigmas is None and timesteps is None:
            raise ValueError("Pass `num_inference_steps`, or a custom grid as `sigmas` or `timesteps`.")
        both_given = sigmas is not None and timesteps is not None
        if both_given and len(sigmas) != len(timesteps):
            raise ValueError(
                f"`sigmas` ({len(sigmas)} values) and `timesteps` ({len(timesteps)} values) must have the same length."
            )
        custom_grid = sigmas if sigmas is not None else timesteps
        if custom_grid is None:
            if not 1 <= num_inference_steps <= num_train_timesteps:
                raise ValueError(
                    f"`num_inference_steps` must be between 1 and `num_train_timesteps` ({num_train_timesteps}),"
                    f" got {num_inference_steps}."
                )
        elif num_inference_steps is None:
            num_inference_steps = len(custom_grid)
        elif num_inference_steps != len(custom_grid):
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps}) must equal the length of the custom `sigmas` or"
                f" `timesteps` ({len(custom_grid)}); leave it out to use their length."
            )

        # 1. the grid of times t (= sigmas), in float32 for custom grids and float64 for the default one, as diffusers
        if sigmas is not None:
            sigmas = np.array(sigmas, dtype=np.float32)
            self._check_grid("sigmas", sigmas, 1.0)
            sigmas = shift_sigmas(sigmas, self.config.shift)
        elif timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.float32)
            self._check_grid("timesteps", timesteps, num_train_timesteps)
            sigmas = timesteps / num_train_timesteps
        else:
            grid = np.linspace(
                self.sigma_max * num_train_timesteps, self.sigma_min * num_train_timesteps, num_inference_steps
            )
            sigmas = shift_sigmas(grid / num_train_timesteps, self.config.shift)

        # 2. model timesteps t * num_train_timesteps; given timesteps stay exactly as given
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if timesteps is None:
            timesteps = sigmas * num_train_timesteps
        else:
            timesteps = torch.from_numpy(np.asarray(timesteps, dtype=np.float32)).to(device=device)
        if both_given and not torch.allclose(timesteps, sigmas * num_train_timesteps, rtol=1e-5, atol=1e-3):
            raise ValueError(
                "`timesteps` must equal the shifted `sigmas` times `num_train_timesteps`"
                f" ({num_train_timesteps}) when both are given; pass only one of them."
            )

        # 3. append the terminal t = 0; Heun repeats every time but the first (its corrector calls)
        zero = torch.zeros(1, dtype=sigmas.dtype, device=sigmas.device)
        if self.config.solver == "heun":
            timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
            sigmas = torch.cat([sigmas[:1], sigmas[1:].repeat_interleave(2), zero])
        else:
            sigmas = torch.cat([sigmas, zero])

        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps
        self.sigmas = sigmas
        self._reset_sampling_state()

    def _reset_sampling_state(self):
        """Forget the position in the sampling grid (a new sampling run starts)."""
        self._step_index = None
        self._begin_index = None
        # Heun's state between its predictor and its corrector call: x_t and v(x_t, t)
        self._heun_sample = None
        self._heun_velocity = None

    def _check_grid(self, name: str, grid: np.ndarray, upper: float):
        if (
            grid.ndim != 1
            or len(grid) == 0
            or not np.all(np.isfinite(grid))
            or grid[0] > upper
            or grid[-1] <= 0
            or np.any(np.diff(grid) >= 0)
        ):
            raise ValueError(f"`{name}` must be a non-empty, strictly decreasing list in (0, {upper}], got {grid}.")

    def index_for_timestep(
        self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None
    ) -> int:
        """
        The index of `timestep` in the timestep schedule.

        Args:
            timestep (`float` or `torch.Tensor`):
                The timestep to find the index for.
            schedule_timesteps (`torch.Tensor`, *optional*):
                The schedule to search in. If `None`, `self.timesteps` is used.

        Returns:
            `int`:
                The index of the timestep.
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"`timestep` {float(timestep)} is not one of `scheduler.timesteps` {schedule_timesteps.tolist()}:"
                " a flow scheduler steps along the grid of `set_timesteps`, pass the loop's `t`."
            )
        # A repeated timestep (Heun, or a pipeline starting mid-schedule) is entered at its second occurrence, as
        # diffusers does, so that a sigma is never skipped.
        position = 1 if len(indices) > 1 else 0
        return indices[position].item()

    def _init_step_index(self, timestep: float | torch.Tensor):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SculptFlowSchedulerOutput | tuple:
        """
        Moves the sample one call along the flow ODE `dx_t / dt = v(x_t, t)`, from `t` to the next time `t' < t`.

        Notation (variable -> paper symbol; Esser et al. 2024 Sec. 2-3, Liu et al. 2022 with time reversed):

        | variable               | symbol                                  |
        |------------------------|-----------------------------------------|
        | `sample`               | x_t (Esser et al. z_t)                  |
        | `model_output`         | v_theta(x_t, t), trained on eps - x_0   |
        | `sigma`                | t                                       |
        | `sigma_next`           | t' (the next, smaller time)             |
        | `dt`                   | t' - t (negative: sampling runs to t=0) |
        | `pred_original_sample` | x0_hat = x_t - t v                      |
        | `prev_sample`          | x_{t'}                                  |

        Args:
            model_output (`torch.Tensor`):
                The velocity predicted by the model at `(sample, timestep)`.
            timestep (`float` or `torch.Tensor`):
                The current model timestep, one of `self.timesteps` (not a loop index).
            sample (`torch.Tensor`):
                The current sample `x_t`.
            generator (`torch.Generator`, *optional*):
                A random number generator for the noise of `stochastic_sampling`.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`SculptFlowSchedulerOutput`] or a tuple.

        Returns:
            [`SculptFlowSchedulerOutput`] or `tuple`:
                If return_dict is `True`, [`SculptFlowSchedulerOutput`] is returned, otherwise a tuple
                `(prev_sample, pred_original_sample)`.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "`timestep` must be one of `scheduler.timesteps` (a float), got an integer: pass the loop's `t`,"
                " not its index from `enumerate(timesteps)`."
            )
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"`model_output` has shape {tuple(model_output.shape)} but `sample` has shape {tuple(sample.shape)}:"
                " they must be equal."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.timesteps):
            raise ValueError(
                f"All {len(self.timesteps)} calls of the sampling grid are done: call `set_timesteps` to sample again."
            )

        # upcast half precision: the update adds a small dt * v to a large x_t (float64 stays float64)
        sample = sample.to(torch.promote_types(sample.dtype, torch.float32))

        # 1. get the current and the next time; Heun's corrector call evaluated the model at t', not at t
        is_corrector = not self.state_in_first_order
        if is_corrector:
            sigma = self.sigmas[self.step_index - 1]
            sigma_next = self.sigmas[self.step_index]
        else:
            sigma = self.sigmas[self.step_index]
            sigma_next = self.sigmas[self.step_index + 1]
        dt = sigma_next - sigma

        # 2. predict x_0 from x_t = (1 - t) x_0 + t eps and v = eps - x_0 (Esser et al. Sec. 3, rectified flow)
        sigma_of_model_call = sigma_next if is_corrector else sigma
        pred_original_sample = sample - sigma_of_model_call * model_output

        # 3. compute x_{t'}
        if self.config.stochastic_sampling:
            # re-noise x0_hat to t' with fresh noise: the forward process x_t' = (1 - t') x0_hat + t' eps
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = (1.0 - sigma_next) * pred_original_sample + sigma_next * noise
        elif is_corrector:
            # Heun corrector, Karras et al. 2022 (arXiv:2206.00364) Algorithm 1 line 8: average v(x_t, t), v(x_t', t')
            prev_sample = self._heun_sample + dt * 0.5 * (self._heun_velocity + model_output)
            self._heun_sample = None
            self._heun_velocity = None
        else:
            # Euler step of the ODE dZ_t = v(Z_t, t) dt of Liu et al. 2022 Sec. 2 (Karras Algorithm 1 line 5 for Heun)
            prev_sample = sample + dt * model_output
            if self.config.solver == "heun" and sigma_next > 0:
                # the corrector comes with the next call; the last step (to t' = 0) stays Euler, as in Algorithm 1
                self._heun_sample = sample
                self._heun_velocity = model_output

        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        pred_original_sample = pred_original_sample.to(model_output.dtype)

        if not return_dict:
            return (prev_sample, pred_original_sample)

        return SculptFlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        The forward path `x_t = (1 - t) * x_0 + t * eps` (Esser et al. 2024 Sec. 3; the optimal-transport path of Lipman
        et al. 2022 Sec. 4.1 with sigma_min = 0 and time reversed), for training.

        Args:
            original_samples (`torch.Tensor`):
                Clean samples `x_0`, batch first.
            noise (`torch.Tensor`):
                Noise `eps ~ N(0, I)`, shaped like `original_samples`.
            timesteps (`torch.Tensor`):
                One model timestep per sample (or one for all) in [0, num_train_timesteps]; float values are used as
                they are (`t = timesteps / num_train_timesteps`), no lookup in a table.

        Returns:
            `torch.Tensor`:
                The noisy samples `x_t`.
        """
        num_train_timesteps = self.config.num_train_timesteps
        sigmas = timesteps.to(device=original_samples.device, dtype=original_samples.dtype).flatten()
        # a time outside [0, 1] extrapolates the straight path (NaN fails both comparisons)
        if not ((sigmas >= 0) & (sigmas <= num_train_timesteps)).all():
            raise ValueError(
                f"`timesteps` must lie in [0, {num_train_timesteps}] (`num_train_timesteps`), got {timesteps.tolist()}."
            )
        if len(sigmas) not in (1, len(original_samples)):
            raise ValueError(
                f"`timesteps` must hold one timestep per sample ({len(original_samples)}) or one for all, got"
                f" {len(sigmas)}."
            )
        sigmas = sigmas / num_train_timesteps
        # (N,) -> (N, 1, ..., 1)
        sigmas = sigmas.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return (1.0 - sigmas) * original_samples + sigmas * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        The training target `v = eps - x_0` = `d x_t / dt` of the straight path (Liu et al. 2022 eq. (1)). It does
        not depend on `t`; `timesteps` is accepted so the training script calls this like DDPM's `get_velocity`.

        Args:
            sample (`torch.Tensor`):
                Clean samples `x_0`.
            noise (`torch.Tensor`):
                Noise `eps`, shaped like `sample`.
            timesteps (`torch.Tensor`):
                Unused.

        Returns:
            `torch.Tensor`:
                The velocity `noise - sample`.
        """
        return noise - sample

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """
        The forward path at a time of the current sampling grid, as `FlowMatchEulerDiscreteScheduler.scale_noise`
        (used by img2img and inpainting pipelines): the sigma comes from the grid position, not from `timestep / T`.

        Args:
            sample (`torch.Tensor`):
                Clean samples `x_0`.
            timestep (`torch.Tensor`):
                One timestep of `self.timesteps` per sample.
            noise (`torch.Tensor`):
                Noise `eps`, shaped like `sample`.

        Returns:
            `torch.Tensor`:
                `t * noise + (1 - t) * sample`.
        """
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        schedule_timesteps = self.timesteps.to(sample.device)
        timestep = timestep.to(sample.device)

        if self.begin_index is None:
            # training, or a pipeline without set_begin_index
            step_indices = [self.index_for_timestep(t, schedule_timesteps) for t in timestep]
        elif self.step_index is not None:
            # called after the first denoising step (inpainting)
            step_indices = [self.step_index] * timestep.shape[0]
        else:
            # called before the first denoising step to make the initial latent (img2img)
            step_indices = [self.begin_index] * timestep.shape[0]

        sigma = sigmas[step_indices].flatten()
        # (N,) -> (N, 1, ..., 1)
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        return sigma * noise + (1.0 - sigma) * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
