"""distill_sculpt.py (latent consistency distillation) and the pipeline's guidance-distilled sampling.

One real `accelerate launch` run distils a tiny saved teacher; resume, the DiT teacher and the refusals run in-process
(parse_args + main), which is faster. The student samples with diffusers' own LCMScheduler.
"""

import json
import os
import sys
from pathlib import Path

import launching
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler
from diffusers.guiders import ClassifierFreeGuidance
from PIL import Image
from safetensors.torch import load_file
from test_train_sculpt import load_script

from sculptdiff import SculptFlowScheduler, SculptPipeline, SculptScheduler


REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "training_scripts" / "distill_sculpt.py"
DIGIT_LABELS = {str(index): str(index) for index in range(10)}
# 16 digits at the teacher's 8x8, a 10-point solver grid on 100 training timesteps, an 8-wide w embedding
TINY_DISTILL = [
    "--max_train_samples", "16", "--train_batch_size", "4", "--seed", "0", "--num_ddim_timesteps", "10",
    "--time_cond_proj_dim", "8", "--num_validation_images", "2", "--validation_steps", "100", "--report_to", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


def save_teacher(folder: Path, build_tiny_pipeline, backbone: str = "unet", **overrides) -> str:
    """A tiny class-conditional digits teacher (10 classes, 8x8, 100 cosine timesteps) saved as a pipeline folder."""
    scheduler = overrides.pop("scheduler", None) or SculptScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"
    )
    denoiser = {"num_class_embeds": 10, "id2label": DIGIT_LABELS, **overrides}
    build_tiny_pipeline(scheduler=scheduler, backbone=backbone, **denoiser).save_pretrained(folder)
    return str(folder)


