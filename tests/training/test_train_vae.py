"""train_vae.py end to end: real `accelerate launch` runs of a tiny AutoencoderKL for a few steps on the digits."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import launching
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from test_train_sculpt import load_script

from sculptdiff.training.data import ImageTransform, load_digits_dataset


SCRIPT = Path(__file__).resolve().parents[2] / "training_scripts" / "train_vae.py"
# 32 digits at 8x8, batches of 4 (8 steps an epoch), a 2-level autoencoder of 8-16 channels: 4x4x4 latents
TINY_VAE = [
    "--resolution", "8", "--max_train_samples", "32", "--train_batch_size", "4", "--seed", "0",
    "--block_out_channels", "8", "16", "--norm_num_groups", "4", "--lr_warmup_steps", "1",
    "--num_validation_images", "2", "--report_to", "none",
]  # fmt: skip
OUTPUT_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "README.md", "reconstruction_grid.png"]
OUTPUT_FILES += ["training_args.json"]


def train_vae(output_dir: Path, *args: str, check: bool = True, num_processes: int = 1) -> subprocess.CompletedProcess:
    """`accelerate launch train_vae.py` with the tiny run's flags, offline, one thread per process; several processes
    form a gloo MULTI_CPU group on a free port (as in test_train_sculpt.py's `launch_command`)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        command += ["--multi_gpu", "--main_process_port", "0"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *TINY_VAE]
    result = launching.run(
        [*command, "--output_dir", str(output_dir), *args], env=env, timeout=launching.LAUNCH_TIMEOUT
    )
    if check:
        assert result.returncode == 0, result.stderr[-5000:]
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """4 steps with random flips and a checkpoint every 2: the resume point lies mid-epoch."""
    output_dir = tmp_path_factory.mktemp("vae") / "sculpt-vae"
    train_vae(output_dir, "--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip")
    return output_dir


def test_output_loads_with_a_scaling_factor_measured_on_the_data(trained):
    assert all((trained / name).is_file() for name in OUTPUT_FILES)
    assert (trained / "checkpoint-2" / "vae").is_dir() and (trained / "checkpoint-2" / "vae_ema").is_dir()
    vae = AutoencoderKL.from_pretrained(trained).eval()
    assert (vae.config.in_channels, vae.config.latent_channels, vae.config.sample_size) == (1, 4, 8)

    # the std of the latents q(z|x) gives over the 32 training images, from the posterior's moments (no sampling)
    transform = ImageTransform(8, "L")
    images = torch.stack([transform(image) for image in load_digits_dataset()[:32]["image"]])
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    second_moment = (posterior.mean**2 + posterior.var).mean()
    std = (second_moment - posterior.mean.mean() ** 2).sqrt().item()
    # the script measures it on one draw of 2048 latents: a relative sampling error of about 1.6%
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=0.06)
    assert vae.config.scaling_factor != 0.18215  # not diffusers' default (Stable Diffusion's value)

    card = (trained / "README.md").read_text()
    assert f"| `scaling_factor` = 1 / latent std | {vae.config.scaling_factor:.6f} |" in card
    assert "reconstruction MSE" in card and "sklearn-digits" in card
    # rows: images, reconstructions, decodes of N(0, I); --num_validation_images 2 columns of 8 px
    assert Image.open(trained / "reconstruction_grid.png").size == (2 * 8, 3 * 8)
    training_args = json.loads((trained / "training_args.json").read_text())
    assert (training_args["rec_loss"], training_args["kl_scale"]) == ("l1", 1e-6)


def test_two_processes_double_the_batch_and_write_once(tmp_path):
    output_dir = tmp_path / "two"
    result = train_vae(output_dir, "--max_train_steps", "2", "--checkpointing_steps", "2", num_processes=2)
    assert "Distributed environment: DistributedType.MULTI_CPU" in result.stderr
    assert "total batch size = 8" in result.stderr
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        path.name for path in (output_dir / "checkpoint-2").iterdir()
    }
    # the main process alone writes the output: the model loads and its card counts the total batch
    vae = AutoencoderKL.from_pretrained(output_dir)
    assert vae.config.latent_channels == 4
    assert "| train_batch_size (total) | 8 |" in (output_dir / "README.md").read_text()
    assert json.loads((output_dir / "training_args.json").read_text())["max_train_steps"] == 2


