import json

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler, SculptFlowSchedulerOutput, shift_sigmas


SHAPE = (2, 3, 4, 4)


def velocity_model(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A fixed, nonlinear, time-dependent stand-in for a trained flow model."""
    t = timestep / 1000
    return torch.sin(3 * sample) * t + 0.3 * sample - 0.5 * (1 - t)


def make_pair() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    return x0, noise


def sample_loop(scheduler, num_inference_steps=None, sigmas=None, model=velocity_model, seed=0):
    """The denoising loop of diffusers' flow pipelines (StableDiffusion3Pipeline step 7), without the network."""
    # diffusers' flow schedulers have no `init_noise_sigma` (it is 1) nor `scale_model_input`; FlowMatchHeun takes no
    # `sigmas`
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps)
    else:
        scheduler.set_timesteps(sigmas=sigmas)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=generator)
    for t in scheduler.timesteps:
        sample = scheduler.step(model(sample, t), t, sample, generator=generator, return_dict=False)[0]
    return sample


# --- training side: interpolation and velocity --------------------------------------------------------------------


def test_add_noise_is_the_straight_path():
    scheduler = SculptFlowScheduler()
    x0, noise = make_pair()
    timesteps = torch.tensor([0.0, 1000.0])
    noisy = scheduler.add_noise(x0, noise, timesteps)
    assert torch.equal(noisy[0], x0[0])
    assert torch.equal(noisy[1], noise[1])

    timesteps = torch.tensor([250.0, 612.5])
    noisy = scheduler.add_noise(x0, noise, timesteps)
    for i, t in enumerate([0.25, 0.6125]):
        torch.testing.assert_close(noisy[i], (1 - t) * x0[i] + t * noise[i], rtol=0, atol=1e-6)

    # integer timesteps (as DDPM training scripts draw them) mean the same times
    torch.testing.assert_close(
        scheduler.add_noise(x0, noise, torch.tensor([250, 600])),
        scheduler.add_noise(x0, noise, torch.tensor([250.0, 600.0])),
    )


def test_get_velocity_is_the_time_derivative_of_add_noise():
    scheduler = SculptFlowScheduler()
    x0, noise = make_pair()
    timesteps = torch.tensor([100.0, 700.0])
    velocity = scheduler.get_velocity(x0, noise, timesteps)
    assert torch.equal(velocity, noise - x0)
    # d x_t / d t with t = timesteps / 1000; the path is linear, so a finite difference is exact up to rounding
    step = 100.0
    difference = scheduler.add_noise(x0, noise, timesteps + step) - scheduler.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(difference / (step / 1000), velocity, rtol=0, atol=1e-4)
    # x0_hat = x_t - t * v recovers x_0 (what step() reports as pred_original_sample)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    t = (timesteps / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy - t * velocity, x0, rtol=0, atol=1e-6)


def test_scale_noise_matches_diffusers():
    ours = SculptFlowScheduler(shift=3.0)
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise = make_pair()
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    # training-style lookup: timesteps from the grid, one per sample
    timestep = ours.timesteps[[1, 4]]
    expected = theirs.scale_noise(x0, timestep, noise)
    assert torch.equal(ours.scale_noise(x0, timestep, noise), expected)
    sigma = ours.sigmas[[1, 4]].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(expected, (1 - sigma) * x0 + sigma * noise)
    # img2img: the pipeline sets the begin index and passes the first timestep
    ours.set_begin_index(2)
    theirs.set_begin_index(2)
    timestep = ours.timesteps[2].repeat(2)
    assert torch.equal(ours.scale_noise(x0, timestep, noise), theirs.scale_noise(x0, timestep, noise))


def test_shift_sigmas_formula():
    sigmas = torch.tensor([1.0, 0.5, 0.1, 0.0])
    assert torch.equal(shift_sigmas(sigmas, 1.0), sigmas)
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), torch.tensor([1.0, 0.75, 0.3 / 1.2, 0.0]))


