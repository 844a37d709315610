"""`accelerate launch train_sculpt.py --model_type dit` in two processes (gloo on CPU) against the test Hub
(hub_server.py): the run publishes a DiT pipeline (`transformer`) that loads through both doors in fresh processes,
and a resume from its checkpoint, again in two processes, ends on exactly the weights it published."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import launching
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file
from test_hub_pipeline import load_and_sample_in_fresh_process, sample
from test_hub_training import published_files

from sculptdiff import SculptDiT2DModel, SculptPipeline


# diffusers 0.42.1's ModelMixin/SchedulerMixin.from_pretrained pass `local_dir_use_symlinks` to hf_hub_download on
# every load from a repo id, which huggingface_hub 2.x warns about: not ours to fix, and exactly this one message.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`:UserWarning"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "training_scripts" / "train_sculpt.py"
# accelerate 1.15 starts CPU processes with torchrun only through --multi_gpu; ACCELERATE_USE_CPU=1 (below) makes
# them a gloo MULTI_CPU group; port 0 makes accelerate pick a free port (other tests may launch at the same time)
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu"]
TWO_PROCESSES += ["--main_process_port", "0"]
TWO_PROCESSES += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# A DiT of 1 block of width 16 (2 heads of 8) over 2x2 patches of 8x8 digits; 24 digits in batches of 4 per process
# are 3 steps per epoch, so a resume from step 2 lands mid-epoch on both processes.
TINY_DIT_RUN = [
    "--model_type", "dit", "--num_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "8",
    "--resolution", "8", "--max_train_samples", "24", "--train_batch_size", "4", "--seed", "0",
    "--num_train_timesteps", "100", "--lr_warmup_steps", "1", "--max_train_steps", "3", "--checkpointing_steps", "1",
    "--validation_steps", "100", "--num_validation_images", "1", "--validation_inference_steps", "2",
    "--report_to", "none",
]  # fmt: skip
PUBLISHED = published_files("transformer", "sculptdiff.models.transformers.dit_sculpt.py")
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def train_two_processes(env: dict, output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = launching.run(
        [*TWO_PROCESSES, str(SCRIPT), *TINY_DIT_RUN, "--output_dir", str(output_dir), *args],
        env={**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
        cwd=REPO_ROOT,
        timeout=launching.LAUNCH_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Distributed environment: DistributedType.MULTI_CPU" in result.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in result.stderr
    return result


def test_two_process_dit_run_publishes_a_transformer_pipeline_and_resumes_to_the_same_weights(hub, tmp_path):
    output_dir = tmp_path / "sculpt-digits-dit"
    train_two_processes(hub.env, output_dir, "--push_to_hub", "--hub_model_id", "ns/digits-dit")

    # the repo holds the DiT pipeline: the denoiser as `transformer` with its code file, no `unet`, no checkpoints
    assert set(HfApi().list_repo_files("ns/digits-dit")) == PUBLISHED
    published = load_file(hf_hub_download("ns/digits-dit", WEIGHTS))
    local = load_file(output_dir / WEIGHTS)
    assert published.keys() == local.keys() and all(torch.equal(published[name], local[name]) for name in local)

    # both doors, each in a fresh process: sculptdiff, and diffusers' remote code with sculptdiff unimportable
    expected = sample(SculptPipeline.from_pretrained(output_dir))
    for loader in ("sculptdiff", "remote-code"):
        images, loaded = load_and_sample_in_fresh_process(hub, tmp_path, loader, "ns/digits-dit")
        np.testing.assert_array_equal(images, expected)
        pipeline_module, pipeline_class, transformer_module, _ = loaded.split()
        assert pipeline_class == "SculptPipeline"
        assert transformer_module.endswith("sculptdiff.models.transformers.dit_sculpt")
        assert transformer_module.startswith("sculptdiff") == (loader == "sculptdiff")
    pipe = SculptPipeline.from_pretrained("ns/digits-dit")
    assert type(pipe.transformer) is SculptDiT2DModel and pipe.unet is None

    # the checkpoint of step 2 (both processes' random states), resumed in two processes in a fresh folder, ends on
    # the same training weights, EMA and optimizer state at step 3, and on the published weights
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        path.name for path in (resumed_dir / "checkpoint-2").iterdir()
    }
    resumed = train_two_processes(hub.env, resumed_dir, "--resume_from_checkpoint", "latest")
    assert re.search(r"Resuming from checkpoint \S*checkpoint-2\b", resumed.stderr)
    for weights in ("transformer", "transformer_ema"):
        a, b = (
            load_file(folder / "checkpoint-3" / weights / "diffusion_pytorch_model.safetensors")
            for folder in (output_dir, resumed_dir)
        )
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), weights
    a, b = (
        torch.load(folder / "checkpoint-3" / "optimizer.bin", weights_only=True)
        for folder in (output_dir, resumed_dir)
    )
    assert all(
        torch.equal(a["state"][index][name], b["state"][index][name])
        for index in a["state"]
        for name in a["state"][index]
    )
    again = load_file(resumed_dir / WEIGHTS)
    assert again.keys() == published.keys() and all(torch.equal(again[name], published[name]) for name in again)
