"""Sample-quality metrics for models trained on the built-in digits: a small digits classifier and what it measures.

The classifier is a CNN trained once on the models' train split of scikit-learn's digits (`digits_split_indices`),
at the training resolution and with the training data's own transform (`sculptdiff.training.data.ImageTransform`),
then cached as safetensors. In its penultimate feature space (128-d) this module computes, for a set of generated
images and the classes they were asked for:

- `fd`: the Frechet distance (FID's formula, Heusel et al. 2017) to the held-out real digits (the reference);
- `class_accuracy`: the fraction of samples the classifier assigns to the requested class;
- `class_coverage` and `class_entropy`: how the predicted-class histogram spreads over the classes;
- `precision` and `recall`: k-NN precision and recall (Kynkaanniemi et al. 2019) against the held-out digits.

Inception features mean nothing on 16x16 grey digits, which is why the features come from a digits classifier.
The numbers are comparable only between runs with the same classifier (same resolution and `CLASSIFIER_VERSION`)
and the same number of samples: Frechet distances are biased upwards for small sets. `calibrate` gives the scale at
the sample count used: real train digits against the reference (the floor, as the mean and spread of several draws:
the noise band), blurred, noisy and collapsed digits.

Generated sets ask for classes i % 10, so they are class-balanced by construction, as the (stratified) reference is;
the real sets of `calibrate` are drawn for the same labels (`match_class_labels`). In a class-discriminative feature
space the class proportions move the mean: random draws of real digits, whose class counts wander, scored FD 9.2 +-
2.6 at N=500 where class-matched draws score 4.8 +- 0.6, and so looked worse than the models.
benchmarks/bench_metric.py measures this, and that a classifier trained on digits disjoint from the models' split
(a 3-way split) changes nothing measurable.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from sculptdiff.training.atomic_files import write_bytes
from sculptdiff.training.data import ImageTransform, load_digits_dataset


# Bump when the classifier, its training or the split changes: cached files of another version are not reused.
CLASSIFIER_VERSION = "1"
NUM_DIGIT_CLASSES = 10
HELD_OUT_FRACTION = 0.3
SPLIT_SEED = 0
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """Two conv stages (conv-GN-ReLU x2, then 2x2 max-pool), average pooling to 4x4, a 128-d feature layer, logits.

    Pooling to a fixed 4x4 grid makes the same network work at 16 and 32 px while keeping where the strokes are;
    GroupNorm keeps train and eval mode identical.
    """

    def __init__(self, num_classes: int = NUM_DIGIT_CLASSES, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, 32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, 32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.norm3 = nn.GroupNorm(8, 64)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.norm4 = nn.GroupNorm(8, 64)
        self.feature = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images (N, 1, H, W) in [-1, 1]."""
        hidden = F.relu(self.norm1(self.conv1(images)))
        hidden = F.relu(self.norm2(self.conv2(hidden)))
        hidden = F.max_pool2d(hidden, 2)
        hidden = F.relu(self.norm3(self.conv3(hidden)))
        hidden = F.relu(self.norm4(self.conv4(hidden)))
        hidden = F.max_pool2d(hidden, 2)
        # (N, 64, H/4, W/4) -> (N, 64, 4, 4) -> (N, 1024)
        hidden = F.adaptive_avg_pool2d(hidden, 4).flatten(1)
        return F.relu(self.feature(hidden))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class DigitsSplit:
    """The built-in digits at one resolution in [-1, 1], split once into train and held-out parts (stratified)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor


def digits_split_indices(labels: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the fixed train and held-out parts of the digits (70% / 30%, stratified, seed 0).

    Generative models benchmarked with this module train on the train part only, so that the held-out part, the
    reference of every metric, is data they never saw.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    return train_test_split(
        np.arange(len(labels)), test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )


def load_digits_split(resolution: int) -> DigitsSplit:
    """The digits through the training data's transform, split by `digits_split_indices`."""
    dataset = load_digits_dataset()
    transform = ImageTransform(resolution, "L", center_crop=True)
    images = torch.stack([transform(image) for image in dataset["image"]])
    labels = torch.tensor(dataset["label"], dtype=torch.long)
    train_index, held_out_index = (torch.from_numpy(index) for index in digits_split_indices(labels.numpy()))
    return DigitsSplit(images[train_index], labels[train_index], images[held_out_index], labels[held_out_index])


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (background -1 padding): generated digits are not centred
    as exactly as the scans, and the classifier should not punish that."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack(
        [padded[i, :, top : top + size, left : left + size] for i, (top, left) in enumerate(offsets.tolist())]
    )