# --- sampling: exact on a linear toy problem ----------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_inference_steps", [1, 2, 7, 50])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_exact_velocity_reaches_x0_from_pure_noise(solver, shift, num_inference_steps, dtype, atol):
    # With the exact velocity eps - x0 the flow ODE is a straight line, so any grid from t = 1 to 0 lands on x0,
    # up to rounding: float32 accumulates ~1e-7 per step, so the 1e-6 bound is checked in float64.
    x0, noise = (tensor.to(dtype) for tensor in make_pair())
    scheduler = SculptFlowScheduler(shift=shift, solver=solver)
    scheduler.set_timesteps(num_inference_steps)
    assert scheduler.sigmas[0] == 1.0
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = scheduler.step(noise - x0, t, sample)
        assert isinstance(output, SculptFlowSchedulerOutput)
        torch.testing.assert_close(output.pred_original_sample, x0, rtol=0, atol=atol)
        sample = output.prev_sample
    assert sample.dtype == dtype
    torch.testing.assert_close(sample, x0, rtol=0, atol=atol)
    assert scheduler.step_index == len(scheduler.timesteps)


def test_exact_velocity_with_custom_sigmas():
    x0, noise = (tensor.double() for tensor in make_pair())
    for solver in ["euler", "heun"]:
        scheduler = SculptFlowScheduler(shift=2.0, solver=solver)
        scheduler.set_timesteps(sigmas=[1.0, 0.9, 0.4, 0.05])
        sample = noise
        for t in scheduler.timesteps:
            sample = scheduler.step(noise - x0, t, sample).prev_sample
        torch.testing.assert_close(sample, x0, rtol=0, atol=1e-6)


def test_heun_is_second_order():
    # dx/dt = x has the exact solution x(0) = x(1) * exp(-1): Heun's error shrinks ~4x per halving, Euler's ~2x.
    def linear_model(sample, timestep):
        return sample

    x1 = torch.ones(SHAPE)
    exact = x1 * torch.exp(torch.tensor(-1.0))

    def error(solver, steps):
        scheduler = SculptFlowScheduler(solver=solver)
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist())
        sample = x1
        for t in scheduler.timesteps:
            sample = scheduler.step(linear_model(sample, t), t, sample).prev_sample
        return (sample - exact).abs().max().item()

    # the last step to t = 0 is Euler in both solvers (Karras Algorithm 1), which limits Heun to about 3x here
    assert error("heun", 40) < error("heun", 20) / 3.0
    assert error("euler", 40) > error("euler", 20) / 2.2
    assert error("heun", 20) < error("euler", 20) / 5


# --- swap with diffusers' FlowMatch schedulers --------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_inference_steps", [1, 4, 28])
def test_euler_matches_flow_match_euler(shift, num_inference_steps):
    ours = SculptFlowScheduler(shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        sample_loop(ours, num_inference_steps), sample_loop(theirs, num_inference_steps), rtol=0, atol=1e-6
    )


def test_euler_matches_flow_match_euler_with_custom_sigmas():
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    ours = SculptFlowScheduler(shift=3.0)
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(sigmas=sigmas)
    theirs.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=1e-6)
    torch.testing.assert_close(sample_loop(ours, sigmas=sigmas), sample_loop(theirs, sigmas=sigmas), rtol=0, atol=1e-6)


def test_custom_timesteps_are_used_unshifted():
    # Documented difference: diffusers shifts the sigmas derived from custom timesteps but not the timesteps.
    timesteps = [1000.0, 750.0, 500.0, 250.0]
    ours = SculptFlowScheduler(shift=1.0)
    theirs = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ours.set_timesteps(timesteps=timesteps)
    theirs.set_timesteps(timesteps=timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas)

    ours = SculptFlowScheduler(shift=3.0)
    ours.set_timesteps(timesteps=timesteps)
    assert ours.timesteps.tolist() == timesteps
    assert ours.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # both given: accepted when consistent, i.e. timesteps = shifted sigmas * num_train_timesteps
    ours.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0, 750.0])
    assert ours.sigmas.tolist() == [1.0, 0.75, 0.0]


def test_stochastic_sampling_matches_flow_match_euler():
    ours = SculptFlowScheduler(shift=3.0, stochastic_sampling=True)
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    torch.testing.assert_close(sample_loop(ours, 5, seed=3), sample_loop(theirs, 5, seed=3), rtol=0, atol=1e-6)
    assert not torch.allclose(sample_loop(ours, 5, seed=3), sample_loop(ours, 5, seed=4))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_inference_steps", [1, 3, 10])
