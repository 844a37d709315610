"""The training set-up every script shares: the transform, the seeded loader, AdamW, the LR schedule and the
arithmetic of steps and epochs (sculptdiff.training.data and sculptdiff.training.optimization)."""

import argparse

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from diffusers.optimization import get_scheduler
from PIL import Image

from sculptdiff.training.data import build_train_dataloader, set_training_transform
from sculptdiff.training.optimization import optimizer_step, prepare_training


def make_args(**overrides) -> argparse.Namespace:
    args = {
        "resolution": 8,
        "center_crop": False,
        "image_column": "image",
        "train_batch_size": 4,
        "dataloader_num_workers": 0,
        "learning_rate": 1e-3,
        "adam_beta1": 0.95,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "adam_epsilon": 1e-8,
        "gradient_accumulation_steps": 1,
        "lr_scheduler": "linear",
        "lr_warmup_steps": 0,
        "max_train_steps": None,
        "num_train_epochs": 3,
    }
    return argparse.Namespace(**{**args, **overrides})


def make_dataset(size: int = 10) -> Dataset:
    images = [Image.fromarray(torch.full((4, 4), 20 * index, dtype=torch.uint8).numpy()) for index in range(size)]
    return Dataset.from_dict({"image": images, "label": [str(index % 3) for index in range(size)]})


def batches_in_order(args: argparse.Namespace, seed: int) -> list[list[float]]:
    torch.manual_seed(seed)
    dataset = make_dataset()
    set_training_transform(dataset, args, "L", class_column="label")
    return [batch["pixel_values"][:, 0, 0, 0].tolist() for batch in build_train_dataloader(dataset, args)]


def test_transform_gives_pixels_and_class_ids_at_the_resolution():
    dataset = make_dataset()
    set_training_transform(dataset, make_args(), "L", class_column="label", resolution=16)
    example = dataset[4]
    assert example["pixel_values"].shape == (1, 16, 16)
    assert example["class_labels"] == 1


def test_loader_order_follows_the_seed_and_not_the_global_rng_state():
    args = make_args()
    assert batches_in_order(args, seed=0) == batches_in_order(args, seed=0)
    assert batches_in_order(args, seed=0) != batches_in_order(args, seed=1)
    # creating the loader after other draws (a resumed run) gives the same order: the generator is seeded from
    # torch.initial_seed(), not from the global state
    torch.manual_seed(0)
    torch.rand(100)
    dataset = make_dataset()
    set_training_transform(dataset, args, "L", class_column="label")
    later = [batch["pixel_values"][:, 0, 0, 0].tolist() for batch in build_train_dataloader(dataset, args)]
    assert later == batches_in_order(args, seed=0)


def test_a_bad_image_column_fails_when_the_loader_is_built():
    dataset = make_dataset()
    set_training_transform(dataset, make_args(image_column="label"), "L")
    with pytest.raises(ValueError, match="--image_column 'label' holds str values, not images"):
        build_train_dataloader(dataset, make_args())


@pytest.mark.parametrize(
    "overrides, steps_per_epoch, max_train_steps, epochs",
    [
        ({}, 3, 9, 3),  # 10 examples in batches of 4: 3 steps per epoch, 3 epochs
        ({"gradient_accumulation_steps": 2}, 2, 6, 3),
        ({"max_train_steps": 7}, 3, 7, 3),
    ],
)
def test_steps_and_epochs_as_diffusers_examples(overrides, steps_per_epoch, max_train_steps, epochs):
    args = make_args(**overrides)
    dataset = make_dataset()
    set_training_transform(dataset, args, "L")
    model = torch.nn.Linear(2, 2)
    prepared = prepare_training(Accelerator(cpu=True), model, model.parameters(), dataset, args)
    assert prepared.num_update_steps_per_epoch == steps_per_epoch
    assert args.max_train_steps == max_train_steps
    assert prepared.num_train_epochs == epochs
    group = prepared.optimizer.param_groups[0]
    assert group["betas"] == (0.95, 0.999) and group["lr"] == 1e-3
    # the linear schedule ends at zero after max_train_steps
    for _ in range(max_train_steps):
        prepared.optimizer.step()
        prepared.lr_scheduler.step()
    assert prepared.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_only_the_given_parameters_are_optimised():
    args = make_args()
    dataset = make_dataset()
    set_training_transform(dataset, args, "L")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    prepared = prepare_training(Accelerator(cpu=True), model, model[1].parameters(), dataset, args)
    optimised = {id(parameter) for group in prepared.optimizer.param_groups for parameter in group["params"]}
    assert optimised == {id(parameter) for parameter in model[1].parameters()}


def test_optimizer_step_steps_at_the_end_of_an_accumulation_cycle_with_clipped_gradients():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=4)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    inputs = torch.full((1, 4), 100.0)
    with accelerator.accumulate(model):
        optimizer_step(accelerator, model(inputs).sum(), model.parameters(), optimizer, lr_scheduler, 0.5)
    assert not model.weight.any() and lr_scheduler.scheduler.last_epoch == 0
    with accelerator.accumulate(model):
        optimizer_step(accelerator, model(inputs).sum(), model.parameters(), optimizer, lr_scheduler, 0.5)
    # the accumulated gradient (norm 200) is clipped to 0.5 before the step of lr 1, then cleared
    assert torch.linalg.vector_norm(model.weight).item() == pytest.approx(0.5)
    assert lr_scheduler.scheduler.last_epoch == 1
    assert model.weight.grad is None or not model.weight.grad.any()
