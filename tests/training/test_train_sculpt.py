"""train_sculpt.py end to end: real `accelerate launch` subprocesses with a tiny U-Net and a few steps.

Errors that must come before the first step are checked in-process (parse_args + main), which is faster.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import launching
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sculptdiff.models.transformers.dit_sculpt import SculptDiT2DModel
from sculptdiff.models.unet_sculpt import SculptUNet2DModel
from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline
from sculptdiff.schedulers.scheduling_sculpt import SculptScheduler
from sculptdiff.schedulers.scheduling_sculpt_flow import SculptFlowScheduler


REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "training_scripts" / "train_sculpt.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
LAUNCH += ["--dynamo_backend", "no"]
# 16 digits at 8x8, 100 training timesteps, 2 sampling steps ...
TINY_RUN = [
    "--resolution", "8", "--max_train_samples", "16", "--train_batch_size", "4", "--seed", "0",
    "--num_train_timesteps", "100", "--lr_warmup_steps", "1",
    "--validation_steps", "100", "--num_validation_images", "2", "--validation_inference_steps", "2",
]  # fmt: skip
# ... with a 2-level U-Net of 8-16 channels
TINY = TINY_RUN + [
    "--block_out_channels", "8", "16", "--norm_num_groups", "4", "--attention_levels", "0", "1",
    "--attention_head_dim", "8",
]  # fmt: skip
# ... or with a DiT of 1 block of width 16 (2 heads of 8) over 2x2 patches
TINY_DIT = TINY_RUN + [
    "--model_type", "dit", "--num_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "8",
]  # fmt: skip
OUTPUT_FILES = {
    "model_index.json",
    "README.md",
    "sample_grid.png",
    "training_args.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
}


def subprocess_env(**extra: str) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("ACCELERATE_", "HF_ENDPOINT"))}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "0"})
    env.update(extra)
    return env


def launch_command(output_dir: Path, *args: str, num_processes: int = 1, model: list[str] = TINY) -> list[str]:
    launcher = LAUNCH + ["--num_processes", str(num_processes)]
    if num_processes > 1:
        # accelerate 1.15 starts CPU processes with torchrun only through --multi_gpu; ACCELERATE_USE_CPU=1 makes
        # them a gloo MULTI_CPU group (`--cpu --num_processes 2` would run a single process). Port 0: accelerate picks
        # a free port, so two launches at once (pytest -n 2) do not join one rendezvous on the default 29500 and hang
        launcher += ["--multi_gpu", "--main_process_port", "0"]
    return [*launcher, str(SCRIPT), *model, "--output_dir", str(output_dir), *args]


def train(
    output_dir: Path,
    *args: str,
    num_processes: int = 1,
    env: dict | None = None,
    check: bool = True,
    model: list[str] = TINY,
):
    """Run train_sculpt.py with `model` (the tiny run and denoiser flags) and `args`."""
    env = env or subprocess_env(**({"ACCELERATE_USE_CPU": "1"} if num_processes > 1 else {}))
    result = launching.run(
        launch_command(output_dir, *args, num_processes=num_processes, model=model),
        env=env,
        cwd=REPO_ROOT,
        timeout=launching.LAUNCH_TIMEOUT,
    )
    if check:
        assert result.returncode == 0, result.stderr[-5000:]
    return result


def files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def load_script(script: Path = SCRIPT):
    """The training script at `script` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample(pipe: SculptPipeline, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.manual_seed(0)
    return pipe(class_labels=[1, 7], num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The default run (class-conditional digits) with tiny overrides and a checkpoint every 2 steps."""
    output_dir = tmp_path_factory.mktemp("run") / "sculpt-digits"
    train(output_dir, "--max_train_steps", "3", "--checkpointing_steps", "2")
    return output_dir


def test_default_run_writes_every_output(trained):
    assert OUTPUT_FILES <= files(trained)
    assert (trained / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert any(name.startswith("logs/") and "tfevents" in name for name in files(trained))
    assert not any(name.startswith(".") or ".tmp" in name or ".staging" in name for name in files(trained))

    config = json.loads((trained / "unet" / "config.json").read_text())
    assert config["prediction_type"] == "epsilon"
    assert config["conditioning_dropout_prob"] == 0.1
    assert config["id2label"] == {str(index): str(index) for index in range(10)}
    assert config["num_class_embeds"] == 10 and config["in_channels"] == 1 and config["sample_size"] == 8

    # the grid: one row per class, --num_validation_images columns
    assert Image.open(trained / "sample_grid.png").size == (2 * 8, 10 * 8)
    args = json.loads((trained / "training_args.json").read_text())
    assert args["max_train_steps"] == 3 and "hub_token" not in args

    pipe = SculptPipeline.from_pretrained(trained)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert sample(pipe).shape == (2, 8, 8, 1)

    # the saved U-Net holds the EMA weights, not the training weights of the last step
    last = load_file(trained / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(trained / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(last[name], ema[name]) for name in last)


def run_card_snippet(output_dir: Path, tmp_path: Path) -> str:
    """Runs the Python snippets of `output_dir`'s model card, one after the other as a reader pastes them, in
    `tmp_path`, checks the 8x8 `sample.png` (and `sample_guided.png` of the guider snippet) they write, and returns
    them."""
    snippet = "\n".join(re.findall(r"```python\n(.*?)```", (output_dir / "README.md").read_text(), re.DOTALL))
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "sample.png").size == (8, 8)
    if "guider=" in snippet:
        assert Image.open(tmp_path / "sample_guided.png").size == (8, 8)
    return snippet


def test_model_card_usage_snippet_runs_as_printed(trained, tmp_path):
    card = (trained / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "- sculptdiff" in card
    snippet = run_card_snippet(trained, tmp_path)
    assert f'from_pretrained("{trained}")' in snippet
    # the class model's card shows the measured guider; the digits note is there because it trained on the digits
    assert "ClassifierFreeGuidance(guidance_scale=1.5, start=0.4, stop=0.9)" in snippet
    assert "this setting measured 99.6% class accuracy" in card


def test_resume_after_kill_is_exact(tmp_path):
    """kill -9 after the first checkpoint, resume from `latest`: weights, EMA and optimizer equal an uninterrupted run.

    24 samples in batches of 4 are 6 steps per epoch: the resume lands mid-epoch and crosses two epoch ends.
    """
    args = ["--max_train_steps", "14", "--checkpointing_steps", "4", "--max_train_samples", "24"]
    args += ["--lr_warmup_steps", "3", "--snr_gamma", "5.0", "--random_flip"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    train(uninterrupted, *args, "--checkpoints_total_limit", "2")
    assert sorted(path.name for path in uninterrupted.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]

    process = subprocess.Popen(
        launch_command(interrupted, *args),
        env=subprocess_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (interrupted / "checkpoint-4").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model_index.json").exists(), "the run finished before it could be killed"
    # a broken newer checkpoint is reported and skipped by `latest`
    (interrupted / "checkpoint-999" / "unet").mkdir(parents=True)
    (interrupted / "checkpoint-999" / "unet" / "config.json").write_text("{")

    resumed = train(interrupted, *args, "--resume_from_checkpoint", "latest")
    assert re.search(r"Skipping checkpoint .*checkpoint-999: .* is missing", resumed.stderr)
    assert re.search(r"Resuming from checkpoint .*checkpoint-(4|8|12)\b", resumed.stderr)

    expected, actual = uninterrupted / "checkpoint-12", interrupted / "checkpoint-12"
    for weights in ("unet", "unet_ema"):
        a = load_file(expected / weights / "diffusion_pytorch_model.safetensors")
        b = load_file(actual / weights / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), weights
    ema_config = json.loads((actual / "unet_ema" / "config.json").read_text())
    assert ema_config["optimization_step"] == 12
    a, b = (torch.load(path / "optimizer.bin", weights_only=True) for path in (expected, actual))
    assert a["param_groups"] == b["param_groups"]
    assert all(
        torch.equal(a["state"][index][name], b["state"][index][name])
        for index in a["state"]
        for name in a["state"][index]
    )
    final = (uninterrupted, interrupted)
    a, b = (load_file(path / "unet" / "diffusion_pytorch_model.safetensors") for path in final)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_two_processes_double_the_batch_and_write_once(tmp_path):
    output_dir = tmp_path / "out"
    result = train(output_dir, "--max_train_steps", "2", "--checkpointing_steps", "1", num_processes=2)
    assert "Distributed environment: DistributedType.MULTI_CPU" in result.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in result.stderr
    # issue 18 part 4: several processes keep accelerate's split of the cores
    assert "torch uses 1 CPU thread(s) per process (OMP_NUM_THREADS=1, 2 process(es))" in result.stderr
    assert OUTPUT_FILES <= files(output_dir)
    # one process logs: a single TensorBoard event file for the scalars
    assert len([name for name in files(output_dir) if name.startswith("logs/") and "tfevents" in name]) <= 2
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= files(output_dir / "checkpoint-2")

    # EMA: one update per optimisation step: ema_1 = w_1, ema_2 = d_2 ema_1 + (1 - d_2) w_2, d_2 = 1 - 2^-3/4
    w1 = load_file(output_dir / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(output_dir / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(output_dir / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    decay = 1 - 2 ** (-3 / 4)
    for name in w1:
        torch.testing.assert_close(ema[name], decay * w1[name] + (1 - decay) * w2[name])
    saved = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[name], ema[name]) for name in ema)
    assert sample(SculptPipeline.from_pretrained(output_dir)).shape == (2, 8, 8, 1)


def finite_weights(folder: Path) -> bool:
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    return all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_divergence_names_a_checkpoint_whose_weights_train_on(tmp_path):
    """Issue 12.4: the checkpoint named after a divergence must be one whose weights gave a finite loss.

    Warm-up makes step 1's learning rate 0 (checkpoint-1 = the initial weights); step 2 applies ~1e30 and
    checkpoint-2 holds finite but huge weights whose forward pass overflows at step 3.
    """
    output_dir = tmp_path / "out"
    args = ["--max_train_steps", "4", "--checkpointing_steps", "1", "--lr_scheduler", "constant_with_warmup"]
    args += ["--lr_warmup_steps", "2"]
    result = train(output_dir, *args, "--learning_rate", "1e30", check=False)
    assert result.returncode != 0
    assert re.search(r"TrainingDivergedError: Training stopped at step 3: the loss is (nan|inf)", result.stderr)
    assert re.search(r"checkpoint-2 holds the weights that gave this loss: do not resume from it", result.stderr)
    assert re.search(r"The newest good checkpoint is \S*checkpoint-1: resume from it", result.stderr)
    assert finite_weights(output_dir / "checkpoint-2" / "unet")
    assert finite_weights(output_dir / "checkpoint-1" / "unet")
    SculptUNet2DModel.from_pretrained(output_dir / "checkpoint-1", subfolder="unet")
    assert not (output_dir / "checkpoint-3").exists() and not (output_dir / "model_index.json").exists()

    # following the advice works: the named checkpoint trains on with a sane learning rate
    resumed = train(output_dir, *args, "--resume_from_checkpoint", str(output_dir / "checkpoint-1"))
    assert "learning_rate: 1e+30 in the checkpoint, 0.001 now" in resumed.stderr
    assert finite_weights(output_dir / "unet")


def test_divergence_on_the_last_step_keeps_a_good_output(tmp_path):
    """Issue 12.4: `--learning_rate 1e30 --max_train_steps 1` exits non-zero and leaves the earlier output alone."""
    output_dir = tmp_path / "out"
    train(output_dir, "--max_train_steps", "1")
    before = {name: (output_dir / name).read_bytes() for name in OUTPUT_FILES}
    args = ["--max_train_steps", "1", "--learning_rate", "1e30", "--lr_scheduler", "constant"]
    result = train(output_dir, *args, check=False)
    assert result.returncode != 0
    assert "The final weights give a non-finite loss" in result.stderr and "keeps what it held" in result.stderr
    assert {name: (output_dir / name).read_bytes() for name in OUTPUT_FILES} == before


def test_checkpointing_steps_do_not_change_the_weights(tmp_path):
    """Issue 12.5: saving the EMA model must not draw from the training RNG."""
    args = ["--max_train_steps", "4", "--max_train_samples", "8"]
    often, rarely = tmp_path / "often", tmp_path / "rarely"
    train(often, *args, "--checkpointing_steps", "1")
    train(rarely, *args, "--checkpointing_steps", "100")
    assert (often / "checkpoint-3").is_dir() and not (rarely / "checkpoint-3").exists()
    a, b = (load_file(path / "unet" / "diffusion_pytorch_model.safetensors") for path in (often, rarely))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_latest_resumes_only_a_checkpoint_of_the_same_run(tmp_path):
    """Issue 12.2 and 12.3: another run's checkpoint is refused by `latest`; an explicit path applies this run's
    learning rate and says so, in the log and in training_args.json."""
    output_dir = tmp_path / "shared"
    train(output_dir, "--max_train_steps", "4", "--checkpointing_steps", "2")

    other = train(output_dir, "--max_train_steps", "4", "--learning_rate", "5e-4", "--seed", "1",
                  "--resume_from_checkpoint", "latest", check=False)  # fmt: skip
    assert other.returncode != 0
    message = other.stderr[other.stderr.index("ValueError: The newest checkpoint") :]
    assert (
        "learning_rate: 0.001 in the checkpoint, 0.0005 now" in message
        and "seed: 0 in the checkpoint, 1 now" in message
    )
    assert (
        "Use another --output_dir" in message and f"--resume_from_checkpoint {output_dir / 'checkpoint-4'}" in message
    )
    assert not re.search(r"Resuming from", other.stderr)

    shorter = train(output_dir, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", check=False)
    assert shorter.returncode != 0 and "is at step 4, past --max_train_steps 3" in shorter.stderr

    # on purpose: the explicit path resumes with the new learning rate, applied from step 3
    args = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "5e-4", "--lr_scheduler"]
    explicit = train(output_dir, *args, "constant", "--resume_from_checkpoint", "checkpoint-2")
    assert "was trained with other settings: learning_rate: 0.001 in the checkpoint, 0.0005 now" in explicit.stderr
    optimizer = torch.load(output_dir / "checkpoint-4" / "optimizer.bin", weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == [5e-4]
    training_args = json.loads((output_dir / "training_args.json").read_text())
    assert training_args["learning_rate"] == 5e-4
    assert training_args["resumed_from"]["checkpoint"] == "checkpoint-2"
    assert training_args["resumed_from"]["settings_before"] == {"learning_rate": 0.001, "lr_scheduler": "cosine"}
    card = (output_dir / "README.md").read_text()
    assert "- `learning_rate`: 0.001 until step 2, then 0.0005" in card
    assert "- `lr_scheduler`: cosine until step 2, then constant" in card


def test_latest_skips_checkpoints_with_truncated_files(tmp_path):
    """Issue 12.8: every file of a checkpoint is read back before `latest` chooses it."""
    output_dir = tmp_path / "out"
    args = ["--max_train_steps", "5", "--checkpointing_steps", "1"]
    train(output_dir, *args)
    expected = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    broken = {
        5: "optimizer.bin",
        4: "scheduler.bin",
        3: "random_states_0.pkl",
        2: "unet_ema/diffusion_pytorch_model.safetensors",
    }
    for step, name in broken.items():
        path = output_dir / f"checkpoint-{step}" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    resumed = train(output_dir, *args, "--resume_from_checkpoint", "latest")
    for step, name in broken.items():
        assert re.search(rf"Skipping checkpoint \S*checkpoint-{step}: {re.escape(name)} is unreadable", resumed.stderr)
    assert re.search(r"Resuming from checkpoint \S*checkpoint-1\b", resumed.stderr)
    # the resume is exact: the same weights as the unbroken run
    actual = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_fine_tuning_a_saved_pipeline(trained, tmp_path):
    output_dir = tmp_path / "tuned"
    train(output_dir, "--max_train_steps", "2", "--pretrained_model_name_or_path", str(trained))
    base = load_file(trained / "unet" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == tuned.keys() and any(not torch.equal(base[name], tuned[name]) for name in base)
    config = json.loads((output_dir / "unet" / "config.json").read_text())
    assert config["id2label"]["7"] == "7" and config["conditioning_dropout_prob"] == 0.1
    card = (output_dir / "README.md").read_text()
    assert f"fine-tuned from `{trained.name}`" in card and str(trained) not in card
    assert sample(SculptPipeline.from_pretrained(output_dir)).shape == (2, 8, 8, 1)


def test_flow_training_saves_a_flow_pipeline_that_reloads_and_guides(tmp_path):
    output_dir = tmp_path / "flow"
    train(output_dir, "--max_train_steps", "2", "--prediction_type", "flow", "--weighting_scheme", "logit_normal")
    config = json.loads((output_dir / "unet" / "config.json").read_text())
    assert config["prediction_type"] == "flow" and config["conditioning_dropout_prob"] == 0.1
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == "SculptFlowScheduler"

    pipe = SculptPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is SculptFlowScheduler
    guided = pipe(class_labels=[1, 7], num_inference_steps=2, guidance_scale=3.0, generator=torch.manual_seed(0))
    assert len(guided.images) == 2
    # the saved objective refuses a scheduler of the other family
    pipe.scheduler = SculptScheduler()
    with pytest.raises(ValueError, match="flow-matching objective"):
        sample(pipe)


@pytest.mark.parametrize(
    "args",
    [
        ["--prediction_type", "v_prediction", "--rescale_betas_zero_snr", "--snr_gamma", "5", "--noise_offset", "0.1"],
        ["--prediction_type", "sample", "--snr_gamma", "5"],
    ],
    ids=["v_prediction-zero_snr-min_snr-noise_offset", "sample-min_snr"],
)
def test_other_objectives_save_what_they_trained(tmp_path, args):
    output_dir = tmp_path / "out"
    train(output_dir, "--max_train_steps", "2", *args)
    prediction_type = args[1]
    assert json.loads((output_dir / "unet" / "config.json").read_text())["prediction_type"] == prediction_type
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == prediction_type
    assert scheduler_config["rescale_betas_zero_snr"] == ("--rescale_betas_zero_snr" in args)
    assert json.loads((output_dir / "training_args.json").read_text())["snr_gamma"] == 5.0

    pipe = SculptPipeline.from_pretrained(output_dir)
    if "--rescale_betas_zero_snr" in args:
        # zero terminal SNR: sampling starts from pure noise at t = T - 1
        assert pipe.scheduler.alphas_cumprod[-1] == 0
    images = sample(pipe)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_training_in_a_vae_latent_space(tmp_path, tiny_vae):
    vae_dir = tmp_path / "vae"
    tiny_vae.save_pretrained(vae_dir)
    output_dir = tmp_path / "out"
    # 16 px RGB digits -> 8x8x4 latents for the 2-level U-Net
    train(output_dir, "--max_train_steps", "2", "--resolution", "16", "--vae_name_or_path", str(vae_dir))
    assert {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"} <= files(output_dir)
    config = json.loads((output_dir / "unet" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"], config["sample_size"]) == (4, 4, 8)
    # latents are not confined to [-1, 1]: no x_0 clipping
    assert json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False
    # one row per digit class, --num_validation_images 2 per row, decoded to 16 px
    assert Image.open(output_dir / "sample_grid.png").size == (2 * 16, 10 * 16)

    pipe = SculptPipeline.from_pretrained(output_dir)
    assert pipe.vae is not None and pipe.vae_scale_factor == 2
    images = sample(pipe)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_resolution_defaults_to_the_vaes_or_16(script, tmp_path, tiny_vae):
    # train_vae.py saves the resolution it trained at as sample_size; 20 px cannot pass through the tiny VAE (2x) and
    # the default 3-level U-Net (4x), so the error shows the resolution the run took
    tiny_vae.register_to_config(sample_size=20)
    tiny_vae.save_pretrained(tmp_path / "vae")
    args = script.parse_args(["--output_dir", str(tmp_path / "latent"), "--vae_name_or_path", str(tmp_path / "vae")])
    with pytest.raises(ValueError, match=r"--resolution 20 cannot pass through this U-Net"):
        script.main(args)
    # pixels: 16, too small for 6 levels
    levels = ["--block_out_channels", *["8"] * 6, "--attention_levels", *["0"] * 5, "1", "--attention_head_dim", "8"]
    levels += ["--norm_num_groups", "4"]
    args = script.parse_args(["--output_dir", str(tmp_path / "pixels"), *levels])
    with pytest.raises(ValueError, match=r"--resolution 16 cannot pass through this U-Net"):
        script.main(args)


def test_eval_steps_log_the_benchmarks_quality_figures(tmp_path):
    output_dir = tmp_path / "eval"
    args = ["--max_train_steps", "2", "--resolution", "16", "--eval_steps", "2", "--eval_num_samples", "20"]
    # the digits classifier is trained once into this cache, never the user's
    train(output_dir, *args, env=subprocess_env(SCULPTDIFF_CACHE=str(tmp_path / "cache")))
    lines = (output_dir / "eval_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert metrics["step"] == 2 and metrics["num_samples"] == 20
    assert np.isfinite(metrics["fd"]) and 0 <= metrics["class_accuracy"] <= 1
    assert list((tmp_path / "cache").iterdir())

    result = train(tmp_path / "bad", "--max_train_steps", "2", "--eval_steps", "2", check=False)
    assert result.returncode != 0 and "--eval_steps scores digits" in result.stderr


def test_caption_training_on_mixed_mode_images_ships_the_text_encoder(tmp_path, tiny_text_encoder, tiny_tokenizer):
    encoder_dir = tmp_path / "encoder"
    tiny_text_encoder.save_pretrained(encoder_dir)
    tiny_tokenizer.save_pretrained(encoder_dir)
    data_dir = tmp_path / "images"
    data_dir.mkdir()
    words = ["zero", "one", "two", "three"]
    with open(data_dir / "metadata.jsonl", "w") as f:
        for index, mode in enumerate(["L", "RGB", "RGBA", "P"] * 2):
            Image.new("RGB", (10, 12), (index * 30, 200, 90)).convert(mode).save(data_dir / f"{index}.png")
            f.write(json.dumps({"file_name": f"{index}.png", "text": f"a photo of digit {words[index % 4]}"}) + "\n")

    output_dir = tmp_path / "out"
    args = ["--max_train_steps", "2", "--train_data_dir", str(data_dir), "--caption_column", "text"]
    args += ["--text_encoder_name_or_path", str(encoder_dir), "--validation_prompts", "a photo of digit one"]
    train(output_dir, *args)
    assert {"text_encoder/config.json", "tokenizer/tokenizer_config.json"} <= files(output_dir)
    config = json.loads((output_dir / "unet" / "config.json").read_text())
    assert config["cross_attention_dim"] == 32 and config["in_channels"] == 3 and config["num_class_embeds"] is None
    assert Image.open(output_dir / "sample_grid.png").size == (2 * 8, 8)
    pipe = SculptPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a photo of digit two", num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert image.shape == (1, 8, 8, 3)
    assert "pipeline_tag: text-to-image" in (output_dir / "README.md").read_text()


def test_push_without_a_reachable_hub_fails_after_the_output_is_complete(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    output_dir = tmp_path / "out"
    env = subprocess_env(
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "home"),
        HF_TOKEN="hf_SECRET",
    )
    args = ["--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/digits"]
    result = train(output_dir, *args, env=env, check=False)
    assert result.returncode != 0
    assert f"hf upload me/digits {output_dir} --include model_index.json" in result.stderr
    assert "--include sample_grid.png --include training_args.json" in result.stderr
    assert OUTPUT_FILES <= files(output_dir)
    assert "me/digits" in (output_dir / "README.md").read_text()
    assert "hf_SECRET" not in result.stderr + result.stdout
    for name in files(output_dir):
        assert b"hf_SECRET" not in (output_dir / name).read_bytes(), name
    # what is uploaded names no folder of this machine
    training_args = json.loads((output_dir / "training_args.json").read_text())
    assert not any(isinstance(value, str) and os.path.isabs(value) for value in training_args.values())


def test_hub_token_is_refused_without_repeating_it(script, tmp_path):
    """Issue 12.11: a token on the command line would reach logs; the error says what to do instead."""
    with pytest.raises(ValueError, match=r"--hub_token is not accepted.*`hf auth login`.*HF_TOKEN") as error:
        script.parse_args(["--output_dir", str(tmp_path), "--hub_token", "hf_SECRET"])
    assert "hf_SECRET" not in str(error.value)


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image_column", "picture"], "--image_column 'picture' is not a column of the dataset"),
        (["--class_column", "digit"], "--class_column 'digit' is not a column of the dataset"),
        (["--max_train_samples", "0"], "The training dataset is empty"),
        (["--block_out_channels", "8", "16", "16", "--attention_levels", "0", "0", "1", "--resolution", "10"],
         "--resolution 10 cannot pass through this U-Net: it must be a multiple of 4"),
        (["--attention_levels", "0", "1", "1"], "--attention_levels needs one 0/1 flag per level"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_the_first_step(script, tmp_path, args, message):
    base = ["--output_dir", str(tmp_path / "out"), "--block_out_channels", "8", "16", "--norm_num_groups", "4"]
    base += ["--attention_levels", "0", "1", "--attention_head_dim", "8", "--report_to", "none"]
    with pytest.raises(ValueError, match=re.escape(message)):
        script.main(script.parse_args(base + args))
    assert not any("checkpoint" in name for name in files(tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume_from_checkpoint", "/nowhere/checkpoint-5"], "--resume_from_checkpoint '/nowhere/checkpoint-5' is neither"),
        (["--class_column", "label", "--caption_column", "text"], "--class_column and --caption_column are both set"),
        (["--caption_column", "text"], "--caption_column needs a text encoder"),
        (["--prediction_type", "flow", "--snr_gamma", "5"], "--snr_gamma weights DDPM-family losses"),
        (["--weighting_scheme", "logit_normal"], "use it with --prediction_type flow"),
        (["--rescale_betas_zero_snr"], "add --prediction_type v_prediction"),
        (["--conditioning_dropout_prob", "1.0"], "--conditioning_dropout_prob must be in [0, 1)"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
        (["--resolution", "0"], "--resolution must be >= 1, got 0"),
        (["--resolution", "-16"], "--resolution must be >= 1, got -16"),
        (["--attention_levels", "0", "1"], "--attention_levels needs one 0/1 flag per level of --block_out_channels (3 levels)"),
        (["--model_type", "dit", "--block_out_channels", "8", "16", "--norm_num_groups", "4"],
         "--block_out_channels --norm_num_groups: not a flag of --model_type dit, whose shape flags are --patch_size"),
        (["--num_layers", "2"], "--num_layers: not a flag of --model_type unet"),
        (["--no-long_skip_connections"], "--long_skip_connections: not a flag of --model_type unet"),
        (["--model_type", "dit", "--num_attention_heads", "0"], "--num_attention_heads must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_flag_combinations_fail_in_parse_args(script, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        script.parse_args(args)


# Issue 15: --model_type dit trains a SculptDiT2DModel, saved as the pipeline's `transformer`.
@pytest.fixture(scope="module")
def trained_dit(tmp_path_factory) -> Path:
    """A tiny DiT run (class-conditional digits), 3 steps with a checkpoint at step 2 (mid-epoch: 4 steps/epoch)."""
    output_dir = tmp_path_factory.mktemp("dit") / "sculpt-digits-dit"
    train(output_dir, "--max_train_steps", "3", "--checkpointing_steps", "2", model=TINY_DIT)
    return output_dir


def test_dit_run_saves_a_transformer_pipeline(trained_dit):
    output = files(trained_dit)
    assert {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"} <= output
    assert not any(name.startswith("unet/") for name in output)
    assert {"checkpoint-2/transformer/config.json", "checkpoint-2/transformer_ema/config.json"} <= output
    index = json.loads((trained_dit / "model_index.json").read_text())
    assert index["transformer"][1] == "SculptDiT2DModel" and index["unet"] == [None, None]
    config = json.loads((trained_dit / "transformer" / "config.json").read_text())
    assert (config["patch_size"], config["num_layers"], config["num_attention_heads"]) == (2, 1, 2)
    assert config["prediction_type"] == "epsilon" and config["conditioning_dropout_prob"] == 0.1
    assert config["num_class_embeds"] == 10 and config["sample_size"] == 8
    fingerprint = json.loads((trained_dit / "checkpoint-2" / "run_fingerprint.json").read_text())
    assert fingerprint["model_type"] == "dit" and fingerprint["transformer_config"]["num_layers"] == 1

    pipe = SculptPipeline.from_pretrained(trained_dit)
    assert type(pipe.transformer) is SculptDiT2DModel and pipe.unet is None
    images = sample(pipe)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    # the saved transformer holds the EMA weights, not the training weights of the last step
    last = load_file(trained_dit / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = load_file(trained_dit / "checkpoint-2" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(last[name], ema[name]) for name in last)

    card = (trained_dit / "README.md").read_text()
    assert "a SculptDiT2DModel (DiT, patch 2, 1 layers, width 16) that denoises 8x8 images" in card
    parameters = sum(parameter.numel() for parameter in pipe.transformer.parameters())
    assert f"| parameters | {parameters:,} |" in card and "| num_layers | 1 |" in card


def test_dit_resume_is_exact(trained_dit, tmp_path):
    """The DiT run's mid-epoch checkpoint, resumed by `latest` in a fresh folder, ends on the same weights."""
    output_dir = tmp_path / "resumed"
    shutil.copytree(trained_dit / "checkpoint-2", output_dir / "checkpoint-2")
    resumed = train(output_dir, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", model=TINY_DIT)
    assert re.search(r"Resuming from checkpoint \S*checkpoint-2\b", resumed.stderr)
    a, b = (
        load_file(path / "transformer" / "diffusion_pytorch_model.safetensors") for path in (trained_dit, output_dir)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_fine_tuning_a_dit_takes_its_backbone(trained_dit, tmp_path):
    output_dir = tmp_path / "tuned"
    # no --model_type: the saved pipeline's backbone
    train(output_dir, "--max_train_steps", "2", "--pretrained_model_name_or_path", str(trained_dit), model=TINY_RUN)
    assert not any(name.startswith("unet/") for name in files(output_dir))
    base = load_file(trained_dit / "transformer" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(output_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == tuned.keys() and any(not torch.equal(base[name], tuned[name]) for name in base)
    assert f"fine-tuned from `{trained_dit.name}`" in (output_dir / "README.md").read_text()
    assert sample(SculptPipeline.from_pretrained(output_dir)).shape == (2, 8, 8, 1)


def test_flow_dit_is_a_sit_pipeline(tmp_path):
    """A DiT trained with flow matching (SiT): saved with the flow sampler, guided sampling works."""
    output_dir = tmp_path / "sit"
    train(output_dir, "--max_train_steps", "2", "--prediction_type", "flow", "--no-use_ema", model=TINY_DIT)
    config = json.loads((output_dir / "transformer" / "config.json").read_text())
    assert config["prediction_type"] == "flow"
    pipe = SculptPipeline.from_pretrained(output_dir)
    assert type(pipe.scheduler) is SculptFlowScheduler and type(pipe.transformer) is SculptDiT2DModel
    images = sample(pipe, guidance_scale=3.0)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert "trained with rectified flow" in (output_dir / "README.md").read_text()


@pytest.mark.parametrize(
    ("model_type", "pretrained", "message"),
    [
        ("unet", "trained_dit", "--model_type unet but --pretrained_model_name_or_path {} holds a dit (its `transformer`)"),
        ("dit", "trained", "--model_type dit but --pretrained_model_name_or_path {} holds a unet (its `unet`)"),
    ],
)  # fmt: skip
def test_model_type_must_match_the_fine_tuned_backbone(script, request, tmp_path, model_type, pretrained, message):
    folder = str(request.getfixturevalue(pretrained))
    args = ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--model_type", model_type]
    with pytest.raises(ValueError, match=re.escape(message.format(repr(folder)))):
        script.main(script.parse_args(args + ["--pretrained_model_name_or_path", folder]))
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_dit_resolution_must_be_a_multiple_of_the_patch(script, tmp_path):
    args = ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--model_type", "dit", "--patch_size", "4"]
    with pytest.raises(
        ValueError,
        match=re.escape("--resolution 10 cannot pass through this DiT: it must be a multiple of 4 (patches of 4)"),
    ):
        script.main(script.parse_args(args + ["--resolution", "10", "--num_layers", "1"]))


@pytest.mark.parametrize(("flags", "skips"), [([], [False, True]), (["--no-long_skip_connections"], [False, False])])
def test_the_dit_has_long_skips_unless_told_otherwise(script, flags, skips):
    args = script.parse_args(["--model_type", "dit", "--num_layers", "2", "--report_to", "none", *flags])
    dit = script.load_or_build_denoiser(args, {"sample_size": 8, "in_channels": 1, "out_channels": 1})
    assert [block.skip_linear is not None for block in dit.transformer_blocks] == skips
    assert dit.config.long_skip_connections == (not flags)
