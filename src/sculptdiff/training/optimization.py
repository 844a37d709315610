"""The optimiser, the training data loader and the learning-rate schedule of a training script, prepared by
accelerate, with diffusers' examples' arithmetic of steps and epochs: one implementation for every script."""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from datasets import Dataset
from diffusers.optimization import get_scheduler

from .data import build_train_dataloader


@dataclass
class PreparedTraining:
    """What `prepare_training` returns: the prepared model, optimiser, loader and schedule, and the loop's lengths."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataloader: torch.utils.data.DataLoader
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    num_update_steps_per_epoch: int
    num_train_epochs: int


def prepare_training(
    accelerator: Accelerator,
    model: torch.nn.Module,
    parameters: Iterable[torch.nn.Parameter],
    dataset: Dataset,
    args,
) -> PreparedTraining:
    """AdamW over `parameters` (the model's, or only an adapter's), the shuffled loader of `dataset` (its transform
    set), and `args.lr_scheduler` with warm-up, all passed through `accelerator.prepare`.

    Reads the flags of `sculptdiff.training.arguments.add_optimization_arguments` and `add_data_arguments`; sets
    `args.max_train_steps` from `args.num_train_epochs` when it is None, as diffusers' examples do.
    """
    optimizer = torch.optim.AdamW(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    dataloader = build_train_dataloader(dataset, args)

    # the schedule counts the steps of every process (accelerate steps it once per process)
    num_update_steps_per_epoch = math.ceil(
        math.ceil(len(dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)

    # the prepared loader is this process's shard
    num_update_steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    return PreparedTraining(
        model=model,
        optimizer=optimizer,
        dataloader=dataloader,
        lr_scheduler=lr_scheduler,
        num_update_steps_per_epoch=num_update_steps_per_epoch,
        num_train_epochs=math.ceil(args.max_train_steps / num_update_steps_per_epoch),
    )


def optimizer_step(
    accelerator: Accelerator,
    loss: torch.Tensor,
    parameters: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    max_grad_norm: float,
):
    """Backpropagate `loss` and take the (prepared, so accumulation-aware) optimiser and schedule step, clipping the
    gradients of `parameters` to `max_grad_norm` at the end of an accumulation cycle. Call inside
    `accelerator.accumulate(model)`."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
