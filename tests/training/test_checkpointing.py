"""sculptdiff.training.checkpointing in-process, with a real Accelerator on the CPU and a tiny U-Net.

The end-to-end behaviour (resume after kill -9, `latest` with another run's checkpoint, truncated files under
`accelerate launch`) is tested in test_train_sculpt.py.
"""

import argparse
import json
import os

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from sculptdiff.training.checkpointing import (
    FINGERPRINT_NAME,
    apply_optimizer_settings,
    checkpoint_problem,
    find_resume_checkpoint,
    fingerprint_differences,
    list_checkpoints,
    register_checkpoint_hooks,
    save_checkpoint,
    save_ema,
    training_batches,
)
from sculptdiff.training.data import collate_fn
from sculptdiff.training.recipe import build_ema, build_unet


FINGERPRINT = {"seed": 0, "learning_rate": 1e-3, "unet_config": {"block_out_channels": (8, 16), "in_channels": 1}}


def tiny_unet():
    torch.manual_seed(0)
    return build_unet(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), attention_levels=(False, True),
        attention_head_dim=8, norm_num_groups=4,
    )  # fmt: skip


@pytest.fixture
def run(tmp_path):
    """A prepared tiny run with its hooks registered and two optimisation steps taken."""
    accelerator = Accelerator(cpu=True)
    unet = tiny_unet()
    ema = build_ema(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=1, num_training_steps=10)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_checkpoint_hooks(accelerator, model_folders=["unet"], ema_models={"unet_ema": ema})
    for _ in range(2):
        unet(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).sample.square().mean().backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
    return accelerator, unet, ema, optimizer, lr_scheduler, tmp_path


def test_save_writes_folders_and_fingerprint_atomically_and_rotates(run):
    accelerator, unet, ema, _, _, output_dir = run
    for step in (2, 4, 6):
        path = save_checkpoint(accelerator, str(output_dir), step, FINGERPRINT, total_limit=2)
        assert path == os.path.join(output_dir, f"checkpoint-{step}")
    assert [os.path.basename(path) for path in list_checkpoints(str(output_dir))] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(os.listdir(output_dir)) == ["checkpoint-4", "checkpoint-6"]
    checkpoint = output_dir / "checkpoint-6"
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", FINGERPRINT_NAME} <= set(os.listdir(checkpoint))
    # save_pretrained folders, not accelerate's anonymous model.safetensors
    assert not (checkpoint / "model.safetensors").exists()
    weights = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[name], value) for name, value in unet.state_dict().items())
    assert json.loads((checkpoint / "unet_ema" / "config.json").read_text())["optimization_step"] == 2
    assert json.loads((checkpoint / FINGERPRINT_NAME).read_text())["unet_config"]["block_out_channels"] == [8, 16]
    assert checkpoint_problem(str(checkpoint), ["unet", "unet_ema"], num_processes=1) is None


def test_saving_the_ema_leaves_the_global_rng_alone(tmp_path):
    ema = build_ema(tiny_unet())
    state = torch.get_rng_state()
    save_ema(ema, str(tmp_path / "ema"))
    assert torch.equal(torch.get_rng_state(), state)
    # what save_ema guards against: EMAModel.save_pretrained initialises a model from the global RNG
    ema.save_pretrained(str(tmp_path / "again"))
    assert not torch.equal(torch.get_rng_state(), state)


def test_load_restores_models_ema_and_optimizer(run):
    accelerator, unet, ema, optimizer, lr_scheduler, output_dir = run
    path = save_checkpoint(accelerator, str(output_dir), 2, FINGERPRINT)
    saved = {name: value.clone() for name, value in unet.state_dict().items()}
    saved_ema = [parameter.clone() for parameter in ema.shadow_params]
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.zero_()
    ema.shadow_params = [torch.zeros_like(parameter) for parameter in ema.shadow_params]
    ema.optimization_step = 0
    accelerator.load_state(path)
    assert all(torch.equal(saved[name], value) for name, value in unet.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(saved_ema, ema.shadow_params)) and ema.optimization_step == 2


@pytest.mark.parametrize(
    ("name", "damage", "problem"),
    [
        ("optimizer.bin", "truncate", "optimizer.bin is unreadable"),
        ("scheduler.bin", "truncate", "scheduler.bin is unreadable"),
        ("random_states_0.pkl", "truncate", "random_states_0.pkl is unreadable"),
        ("unet/diffusion_pytorch_model.safetensors", "truncate", "unet/diffusion_pytorch_model.safetensors is unreadable"),
        ("unet_ema/config.json", "truncate", "unet_ema/config.json is unreadable"),
        (FINGERPRINT_NAME, "truncate", f"{FINGERPRINT_NAME} is unreadable"),
        (FINGERPRINT_NAME, "delete", f"{FINGERPRINT_NAME} is missing"),
        ("random_states_0.pkl", "empty state", "random_states_0.pkl is unreadable (KeyError"),
    ],
)  # fmt: skip
def test_every_file_is_read_back(run, name, damage, problem):
    accelerator, *_, output_dir = run
    path = save_checkpoint(accelerator, str(output_dir), 2, FINGERPRINT)
    target = os.path.join(path, name)
    if damage == "truncate":
        with open(target, "rb") as f:
            data = f.read()
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
    elif damage == "delete":
        os.remove(target)
    else:
        torch.save({"step": 2}, target)
    assert problem in checkpoint_problem(path, ["unet", "unet_ema"], num_processes=1)
    # a second process would need its own RNG state
    assert checkpoint_problem(path, ["unet", "unet_ema"], num_processes=2) is not None


