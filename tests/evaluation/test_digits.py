"""The sample-quality metrics of sculptdiff.evaluation.digits, on known inputs and on the real digits."""

import math
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sculptdiff.evaluation.digits import (
    CLASSIFIER_VERSION,
    NUM_DIGIT_CLASSES,
    DigitsEvaluator,
    class_metrics,
    classifier_cache_path,
    feature_statistics,
    frechet_distance,
    gaussian_blur,
    knn_precision_recall,
    load_digits_classifier,
    load_digits_split,
    match_class_labels,
)


# A briefly trained classifier keeps the file fast; the orderings tested below hold for it as for the full one.
EPOCHS = 5


@pytest.fixture(scope="module")
def split():
    return load_digits_split(16)


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory, split):
    return DigitsEvaluator(16, cache_dir=tmp_path_factory.mktemp("classifier"), classifier_epochs=EPOCHS)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_mean_shift_adds_its_square():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1000, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    shift = np.linspace(-1, 1, 16)
    # equal covariances: only ||mu1 - mu2||^2 remains
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_singular_covariances_is_exact_and_quiet():
    # the classifier's features have dead (zero-variance) dimensions, so every real covariance is singular; for
    # diagonal ones the trace term is sum (sqrt(s1) - sqrt(s2))^2: (1 - 3)^2 + (2 - 1)^2 + 0 + (0 - sqrt 2)^2 = 7
    sigma1, sigma2 = np.diag([1.0, 4.0, 0.0, 0.0]), np.diag([9.0, 1.0, 0.0, 2.0])
    mu = np.zeros(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(7.0, rel=1e-12)
        # a rotation changes nothing: the distance depends on the Gaussians, not on the basis
        rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))
        rotated = frechet_distance(mu, rotation @ sigma1 @ rotation.T, mu, rotation @ sigma2 @ rotation.T)
        assert rotated == pytest.approx(7.0, rel=1e-6)  # sqrt of a round-off eigenvalue ~1e-16 is ~1e-8


def test_frechet_distance_grows_with_blur_and_noise(evaluator, split):
    images, labels = split.train_images[:400], split.train_labels[:400]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    real = evaluator.evaluate(images, labels)["fd"]
    blurred = [evaluator.evaluate(gaussian_blur(images, sigma), labels)["fd"] for sigma in (1.0, 2.0)]
    noisy = [evaluator.evaluate((images + std * noise).clamp(-1, 1), labels)["fd"] for std in (0.3, 0.6)]
    assert real < blurred[0] < blurred[1]
    assert real < noisy[0] < noisy[1]


def test_evaluate_scores_real_digits_and_a_collapse(evaluator, split):
    images, labels = split.train_images[:400], split.train_labels[:400]
    real = evaluator.evaluate(images, labels)
    assert evaluator.held_out_accuracy > 0.8
    assert real["class_accuracy"] > 0.8 and real["class_coverage"] == 1.0 and real["num_samples"] == 400
    zeros = split.train_images[split.train_labels == 0]
    collapse = evaluator.evaluate(zeros[torch.arange(400) % len(zeros)], labels)
    assert collapse["class_coverage"] <= 0.2 and collapse["recall"] < real["recall"] / 2
    assert collapse["fd"] > 5 * real["fd"]


def test_evaluate_rejects_wrong_shapes(evaluator):
    with pytest.raises(ValueError, match="resolution"):
        evaluator.evaluate(torch.zeros(8, 1, 32, 32))
    with pytest.raises(ValueError, match="one label per image"):
        evaluator.evaluate(torch.zeros(8, 1, 16, 16), torch.zeros(7, dtype=torch.long))


def test_class_metrics_on_known_logits():
    # 100 samples asked for class i % 10; 70 predicted right, the other 30 all predicted as class 0
    asked = torch.arange(100) % 10
    predicted = torch.where(torch.arange(100) < 70, asked, torch.zeros_like(asked))
    metrics = class_metrics(torch.nn.functional.one_hot(predicted, 10).float(), asked)
    # the last 30 samples ask for 0..9 three times: the 3 asking for class 0 are still right
    assert metrics["class_accuracy"] == pytest.approx(0.73)
    # histogram: class 0 gets 7 + 30 = 37, classes 1-9 get 7 each (>= 5, half the uniform share)
    assert metrics["class_coverage"] == 1.0
    shares = np.array([0.37] + [0.07] * 9)
    assert metrics["class_entropy"] == pytest.approx(-(shares * np.log(shares)).sum() / math.log(10))

    collapse = class_metrics(torch.nn.functional.one_hot(torch.full((50,), 3), 10).float(), None)
    assert math.isnan(collapse["class_accuracy"])
    assert collapse["class_coverage"] == pytest.approx(0.1) and collapse["class_entropy"] == 0.0
    # four of ten classes at 25% each, the others empty: coverage 0.4, entropy log(4) / log(10)
    four = class_metrics(torch.nn.functional.one_hot(torch.arange(40) % 4, 10).float(), None)
    assert four["class_coverage"] == pytest.approx(0.4)
    assert four["class_entropy"] == pytest.approx(math.log(4) / math.log(10))


