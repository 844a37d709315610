"""SculptPipeline with one of diffusers' guiders as its `guider` component (`diffusers.guiders`)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    FrequencyDecoupledGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.guiders.guider_utils import rescale_noise_cfg
from test_pipeline_sculpt import DenoiserCalls

from sculptdiff import SculptFlowScheduler, SculptPipeline


BACKBONES = ["unet", "dit"]
CONDITIONINGS = ["class", "text"]


def build_guider(name: str):
    """Each guider this test file covers, set up so that it departs from plain CFG at w = 3 (APG with eta = 0 drops
    the update's part parallel to the conditional prediction; CFG-Zero* zeroes the first step; FDG guides the two
    frequency bands with different scales)."""
    if name == "cfg":
        return ClassifierFreeGuidance(guidance_scale=3.0)
    if name == "apg":
        return AdaptiveProjectedGuidance(guidance_scale=3.0, eta=0.0)
    if name == "cfg_zero_star":
        return ClassifierFreeZeroStarGuidance(guidance_scale=3.0)
    if name == "tcfg":
        return TangentialClassifierFreeGuidance(guidance_scale=3.0)
    # needs kornia (the test extra installs it: a missing install fails here instead of skipping)
    return FrequencyDecoupledGuidance(guidance_scales=[3.0, 1.5])


GUIDERS = ["cfg", "apg", "cfg_zero_star", "tcfg", "fdg"]


@pytest.fixture
def build_pipeline(build_tiny_pipeline, build_tiny_text_pipeline):
    """`build_pipeline(backbone, conditioning, guider=None)`: the tiny pipeline on classes or on text, with `guider`
    registered as its component."""

    def build(backbone: str, conditioning: str, guider=None) -> SculptPipeline:
        if conditioning == "text":
            pipe = build_tiny_text_pipeline(backbone=backbone)
        else:
            pipe = build_tiny_pipeline(backbone=backbone)
        pipe.register_modules(guider=guider)
        return pipe

    return build


def condition(conditioning: str) -> dict:
    if conditioning == "text":
        return {"prompt": ["digit two", "digit four"]}
    return {"class_labels": [1, 3]}


def generate(pipe, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(**kwargs).images


# without a guider: the pipeline's own classifier-free guidance, unchanged


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_without_a_guider_cfg_is_one_batched_pass_of_the_formula(conditioning, build_pipeline):
    pipe = build_pipeline("unet", conditioning)
    assert pipe.guider is None and pipe.config.guider == (None, None)
    calls = DenoiserCalls(pipe.unet)
    latents = generate(
        pipe, guidance_scale=3.0, guidance_rescale=0.5, num_inference_steps=3, **condition(conditioning)
    )
    assert calls.batch_sizes == [4, 4, 4]

    # the same loop by hand, bit for bit: one batch [uncond, cond] per step, the formula, the rescale, the step
    scheduler = pipe.scheduler
    scheduler.set_timesteps(3)
    generator = torch.Generator().manual_seed(0)
    expected = torch.randn((2, 1, 8, 8), generator=generator)
    if conditioning == "text":
        cond, uncond = pipe.encode_prompt(["digit two", "digit four"], torch.device("cpu"))
        inputs = {"encoder_hidden_states": torch.cat([uncond, cond])}
    else:
        inputs = {"class_labels": torch.tensor([5, 5, 1, 3])}
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = torch.cat([expected] * 2)
            uncond_output, cond_output = pipe.unet(model_input, t.expand(4), **inputs).sample.chunk(2)
            guided = uncond_output + 3.0 * (cond_output - uncond_output)
            guided = rescale_noise_cfg(guided, cond_output, 0.5)
            expected = scheduler.step(guided, t, expected, generator=generator).prev_sample
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


# with a guider: diffusers' protocol in the loop


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_classifier_free_guidance_guider_equals_the_built_in_cfg(backbone, conditioning, build_pipeline):
    pipe = build_pipeline(backbone, conditioning)
    built_in = generate(pipe, guidance_scale=3.0, guidance_rescale=0.5, **condition(conditioning))
    unguided = generate(pipe, **condition(conditioning))

    pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=3.0, guidance_rescale=0.5))
    calls = DenoiserCalls(pipe.denoiser)
    guided = generate(pipe, **condition(conditioning))
    # the guider's two batches run as one batched pass, as the built-in CFG runs them
    assert calls.batch_sizes == [4, 4]
    torch.testing.assert_close(guided, built_in, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(guided, unguided, atol=1e-3)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_guidance_interval_guides_only_inside_it(backbone, build_pipeline):
    # arXiv 2404.07724: guidance on steps int(0.25 * 4) = 1 and 2 of 0..3, plain conditional sampling elsewhere
    pipe = build_pipeline(backbone, "class", guider=ClassifierFreeGuidance(guidance_scale=3.0, start=0.25, stop=0.75))
    calls = DenoiserCalls(pipe.denoiser)
    interval = generate(pipe, class_labels=[1, 3], num_inference_steps=4)
    assert calls.batch_sizes == [2, 4, 4, 2]

    pipe.register_modules(guider=None)
    unguided = generate(pipe, class_labels=[1, 3], num_inference_steps=4)
    guided = generate(pipe, class_labels=[1, 3], num_inference_steps=4, guidance_scale=3.0)
    assert not torch.allclose(interval, unguided, atol=1e-3)
    assert not torch.allclose(interval, guided, atol=1e-3)


def test_guidance_interval_is_a_fraction_of_the_loop_of_a_second_order_scheduler(build_tiny_pipeline):
    # Heun's 3 steps are 5 model calls (timesteps t0, t1, t1, t2, t2): `stop=0.5` guides calls 0 and 1 of the 5,
    # the whole first step (predictor and corrector), not a fraction of `num_inference_steps`
    pipe = build_tiny_pipeline(prediction_type="flow", scheduler=SculptFlowScheduler(solver="heun"))
    pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=3.0, stop=0.5))
    calls = DenoiserCalls(pipe.unet)
    generate(pipe, class_labels=[1, 3], num_inference_steps=3)
    assert calls.batch_sizes == [4, 4, 2, 2, 2]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("guider_name", GUIDERS)
def test_each_guider_samples_deterministically(guider_name, conditioning, backbone, build_pipeline):
    pipe = build_pipeline(backbone, conditioning, guider=build_guider(guider_name))
    calls = DenoiserCalls(pipe.denoiser)
    first = generate(pipe, **condition(conditioning))
    assert calls.batch_sizes == [4, 4]
    assert first.shape == (2, 1, 8, 8) and torch.isfinite(first).all()
    torch.testing.assert_close(generate(pipe, **condition(conditioning)), first, rtol=0, atol=0)

    plain_cfg = build_pipeline(backbone, conditioning, guider=ClassifierFreeGuidance(guidance_scale=3.0))
    differs_from_cfg = not torch.allclose(first, generate(plain_cfg, **condition(conditioning)), atol=1e-4)
    assert differs_from_cfg == (guider_name != "cfg")


def test_adaptive_projected_guidance_keeping_the_whole_update_is_cfg(build_pipeline):
    # APG with eta = 1 and no norm threshold keeps the parallel and the orthogonal part: the CFG update again
    apg = AdaptiveProjectedGuidance(guidance_scale=3.0, eta=1.0, adaptive_projected_guidance_rescale=0.0)
    with_apg = generate(build_pipeline("unet", "class", guider=apg), class_labels=[1, 3])
    with_cfg = generate(build_pipeline("unet", "class"), class_labels=[1, 3], guidance_scale=3.0)
    torch.testing.assert_close(with_apg, with_cfg, rtol=1e-5, atol=1e-5)


class HookedClassifierFreeGuidance(ClassifierFreeGuidance):
    """CFG whose `prepare_models`/`cleanup_models` are its own, as those of guiders that hook into the denoiser per
    batch (PAG, SLG): the pipeline must then run a pass per batch, between these calls."""

    def prepare_models(self, denoiser):
        super().prepare_models(denoiser)
        self.events.append("prepare")

    def cleanup_models(self, denoiser):
        self.events.append("cleanup")


def test_a_guider_that_prepares_the_denoiser_gets_a_pass_per_batch(build_pipeline):
    guider = HookedClassifierFreeGuidance(guidance_scale=3.0)
    guider.events = []
    pipe = build_pipeline("unet", "class", guider=guider)
    pipe.unet.register_forward_hook(record_forward_events(guider))
    separate = generate(pipe, class_labels=[1, 3])
    assert guider.events == ["prepare", "forward 2", "cleanup"] * 4

    batched = generate(
        build_pipeline("unet", "class", guider=ClassifierFreeGuidance(guidance_scale=3.0)), class_labels=[1, 3]
    )
    # batches of 2 and of 4 round differently in float32, nothing more
    torch.testing.assert_close(separate, batched, rtol=1e-3, atol=1e-4)


def record_forward_events(guider):
    def record(module, args, output):
        guider.events.append(f"forward {args[0].shape[0]}")

    return record


# saving and loading the guider with the pipeline, through both doors


def test_guider_is_saved_and_loaded_through_both_doors(tmp_path, build_pipeline):
    guider = AdaptiveProjectedGuidance(
        guidance_scale=2.5, eta=0.3, adaptive_projected_guidance_momentum=-0.5, stop=0.8
    )
    pipe = build_pipeline("unet", "class", guider=guider)
    expected = generate(pipe, class_labels=[1, 3], num_inference_steps=3)
    assert "guider/*" in pipe.hub_allow_patterns()
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)

    assert json.loads((folder / "model_index.json").read_text())["guider"] == [
        "diffusers",
        "AdaptiveProjectedGuidance",
    ]
    saved_config = json.loads((folder / "guider" / "guider_config.json").read_text())
    assert (saved_config["guidance_scale"], saved_config["eta"], saved_config["stop"]) == (2.5, 0.3, 0.8)

    loaded = SculptPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.guider) is AdaptiveProjectedGuidance
    assert {key: value for key, value in loaded.guider.config.items() if not key.startswith("_")} == {
        key: value for key, value in guider.config.items() if not key.startswith("_")
    }
    torch.testing.assert_close(generate(loaded, class_labels=[1, 3], num_inference_steps=3), expected, rtol=0, atol=0)

    # the trust_remote_code door, in a fresh process in which sculptdiff cannot be imported
    script = f"""