def test_find_resume_checkpoint(run):
    accelerator, *_, output_dir = run
    folders = ["unet", "unet_ema"]
    for step in (2, 4):
        save_checkpoint(accelerator, str(output_dir), step, FINGERPRINT)
    assert find_resume_checkpoint(None, str(output_dir), FINGERPRINT, folders, 1, 10) is None
    resume = find_resume_checkpoint("latest", str(output_dir), FINGERPRINT, folders, 1, 10)
    assert resume.path.endswith("checkpoint-4") and resume.step == 4 and resume.differences == {}

    other = {**FINGERPRINT, "seed": 1, "unet_config": {"block_out_channels": [8, 32], "in_channels": 1}}
    message = r"belongs to another run: seed: 0 in the checkpoint, 1 now; unet_config.block_out_channels: \[8, 16\]"
    with pytest.raises(ValueError, match=message):
        find_resume_checkpoint("latest", str(output_dir), other, folders, 1, 10)
    explicit = find_resume_checkpoint(str(output_dir / "checkpoint-2"), str(output_dir), other, folders, 1, 10)
    assert explicit.step == 2 and explicit.differences["seed"] == (0, 1)

    with pytest.raises(ValueError, match="is at step 4, past --max_train_steps 3"):
        find_resume_checkpoint("latest", str(output_dir), FINGERPRINT, folders, 1, 3)
    os.remove(output_dir / "checkpoint-4" / "optimizer.bin")
    assert find_resume_checkpoint("latest", str(output_dir), FINGERPRINT, folders, 1, 3).step == 2
    with pytest.raises(ValueError, match="cannot be loaded: optimizer.bin is missing"):
        find_resume_checkpoint(str(output_dir / "checkpoint-4"), str(output_dir), FINGERPRINT, folders, 1, 10)


def test_fingerprint_differences_compare_as_json():
    assert fingerprint_differences({"a": (1, 2), "b": {"c": 1}}, {"a": [1, 2], "b": {"c": 1}}) == {}
    assert fingerprint_differences({"a": 1, "b": {"c": 1}}, {"b": {"c": 2, "d": 3}}) == {
        "a": (1, None),
        "b.c": (1, 2),
        "b.d": (None, 3),
    }


def test_apply_optimizer_settings_continues_the_schedule_with_the_new_peak(run):
    _, _, _, optimizer, lr_scheduler, _ = run
    before = lr_scheduler.get_last_lr()[0]
    apply_optimizer_settings(optimizer, lr_scheduler, 5e-4, betas=(0.8, 0.99))
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(before / 2) and group["initial_lr"] == 5e-4 and group["betas"] == (0.8, 0.99)
    optimizer.step()
    lr_scheduler.step()
    # the cosine schedule of 10 steps after 1 warm-up step, at step 3, peak 5e-4
    expected = 5e-4 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 9))).item()
    assert lr_scheduler.get_last_lr()[0] == pytest.approx(expected)


def loop_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(
        **{"max_train_steps": 4, "gradient_accumulation_steps": 2, "random_flip": False, **overrides}
    )


def prepared_loader(accumulation: int = 2):
    """A run's prepared loader of 10 one-pixel images numbered 0..9 (5 batches an epoch) and its accelerator."""
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=accumulation,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    images = [{"pixel_values": torch.tensor([[[float(i), -float(i)]]])} for i in range(10)]
    loader = torch.utils.data.DataLoader(images, batch_size=2, shuffle=True, collate_fn=collate_fn)
    return accelerator, accelerator.prepare(loader)


def test_training_batches_stop_where_accelerate_counts_the_last_step():
    # 5 batches an epoch in steps of 2 batches: accelerate syncs after batches 2, 4 and 5 (the end of the loader)
    accelerator, loader = prepared_loader()
    model = accelerator.prepare(torch.nn.Linear(1, 1))
    batches = syncs = 0
    for _ in training_batches(accelerator, loader, 0, loop_args(max_train_steps=4)):
        with accelerator.accumulate(model):
            batches += 1
        syncs += accelerator.sync_gradients
    assert (batches, syncs) == (7, 4)


def test_training_batches_of_a_resumed_run_are_the_rest_of_the_uninterrupted_run():
    set_seed(0)
    accelerator, loader = prepared_loader()
    args = loop_args(max_train_steps=5)
    uninterrupted = [batch["pixel_values"] for batch in training_batches(accelerator, loader, 0, args)]
    set_seed(0)
    accelerator, loader = prepared_loader()
    resumed = [batch["pixel_values"] for batch in training_batches(accelerator, loader, 2, args)]
    # step 2 ended after the 4th batch of the first epoch
    assert len(uninterrupted) == 9 and len(resumed) == 5
    for expected, batch in zip(uninterrupted[4:], resumed):
        assert torch.equal(expected, batch)


def test_random_flip_mirrors_images_from_the_global_rng():
    accelerator, loader = prepared_loader(accumulation=1)
    args = loop_args(max_train_steps=5, random_flip=True, gradient_accumulation_steps=1)
    torch.manual_seed(0)
    flipped = torch.cat([batch["pixel_values"] for batch in training_batches(accelerator, loader, 0, args)])
    torch.manual_seed(0)
    replayed = torch.cat([batch["pixel_values"] for batch in training_batches(accelerator, loader, 0, args)])
    # the seedable sampler's order is the same; the flips are replayed with the global RNG's state
    assert torch.equal(flipped, replayed)
    mirrored = flipped[:, 0, 0, 0] < 0
    assert 0 < mirrored.sum() < len(flipped)
    # an image is itself or its mirror, never anything else
    assert torch.equal(flipped[:, 0, 0, 0], -flipped[:, 0, 0, 1])
