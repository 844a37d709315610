import math

import pytest
import torch
from accelerate import Accelerator

from sculptdiff.training.guard import DivergenceGuard, TrainingDivergedError, non_finite_parameters


def parameters(*values: float) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer{index}.weight", torch.full((2, 2), value)) for index, value in enumerate(values)]


@pytest.fixture
def guard(tmp_path):
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    return DivergenceGuard(Accelerator(cpu=True))


def test_non_finite_parameters_are_named():
    assert non_finite_parameters(parameters(1.0, math.nan, math.inf, -math.inf)) == [
        "layer1.weight",
        "layer2.weight",
        "layer3.weight",
    ]
    assert non_finite_parameters(parameters(1e30, -1e30)) == []


def test_a_checkpoint_is_good_once_the_next_step_trained_on_its_weights(guard, tmp_path):
    guard.check_step(1, 0.5, parameters(1.0))
    guard.checkpoint_saved(str(tmp_path / "checkpoint-1"))
    # pending: nothing has computed a loss with its weights yet
    assert guard.last_good_checkpoint is None
    guard.check_step(2, 0.4, parameters(1e30))
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-1")
    guard.checkpoint_saved(str(tmp_path / "checkpoint-2"))

    # checkpoint-2's finite but huge weights give a NaN loss: it is named as bad, checkpoint-1 as the way back
    with pytest.raises(TrainingDivergedError) as error:
        guard.check_step(3, math.nan, parameters(math.nan))
    message = str(error.value)
    assert message.startswith("Training stopped at step 3: the loss is nan and the update made parameters non-finite")
    assert f"{tmp_path / 'checkpoint-2'} holds the weights that gave this loss: do not resume from it" in message
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-1'}" in message


def test_an_update_that_overflows_the_weights_stops_before_they_are_saved(guard):
    with pytest.raises(
        TrainingDivergedError, match=r"step 1: the update made parameters non-finite \(layer1.weight\)"
    ):
        guard.check_step(1, 0.5, parameters(1.0, math.inf))
    with pytest.raises(TrainingDivergedError, match="No checkpoint of this run is known to be good"):
        guard.check_step(1, 0.5, parameters(1.0, math.inf))


def test_a_removed_checkpoint_is_not_recommended(guard, tmp_path):
    guard.checkpoint_saved(str(tmp_path / "checkpoint-1"))
    guard.check_step(2, 0.4, parameters(1.0))
    (tmp_path / "checkpoint-1").rmdir()
    with pytest.raises(TrainingDivergedError, match="No checkpoint of this run is known to be good"):
        guard.check_step(3, math.inf, parameters(1.0))


def test_final_check(guard, tmp_path):
    guard.check_final(0.3, parameters(1.0), str(tmp_path))
    # a run resumed at its last step takes no step: only the weights are checked
    guard.check_final(None, parameters(1.0), str(tmp_path))
    with pytest.raises(
        TrainingDivergedError, match=r"The final weights give a non-finite loss \(nan\): nothing was saved"
    ):
        guard.check_final(math.nan, parameters(1e30), str(tmp_path))
    with pytest.raises(TrainingDivergedError, match="The final weights are not finite"):
        guard.check_final(None, parameters(math.nan), str(tmp_path))