def count_calls(denoiser: torch.nn.Module) -> list[dict]:
    """Records, per forward call of `denoiser`, its batch size and whether a `timestep_cond` was passed."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({"batch": args[0].shape[0], "timestep_cond": kwargs.get("timestep_cond")})

    denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_accelerate_launch_distils_a_saved_teacher_into_an_lcm_pipeline(tmp_path, build_tiny_pipeline):
    # a real `accelerate launch` run: 4 steps, a checkpoint every 2
    teacher = save_teacher(tmp_path / "teacher", build_tiny_pipeline)
    output_dir = tmp_path / "student"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]
    args = ["--teacher", teacher, "--output_dir", str(output_dir), "--max_train_steps", "4"]
    args += ["--checkpointing_steps", "2", *TINY_DISTILL]
    env = {name: value for name, value in os.environ.items() if not name.startswith("ACCELERATE_")}
    result = launching.run(
        launch + args, env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT, timeout=launching.LAUNCH_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-5000:]

    for name in ("model_index.json", "README.md", "sample_grid.png", "training_args.json", "pipeline_sculpt.py"):
        assert (output_dir / name).is_file(), name
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == "LCMScheduler"
    assert scheduler_config["original_inference_steps"] == 10
    assert json.loads((output_dir / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 8
    # the saved student is the target network, the EMA the last checkpoint holds
    saved = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    target = load_file(output_dir / "checkpoint-4" / "unet_target" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[name], target[name]) for name in saved)

    card = (output_dir / "README.md").read_text()
    assert "LCM student of `teacher`" in card and "[1.0, 4.0]" in card and "num_inference_steps=4" in card
    assert "Left to right: 1, 2, 4 `LCMScheduler` steps" in card and "- lcm" in card
    # three panels (1, 2, 4 steps) of 10 class rows x 2 images of 8 px
    assert Image.open(output_dir / "sample_grid.png").size == (3 * 2 * 8, 10 * 8)

    # both loading doors give the same student; guided, it makes one un-doubled call per step (w is an input)
    for steps in (1, 2):
        outputs = []
        for pipe in (
            SculptPipeline.from_pretrained(output_dir),
            DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True),
        ):
            assert isinstance(pipe.scheduler, LCMScheduler)
            pipe.set_progress_bar_config(disable=True)
            calls = count_calls(pipe.denoiser)
            images = pipe(
                class_labels=[1, 7, 3],
                num_inference_steps=steps,
                guidance_scale=3.0,
                generator=torch.manual_seed(0),
                output_type="np",
            ).images
            assert [call["batch"] for call in calls] == [3] * steps
            assert all(call["timestep_cond"] is not None for call in calls)
            outputs.append(images)
        np.testing.assert_array_equal(outputs[0], outputs[1])


def distill_in_process(script, teacher: str, output_dir: Path, *args: str):
    script.main(script.parse_args(["--teacher", teacher, "--output_dir", str(output_dir), *TINY_DISTILL, *args]))


def test_resume_continues_exactly(script, tmp_path, build_tiny_pipeline):
    teacher = save_teacher(tmp_path / "teacher", build_tiny_pipeline)
    distill_in_process(script, teacher, tmp_path / "straight", "--max_train_steps", "4")
    distill_in_process(script, teacher, tmp_path / "resumed", "--max_train_steps", "2", "--checkpointing_steps", "2")
    distill_in_process(
        script, teacher, tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest"
    )
    straight = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    first_half = load_file(
        tmp_path / "resumed" / "checkpoint-2" / "unet_target" / "diffusion_pytorch_model.safetensors"
    )
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert not all(torch.equal(straight[name], first_half[name]) for name in straight)
    training_args = json.loads((tmp_path / "resumed" / "training_args.json").read_text())
    assert training_args["resumed_from"]["step"] == 2


def test_dit_teacher_distils_into_a_dit_student(script, tmp_path, build_tiny_pipeline):
    teacher = save_teacher(tmp_path / "teacher", build_tiny_pipeline, backbone="dit")
    distill_in_process(script, teacher, tmp_path / "student", "--max_train_steps", "2", "--loss_type", "huber")
    pipe = SculptPipeline.from_pretrained(tmp_path / "student")
    assert pipe.unet is None and pipe.transformer.config.time_cond_proj_dim == 8
    pipe.set_progress_bar_config(disable=True)
    calls = count_calls(pipe.denoiser)
    pipe(class_labels=[2, 5], num_inference_steps=1, guidance_scale=2.0, output_type="np")
    assert [call["batch"] for call in calls] == [2]


def test_text_teacher_distils_with_its_encoder(script, tmp_path, build_tiny_text_pipeline):
    teacher = tmp_path / "teacher"
    build_tiny_text_pipeline(scheduler=SculptScheduler(num_train_timesteps=100)).save_pretrained(teacher)
    data_dir = tmp_path / "images"
    data_dir.mkdir()
    with open(data_dir / "metadata.jsonl", "w") as f:
        for index, word in enumerate(["zero", "one", "two", "three"]):
            Image.new("L", (8, 8), index * 60).save(data_dir / f"{index}.png")
            f.write(json.dumps({"file_name": f"{index}.png", "text": f"a photo of digit {word}"}) + "\n")
    args = ["--max_train_steps", "2", "--train_data_dir", str(data_dir), "--caption_column", "text"]
    distill_in_process(script, str(teacher), tmp_path / "student", *args)

    pipe = SculptPipeline.from_pretrained(tmp_path / "student")
    assert pipe.text_encoder is not None and pipe.unet.config.time_cond_proj_dim == 8
    pipe.set_progress_bar_config(disable=True)
    calls = count_calls(pipe.denoiser)
    pipe(prompt="a photo of digit two", num_inference_steps=2, guidance_scale=2.0, output_type="np")
    assert [call["batch"] for call in calls] == [1, 1]
    assert "a photo of digit" in (tmp_path / "student" / "README.md").read_text()


def test_student_starts_as_the_teacher(script, build_tiny_unet):
    teacher = build_tiny_unet(num_class_embeds=10, id2label=DIGIT_LABELS)
    student = script.build_student(teacher, time_cond_proj_dim=8).eval()
    sample, timesteps, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    w_embedding = torch.randn(2, 8)
    with torch.no_grad():
        expected = teacher(sample, timesteps, class_labels=labels).sample
        actual = student(sample, timesteps, class_labels=labels, timestep_cond=w_embedding).sample
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_solver_and_consistency_function_are_the_samplers(script, prediction_type):
    scheduler = LCMScheduler(
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        original_inference_steps=10,
        prediction_type=prediction_type,
        clip_sample=True,
    )
    solver = script.DDIMSolver(scheduler.alphas_cumprod, 10, prediction_type, clip_range=1.0)
    # the skip-step grid of the solver is the grid LCMScheduler samples on with all of its steps
    scheduler.set_timesteps(10)
    assert solver.ddim_timesteps.flip(0).tolist() == scheduler.timesteps.tolist() == list(range(99, 0, -10))

    # the consistency function learned is what LCMScheduler.step returns as `denoised`, clipping included
    torch.manual_seed(0)
    sample, model_output = torch.randn(1, 1, 4, 4), 3 * torch.randn(1, 1, 4, 4)
    for step_index, t in enumerate(scheduler.timesteps[:3]):
        scheduler.set_timesteps(10)
        scheduler._step_index = step_index
        denoised = scheduler.step(model_output, t, sample, generator=torch.manual_seed(0)).denoised
        expected = script.consistency_function(solver, scheduler, model_output, t.reshape(1), sample)
        torch.testing.assert_close(expected, denoised)

    # a DDIM step of the exact x_0 and noise lands on the forward process at the previous grid point
    x0, noise, index = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4), torch.tensor([0, 4, 9])
    alphas_cumprod = scheduler.alphas_cumprod[[0, 39, 89]][:, None, None, None]
    expected = alphas_cumprod.sqrt() * x0 + (1 - alphas_cumprod).sqrt() * noise
    torch.testing.assert_close(solver.ddim_step(x0, noise, index), expected)


@pytest.mark.parametrize(
    "teacher_kind, message",
    [
        ("missing", "could not be loaded as a SculptPipeline"),
        ("flow", "flow-matching teacher"),
        ("unconditional", "it is unconditional"),
        ("no_null_condition", "without a null condition"),
        ("student", "already reads a guidance scale"),
    ],
)
def test_unsupported_teacher_is_refused_with_the_reason(script, tmp_path, build_tiny_pipeline, teacher_kind, message):
    folder = tmp_path / "teacher"
    if teacher_kind == "flow":
        save_teacher(folder, build_tiny_pipeline, scheduler=SculptFlowScheduler(), prediction_type="flow")
    elif teacher_kind == "unconditional":
        save_teacher(folder, build_tiny_pipeline, num_class_embeds=None, id2label=None)
    elif teacher_kind == "no_null_condition":
        save_teacher(folder, build_tiny_pipeline, conditioning_dropout_prob=0.0)
    elif teacher_kind == "student":
        save_teacher(folder, build_tiny_pipeline, time_cond_proj_dim=8)
    with pytest.raises(ValueError, match=message) as error:
        distill_in_process(script, str(folder), tmp_path / "student", "--max_train_steps", "1")
    assert "--teacher" in str(error.value)


def test_bad_guidance_range_fails_in_parse_args(script):
    with pytest.raises(ValueError, match="--w_min and --w_max"):
        script.parse_args(["--teacher", "x", "--w_min", "5", "--w_max", "2"])
    with pytest.raises(ValueError, match="--validation_inference_steps"):
        script.parse_args(["--teacher", "x", "--num_ddim_timesteps", "4", "--validation_inference_steps", "8"])


# The pipeline side: `timestep_cond` for a guidance-distilled denoiser, nothing changed for the others.


def lcm_pipeline(build_tiny_pipeline, backbone: str) -> SculptPipeline:
    """A tiny guidance-distilled student (random w projection) with diffusers' LCMScheduler."""
    scheduler = LCMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", original_inference_steps=10)
    return build_tiny_pipeline(scheduler=scheduler, backbone=backbone, time_cond_proj_dim=8)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_pipeline_passes_the_w_embedding_and_does_not_double_the_batch(build_tiny_pipeline, backbone):
    pipe = lcm_pipeline(build_tiny_pipeline, backbone)
    calls = count_calls(pipe.denoiser)
    images = {}
    for guidance_scale in (1.0, 3.0):
        images[guidance_scale] = pipe(
            class_labels=[0, 4],
            num_inference_steps=2,
            guidance_scale=guidance_scale,
            generator=torch.manual_seed(0),
            output_type="latent",
        ).images
    assert [call["batch"] for call in calls] == [2] * 4
    # the embedding of w - 1, as diffusers' LatentConsistencyModelPipeline embeds its guidance scale
    w = torch.tensor([2.0, 2.0])
    expected = pipe.get_guidance_scale_embedding(w, embedding_dim=8)
    torch.testing.assert_close(calls[-1]["timestep_cond"], expected, rtol=0, atol=0)
    assert (images[1.0] - images[3.0]).abs().max() > 1e-3