def test_heun_matches_flow_match_heun(shift, num_inference_steps):
    ours = SculptFlowScheduler(shift=shift, solver="heun")
    theirs = FlowMatchHeunDiscreteScheduler(shift=shift)
    assert ours.order == theirs.order == 2
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert len(ours.timesteps) == 2 * num_inference_steps - 1
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    # The one difference: diffusers computes the derivative as (x - x0_hat) / sigma, algebraically v, but in float32
    # that detour loses digits at small sigma (up to ~2e-5 here). We use v directly and stay within 1e-6 of the same
    # algorithm run in float64.
    ours_sample = sample_loop(ours, num_inference_steps)
    torch.testing.assert_close(ours_sample, sample_loop(theirs, num_inference_steps), rtol=0, atol=1e-4)
    ours.set_timesteps(num_inference_steps)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double()
    for t in ours.timesteps:
        sample = ours.step(velocity_model(sample, t), t, sample).prev_sample
    torch.testing.assert_close(ours_sample.double(), sample, rtol=0, atol=1e-6)


def test_from_config_both_ways():
    flow_match = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True, shift_terminal=None)
    ours = SculptFlowScheduler.from_config(flow_match.config)
    assert (ours.config.shift, ours.config.stochastic_sampling, ours.config.solver) == (3.0, True, "euler")
    assert ours.config.prediction_type == "flow"
    back = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert (back.config.shift, back.config.stochastic_sampling) == (3.0, True)

    # A Flux-style config (dynamic shifting, unsupported) loads with a plain static shift; diffusers keeps its
    # foreign keys as hidden config entries, so swapping back restores the original scheduler.
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=512)
    ours = SculptFlowScheduler.from_config(flux.config)
    ours.set_timesteps(4)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(4)
    assert torch.equal(ours.timesteps, reference.timesteps)
    back = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert (back.config.use_dynamic_shifting, back.config.base_image_seq_len) == (True, 512)

    heun = FlowMatchHeunDiscreteScheduler(shift=2.0)
    ours = SculptFlowScheduler.from_config(heun.config, solver="heun")
    assert (ours.config.shift, ours.order) == (2.0, 2)
    back = FlowMatchHeunDiscreteScheduler.from_config(ours.config)
    assert back.config.shift == 2.0
    assert SculptFlowScheduler.from_config(ours.config).config.solver == "heun"
    assert set(SculptFlowScheduler._compatibles) <= {cls.__name__ for cls in ours.compatibles}


def test_wrong_family_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="prediction_type.*SculptScheduler"):
        SculptFlowScheduler.from_config(DDPMScheduler(prediction_type="v_prediction").config)
    DDPMScheduler().save_config(tmp_path)
    with pytest.raises(ValueError, match="got 'epsilon'"):
        SculptFlowScheduler.from_pretrained(tmp_path)


# --- saving and loading -------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    scheduler = SculptFlowScheduler(num_train_timesteps=500, shift=2.5, solver="heun")
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "SculptFlowScheduler"
    assert saved["prediction_type"] == "flow"
    loaded = SculptFlowScheduler.from_pretrained(tmp_path)
    assert {key: value for key, value in loaded.config.items() if not key.startswith("_")} == {
        "num_train_timesteps": 500,
        "shift": 2.5,
        "solver": "heun",
        "stochastic_sampling": False,
        "prediction_type": "flow",
    }
    scheduler.set_timesteps(6)
    loaded.set_timesteps(6)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)


def test_unknown_and_missing_config_keys_load(tmp_path):
    config = {"_class_name": "SculptFlowScheduler", "num_train_timesteps": 1000, "some_future_key": 1}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    loaded = SculptFlowScheduler.from_pretrained(tmp_path)
    assert loaded.config.shift == 1.0
    assert loaded.config.solver == "euler"
    scheduler = SculptFlowScheduler()
    loaded.set_timesteps(5)
    scheduler.set_timesteps(5)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)


# --- interface and errors -----------------------------------------------------------------------------------------


