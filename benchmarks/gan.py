# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""The GAN baseline of `bench_families.py`: a small class-conditional DCGAN for the 16 px digits.

A baseline, not a package API: benchmarks import it as a sibling module (`import gan`), like `harness`. What is taken
from where:

- the generator's shape (a projected and reshaped latent, then stride-2 transposed convolutions with BatchNorm and
  ReLU, tanh output) and the discriminator's (stride-2 convolutions with leaky ReLU, no pooling): DCGAN, Radford et
  al. 2015, https://arxiv.org/abs/1511.06434, section 3;
- spectral normalisation of every discriminator layer: Miyato et al. 2018, https://arxiv.org/abs/1802.05957;
- class conditioning of the discriminator by projection, D(x, y) = psi(phi(x)) + <embed(y), phi(x)>: Miyato & Koyama
  2018, https://arxiv.org/abs/1802.05637, eq. 3; of the generator by conditional BatchNorm (a per-class gain and
  bias after each normalisation), the generator of the same paper (section 5, after Dumoulin et al. 2017);
- the hinge loss of both papers' experiments (Lim & Ye 2017), or the non-saturating loss of Goodfellow et al. 2014,
  https://arxiv.org/abs/1406.2661, section 3;
- Adam with betas (0, 0.9) and n_dis discriminator steps per generator step, or DCGAN's betas (0.5, 0.999) with one;
- an exponential moving average of the generator's weights for sampling: Yazici et al. 2019,
  https://arxiv.org/abs/1806.04498 (also Karras et al. 2018, https://arxiv.org/abs/1710.10196). BatchNorm's running
  statistics are averaged too, and the EMA generator samples in eval mode.

Tuning: `python benchmarks/bench_families.py --threads 1 --tune_gan --budget_minutes 3` trains every setting of
`TUNING_GRID` interleaved on its own clock (seed 0) and writes results/families-gan-tuning-<date>.md (FD, precision,
recall, class accuracy, collapse per setting); `DEFAULT_SETTINGS` must be the best of that table. Measured
(results/families-gan-tuning-2026-12-02.md: 3 min each, the families run's budget, one otherwise idle core, 500
samples, class-conditional FD; real digits score 4.8): hinge, betas (0, 0.9), n_dis 1 (the default): FD 96.2 (1312
steps, class accuracy 40%); non-saturating, betas (0, 0.9): 108.3; the default with n_dis 2: 152.5 (848 steps);
non-saturating, betas (0.5, 0.999) (DCGAN's set-up): 155.7; hinge with TTUR learning rates G 1e-4 / D 4e-4: 161.6;
hinge, betas (0.5, 0.999): 162.4. The same best as a first 40 s probe on a loaded core.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


LOSSES = ("hinge", "non-saturating")


@dataclass(frozen=True)
class GANSettings:
    """Optimisation settings of the GAN baseline (the tuned ones are `DEFAULT_SETTINGS`)."""

    loss: str = "hinge"
    learning_rate_g: float = 2e-4
    learning_rate_d: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.9)
    n_dis: int = 1
    batch_size: int = 64
    latent_dim: int = 64
    width: int = 32
    ema_decay: float = 0.999
    lr_decay: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {self.loss!r}.")
        if self.n_dis < 1:
            raise ValueError(f"`n_dis` must be >= 1, got {self.n_dis}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}.")

    def describe(self) -> str:
        return (
            f"{self.loss}, lr G/D {self.learning_rate_g:g}/{self.learning_rate_d:g}, betas {self.betas}, n_dis"
            f" {self.n_dis}, batch {self.batch_size}, width {self.width}"
            + (", lr decayed linearly to 0" if self.lr_decay else "")
        )


DEFAULT_SETTINGS = GANSettings()
# the settings `--tune_gan` tries: the two Adam set-ups of the literature, both losses, and a faster learning rate
TUNING_GRID = (
    GANSettings(),
    GANSettings(n_dis=2),
    GANSettings(loss="non-saturating"),
    GANSettings(betas=(0.5, 0.999)),
    GANSettings(loss="non-saturating", betas=(0.5, 0.999)),
    GANSettings(learning_rate_g=1e-4, learning_rate_d=4e-4),
)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine parameters, then a per-class gain and bias (gain initialised to 1, bias to 0)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, hidden: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        gain = self.gain(class_labels)[:, :, None, None]
        bias = self.bias(class_labels)[:, :, None, None]
        return self.norm(hidden) * gain + bias


