"""LoRA training with `train_sculpt.py --lora_rank` (issue 18, part 1): real `accelerate launch` runs of a tiny U-Net.

The base is a 2-step run of the tiny class-conditional U-Net; the adapter trains on top of it, saved in diffusers'
LoRA format and loaded back with `SculptPipeline.load_lora_weights`.
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_sculpt import files, load_script, run_card_snippet, sample, train

from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline


# a learning rate that moves a zero-initialised LoRA B visibly in 3 steps
LORA_RUN = ["--lora_rank", "4", "--learning_rate", "1e-2", "--max_train_steps", "3", "--checkpointing_steps", "2"]
ADAPTER = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("base") / "sculpt-digits"
    train(output_dir, "--max_train_steps", "2")
    return output_dir


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("lora") / "sculpt-digits-lora"
    train(output_dir, "--pretrained_model_name_or_path", str(base), *LORA_RUN)
    return output_dir


def test_a_lora_run_saves_only_the_adapter_in_diffusers_format(base, lora_run):
    saved = files(lora_run)
    assert {ADAPTER, "README.md", "sample_grid.png", "sample_grid_base.png", "training_args.json"} <= saved
    # an adapter, not a copy of the model
    assert "model_index.json" not in saved and not any(name.startswith("unet/") for name in saved)
    adapter = load_file(lora_run / ADAPTER)
    # diffusers' LoRA format: `unet.<layer>.lora.down.weight` / `.lora.up.weight`
    assert adapter and all(re.fullmatch(r"unet\..+\.lora\.(down|up)\.weight", name) for name in adapter)
    # the default targets: the attention projections
    assert {name.split(".lora.")[0].rsplit(".", 1)[-1] for name in adapter} == {"to_q", "to_k", "to_v", "0"}
    base_weights = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert sum(tensor.numel() for tensor in adapter.values()) < sum(t.numel() for t in base_weights.values()) / 10

    card = (lora_run / "README.md").read_text()
    assert "- lora" in card and "# LoRA adapter for `sculpt-digits`" in card
    assert "rank 4, alpha 4" in card and "to_q, to_k, to_v, to_out.0" in card
    assert "![base model samples](sample_grid_base.png)" in card
    assert Image.open(lora_run / "sample_grid_base.png").size == Image.open(lora_run / "sample_grid.png").size
    # the checkpoints hold the whole model (with the adapter) and the adapter's EMA
    assert {"model.safetensors", "custom_checkpoint_0.pkl"} <= files(lora_run / "checkpoint-2")


def test_the_adapter_loads_and_changes_the_samples(base, lora_run):
    pipe = SculptPipeline.from_pretrained(base)
    before = sample(pipe)
    noisy = torch.randn(2, 1, 8, 8, generator=torch.manual_seed(0))
    timesteps, class_labels = torch.tensor([50, 50]), torch.tensor([1, 7])
    with torch.no_grad():
        prediction_before = pipe.unet(noisy, timesteps, class_labels=class_labels).sample
        pipe.load_lora_weights(lora_run)
        prediction_after = pipe.unet(noisy, timesteps, class_labels=class_labels).sample
    # the 2-step base predicts about 0.01 and its samples are mostly clipped: the prediction shows the adapter best
    assert (prediction_after - prediction_before).abs().max() > 1e-5
    assert not np.array_equal(sample(pipe), before)
    # the base model's folder is untouched by the adapter run
    assert np.array_equal(sample(SculptPipeline.from_pretrained(base)), before)


def test_the_lora_card_snippet_runs_as_printed(lora_run, tmp_path):
    assert f'load_lora_weights("{lora_run}")' in run_card_snippet(lora_run, tmp_path)


def test_a_resumed_lora_run_ends_with_the_same_adapter(base, lora_run, tmp_path):
    output_dir = tmp_path / "resumed"
    output_dir.mkdir()
    shutil.copytree(lora_run / "checkpoint-2", output_dir / "checkpoint-2")
    resumed = train(
        output_dir, "--pretrained_model_name_or_path", str(base), *LORA_RUN, "--resume_from_checkpoint", "latest"
    )
    assert re.search(r"Resuming from checkpoint \S*checkpoint-2\b", resumed.stderr)
    expected, got = load_file(lora_run / ADAPTER), load_file(output_dir / ADAPTER)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_two_processes_train_one_adapter(base, tmp_path):
    output_dir = tmp_path / "two"
    result = train(output_dir, "--pretrained_model_name_or_path", str(base), *LORA_RUN, num_processes=2)
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in result.stderr
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= files(output_dir / "checkpoint-2")
    pipe = SculptPipeline.from_pretrained(base)
    pipe.load_lora_weights(output_dir)
    assert sample(pipe).shape == (2, 8, 8, 1)


def test_a_diverging_lora_run_stops_and_writes_no_adapter(base, tmp_path):
    output_dir = tmp_path / "diverged"
    args = ["--lora_rank", "4", "--max_train_steps", "3", "--learning_rate", "1e30", "--lr_scheduler", "constant"]
    result = train(output_dir, "--pretrained_model_name_or_path", str(base), *args, check=False)
    assert result.returncode != 0
    assert "TrainingDivergedError" in result.stderr
    assert not (output_dir / ADAPTER).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora_rank", "4"], "--lora_rank trains an adapter on a trained model: pass the pipeline to adapt"),
        (["--lora_alpha", "8"], "--lora_alpha set(s) up a LoRA adapter: add --lora_rank."),
        (["--lora_rank", "0", "--pretrained_model_name_or_path", "x"], "--lora_rank must be >= 1, got 0."),
    ],
)
def test_bad_lora_flags_fail_in_parse_args(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_script().parse_args(args)