def test_interface():
    scheduler = SculptFlowScheduler(solver="euler")
    assert scheduler.init_noise_sigma == 1.0
    assert scheduler.order == 1
    assert len(scheduler) == 1000
    sample = torch.randn(SHAPE)
    assert scheduler.scale_model_input(sample, torch.tensor(500.0)) is sample
    scheduler.set_timesteps(4, device="cpu")
    assert scheduler.num_inference_steps == 4
    assert scheduler.timesteps.dtype == torch.float32
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    output = scheduler.step(sample, scheduler.timesteps[0], sample, return_dict=False)
    assert isinstance(output, tuple) and len(output) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "rk4"}, "`solver` must be 'euler' or 'heun'"),
        ({"shift": 0.0}, "`shift` must be a finite number > 0"),
        ({"shift": -1.0}, "`shift` must be a finite number > 0"),
        ({"shift": float("nan")}, "`shift` must be a finite number > 0"),
        ({"shift": float("inf")}, "`shift` must be a finite number > 0"),
        ({"prediction_type": "epsilon"}, "`prediction_type` of SculptFlowScheduler is always 'flow'"),
        ({"solver": "heun", "stochastic_sampling": True}, "`stochastic_sampling=True` is defined for"),
    ],
)
def test_init_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SculptFlowScheduler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "Pass `num_inference_steps`"),
        ({"num_inference_steps": 1001}, "`num_inference_steps` must be between 1 and"),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be between 1 and"),
        ({"sigmas": [0.5, 0.8]}, "`sigmas` must be a non-empty, strictly decreasing"),
        ({"sigmas": [1.0, 0.5, 0.5]}, "`sigmas` must be a non-empty, strictly decreasing"),
        ({"sigmas": [1.5, 0.5]}, r"`sigmas` must be .* in \(0, 1.0\]"),
        ({"sigmas": [1.0, 0.0]}, "`sigmas` must be a non-empty"),
        ({"sigmas": [1.0, float("nan"), 0.5]}, "`sigmas` must be a non-empty"),
        ({"timesteps": [1000.0, float("nan")]}, "`timesteps` must be a non-empty"),
        ({"timesteps": [500.0, 900.0]}, "`timesteps` must be a non-empty, strictly decreasing"),
        ({"sigmas": [1.0, 0.5], "timesteps": [1000.0]}, "`sigmas` .* and `timesteps` .* must have the same length"),
        ({"sigmas": [1.0, 0.5], "timesteps": [1000.0, 400.0]}, "`timesteps` must equal the shifted `sigmas`"),
        ({"num_inference_steps": 3, "sigmas": [1.0, 0.5]}, r"`num_inference_steps` \(3\) must equal the length"),
    ],
)
def test_set_timesteps_errors(kwargs, match):
    scheduler = SculptFlowScheduler(shift=3.0)
    with pytest.raises(ValueError, match=match):
        scheduler.set_timesteps(**kwargs)


def test_step_errors():
    scheduler = SculptFlowScheduler()
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="Call `set_timesteps` before `step`"):
        scheduler.step(sample, torch.tensor(1000.0), sample)
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="not its index from `enumerate"):
        scheduler.step(sample, 0, sample)
    with pytest.raises(ValueError, match="not its index from `enumerate"):
        scheduler.step(sample, torch.tensor(0), sample)


@pytest.mark.parametrize("model_output_shape", [(1, 3, 4, 4), (2, 3, 4, 1), (2, 6, 4, 4)])
def test_step_refuses_a_model_output_of_another_shape(model_output_shape):
    # (1, ...) and (..., 1) would broadcast silently
    scheduler = SculptFlowScheduler()
    scheduler.set_timesteps(3)
    sample = torch.randn(SHAPE)
    expected = rf"`model_output` has shape \({', '.join(map(str, model_output_shape))}\) but `sample` has shape"
    with pytest.raises(ValueError, match=expected + r" \(2, 3, 4, 4\)"):
        scheduler.step(torch.zeros(model_output_shape), scheduler.timesteps[0], sample)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_off_grid_step_and_step_past_the_end_raise(solver):
    scheduler = SculptFlowScheduler(solver=solver)
    scheduler.set_timesteps(3)
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"`timestep` 512.5 is not one of `scheduler.timesteps`"):
        scheduler.step(sample, torch.tensor(512.5), sample)
    with pytest.raises(ValueError, match=r"`timestep` 512.5 is not one of `scheduler.timesteps`"):
        scheduler.scale_noise(sample, torch.tensor([512.5, 512.5]), sample)
    for t in scheduler.timesteps:
        sample = scheduler.step(velocity_model(sample, t), t, sample).prev_sample
    with pytest.raises(ValueError, match=f"All {len(scheduler.timesteps)} calls of the sampling grid are done"):
        scheduler.step(sample, scheduler.timesteps[-1], sample)
    # set_timesteps starts a new run
    scheduler.set_timesteps(3)
    for t in scheduler.timesteps:
        sample = scheduler.step(velocity_model(sample, t), t, sample).prev_sample
    assert torch.isfinite(sample).all()