def test_guidance_embedding_is_diffusers_lcm_embedding(build_tiny_pipeline):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 0.5, 2.0, 7.5])
    pipe = lcm_pipeline(build_tiny_pipeline, "unet")
    for dim in (8, 15, 256):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(pipe, w, embedding_dim=dim)
        assert torch.equal(pipe.get_guidance_scale_embedding(w, embedding_dim=dim), expected)


def test_student_refuses_a_guider_and_guidance_rescale(build_tiny_pipeline):
    pipe = lcm_pipeline(build_tiny_pipeline, "unet")
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe(class_labels=[1], num_inference_steps=1, guidance_scale=2.0, guidance_rescale=0.5)
    pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=2.0))
    with pytest.raises(ValueError, match="takes no `guider`"):
        pipe(class_labels=[1], num_inference_steps=1)


def test_denoiser_without_time_cond_proj_dim_samples_as_classifier_free_guidance(build_tiny_pipeline):
    # the pipeline's loop against the CFG update written out: one doubled batch (null class first), no w input
    pipe = build_tiny_pipeline(scheduler=SculptScheduler(num_train_timesteps=100, timestep_spacing="trailing"))
    calls = count_calls(pipe.denoiser)
    images = pipe(
        class_labels=[1, 3],
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.manual_seed(0),
        output_type="pt",
    ).images
    assert [call["batch"] for call in calls] == [4, 4] and all(call["timestep_cond"] is None for call in calls)

    latents = torch.randn((2, 1, 8, 8), generator=torch.manual_seed(0))
    scheduler = SculptScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(2)
    labels = torch.tensor([5, 5, 1, 3])
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond, cond = pipe.denoiser(torch.cat([latents] * 2), t.expand(4), class_labels=labels).sample.chunk(2)
            latents = scheduler.step(uncond + 3.0 * (cond - uncond), t, latents).prev_sample
    assert torch.equal(images, (latents / 2 + 0.5).clamp(0, 1))
