# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""The divergence guard: stop a run as soon as a loss or the updated weights are not finite, before anything of that
step is saved, and name the newest checkpoint that is known to be good.

Finite weights are not enough for "good": an update can leave weights that are finite but so large that the next
forward pass overflows. A checkpoint therefore counts as good once the step after it has computed a finite loss with
its weights; until then it is pending. Model-agnostic: pass the loss and the parameters of whatever is trained.

    guard = DivergenceGuard(accelerator)
    for step ...:
        loss = ...; accelerator.backward(loss); optimizer.step(); ...
        guard.check_step(step, loss_value, model.named_parameters())    # after the update
        if step % checkpointing_steps == 0:
            guard.checkpoint_saved(save_checkpoint(...))
    guard.check_final(final_loss, final_model.named_parameters(), output_dir)   # before the final save
"""

import math
import os
from collections.abc import Iterable

import torch
from accelerate import Accelerator


class TrainingDivergedError(FloatingPointError):
    """Training produced non-finite numbers; nothing of the failing step was saved."""


def non_finite_parameters(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the parameters holding a NaN or an infinity."""
    return [name for name, parameter in named_parameters if not torch.isfinite(parameter).all()]


class DivergenceGuard:
    """Checks every optimisation step and the final weights; raises TrainingDivergedError on every process alike.

    Args:
        accelerator: the run's accelerator; verdicts are summed over processes so that all of them stop together.
        resumed_checkpoint: the checkpoint the run resumed from, if any (pending until the first step confirms it).
    """

    def __init__(self, accelerator: Accelerator, resumed_checkpoint: str | None = None):
        self.accelerator = accelerator
        self.last_good_checkpoint = None
        self.pending_checkpoint = resumed_checkpoint

    def checkpoint_saved(self, path: str):
        """Record a checkpoint written after a passing check: good once the next step's loss is finite."""
        self.pending_checkpoint = path

    def check_step(self, step: int, loss: float, named_parameters: Iterable[tuple[str, torch.Tensor]]):
        """Call after the optimizer step (the end of an accumulation cycle) and before the step is checkpointed.

        Args:
            step: the number of the step just taken.
            loss: its loss (mean over processes and accumulated batches), computed with the weights before the update.
            named_parameters: the trained model's `named_parameters()` after the update.
        """
        bad_loss, bad_names = self._verdict(loss, named_parameters)
        if not bad_loss and not bad_names:
            # the weights the pending checkpoint holds have just given a finite loss
            if self.pending_checkpoint is not None:
                self.last_good_checkpoint, self.pending_checkpoint = self.pending_checkpoint, None
            return
        problems = []
        if bad_loss:
            problems.append(f"the loss is {loss}")
        if bad_names:
            shown = ", ".join(bad_names[:3]) + (" ..." if len(bad_names) > 3 else "")
            problems.append(f"the update made parameters non-finite ({shown})")
        message = f"Training stopped at step {step}: {' and '.join(problems)}. Nothing of this step was saved."
        if bad_loss and self.pending_checkpoint is not None:
            message += f" {self.pending_checkpoint} holds the weights that gave this loss: do not resume from it."
        raise TrainingDivergedError(f"{message} {self._advice()}")

    def check_final(self, loss: float | None, named_parameters: Iterable[tuple[str, torch.Tensor]], output_dir: str):
        """Call before the final save, so that a run diverging on its last step leaves `output_dir` as it was.

        Args:
            loss: the loss the final weights give (e.g. on the last training batch); None when no step was taken.
            named_parameters: the final model's `named_parameters()`.
            output_dir: where the final model would be saved.
        """
        bad_loss, bad_names = self._verdict(loss if loss is not None else 0.0, named_parameters)
        if not bad_loss and not bad_names:
            return
        problem = f"give a non-finite loss ({loss})" if bad_loss else "are not finite"
        raise TrainingDivergedError(
            f"The final weights {problem}: nothing was saved, {output_dir!r} keeps what it held. {self._advice()}"
        )

    def _verdict(self, loss: float, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> tuple[bool, list[str]]:
        bad_names = non_finite_parameters(named_parameters)
        local = torch.tensor([float(not math.isfinite(loss)), float(len(bad_names))], device=self.accelerator.device)
        bad_loss, bad_count = self.accelerator.reduce(local, reduction="sum").tolist()
        # another process may have found what this one did not
        return bad_loss > 0, bad_names or (["(on another process)"] if bad_count > 0 else [])

    def _advice(self) -> str:
        # --checkpoints_total_limit may have removed it since
        if self.last_good_checkpoint is None or not os.path.isdir(self.last_good_checkpoint):
            return "No checkpoint of this run is known to be good: start again with a lower --learning_rate."
        return (
            f"The newest good checkpoint is {self.last_good_checkpoint}: resume from it with"
            f" --resume_from_checkpoint {self.last_good_checkpoint} and a lower --learning_rate (or keep"
            " --max_grad_norm, or turn off --mixed_precision)."
        )
