"""Publishing against the test Hub (hub_server.py): `push_output_dir` and its printed `hf upload` command on a folder
full of things that must stay local, and `train_sculpt.py --push_to_hub` with a tiny U-Net and two steps."""

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import launching
import numpy as np
import pytest
import torch
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from safetensors.torch import load_file

from sculptdiff import SculptPipeline, SculptScheduler
from sculptdiff.training.card import SAMPLE_GRID_NAME
from sculptdiff.training.publish import ARGS_FILE_NAME, push_output_dir, upload_command


# diffusers 0.42.1's ModelMixin/SchedulerMixin.from_pretrained pass `local_dir_use_symlinks` to hf_hub_download on
# every load from a repo id, which huggingface_hub 2.x warns about: not ours to fix, and exactly this one message.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`:UserWarning"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "training_scripts" / "train_sculpt.py"
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
ACCELERATE_LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# A class-conditional U-Net of 8-16 channels on 16 digits at 8x8; a checkpoint every step and TensorBoard logs in a
# custom folder, so that there are checkpoint-* and log folders for the push to leave out.
TINY_RUN = [
    "--resolution", "8", "--max_train_samples", "16", "--train_batch_size", "4", "--seed", "0",
    "--block_out_channels", "8", "16", "--norm_num_groups", "4", "--attention_levels", "0", "1",
    "--attention_head_dim", "8", "--num_train_timesteps", "100", "--lr_warmup_steps", "0",
    "--checkpointing_steps", "1", "--validation_steps", "100", "--num_validation_images", "1",
    "--validation_inference_steps", "2", "--report_to", "tensorboard", "--logging_dir", "my-logs",
]  # fmt: skip


def published_files(denoiser: str, code_file: str) -> set[str]:
    """The files a push publishes of a trained pipeline whose denoiser folder `denoiser` holds the custom code file
    `code_file`."""
    pipeline_files = {".gitattributes", "README.md", "model_index.json", "pipeline_sculpt.py", "training_args.json"}
    scheduler_files = {"scheduler/scheduler_config.json", "scheduler/sculptdiff.schedulers.scheduling_sculpt.py"}
    denoiser_files = {
        f"{denoiser}/{name}" for name in ("config.json", "diffusion_pytorch_model.safetensors", code_file)
    }
    return pipeline_files | scheduler_files | denoiser_files | {SAMPLE_GRID_NAME}


PUBLISHED = published_files("unet", "sculptdiff.models.unet_sculpt.py")


# What an output folder may also hold and must never publish: secrets, other dotfiles (also inside a published
# component folder), logs in a custom folder, staging folders of interrupted saves. (Training runs add their own
# checkpoint-* folders; a fake one would be a checkpoint for `--resume_from_checkpoint latest` to refuse.)
LOCAL_ONLY = {
    ".env": "HF_TOKEN=hf_do_not_publish\n",
    ".bash_history": "export HF_TOKEN=hf_do_not_publish\n",
    "unet/.env": "HF_TOKEN=hf_do_not_publish\n",
    "custom-logs/events.out.tfevents.1": "events",
    ".checkpoint-5.staging/optimizer.bin": "half-written checkpoint",
    ".tmp-save-x/unet/config.json": "{}",
}


