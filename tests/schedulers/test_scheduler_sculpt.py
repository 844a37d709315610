"""Contract tests of SculptScheduler: equality with diffusers' DDIMScheduler (eta=0) and DDPMScheduler (eta=1),
the forward process, config round trips, input errors, and a golden sampling loop."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler, SculptSchedulerOutput


SHAPE = (2, 3, 8, 8)
BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "trained_betas"]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def dummy_model(sample: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str):
    """A fixed, deterministic stand-in for a trained network: it believes x_0 = 1.3 tanh(x_t + t / 500) (outside
    [-1, 1] often enough for clipping and thresholding to act) and returns that belief as `prediction_type`."""
    alpha_prod_t = alphas_cumprod[t]
    pred_original_sample = 1.3 * torch.tanh(sample + t / 500)
    if prediction_type == "sample":
        return pred_original_sample
    pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / (1 - alpha_prod_t) ** 0.5
    if prediction_type == "epsilon":
        return pred_epsilon
    return alpha_prod_t**0.5 * pred_epsilon - (1 - alpha_prod_t) ** 0.5 * pred_original_sample


def predicted_variance_channels(sample: torch.Tensor, variance_type: str) -> torch.Tensor:
    """The variance half of a learned-variance model output: a variance for "learned", a value in [-1, 1] for
    "learned_range" (both as DDPMScheduler reads them)."""
    if variance_type == "learned":
        return 0.02 * torch.sigmoid(sample)
    return torch.tanh(sample)


def sample_loop(scheduler, num_inference_steps=10, timesteps=None, seed=0, variance_type=None, **step_kwargs):
    """A full sampling loop with `dummy_model`, the initial noise and the step noise drawn from one seeded generator
    (as DDPMPipeline does). Returns every x_{t-1} of the loop, stacked, so that comparisons are step for step."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=generator)
    if timesteps is None:
        scheduler.set_timesteps(num_inference_steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    trajectory = []
    for t in scheduler.timesteps:
        model_output = dummy_model(sample, t, scheduler.alphas_cumprod, scheduler.config.prediction_type)
        if variance_type in ("learned", "learned_range"):
            model_output = torch.cat([model_output, predicted_variance_channels(sample, variance_type)], dim=1)
        sample = scheduler.step(model_output, t, sample, generator=generator, **step_kwargs).prev_sample
        trajectory.append(sample)
    return torch.stack(trajectory)


def schedule_config(beta_schedule: str) -> dict:
    if beta_schedule == "trained_betas":
        return {"trained_betas": torch.linspace(0.0002, 0.03, 1000).tolist()}
    if beta_schedule == "scaled_linear":
        return {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return {"beta_schedule": beta_schedule}


def ddim_schedule_config(beta_schedule: str) -> dict:
    # DDIMScheduler has no "sigmoid" schedule: it gets DDPMScheduler's sigmoid betas as trained_betas
    if beta_schedule == "sigmoid":
        return {"trained_betas": DDPMScheduler(beta_schedule="sigmoid").betas.tolist()}
    return schedule_config(beta_schedule)


def assert_same(actual: torch.Tensor, expected: torch.Tensor):
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# forward process and schedules


def test_add_noise_reproduces_the_worked_example():
    # abar_0 = 1 - 0.6 = 0.4; x_t = sqrt(0.4) * 1.0 + sqrt(0.6) * 0.5 = 0.632 + 0.387 = 1.019
    scheduler = SculptScheduler(num_train_timesteps=1, trained_betas=[0.6])
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(0.4)
    noisy = scheduler.add_noise(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0]))
    assert noisy.item() == pytest.approx(0.4**0.5 + 0.6**0.5 * 0.5, abs=1e-6)
    assert noisy.item() == pytest.approx(1.019, abs=1e-3)