def test_knn_precision_recall_on_known_points():
    # real points 0, 1, ..., 99 on a line: with k=1 every real ball has radius 1
    real = torch.arange(100, dtype=torch.float64)[:, None]
    assert knn_precision_recall(real, real.clone(), k=1) == (1.0, 1.0)
    assert knn_precision_recall(real, real + 1000, k=1) == (0.0, 0.0)
    # generated: 0..49 (inside) and 1000..1049 (outside); their own radii are 1, so they cover real 0..50
    fake = torch.cat([real[:50], real[:50] + 1000])
    precision, recall = knn_precision_recall(real, fake, k=1)
    assert precision == 0.5
    assert recall == pytest.approx(0.51)
    with pytest.raises(ValueError, match="more than k"):
        knn_precision_recall(real, real[:3], k=3)


def test_gaussian_blur_keeps_constants_and_the_mean():
    constant = torch.full((2, 1, 16, 16), 0.25)
    torch.testing.assert_close(gaussian_blur(constant, 1.0), constant)
    point = torch.zeros(1, 1, 16, 16)
    point[0, 0, 8, 8] = 1.0
    blurred = gaussian_blur(point, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and blurred.max() < 0.2


def test_classifier_cache_round_trip(tmp_path, split):
    path = classifier_cache_path(16, tmp_path)
    assert path.name == f"digits-classifier-16px-v{CLASSIFIER_VERSION}.safetensors"
    assert not path.exists()
    trained, accuracy = load_digits_classifier(16, tmp_path, epochs=1, split=split)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]
    with safe_open(path, framework="pt") as weights:
        assert weights.metadata()["held_out_accuracy"] == repr(accuracy)
    modified = path.stat().st_mtime_ns
    loaded, loaded_accuracy = load_digits_classifier(16, tmp_path, epochs=1, split=split)
    assert loaded_accuracy == accuracy and path.stat().st_mtime_ns == modified
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    images = split.held_out_images[:16]
    torch.testing.assert_close(loaded(images), trained(images))
    # another resolution is another file
    assert classifier_cache_path(32, tmp_path) != path
    with pytest.raises(ValueError, match="resolution"):
        load_digits_classifier(12, tmp_path)


def test_calibration_draws_real_digits_for_the_labels_a_generated_set_asks_for(evaluator, split):
    # a random draw's class counts wander, and the FD punishes that: the real floor scored worse than every model
    sets = evaluator.calibration_sets(num_samples=200, seed=0)
    images, labels = sets["real train digits (floor)"]
    assert torch.equal(labels, torch.arange(200) % NUM_DIGIT_CLASSES)
    # each image is a distinct train digit of the class it stands for
    matches = (images.flatten(1)[:, None, :] == split.train_images.flatten(1)[None, :, :]).all(dim=2)
    rows = matches.float().argmax(dim=1)
    assert matches.any(dim=1).all() and len(rows.unique()) == 200
    assert torch.equal(split.train_labels[rows], labels)
    blurred, blurred_labels = sets["real, blurred sigma=1 px"]
    torch.testing.assert_close(blurred, gaussian_blur(images, 1.0))
    assert torch.equal(blurred_labels, labels)


def test_calibration_ranks_real_digits_best(evaluator, split):
    rows = evaluator.calibrate(num_samples=300, seed=0, num_draws=3)
    floor = rows["real train digits (floor)"]
    assert floor["num_draws"] == 3 and floor["fd_std"] > 0
    # every degradation lies clearly above the floor and its noise band
    for name in (
        "real, blurred sigma=1 px",
        "real + noise std 0.3",
        "one-class collapse (all 0s)",
        "pure noise N(0, 1)",
    ):
        assert rows[name]["fd"] > floor["fd"] + 2 * floor["fd_std"], name
    assert rows["real, blurred sigma=1 px"]["fd"] > rows["real, blurred sigma=0.5 px"]["fd"]
    assert rows["real + noise std 0.3"]["fd"] > rows["real + noise std 0.1"]["fd"]
    # a class-balanced set of other real digits, slightly blurred, stands for a good model: it must not beat real data
    labels = torch.arange(300) % NUM_DIGIT_CLASSES
    others = split.train_images[match_class_labels(split.train_labels, labels, torch.Generator().manual_seed(99))]
    assert evaluator.evaluate(gaussian_blur(others, 0.75), labels)["fd"] > floor["fd"] + 2 * floor["fd_std"]
    with pytest.raises(ValueError, match="num_draws"):
        evaluator.calibrate(num_samples=100, num_draws=1)
    with pytest.raises(ValueError, match=r"`num_samples` must be in \[1, 1220\]"):
        evaluator.calibration_sets(num_samples=1221)


def test_match_class_labels_draws_distinct_images_of_each_asked_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    asked = torch.tensor([1, 0, 2, 0, 1])
    index = match_class_labels(labels, asked, torch.Generator().manual_seed(0))
    assert torch.equal(labels[index], asked) and len(index.unique()) == 5
    with pytest.raises(ValueError, match="2 images of class 2, but only 1"):
        match_class_labels(labels, torch.tensor([2, 2]), torch.Generator().manual_seed(0))


def test_the_old_module_path_still_imports_the_evaluator():
    # the training script's --eval_steps (and code written before the move) import sculptdiff.training.evaluation
    from sculptdiff.evaluation import digits
    from sculptdiff.training import evaluation

    for name in ("DigitsEvaluator", "digits_split_indices", "load_digits_split", "match_class_labels"):
        assert name in evaluation.__all__
    assert all(getattr(evaluation, name) is getattr(digits, name) for name in evaluation.__all__)