import sys
sys.modules["sculptdiff"] = None
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert type(pipe.guider).__name__ == "AdaptiveProjectedGuidance", type(pipe.guider)
assert pipe.guider.config.eta == 0.3 and pipe.guider.config.adaptive_projected_guidance_momentum == -0.5
latents = pipe(class_labels=[1, 3], num_inference_steps=3, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
torch.save(latents, {str(tmp_path / "remote.pt")!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), expected, rtol=0, atol=0)


def test_a_folder_without_a_guider_loads_without_one(tmp_path, build_pipeline):
    build_pipeline("unet", "class").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["guider"] == [None, None]
    assert not (tmp_path / "guider").exists()
    assert SculptPipeline.from_pretrained(tmp_path).guider is None
    assert DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True).guider is None

    # a guider given at load time joins the pipeline, and is saved with it from then on
    loaded = SculptPipeline.from_pretrained(tmp_path, guider=ClassifierFreeGuidance(guidance_scale=2.0, stop=0.5))
    assert loaded.config.guider == ("diffusers", "ClassifierFreeGuidance")
    loaded.save_pretrained(tmp_path / "with-guider")
    assert SculptPipeline.from_pretrained(tmp_path / "with-guider").guider.config.stop == 0.5


# conflicting arguments


@pytest.mark.parametrize("argument", [{"guidance_scale": 3.0}, {"guidance_scale": 1.0}, {"guidance_rescale": 0.5}])
def test_the_guider_owns_the_guidance_scale(argument, build_pipeline):
    pipe = build_pipeline("unet", "class", guider=ClassifierFreeGuidance(guidance_scale=3.0))
    name = next(iter(argument))
    with pytest.raises(ValueError, match=rf"`{name}=.*ClassifierFreeGuidance.*owns guidance.*pipe.guider.new"):
        generate(pipe, class_labels=[1, 3], **argument)