def add_local_only_files(folder: Path):
    for name, text in LOCAL_ONLY.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def train(launcher: list[str], env: dict, output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return launching.run(
        [*launcher, str(SCRIPT), *TINY_RUN, "--output_dir", str(output_dir), *args],
        env=env,
        cwd=REPO_ROOT,
        timeout=launching.LAUNCH_TIMEOUT,
    )


def digests(folder: Path, published_only: bool = False) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path; only the files of `PUBLISHED` if asked."""
    files = {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    if published_only:
        files = {name: digest for name, digest in files.items() if name in PUBLISHED}
    return files


def sample(pipe: SculptPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 7], num_inference_steps=2, generator=generator, output_type="np").images


def save_as_a_run(pipeline: SculptPipeline, folder: Path):
    """Saves `pipeline` to `folder` with what a training run writes beside it: a card, a sample grid, run arguments."""
    pipeline.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# card\n")
    (folder / SAMPLE_GRID_NAME).write_bytes(b"\x89PNG not really")
    (folder / ARGS_FILE_NAME).write_text(json.dumps({"output_dir": "sculpt-digits"}))


def test_push_uploads_exactly_the_allowlist_and_so_does_the_printed_command(hub, tmp_path, build_tiny_pipeline):
    output_dir = tmp_path / "sculpt-digits"
    pipeline = build_tiny_pipeline(scheduler=SculptScheduler(num_train_timesteps=100))
    save_as_a_run(pipeline, output_dir)
    add_local_only_files(output_dir)
    (output_dir / "checkpoint-5").mkdir()
    (output_dir / "checkpoint-5" / "optimizer.bin").write_bytes(b"optimizer state")
    allow_patterns = pipeline.hub_allow_patterns() + [SAMPLE_GRID_NAME, ARGS_FILE_NAME]
    local = digests(output_dir)

    assert push_output_dir(str(output_dir), "ns/allow", allow_patterns, token=hub.token) == "ns/allow"
    api = HfApi()
    assert set(api.list_repo_files("ns/allow")) == PUBLISHED
    published = digests(Path(snapshot_download("ns/allow")))
    published.pop(".gitattributes")
    assert published == digests(output_dir, published_only=True)

    # The retry command a failed push prints, run verbatim, uploads the same files and nothing else; the push before
    # it left the hidden-file patterns as they were (huggingface_hub extends the ignore list it is given)
    command = shlex.split(upload_command("ns/allow-cli", str(output_dir), allow_patterns))
    assert command[-4:] == ["--exclude", ".*", "--exclude", "*/.*"]
    uploaded = subprocess.run(command, env=hub.env, capture_output=True, text=True, timeout=120)
    assert uploaded.returncode == 0, uploaded.stderr
    assert set(api.list_repo_files("ns/allow-cli")) == PUBLISHED
    assert digests(output_dir) == local


def test_training_run_publishes_the_output_and_a_second_run_commits_again(hub, tmp_path):
    output_dir = tmp_path / "sculpt-digits"
    output_dir.mkdir()
    add_local_only_files(output_dir)
    first = train(
        ACCELERATE_LAUNCH,
        hub.env,
        output_dir,
        "--max_train_steps",
        "2",
        "--push_to_hub",
        "--hub_model_id",
        "ns/digits",
    )
    assert first.returncode == 0, first.stderr
    assert (output_dir / "checkpoint-2").is_dir() and (output_dir / "my-logs").is_dir()

    # The repo holds exactly the saved pipeline, card, sample grid and args: byte for byte, no checkpoints, logs,
    # dotfiles or staging folders; the published arguments name no folder of this machine.
    api = HfApi()
    assert set(api.list_repo_files("ns/digits")) == PUBLISHED
    published_args = Path(hf_hub_download("ns/digits", ARGS_FILE_NAME)).read_text()
    assert str(tmp_path) not in published_args and "hf_sculptdiff_test_token" not in published_args
    assert json.loads(published_args)["logging_dir"] == "my-logs"
    first_commit = api.model_info("ns/digits").sha
    snapshot = Path(snapshot_download("ns/digits"))
    published = digests(snapshot)
    published.pop(".gitattributes")
    assert published == digests(output_dir, published_only=True)

    card = ModelCard.load("ns/digits")
    assert "sculptdiff" in card.data.tags and card.data.library_name == "diffusers"
    assert "ns/digits" in card.text and "sample_grid.png" in card.text
    np.testing.assert_array_equal(
        sample(SculptPipeline.from_pretrained("ns/digits")), sample(SculptPipeline.from_pretrained(output_dir))
    )

    # A second run (resumed, one more step) makes a new commit; the first commit id still serves the first weights.
    second = train(
        [sys.executable],
        hub.env,
        output_dir,
        "--max_train_steps",
        "3",
        "--resume_from_checkpoint",
        "latest",
        "--push_to_hub",
        "--hub_model_id",
        "ns/digits",
    )
    assert second.returncode == 0, second.stderr
    second_commit = api.model_info("ns/digits").sha
    assert second_commit != first_commit
    assert set(api.list_repo_files("ns/digits")) == PUBLISHED
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert digests(Path(snapshot_download("ns/digits")), published_only=True)[weights] == digests(output_dir)[weights]
    old = load_file(hf_hub_download("ns/digits", weights, revision=first_commit))
    assert all(torch.equal(old[name], tensor) for name, tensor in load_file(snapshot / weights).items())
    new = load_file(hf_hub_download("ns/digits", weights))
    assert any(not torch.equal(old[name], new[name]) for name in old)


def test_push_with_the_hub_down_fails_clearly_and_the_printed_command_publishes(hub, tmp_path):
    hub.stop()
    output_dir = tmp_path / "sculpt-digits"
    output_dir.mkdir()
    add_local_only_files(output_dir)
    failed = train(
        [sys.executable], hub.env, output_dir, "--max_train_steps", "2", "--push_to_hub", "--hub_model_id", "ns/later"
    )
    assert failed.returncode != 0
    assert "Pushing" in failed.stderr and "ns/later" in failed.stderr and "ConnectError" in failed.stderr
    repush = re.search(r"re-run the push alone with:\n\s+(hf upload .+)\n", failed.stderr)
    assert repush is not None, failed.stderr

    # The local output is complete: the pipeline loads, the card, grid, checkpoints and logs are there.
    local = digests(output_dir)
    assert {"README.md", "sample_grid.png", "model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= set(
        local
    )
    assert any(name.startswith("checkpoint-2/") for name in local) and any(
        name.startswith("my-logs/") for name in local
    )
    expected = sample(SculptPipeline.from_pretrained(output_dir))

    # Hub back up (same data, new port): the printed command, run verbatim, publishes the folder and leaves it as is.
    restarted = HubServer(tmp_path / "hub-data", token=hub.token).start()
    try:
        env = {**hub.env, "HF_ENDPOINT": restarted.url}
        uploaded = subprocess.run(shlex.split(repush.group(1)), env=env, capture_output=True, text=True, timeout=120)
        assert uploaded.returncode == 0, uploaded.stderr
        assert digests(output_dir) == local
        api = HfApi(endpoint=restarted.url)
        assert set(api.list_repo_files("ns/later")) == PUBLISHED
        weights = api.hf_hub_download("ns/later", "unet/diffusion_pytorch_model.safetensors", cache_dir=tmp_path / "c")
        assert (
            hashlib.sha256(Path(weights).read_bytes()).hexdigest() == local["unet/diffusion_pytorch_model.safetensors"]
        )
    finally:
        restarted.stop()
    np.testing.assert_array_equal(sample(SculptPipeline.from_pretrained(output_dir)), expected)