@pytest.mark.parametrize(
    "timesteps, match",
    [
        (torch.tensor([-1.0, 5.0]), r"must lie in \[0, 1000\]"),
        (torch.tensor([5.0, 1000.5]), r"must lie in \[0, 1000\]"),
        (torch.tensor([5.0, float("nan")]), r"must lie in \[0, 1000\]"),
        (torch.tensor([-3, 5]), r"must lie in \[0, 1000\]"),
        (torch.tensor([1.0, 2.0, 3.0]), r"one timestep per sample \(2\) or one for all, got 3"),
    ],
)
def test_add_noise_refuses_bad_timesteps(timesteps, match):
    # outside [0, 1000] the straight path would be extrapolated: x_t = 1.0005 eps - 0.0005 x_0 at t = 1000.5
    x0, noise = make_pair()
    with pytest.raises(ValueError, match=match):
        SculptFlowScheduler().add_noise(x0, noise, timesteps)


# --- golden numbers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, expected_sum, expected_mean_abs",
    [
        ("euler", 18.846613, 0.5818468),
        ("heun", 22.687981, 0.5995983),
    ],
)
def test_full_loop_golden_numbers(solver, expected_sum, expected_mean_abs):
    # pinned from this implementation (diffusers 0.42.1, torch 2.13 CPU); the Euler loop equals diffusers' own
    scheduler = SculptFlowScheduler(shift=3.0, solver=solver)
    sample = sample_loop(scheduler, 10)
    assert abs(sample.sum().item() - expected_sum) < 1e-3
    assert abs(sample.abs().mean().item() - expected_mean_abs) < 1e-5


# --- inside a stock diffusers pipeline ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd3_transformer():
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=8,
    ).eval()


def run_sd3_pipeline(transformer, scheduler, num_inference_steps=3):
    # Precomputed prompt embeddings stand in for the three text encoders, which the pipeline then never calls;
    # output_type="latent" skips the VAE. Everything else is the stock StableDiffusion3Pipeline loop.
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = torch.linspace(-1, 1, 2 * 5 * 16).reshape(2, 5, 16)
    pooled_prompt_embeds = torch.linspace(-1, 1, 2 * 16).reshape(2, 16)
    return pipe(
        prompt_embeds=prompt_embeds[1:],
        pooled_prompt_embeds=pooled_prompt_embeds[1:],
        negative_prompt_embeds=prompt_embeds[:1],
        negative_pooled_prompt_embeds=pooled_prompt_embeds[:1],
        guidance_scale=3.0,
        height=64,
        width=64,
        num_inference_steps=num_inference_steps,
        generator=generator,
        output_type="latent",
    ).images


def test_runs_in_stock_sd3_pipeline(tiny_sd3_transformer):
    ours = SculptFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    latents = run_sd3_pipeline(tiny_sd3_transformer, ours)
    expected = run_sd3_pipeline(tiny_sd3_transformer, FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)

    ours = SculptFlowScheduler(shift=3.0, solver="heun")
    latents = run_sd3_pipeline(tiny_sd3_transformer, ours)
    expected = run_sd3_pipeline(tiny_sd3_transformer, FlowMatchHeunDiscreteScheduler(shift=3.0))
    # atol as in test_heun_matches_flow_match_heun (diffusers' float32 derivative detour)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-4)
    # the pipeline ran both Heun calls of every step: 2 * 3 - 1 model calls
    assert ours.step_index == 5