def test_add_noise_and_get_velocity_match_ddpm():
    generator = torch.Generator().manual_seed(0)
    original, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    timesteps = torch.tensor([3, 999])
    ours, reference = SculptScheduler(), DDPMScheduler()
    noisy = ours.add_noise(original, noise, timesteps)
    torch.testing.assert_close(noisy, reference.add_noise(original, noise, timesteps))
    abar = reference.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, abar**0.5 * original + (1 - abar) ** 0.5 * noise)
    velocity = ours.get_velocity(original, noise, timesteps)
    torch.testing.assert_close(velocity, reference.get_velocity(original, noise, timesteps))
    # x_0 comes back from (x_t, v): x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
    torch.testing.assert_close(abar**0.5 * noisy - (1 - abar) ** 0.5 * velocity, original, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
def test_schedules_match_ddpm(beta_schedule, rescale_betas_zero_snr):
    ours = SculptScheduler(**schedule_config(beta_schedule), rescale_betas_zero_snr=rescale_betas_zero_snr)
    reference = DDPMScheduler(**schedule_config(beta_schedule), rescale_betas_zero_snr=rescale_betas_zero_snr)
    torch.testing.assert_close(ours.betas, reference.betas, atol=0, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod, atol=0, rtol=0)
    assert ours.alphas_cumprod.dtype == torch.float32
    # zero terminal SNR keeps abar_T = 0, as DDIMScheduler and DDPMScheduler do
    assert (ours.alphas_cumprod[-1].item() == 0.0) == rescale_betas_zero_snr
    assert ours.init_noise_sigma == 1.0 and ours.order == 1 and len(ours) == 1000


def test_set_alpha_to_one():
    assert SculptScheduler().final_alpha_cumprod.item() == 1.0
    ours = SculptScheduler(set_alpha_to_one=False, clip_sample=False)
    reference = DDIMScheduler(set_alpha_to_one=False, clip_sample=False)
    assert ours.final_alpha_cumprod == ours.alphas_cumprod[0]
    assert_same(sample_loop(ours), sample_loop(reference))


# ---------------------------------------------------------------------------------------------------------------------
# eta = 0 is DDIMScheduler


# DDIM steps to t - T // n. That is the next grid point for "leading" spacing (any n) and for "trailing" spacing when n
# divides T; "linspace" and "trailing" with 7 steps are excluded here (test_previous_timestep_is_the_next_grid_point).
DDIM_GRIDS = [("leading", 10), ("leading", 7), ("trailing", 10)]


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("timestep_spacing, num_inference_steps", DDIM_GRIDS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_eta_zero_matches_ddim(beta_schedule, prediction_type, timestep_spacing, num_inference_steps, clip_sample):
    settings = {"prediction_type": prediction_type, "timestep_spacing": timestep_spacing, "clip_sample": clip_sample}
    # DDIMScheduler keeps the model's noise after clipping x_0: that is `use_clipped_model_output=False` here
    ours = SculptScheduler(**schedule_config(beta_schedule), use_clipped_model_output=False, **settings)
    reference = DDIMScheduler(**ddim_schedule_config(beta_schedule), **settings)
    assert_same(sample_loop(ours, num_inference_steps), sample_loop(reference, num_inference_steps))


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_eta_zero_matches_ddim_with_steps_offset(steps_offset):
    settings = {"steps_offset": steps_offset, "clip_sample": False, **schedule_config("scaled_linear")}
    assert_same(sample_loop(SculptScheduler(**settings)), sample_loop(DDIMScheduler(**settings)))


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_any_eta_matches_ddim_with_the_same_clipping_choice(eta, use_clipped_model_output):
    # DDIM draws step noise at t = 0 too, where its variance is 0: the samples are still equal
    kwargs = {"eta": eta, "use_clipped_model_output": use_clipped_model_output}
    ours, reference = SculptScheduler(), DDIMScheduler()
    assert_same(sample_loop(ours, **kwargs), sample_loop(reference, **kwargs))


def test_clipped_model_output_is_the_default_and_ddims_choice_is_a_setting():
    # with clipping active, re-deriving the noise from the clipped x_0 changes a deterministic step
    default = sample_loop(SculptScheduler())
    assert_same(default, sample_loop(DDIMScheduler(), use_clipped_model_output=True))
    unclipped = sample_loop(SculptScheduler(use_clipped_model_output=False))
    assert_same(unclipped, sample_loop(DDIMScheduler()))
    assert_same(sample_loop(SculptScheduler(), use_clipped_model_output=False), unclipped)
    assert (default - unclipped).abs().max() > 1e-3


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_zero_snr_v_prediction_matches_ddim(prediction_type):
    settings = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}
    if prediction_type == "epsilon":
        # x_0 is not recoverable from a noise prediction at zero SNR (t = 999 is on the trailing grid)
        with pytest.raises(ValueError, match="v_prediction"):
            sample_loop(SculptScheduler(prediction_type=prediction_type, **settings))
        return
    ours = SculptScheduler(prediction_type=prediction_type, **settings)
    reference = DDIMScheduler(prediction_type=prediction_type, **settings)
    assert_same(sample_loop(ours), sample_loop(reference))


# ---------------------------------------------------------------------------------------------------------------------
# eta = 1 is DDPMScheduler


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("timestep_spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_eta_one_matches_ddpm(beta_schedule, prediction_type, timestep_spacing, clip_sample):
    settings = {"prediction_type": prediction_type, "timestep_spacing": timestep_spacing, "clip_sample": clip_sample}
    ours = SculptScheduler(**schedule_config(beta_schedule), eta=1.0, **settings)
    reference = DDPMScheduler(**schedule_config(beta_schedule), **settings)
    assert_same(sample_loop(ours), sample_loop(reference))


# DDPMScheduler's "fixed_large_log" takes the square root of log(beta_t) (NaN; see test_fixed_large_log); the other
# five variance types are compared on all three spacings ("trailing" ends at t = 99 > 0, where DDPM still adds noise)
@pytest.mark.parametrize("timestep_spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(
    "variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]
)
def test_eta_one_matches_ddpm_variance_types(variance_type, timestep_spacing):
    settings = {"variance_type": variance_type, "timestep_spacing": timestep_spacing}
    ours, reference = SculptScheduler(eta=1.0, **settings), DDPMScheduler(**settings)
    assert_same(sample_loop(ours, variance_type=variance_type), sample_loop(reference, variance_type=variance_type))


def test_fixed_large_log():
    reference = sample_loop(DDPMScheduler(variance_type="fixed_large_log"))
    assert torch.isnan(reference).any()  # the diffusers behaviour this scheduler does not copy
    ours = sample_loop(SculptScheduler(eta=1.0, variance_type="fixed_large_log"))
    assert_same(ours, sample_loop(SculptScheduler(eta=1.0, variance_type="fixed_large")))


@pytest.mark.parametrize("reference_class", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_thresholding_matches(prediction_type, reference_class):
    settings = {"thresholding": True, "sample_max_value": 1.2, "prediction_type": prediction_type}
    is_ddim = reference_class is DDIMScheduler
    ours = SculptScheduler(eta=0.0 if is_ddim else 1.0, use_clipped_model_output=not is_ddim, **settings)
    thresholded = sample_loop(ours)
    assert_same(thresholded, sample_loop(reference_class(**settings)))
    # the threshold acts: without it the result differs
    unthresholded = sample_loop(SculptScheduler(eta=ours.config.eta, prediction_type=prediction_type))
    assert (thresholded - unthresholded).abs().max() > 1e-3


# DDPMScheduler's own arithmetic rounds differently from formula (12) where abar_{t-1} -> 1 (its 1 - abar_t / abar_{t-1}
# loses ~1e-4 relative precision for t < 10): eta = 1 computes DDPM's way, so that all 1000 training steps, every
# variance type included, give DDPMScheduler's samples bit for bit
@pytest.mark.parametrize(
    "variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]
)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_full_chain_without_set_timesteps_matches_ddpm_exactly(prediction_type, variance_type):
    settings = {"prediction_type": prediction_type, "variance_type": variance_type}
    ours, reference = SculptScheduler(eta=1.0, **settings), DDPMScheduler(**settings)
    results = []
    for scheduler in (ours, reference):
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(SHAPE, generator=generator)
        for t in scheduler.timesteps:
            model_output = dummy_model(sample, t, scheduler.alphas_cumprod, prediction_type)
            if variance_type in ("learned", "learned_range"):
                model_output = torch.cat([model_output, predicted_variance_channels(sample, variance_type)], dim=1)
            sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
        results.append(sample)
    assert torch.isfinite(results[1]).all()
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


@pytest.mark.parametrize("timestep, prev_timestep", [(999, 500), (500, 0), (2, 1), (1, 0)])
def test_eta_one_step_is_ddpm_step_bit_for_bit(timestep, prev_timestep):
    # one step with noise, also where abar_{t-1} is close to 1 (prev_timestep = 0, 1), as the last steps of a chain
    ours, reference = SculptScheduler(eta=1.0), DDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    outputs = []
    for scheduler in (ours, reference):
        scheduler.set_timesteps(timesteps=[timestep, prev_timestep])
        outputs.append(scheduler.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(outputs[0].prev_sample, outputs[1].prev_sample, atol=0, rtol=0)
    torch.testing.assert_close(outputs[0].pred_original_sample, outputs[1].pred_original_sample, atol=0, rtol=0)


def test_custom_timesteps_match_ddpm():
    timesteps = [950, 700, 420, 101, 37, 5]
    ours, reference = SculptScheduler(eta=1.0), DDPMScheduler()
    assert_same(sample_loop(ours, None, timesteps=timesteps), sample_loop(reference, None, timesteps=timesteps))
    assert ours.timesteps.tolist() == timesteps and ours.num_inference_steps == len(timesteps)


def test_step_eta_overrides_the_config():
    ours = SculptScheduler(eta=1.0, use_clipped_model_output=False)
    assert_same(sample_loop(ours, eta=0.0), sample_loop(DDIMScheduler()))
    assert_same(sample_loop(SculptScheduler(), eta=1.0), sample_loop(DDPMScheduler()))


@pytest.mark.parametrize("eta", [0.5, 0.99])
@pytest.mark.parametrize("timestep, prev_timestep", [(999, 500), (500, 0), (2, 1), (1, 0)])
def test_eta_below_one_is_formula_12_in_float64(timestep, prev_timestep, eta):
    # Without noise a step is sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - eta^2 beta_tilde_t) eps (DDIM formula (12)),
    # here computed in float64 from the same float32 alphas_cumprod; also where abar_{t-1} is close to 1 (prev_timestep
    # = 0, 1), where beta_t = 1 - abar_t / abar_{t-1} in float32 would be off by ~1e-4 relative
    scheduler = SculptScheduler(eta=eta, clip_sample=False)
    scheduler.set_timesteps(timesteps=[timestep, prev_timestep])
    generator = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    output = scheduler.step(model_output, timestep, sample, variance_noise=torch.zeros(SHAPE))
    abar_t = scheduler.alphas_cumprod[timestep].double()
    abar_prev = scheduler.alphas_cumprod[prev_timestep].double()
    posterior_variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    x0 = (sample.double() - (1 - abar_t) ** 0.5 * model_output.double()) / abar_t**0.5
    expected = abar_prev**0.5 * x0 + (1 - abar_prev - eta**2 * posterior_variance) ** 0.5 * model_output.double()
    torch.testing.assert_close(output.prev_sample.double(), expected, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(output.pred_original_sample.double(), x0, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# timesteps


def test_previous_timestep_is_the_next_grid_point():
    # "linspace" 10 of 1000: 999, 888, ..., 111, 0. DDIM would step from 111 to 111 - 1000 // 10 = 11, not a grid point
    scheduler = SculptScheduler(timestep_spacing="linspace")
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert scheduler.previous_timestep(scheduler.timesteps[-2]) == 0
    assert scheduler.previous_timestep(scheduler.timesteps[-1]) == -1
    reference = DDIMScheduler(timestep_spacing="linspace")
    reference.set_timesteps(10)
    assert reference.timesteps.tolist() == scheduler.timesteps.tolist()
    # "trailing" 7 of 1000: 999, 856, ...; DDIM would step from 999 to 999 - 1000 // 7 = 857
    scheduler = SculptScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(7)
    assert scheduler.timesteps[:2].tolist() == [999, 856] and scheduler.previous_timestep(999) == 856
    # so with eta = 0 the result differs from DDIMScheduler's off-grid step
    ours = sample_loop(SculptScheduler(timestep_spacing="linspace"))
    assert (ours - sample_loop(DDIMScheduler(timestep_spacing="linspace"))).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(
    "timestep_spacing, steps_offset, num_inference_steps, timestep",
    [
        ("leading", 0, 50, 1),
        ("leading", 0, 50, 49),
        ("leading", 1, 5, 0),
        ("trailing", 0, 7, 500),
        ("linspace", 0, 10, 5),
    ],
)
def test_off_grid_timesteps_step_as_ddim(timestep_spacing, steps_offset, num_inference_steps, timestep, eta):
    # diffusers' DDIM tests step from timesteps such as 1 after set_timesteps(50) (grid 980, ..., 20, 0): DDIMScheduler
    # steps to t - T // n, and so does this scheduler, for any eta
    settings = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    ours = SculptScheduler(use_clipped_model_output=False, **settings)
    reference = DDIMScheduler(**settings)
    ours.set_timesteps(num_inference_steps)
    reference.set_timesteps(num_inference_steps)
    assert timestep not in ours.timesteps.tolist()
    assert ours.previous_timestep(timestep) == timestep - 1000 // num_inference_steps
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(SHAPE, generator=generator)
    model_output = dummy_model(sample, torch.tensor(timestep), ours.alphas_cumprod, "epsilon")
    outputs = [
        scheduler.step(model_output, timestep, sample, eta, generator=torch.Generator().manual_seed(1))
        for scheduler in (ours, reference)
    ]
    assert_same(outputs[0].prev_sample, outputs[1].prev_sample)
    assert_same(outputs[0].pred_original_sample, outputs[1].pred_original_sample)


def test_previous_timestep_returns_a_tensor_for_a_tensor():
    # as DDPMScheduler.previous_timestep, also after the last grid point (-1) and off the grid
    scheduler = SculptScheduler()
    scheduler.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    previous = [scheduler.previous_timestep(t) for t in scheduler.timesteps]
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 for t in previous)
    assert [t.item() for t in previous] == [87, 50, 1, 0, -1]
    assert scheduler.previous_timestep(87) == 50 and isinstance(scheduler.previous_timestep(87), int)
    assert scheduler.previous_timestep(0) == -1 and isinstance(scheduler.previous_timestep(0), int)
    scheduler.set_timesteps(10)
    assert scheduler.previous_timestep(torch.tensor(5)).item() == -95
    assert isinstance(scheduler.previous_timestep(torch.tensor(5)), torch.Tensor)


@pytest.mark.parametrize(
    "timestep, match",
    [
        (1000, r"integer in \[0, 1000\)"),
        (-1, r"integer in \[0, 1000\)"),
        (2.5, r"integer in \[0, 1000\)"),
        (torch.tensor(-3), r"integer in \[0, 1000\)"),
        (51, "not one of the custom `timesteps`"),
    ],
)
def test_bad_timestep_raises(timestep, match):
    # custom timesteps have no step size, so there is no off-grid step from them (DDPMScheduler raises an IndexError)
    scheduler = SculptScheduler()
    scheduler.set_timesteps(timesteps=[100, 50, 0])
    sample = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=match):
        scheduler.step(sample, timestep, sample)
    with pytest.raises(ValueError, match=match):
        scheduler.previous_timestep(timestep)


@pytest.mark.parametrize("timestep_spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_inference_steps", [1, 7, 10, 1000])
def test_timesteps_match_ddpm(timestep_spacing, num_inference_steps):
    ours, reference = (
        SculptScheduler(timestep_spacing=timestep_spacing),
        DDPMScheduler(timestep_spacing=timestep_spacing),
    )
    ours.set_timesteps(num_inference_steps)
    reference.set_timesteps(num_inference_steps)
    assert ours.timesteps.dtype == torch.int64
    assert ours.timesteps.tolist() == reference.timesteps.tolist()
    assert ours.num_inference_steps == num_inference_steps


def test_return_dict_false_and_output_class():
    scheduler = SculptScheduler()
    scheduler.set_timesteps(2)
    sample = torch.ones(SHAPE)
    output = scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[0], sample)
    prev_sample, pred_original_sample = scheduler.step(
        torch.zeros(SHAPE), scheduler.timesteps[0], sample, return_dict=False
    )
    assert isinstance(output, SculptSchedulerOutput)
    torch.testing.assert_close(output.prev_sample, prev_sample)
    torch.testing.assert_close(output.pred_original_sample, pred_original_sample)
    assert prev_sample.shape == SHAPE


def test_sampling_never_mutates_the_config():
    scheduler = SculptScheduler(eta=1.0, variance_type="learned_range")
    config = dict(scheduler.config)
    sample_loop(scheduler, variance_type="learned_range")
    assert dict(scheduler.config) == config


# ---------------------------------------------------------------------------------------------------------------------
# config interchange


def saved_config(scheduler, folder) -> dict:
    """The config as a saved folder gives it to `from_config`: with `_class_name`, as `from_pretrained` reads it."""
    scheduler.save_config(folder)
    return SculptScheduler.load_config(folder)


@pytest.mark.parametrize("from_disk", [False, True])
def test_from_config_keeps_the_sampler_of_the_saving_scheduler(tmp_path, from_disk):
    def load(reference, **kwargs):
        config = saved_config(reference, tmp_path / "saved") if from_disk else reference.config
        assert ("_class_name" in config) == from_disk
        scheduler = SculptScheduler.from_config(config, **kwargs)
        return scheduler.config.eta, scheduler.config.use_clipped_model_output

    # DDPMScheduler's ancestral sampler, DDIMScheduler's deterministic step (which keeps the model's noise)
    assert load(DDPMScheduler()) == (1.0, True)
    assert load(DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")) == (1.0, True)
    assert load(DDIMScheduler()) == (0.0, False)
    # an explicit value wins: a keyword argument, or the key in the config
    assert load(DDPMScheduler(), eta=0.0) == (0.0, True)
    assert load(DDIMScheduler(), eta=0.3, use_clipped_model_output=True) == (0.3, True)
    assert load(SculptScheduler(eta=0.5)) == (0.5, True)
    assert load(DDPMScheduler.from_config(SculptScheduler(eta=0.5).config)) == (0.5, True)
    # any other config gets this class's defaults; DPMSolverMultistepScheduler's `variance_type` does not make it DDPM,
    # and its saved `variance_type: null` (no learned variance) loads as the default "fixed_small"
    assert load(SculptScheduler()) == (0.0, True)
    assert load(DPMSolverMultistepScheduler()) == (0.0, True)
    config = saved_config(DPMSolverMultistepScheduler(), tmp_path / "dpm") if from_disk else {"variance_type": None}
    assert config["variance_type"] is None
    assert SculptScheduler.from_config(config).config.variance_type == "fixed_small"


def test_from_pretrained_of_a_ddpm_folder_samples_as_ddpm(tmp_path):
    reference = DDPMScheduler(clip_sample=False)
    reference.save_pretrained(tmp_path)
    ours = SculptScheduler.from_pretrained(tmp_path)
    assert ours.config.eta == 1.0
    assert_same(sample_loop(ours), sample_loop(reference))
    # saved again, it stays DDPM's sampler
    ours.save_pretrained(tmp_path / "again")
    assert SculptScheduler.from_pretrained(tmp_path / "again").config.eta == 1.0
    explicit = dict(saved_config(reference, tmp_path / "explicit"), eta=0.0)
    assert SculptScheduler.from_config(explicit).config.eta == 0.0


def test_loads_from_ddpm_and_ddim_configs_and_back():
    ddpm_config = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large").config
    ours = SculptScheduler.from_config(ddpm_config)
    assert ours.config.variance_type == "fixed_large" and ours.config.eta == 1.0
    assert_same(sample_loop(ours), sample_loop(DDPMScheduler.from_config(ddpm_config)))
    ddim = DDIMScheduler.from_config(SculptScheduler(timestep_spacing="trailing", clip_sample=False).config)
    assert isinstance(ddim, DDIMScheduler) and ddim.config.timestep_spacing == "trailing"
    assert_same(sample_loop(SculptScheduler.from_config(ddim.config)), sample_loop(ddim))


def test_save_pretrained_round_trip(tmp_path):
    scheduler = SculptScheduler(beta_schedule="scaled_linear", eta=0.5, prediction_type="v_prediction", steps_offset=1)
    scheduler.save_pretrained(tmp_path)
    loaded = SculptScheduler.from_pretrained(tmp_path)
    public_config = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
    assert {key: value for key, value in loaded.config.items() if not key.startswith("_")} == public_config
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "SculptScheduler"
    assert_same(sample_loop(loaded), sample_loop(scheduler))


def test_hand_written_config_with_unknown_and_missing_keys_loads(tmp_path):
    config = {"_class_name": "SomeOtherScheduler", "num_train_timesteps": 500, "eta": 1.0, "not_a_key": 3}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    scheduler = SculptScheduler.from_pretrained(tmp_path)
    assert scheduler.config.num_train_timesteps == 500 and scheduler.config.eta == 1.0
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.clip_sample is True
    assert_same(sample_loop(scheduler), sample_loop(DDPMScheduler(num_train_timesteps=500)))


# ---------------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta_schedule": "cosine"}, "beta_schedule.*squaredcos_cap_v2"),
        ({"prediction_type": "noise"}, "prediction_type.*v_prediction"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing.*trailing"),
        ({"variance_type": "small"}, "variance_type.*fixed_small"),
        ({"eta": 1.5}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas.*num_train_timesteps"),
        ({"num_train_timesteps": 2, "trained_betas": [0.1, float("nan")]}, "trained_betas.*finite"),
        ({"beta_start": float("nan")}, "beta_start.*finite"),
        ({"beta_end": float("inf")}, "beta_end.*finite"),
        ({"clip_sample_range": float("nan")}, "clip_sample_range.*finite"),
        ({"dynamic_thresholding_ratio": float("nan")}, "dynamic_thresholding_ratio.*finite"),
        ({"sample_max_value": float("nan")}, "sample_max_value.*finite"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SculptScheduler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_inference_steps": 1001}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({}, "num_inference_steps.*timesteps"),
        ({"num_inference_steps": 10, "timesteps": [10, 0]}, "num_inference_steps.*timesteps"),
        ({"timesteps": [10, 20]}, "timesteps.*descending"),
        ({"timesteps": [10, 10, 0]}, "timesteps.*descending"),
        ({"timesteps": [1000, 0]}, "timesteps.*num_train_timesteps"),
        ({"timesteps": [10, -1]}, "timesteps.*num_train_timesteps"),
    ],
)
def test_bad_set_timesteps_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SculptScheduler().set_timesteps(**kwargs)


def test_bad_step_arguments_raise():
    scheduler = SculptScheduler(variance_type="learned_range")
    scheduler.set_timesteps(10)
    t, sample = scheduler.timesteps[0], torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="eta"):
        scheduler.step(sample, t, sample, eta=-0.1)
    with pytest.raises(ValueError, match="generator.*variance_noise"):
        scheduler.step(sample, t, sample, eta=1.0, generator=torch.Generator(), variance_noise=sample)
    # a learned variance needs the model's variance channels, but only when noise is added
    with pytest.raises(ValueError, match="variance_type.*twice the channels"):
        scheduler.step(sample, t, sample, eta=1.0)
    assert scheduler.step(sample, t, sample, eta=0.0).prev_sample.shape == SHAPE


@pytest.mark.parametrize(
    "variance_type, model_output_shape",
    [
        ("fixed_small", (1, 3, 8, 8)),  # would broadcast over the batch
        ("fixed_small", (2, 3, 8, 1)),  # would broadcast over the width
        ("fixed_small", (2, 6, 8, 8)),  # variance channels the config does not read
        ("learned_range", (2, 5, 8, 8)),
    ],
)
def test_step_refuses_a_model_output_of_another_shape(variance_type, model_output_shape):
    scheduler = SculptScheduler(variance_type=variance_type, eta=1.0)
    scheduler.set_timesteps(10)
    sample = torch.zeros(SHAPE)
    expected = rf"`model_output` has shape \({', '.join(map(str, model_output_shape))}\) but `sample` has shape"
    with pytest.raises(ValueError, match=expected + r" \(2, 3, 8, 8\)"):
        scheduler.step(torch.zeros(model_output_shape), scheduler.timesteps[0], sample)


@pytest.mark.parametrize(
    "timesteps, match",
    [
        (torch.tensor([-1, 5]), r"must lie in \[0, 1000\).*\[-1, 5\]"),
        (torch.tensor([5, 1000]), r"must lie in \[0, 1000\)"),
        (torch.tensor([1, 2, 3]), r"one timestep per sample \(2\) or one for all, got 3"),
    ],
)
def test_add_noise_and_get_velocity_refuse_bad_timesteps(timesteps, match):
    # a negative timestep would index abar from the end of the schedule, i.e. almost pure noise
    scheduler = SculptScheduler()
    sample = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=match):
        scheduler.add_noise(sample, sample, timesteps)
    with pytest.raises(ValueError, match=match):
        scheduler.get_velocity(sample, sample, timesteps)


# ---------------------------------------------------------------------------------------------------------------------
# regression pin


def test_golden_sampling_loop():
    # computed once with this implementation (eta = 0.5, between DDIM and DDPM, so no reference scheduler pins it)
    scheduler = SculptScheduler(eta=0.5, variance_type="fixed_small", clip_sample=True)
    result = sample_loop(scheduler)[-1]
    assert result.shape == SHAPE
    assert result.sum().item() == pytest.approx(GOLDEN_SUM, abs=1e-3)
    assert result.abs().mean().item() == pytest.approx(GOLDEN_ABS_MEAN, abs=1e-5)
    torch.testing.assert_close(result[0, 0, 0, :4], torch.tensor(GOLDEN_SLICE), atol=1e-5, rtol=0)


GOLDEN_SUM = 253.8593
GOLDEN_ABS_MEAN = 0.8951686
GOLDEN_SLICE = [0.7338504, 0.9895676, 0.9886240, 0.9976324]
