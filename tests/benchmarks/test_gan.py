"""benchmarks/gan.py: the GAN baseline of bench_families.py trains, is deterministic, and is class-conditional."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gan  # noqa: E402


# tiny networks: 8 channels at the widest layer is enough for the behaviour
SETTINGS = gan.GANSettings(batch_size=8, width=8, latent_dim=16)


def toy_data(num_images: int = 32, resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(num_images, 1, resolution, resolution, generator=generator) * 2 - 1
    return images, torch.arange(num_images) % 10


def trained(settings: gan.GANSettings = SETTINGS, steps: int = 3, seed: int = 0) -> gan.GANTrainer:
    images, labels = toy_data()
    trainer = gan.GANTrainer(images, labels, settings, seed=seed)
    for step in range(steps):
        trainer.train_step(step / steps)
    return trainer


@pytest.mark.parametrize("loss", gan.LOSSES)
def test_steps_train_both_networks_with_finite_losses(loss):
    settings = replace(SETTINGS, loss=loss, n_dis=2)
    images, labels = toy_data()
    trainer = gan.GANTrainer(images, labels, settings, seed=0)
    generator_before = [p.clone() for p in trainer.generator_net.parameters()]
    discriminator_before = [p.clone() for p in trainer.discriminator.parameters()]
    ema_before = [p.clone() for p in trainer.ema_generator.parameters()]
    for _ in range(3):
        loss_d, loss_g = trainer.train_step()
        assert torch.isfinite(torch.tensor([loss_d, loss_g])).all()
    assert trainer.steps == 3 and len(trainer.losses) == 3
    for before, network in (
        (generator_before, trainer.generator_net),
        (discriminator_before, trainer.discriminator),
        (ema_before, trainer.ema_generator),
    ):
        assert any(not torch.equal(b, a) for b, a in zip(before, network.parameters()))


def test_samples_have_the_data_shape_and_range():
    trainer = trained()
    images = trainer.sample(torch.arange(10), torch.Generator().manual_seed(0))
    assert images.shape == (10, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    # the EMA generator samples in eval mode: a sample does not depend on the rest of its batch
    alone = trainer.sample(torch.tensor([3]), torch.Generator().manual_seed(0))
    torch.testing.assert_close(alone[0], trainer.sample(torch.tensor([3, 7]), torch.Generator().manual_seed(0))[0])


def test_same_seed_same_training_other_seed_other_training():
    first = trained(seed=0).sample(torch.arange(4), torch.Generator().manual_seed(1))
    again = trained(seed=0).sample(torch.arange(4), torch.Generator().manual_seed(1))
    other = trained(seed=1).sample(torch.arange(4), torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_class_conditioning_changes_the_output():
    trainer = trained()
    # the conditional gains start at 1 and the biases at 0: make the classes differ as training would
    with torch.no_grad():
        for norm in trainer.ema_generator.norms:
            norm.bias.weight.normal_(generator=torch.Generator().manual_seed(0))
    z_seed = torch.Generator().manual_seed(0)
    zeros = trainer.sample(torch.zeros(4, dtype=torch.long), z_seed)
    sevens = trainer.sample(torch.full((4,), 7), torch.Generator().manual_seed(0))
    assert not torch.allclose(zeros, sevens, atol=1e-3)


def test_projection_discriminator_reads_the_class():
    discriminator = gan.ProjectionDiscriminator(width=8)
    images = torch.rand(2, 1, 16, 16)
    assert not torch.allclose(discriminator(images, torch.tensor([0, 0])), discriminator(images, torch.tensor([5, 5])))


def test_learning_rate_decays_linearly_over_the_budget():
    images, labels = toy_data()
    trainer = gan.GANTrainer(images, labels, SETTINGS)
    trainer.train_step(0.75)
    assert trainer.optimizer_g.param_groups[0]["lr"] == pytest.approx(0.25 * SETTINGS.learning_rate_g)
    assert trainer.optimizer_d.param_groups[0]["lr"] == pytest.approx(0.25 * SETTINGS.learning_rate_d)
    constant = gan.GANTrainer(images, labels, replace(SETTINGS, lr_decay=False))
    constant.train_step(0.75)
    assert constant.optimizer_g.param_groups[0]["lr"] == SETTINGS.learning_rate_g


@pytest.mark.parametrize(
    "changes, message",
    [({"loss": "wasserstein"}, "loss"), ({"n_dis": 0}, "n_dis"), ({"ema_decay": 1.0}, "ema_decay")],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        gan.GANSettings(**changes)


def test_bad_data_is_refused():
    images, labels = toy_data()
    with pytest.raises(ValueError, match="images"):
        gan.GANTrainer(images[:, 0], labels)
    with pytest.raises(ValueError, match="labels"):
        gan.GANTrainer(images, labels[:-1])
    with pytest.raises(ValueError, match="resolution"):
        gan.Generator(resolution=12)