def train_digits_classifier(
    split: DigitsSplit, epochs: int = 30, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0
) -> DigitsClassifier:
    """Train the classifier on the train split (AdamW, cosine learning rate, random 1-2 px shifts), on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        classifier = DigitsClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-4)
    num_batches = math.ceil(len(split.train_labels) / batch_size)
    total_steps = epochs * num_batches
    max_shift = max(1, split.train_images.shape[-1] // 16)
    classifier.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(split.train_labels), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            images = random_shift(split.train_images[index], max_shift, generator)
            loss = F.cross_entropy(classifier(images), split.train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    return classifier.eval().requires_grad_(False)


@torch.no_grad()
def classify(classifier: DigitsClassifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, ...]:
    """Features (N, 128) and logits (N, 10) of images (N, 1, H, W) in [-1, 1], in batches."""
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        batch_features = classifier.features(images[start : start + batch_size].float())
        features.append(batch_features)
        logits.append(classifier.head(batch_features))
    return torch.cat(features), torch.cat(logits)


def default_cache_dir() -> Path:
    """$SCULPTDIFF_CACHE, else $XDG_CACHE_HOME/sculptdiff, else ~/.cache/sculptdiff."""
    if os.environ.get("SCULPTDIFF_CACHE"):
        return Path(os.environ["SCULPTDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sculptdiff"


def classifier_cache_path(resolution: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the classifier for `resolution` is cached: keyed by resolution and `CLASSIFIER_VERSION`."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"digits-classifier-{resolution}px-v{CLASSIFIER_VERSION}.safetensors"


def load_digits_classifier(
    resolution: int = 16,
    cache_dir: str | os.PathLike | None = None,
    epochs: int = 30,
    split: DigitsSplit | None = None,
) -> tuple[DigitsClassifier, float]:
    """The cached classifier for `resolution` and its held-out accuracy, training and caching it on first use.

    A cache file written by a run with another `epochs` is retrained (the epoch count is in its metadata).
    """
    if resolution < 16 or resolution % 4 != 0:
        raise ValueError(f"`resolution` must be a multiple of 4 pixels, at least 16 (16 or 32), got {resolution}.")
    path = classifier_cache_path(resolution, cache_dir)
    classifier = DigitsClassifier()
    if path.is_file():
        with safe_open(path, framework="pt") as weights:
            metadata = weights.metadata() or {}
        if metadata.get("epochs") == str(epochs):
            classifier.load_state_dict(load_file(path))
            return classifier.eval().requires_grad_(False), float(metadata["held_out_accuracy"])
    split = split if split is not None else load_digits_split(resolution)
    classifier = train_digits_classifier(split, epochs=epochs)
    _, logits = classify(classifier, split.held_out_images)
    accuracy = (logits.argmax(dim=1) == split.held_out_labels).float().mean().item()
    metadata = {
        "version": CLASSIFIER_VERSION,
        "resolution": str(resolution),
        "epochs": str(epochs),
        "held_out_accuracy": repr(accuracy),
    }
    write_bytes(str(path), save(classifier.state_dict(), metadata=metadata))
    return classifier, accuracy


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features (N, D), the Gaussian that the Frechet distance compares."""
    features = features.double().cpu().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) (Dowson & Landau 1982; FID, Heusel et al.
    2017), with Tr((sigma1 sigma2)^(1/2)) as the sum of the square roots of the eigenvalues of sigma1 sigma2."""
    # Not pytorch-fid's scipy.linalg.sqrtm: the classifier's ReLU features leave most dimensions at zero variance
    # (91 of 128 on the digits), so the product is always singular and sqrtm warns on every set. The eigenvalues
    # of a product of two covariances are real and >= 0, and the trace needs nothing else (same values to 1e-11
    # on the benchmark's calibration sets); round-off leaves tiny negative and imaginary parts, dropped here.
    diff = mu1 - mu2
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum())


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each feature vector to its k-th nearest neighbour in the same set (itself excluded)."""
    if features.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples, got {features.shape[0]}.")
    distances = torch.cdist(features.double(), features.double())
    # the smallest distance is the point to itself (0): the k-th neighbour is at sorted position k
    return distances.kthvalue(k + 1, dim=1).values