class Generator(nn.Module):
    """z (latent_dim) and a class -> a (1, resolution, resolution) image in [-1, 1]: a 4x4 map of 4 * width channels,
    then one transposed convolution (x2) per doubling, conditional BatchNorm and ReLU after each."""

    def __init__(self, resolution: int = 16, latent_dim: int = 64, width: int = 32, num_classes: int = 10):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"`resolution` must be a power of two >= 8, got {resolution}.")
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        num_ups = int(math.log2(resolution // 4))
        channels = [width * 2 ** max(0, 2 - index) for index in range(num_ups + 1)]
        self.project = nn.Linear(latent_dim, channels[0] * 16)
        self.norms = nn.ModuleList([ConditionalBatchNorm2d(channels[0], num_classes)])
        self.ups = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.ups.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            self.norms.append(ConditionalBatchNorm2d(c_out, num_classes))
        self.to_image = nn.Conv2d(channels[-1], 1, 3, padding=1)

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        hidden = self.project(z).view(z.shape[0], -1, 4, 4)
        hidden = F.relu(self.norms[0](hidden, class_labels))
        for up, norm in zip(self.ups, self.norms[1:]):
            hidden = F.relu(norm(up(hidden), class_labels))
        return torch.tanh(self.to_image(hidden))


class ProjectionDiscriminator(nn.Module):
    """Stride-2 spectrally normalised convolutions down to 4x4, sum pooling to phi(x), then psi(phi(x)) +
    <embed(y), phi(x)> (Miyato & Koyama 2018, eq. 3)."""

    def __init__(self, resolution: int = 16, width: int = 32, num_classes: int = 10):
        super().__init__()
        num_downs = int(math.log2(resolution // 4))
        channels = [1] + [width * 2 ** min(index, 2) for index in range(num_downs + 1)]
        layers = []
        for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            stride = 1 if index == 0 else 2
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 3 if stride == 1 else 4, stride, 1)), nn.LeakyReLU(0.1)]
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(channels[-1], 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, channels[-1]))

    def forward(self, images: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        phi = self.features(images).sum(dim=(2, 3))
        return self.linear(phi).squeeze(1) + (self.embed(class_labels) * phi).sum(dim=1)


def discriminator_loss(loss: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    # -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(loss: str, fake_logits: torch.Tensor) -> torch.Tensor:
    if loss == "hinge":
        return -fake_logits.mean()
    # non-saturating: -log sigmoid(D(G(z)))
    return F.softplus(-fake_logits).mean()


class GANTrainer:
    r"""
    Trains the class-conditional GAN on a fixed set of images, one `train_step` at a time.

    Args:
        images (`torch.Tensor`): the training images, `(N, 1, H, W)` in [-1, 1].
        labels (`torch.Tensor`): their classes, `(N,)`, in `[0, num_classes)`.
        settings (`GANSettings`, *optional*): the optimisation settings; `DEFAULT_SETTINGS` if not given.
        num_classes (`int`, defaults to 10): the number of classes.
        seed (`int`, defaults to 0): seeds the weights, the batch order and every draw.

    `sample(class_labels, generator)` draws from the EMA generator. It trains under the benchmarks' clock
    (`harness.train_interleaved`): `name`, `seconds`, `steps`, `losses`, `warm_up()` and `train_step(progress)`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        settings: GANSettings | None = None,
        num_classes: int = 10,
        seed: int = 0,
        name: str = "GAN",
    ):
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ValueError(f"`images` must have shape (N, 1, H, H), got {tuple(images.shape)}.")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"`labels` must have shape ({images.shape[0]},), got {tuple(labels.shape)}.")
        self.settings = settings or DEFAULT_SETTINGS
        self.images, self.labels, self.num_classes = images, labels, num_classes
        resolution = images.shape[-1]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.generator_net = Generator(resolution, self.settings.latent_dim, self.settings.width, num_classes)
            self.discriminator = ProjectionDiscriminator(resolution, self.settings.width, num_classes)
        self.ema_generator = copy.deepcopy(self.generator_net).eval().requires_grad_(False)
        self.optimizer_g = torch.optim.Adam(
            self.generator_net.parameters(), lr=self.settings.learning_rate_g, betas=self.settings.betas
        )
        self.optimizer_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=self.settings.learning_rate_d, betas=self.settings.betas
        )
        self.rng = torch.Generator().manual_seed(seed + 1)
        self.order = torch.empty(0, dtype=torch.long)
        self.name = name
        self.seconds = 0.0
        self.steps = 0
        self.losses_d: list[float] = []
        self.losses_g: list[float] = []

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch without replacement within an epoch (a new permutation when the current one runs out)."""
        size = self.settings.batch_size
        if len(self.order) < size:
            self.order = torch.randperm(self.images.shape[0], generator=self.rng)
        index, self.order = self.order[:size], self.order[size:]
        return self.images[index], self.labels[index]

    def fake_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(size, self.settings.latent_dim, generator=self.rng)
        # fake classes drawn uniformly, as the projection discriminator's training samples them
        class_labels = torch.randint(0, self.num_classes, (size,), generator=self.rng)
        return self.generator_net(z, class_labels), class_labels

    @property
    def losses(self) -> list[float]:
        """The discriminator's losses: the generator's alone say little about progress."""
        return self.losses_d

    def warm_up(self):
        """One forward and backward of both networks that changes no weight: one-time kernel set-up off the clock."""
        fake, fake_labels = self.fake_batch(self.settings.batch_size)
        self.discriminator(fake, fake_labels).mean().backward()
        self.optimizer_g.zero_grad()
        self.optimizer_d.zero_grad()

    def train_step(self, progress: float = 0.0) -> tuple[float, float]:
        """n_dis discriminator updates, one generator update, one EMA update; returns the two last losses.
        `progress`, the spent fraction of the training budget, decays the learning rates linearly to 0 when
        `settings.lr_decay` (SNGAN and the projection paper decay linearly, Miyato et al. 2018, section 4)."""
        scale = max(0.0, 1.0 - progress) if self.settings.lr_decay else 1.0
        for optimizer, learning_rate in (
            (self.optimizer_g, self.settings.learning_rate_g),
            (self.optimizer_d, self.settings.learning_rate_d),
        ):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * scale
        loss = self.settings.loss
        for _ in range(self.settings.n_dis):
            real, real_labels = self.next_batch()
            with torch.no_grad():
                fake, fake_labels = self.fake_batch(real.shape[0])
            loss_d = discriminator_loss(
                loss, self.discriminator(real, real_labels), self.discriminator(fake, fake_labels)
            )
            self.optimizer_d.zero_grad()
            loss_d.backward()
            self.optimizer_d.step()
        fake, fake_labels = self.fake_batch(self.settings.batch_size)
        loss_g = generator_loss(loss, self.discriminator(fake, fake_labels))
        self.optimizer_g.zero_grad()
        loss_g.backward()
        self.optimizer_g.step()
        self.update_ema()
        self.steps += 1
        self.losses_d.append(loss_d.item())
        self.losses_g.append(loss_g.item())
        return self.losses_d[-1], self.losses_g[-1]

    @torch.no_grad()
    def update_ema(self):
        # the same warm-up as the diffusion models' EMA (crowsonkb's, power 3/4): short runs average recent weights
        decay = min(self.settings.ema_decay, 1 - (1 + self.steps) ** -0.75)
        for ema, live in zip(self.ema_generator.parameters(), self.generator_net.parameters()):
            ema.lerp_(live, 1 - decay)
        for ema, live in zip(self.ema_generator.buffers(), self.generator_net.buffers()):
            if ema.dtype.is_floating_point:
                ema.lerp_(live, 1 - decay)
            else:
                ema.copy_(live)

    @torch.no_grad()
    def sample(self, class_labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images `(N, 1, H, W)` in [-1, 1] from the EMA generator for `class_labels` `(N,)`: one network call."""
        z = torch.randn(class_labels.shape[0], self.settings.latent_dim, generator=generator)
        return self.ema_generator(z, class_labels)