def test_a_guider_needs_a_condition(build_pipeline):
    pipe = build_pipeline("unet", "class", guider=ClassifierFreeGuidance(guidance_scale=3.0))
    with pytest.raises(ValueError, match=r"`guider` \(ClassifierFreeGuidance\) needs a condition"):
        generate(pipe, batch_size=2)


def test_a_guider_needs_a_model_trained_with_a_null_condition(build_tiny_pipeline):
    pipe = build_tiny_pipeline(conditioning_dropout_prob=0.0)
    pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=3.0))
    with pytest.raises(ValueError, match="conditioning_dropout_prob=0"):
        generate(pipe, class_labels=[1])


def test_a_guider_must_be_one_of_diffusers_guiders(build_pipeline):
    pipe = build_pipeline("unet", "class", guider=None)
    pipe.guider = "cfg"
    with pytest.raises(TypeError, match="`guider` must be one of diffusers' guiders.*got str"):
        generate(pipe, class_labels=[1])


def test_a_callback_cannot_change_the_guidance_scale_of_a_guider(build_pipeline):
    pipe = build_pipeline("unet", "class", guider=ClassifierFreeGuidance(guidance_scale=3.0))

    def cutoff(pipeline, step, timestep, callback_kwargs):
        pipeline._guidance_scale = 0.0
        return callback_kwargs

    with pytest.raises(ValueError, match=r"set `_guidance_scale` to 0.0.*`start`/`stop`"):
        generate(pipe, class_labels=[1], callback_on_step_end=cutoff)