def knn_precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3, real_radii: torch.Tensor | None = None
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, https://arxiv.org/abs/1904.06991, eq. 1-3).

    Each set's manifold is the union of balls around its points whose radius is the distance to the k-th nearest
    neighbour. Precision: fraction of generated samples inside the real manifold. Recall: fraction of real samples
    inside the generated manifold. Both sets should have similar sizes (the radii shrink as a set grows).
    """
    if real_radii is None:
        real_radii = knn_radii(real_features, k)
    fake_radii = knn_radii(fake_features, k)
    distances = torch.cdist(fake_features.double(), real_features.double())
    # (N_fake, N_real): fake i lies in the ball of real j
    precision = (distances <= real_radii[None, :]).any(dim=1).float().mean().item()
    # real j lies in the ball of fake i
    recall = (distances <= fake_radii[:, None]).any(dim=0).float().mean().item()
    return precision, recall


def class_metrics(
    logits: torch.Tensor, class_labels: torch.Tensor | None, num_classes: int = NUM_DIGIT_CLASSES
) -> dict[str, float]:
    """Class accuracy, coverage and entropy of a set of samples from the classifier's logits.

    - `class_accuracy`: fraction of samples predicted as the class they were asked for (nan without labels);
    - `class_coverage`: fraction of classes that receive at least half of the uniform share (0.5 / num_classes) of
      the predictions; 1.0 when every class is reasonably represented, 0.1 for a one-class collapse of 10 classes;
    - `class_entropy`: entropy of the predicted-class histogram divided by log(num_classes), in [0, 1] (1 = uniform).
    """
    predictions = logits.argmax(dim=1).cpu()
    histogram = torch.bincount(predictions, minlength=num_classes).double() / predictions.numel()
    nonzero = histogram[histogram > 0]
    entropy = abs((nonzero * nonzero.log()).sum().item()) / math.log(num_classes)
    coverage = (histogram >= 0.5 / num_classes).double().mean().item()
    accuracy = float("nan")
    if class_labels is not None:
        accuracy = (predictions == class_labels.cpu()).float().mean().item()
    return {"class_accuracy": accuracy, "class_coverage": coverage, "class_entropy": entropy}


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (std `sigma` pixels, radius 3 sigma, edges replicated) of images (N, C, H, W)."""
    radius = max(1, math.ceil(3 * sigma))
    positions = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(positions**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    blurred = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(blurred, vertical, groups=channels)


def match_class_labels(labels: torch.Tensor, class_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of distinct images whose `labels` are `class_labels`, drawn at random within each class: a real set
    with the class counts of a generated one (a random draw's class counts wander, and the FD punishes that)."""
    index = torch.empty_like(class_labels)
    for label in class_labels.unique().tolist():
        wanted = torch.nonzero(class_labels == label).flatten()
        pool = torch.nonzero(labels == label).flatten()
        if len(wanted) > len(pool):
            raise ValueError(
                f"`class_labels` asks for {len(wanted)} images of class {label}, but only {len(pool)} are available."
            )
        index[wanted] = pool[torch.randperm(len(pool), generator=generator)[: len(wanted)]]
    return index


class DigitsEvaluator:
    r"""
    Scores sets of generated digits against the held-out real digits, in the digits classifier's feature space.

    Args:
        resolution (`int`, defaults to 16): side of the images, as trained (16 or 32).
        cache_dir (`str`, *optional*): where the classifier is cached (default: `default_cache_dir()`).
        k (`int`, defaults to 3): neighbours of the k-NN precision/recall (3 is the paper's default).
        classifier_epochs (`int`, defaults to 30): training epochs of the classifier (part of its cache key).

    `evaluate(images, class_labels)` returns `fd`, `precision`, `recall`, `class_accuracy`, `class_coverage`,
    `class_entropy` and `num_samples`; see `class_metrics` and `knn_precision_recall` for the definitions.
    """

    def __init__(
        self, resolution: int = 16, cache_dir: str | os.PathLike | None = None, k: int = 3, classifier_epochs: int = 30
    ):
        self.resolution = resolution
        self.k = k
        self.split = load_digits_split(resolution)
        self.classifier, self.held_out_accuracy = load_digits_classifier(
            resolution, cache_dir, classifier_epochs, self.split
        )
        self.reference_features, _ = classify(self.classifier, self.split.held_out_images)
        self.reference_mu, self.reference_sigma = feature_statistics(self.reference_features)
        self.reference_radii = knn_radii(self.reference_features, k)

    def evaluate(self, images: torch.Tensor, class_labels: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics of images (N, 1, resolution, resolution) in [-1, 1], asked for `class_labels` (N,) if given."""
        expected = (1, self.resolution, self.resolution)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"`images` must have shape (N, {', '.join(map(str, expected))}) in [-1, 1], got {tuple(images.shape)};"
                " resize the samples or build the evaluator with their resolution."
            )
        if class_labels is not None and class_labels.shape != (images.shape[0],):
            raise ValueError(
                f"`class_labels` must hold one label per image ({images.shape[0]}), got shape {tuple(class_labels.shape)}."
            )
        features, logits = classify(self.classifier, images)
        mu, sigma = feature_statistics(features)
        precision, recall = knn_precision_recall(self.reference_features, features, self.k, self.reference_radii)
        metrics = {"fd": frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma)}
        metrics.update({"precision": precision, "recall": recall})
        metrics.update(class_metrics(logits, class_labels))
        metrics["num_samples"] = images.shape[0]
        return metrics

    def calibration_sets(self, num_samples: int = 500, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Known sets of `num_samples` images for the labels of a generated set (class i % 10 for image i), from the
        train split: real digits (the floor: train vs held-out), blurred ones, noisy ones, a one-class collapse and
        pure noise. All but the last two are the same real digits, so their differences are the degradations'."""
        train_images, train_labels = self.split.train_images, self.split.train_labels
        largest = NUM_DIGIT_CLASSES * int(torch.bincount(train_labels).min())
        if not 0 < num_samples <= largest:
            raise ValueError(
                f"`num_samples` must be in [1, {largest}] (distinct train digits for the labels i % 10), got"
                f" {num_samples}."
            )
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(num_samples) % NUM_DIGIT_CLASSES
        images = train_images[match_class_labels(train_labels, labels, generator)]
        # blur in pixels of a 16 px image, whatever the resolution
        scale = self.resolution / 16
        zeros = torch.nonzero(train_labels == 0).flatten()
        collapse = train_images[zeros[torch.randint(0, len(zeros), (num_samples,), generator=generator)]]
        noise = torch.randn(images.shape, generator=generator)
        return {
            "real train digits (floor)": (images, labels),
            "real, blurred sigma=0.5 px": (gaussian_blur(images, 0.5 * scale), labels),
            "real, blurred sigma=1 px": (gaussian_blur(images, 1.0 * scale), labels),
            "real + noise std 0.1": ((images + 0.1 * noise).clamp(-1, 1), labels),
            "real + noise std 0.3": ((images + 0.3 * noise).clamp(-1, 1), labels),
            "one-class collapse (all 0s)": (collapse, labels),
            "pure noise N(0, 1)": (noise.clamp(-1, 1), labels),
        }

    def calibrate(self, num_samples: int = 500, seed: int = 0, num_draws: int = 8) -> dict[str, dict[str, float]]:
        """Metrics of each of `calibration_sets` (seed `seed`): the scale a generated set's numbers are read against.

        The floor row holds the mean of each metric over `num_draws` draws of real digits (seeds `seed`,
        `seed + 1`, ...) and `fd_std`, their standard deviation: the noise band of an FD at this sample count. The
        draws share digits (the train split holds about 125 per class), so independent sets vary somewhat more.
        """
        if num_draws < 2:
            raise ValueError(f"`num_draws` must be >= 2 to measure a spread, got {num_draws}.")
        rows = {
            name: self.evaluate(images, labels)
            for name, (images, labels) in self.calibration_sets(num_samples, seed).items()
        }
        floor_name = "real train digits (floor)"
        draws = [rows[floor_name]]
        for draw in range(1, num_draws):
            images, labels = self.calibration_sets(num_samples, seed + draw)[floor_name]
            draws.append(self.evaluate(images, labels))
        rows[floor_name] = {name: float(np.mean([draw[name] for draw in draws])) for name in draws[0]}
        rows[floor_name]["fd_std"] = float(np.std([draw["fd"] for draw in draws], ddof=1))
        rows[floor_name]["num_draws"] = num_draws
        return rows