def test_resume_from_a_mid_epoch_checkpoint_is_exact(trained, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained / "checkpoint-2", resumed / "checkpoint-2")
    result = train_vae(
        resumed, "--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip", "--resume_from_checkpoint",
        "latest",
    )  # fmt: skip
    assert "Resuming from checkpoint" in result.stderr
    for folder in ("checkpoint-4/vae", "checkpoint-4/vae_ema", "."):
        expected, actual = weights(trained / folder), weights(resumed / folder)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[name], actual[name]) for name in expected), folder


def test_latest_refuses_a_checkpoint_of_another_run(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained / "checkpoint-2", other / "checkpoint-2")
    args = ["--max_train_steps", "4", "--kl_scale", "0.01", "--resume_from_checkpoint", "latest"]
    result = train_vae(other, *args, check=False)
    assert result.returncode != 0 and "belongs to another run: kl_scale: 1e-06 in the checkpoint" in result.stderr


def test_divergence_keeps_the_earlier_output(trained, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(trained, output_dir)
    before = {name: (output_dir / name).read_bytes() for name in OUTPUT_FILES}
    args = ["--max_train_steps", "1", "--learning_rate", "1e30", "--lr_scheduler", "constant"]
    result = train_vae(output_dir, *args, check=False)
    assert result.returncode != 0 and "TrainingDivergedError" in result.stderr
    assert {name: (output_dir / name).read_bytes() for name in OUTPUT_FILES} == before
    assert not list(output_dir.glob(".tmp-save-*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kl_scale", "-1"], "--kl_scale must be >= 0, got -1.0"),
        (["--block_out_channels", "8", "0"], "--block_out_channels must be positive channel counts"),
        (["--latent_channels", "0"], "--latent_channels must be >= 1, got 0"),
        (["--dataset_name", "a", "--train_data_dir", "b"], "Pass one of --dataset_name and --train_data_dir"),
    ],
)
def test_bad_flags_fail_in_parse_args(script, args, message):
    with pytest.raises(ValueError, match=message):
        script.parse_args(args)


def test_rec_loss_choices_are_enforced(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--rec_loss", "l3"])
    assert "argument --rec_loss: invalid choice: 'l3'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution", "10"], "--resolution 10 must be a multiple of 4: the autoencoder halves the image 2 times"),
        (["--norm_num_groups", "3"], r"--norm_num_groups 3 must divide every entry of --block_out_channels \[16, 32"),
    ],
)
def test_bad_shapes_fail_before_training(script, args, message):
    with pytest.raises(ValueError, match=message):
        script.build_vae(script.parse_args(args), in_channels=1)


def test_default_autoencoder_makes_8x8x4_latents_of_32px_digits(script):
    vae = script.build_vae(script.parse_args([]), in_channels=1)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 1, 32, 32)).latent_dist.mode()
    assert latents.shape == (1, 4, 8, 8)


def as_rgb(row: dict) -> dict:
    return {"image": row["image"].convert("RGB")}


def test_grey_images_of_other_data_train_a_one_channel_autoencoder(tmp_path):
    """The channels come from the data: a saved dataset of grey digits (as the benchmarks pass a split) is 1 channel,
    the same digits as RGB images are 3."""
    digits = load_digits_dataset().select(range(8))
    digits.save_to_disk(str(tmp_path / "grey"))
    digits.map(as_rgb).save_to_disk(str(tmp_path / "rgb"))
    for name, channels in (("grey", 1), ("rgb", 3)):
        output_dir = tmp_path / f"vae-{name}"
        train_vae(output_dir, "--max_train_steps", "1", "--dataset_name", str(tmp_path / name))
        assert AutoencoderKL.load_config(output_dir)["in_channels"] == channels, name
