#!/usr/bin/env python
# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Does the quality metric rank real digits best? Calibration of `sculptdiff.evaluation.digits`, real data only.

    python benchmarks/bench_metric.py             # about 3 minutes on 2 cores (one classifier trained on first use)
    python benchmarks/bench_metric.py --quick     # the whole path with small sets

An instrument under which models beat real data cannot say which model is better. This script measures, on real
digits only (no model is trained):

1. the evaluator's calibration table at the quality benchmark's sample count: real train digits drawn for the labels
   of a generated set (the floor, mean and spread over `--num_draws` draws: the noise band), blurred and noisy
   copies of those same digits, a one-class collapse and pure noise;
2. why the 2026-12-01 table put real digits (FD 9.82) behind every model (5-7): real train digits drawn at random
   (as `calibrate` drew them then) against drawn for the labels i % 10 that generated sets ask for;
3. whether the classifier flatters the digits it was trained on: the held-out digits are split into halves A and
   B (B is the reference here); the evaluator's classifier (trained on the models' train split) is compared with one
   trained on A only, disjoint from both the models' split and the reference (the 3-way split);
4. how the FD of real vs real falls with the sample count (the estimator's small-sample bias).

Writes benchmarks/results/metric-<date>.md (+ .json).
"""

import argparse
import os
import time
from pathlib import Path

import harness
import numpy as np
import torch
from sklearn.model_selection import train_test_split

from sculptdiff.evaluation.digits import (
    NUM_DIGIT_CLASSES,
    DigitsEvaluator,
    DigitsSplit,
    classify,
    feature_statistics,
    frechet_distance,
    match_class_labels,
    train_digits_classifier,
)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = harness.BenchmarkParser(
        __doc__.split("\n\n")[0],
        results="metric-<date>.md/.json",
        quick={"num_samples": 200, "num_draws": 3, "disjoint_classifier_epochs": 5},
        seed="Seed of the draws, the held-out halves and the noise.",
    )
    parser.add_argument("--resolution", type=int, default=16, help="Image side in pixels (16 or 32).")
    parser.add_argument(
        "--num_samples", type=int, default=500, help="Images per set (the quality benchmark's --num_samples)."
    )
    parser.add_argument("--num_draws", type=int, default=8, help="Random draws per measured row (its noise band).")
    parser.add_argument(
        "--disjoint_classifier_epochs",
        type=int,
        default=60,
        help="Epochs of the classifier trained on held-out half A (270 digits; the evaluator's sees 1257 for 30).",
    )
    args = parser.parse_args(input_args)
    if args.num_draws < 2:
        raise ValueError(f"--num_draws must be >= 2 to measure a spread, got {args.num_draws}.")
    if not 20 <= args.num_samples <= 1220:
        raise ValueError(
            f"--num_samples must be in [20, 1220] (the train split holds 122 digits of its rarest class), got"
            f" {args.num_samples}."
        )
    return args


def fd_of_features(features: torch.Tensor, reference: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(features), *feature_statistics(reference))


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values}


def format_spread(row: dict) -> str:
    return f"{row['mean']:.2f} +- {row['std']:.2f} ({min(row['values']):.2f} .. {max(row['values']):.2f})"


def class_matched_fds(features, labels, reference, num_samples, num_draws, generator) -> dict:
    """FD against `reference` of `num_draws` sets drawn for the labels i % 10 (as generated sets ask)."""
    asked = torch.arange(num_samples) % NUM_DIGIT_CLASSES
    return spread(
        [fd_of_features(features[match_class_labels(labels, asked, generator)], reference) for _ in range(num_draws)]
    )


def main(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    data = harness.results_header(args)
    evaluator = DigitsEvaluator(args.resolution)
    split = evaluator.split
    data["classifier_held_out_accuracy"] = evaluator.held_out_accuracy
    train_features, _ = classify(evaluator.classifier, split.train_images)

    # 1. the calibration table of the fixed instrument
    data["calibration"] = evaluator.calibrate(args.num_samples, seed=args.seed, num_draws=args.num_draws)

    # 2. random draws (the old calibration) against class-matched draws, both against the whole held-out reference
    generator = torch.Generator().manual_seed(args.seed)
    random_draws = [
        fd_of_features(
            train_features[torch.randperm(len(train_features), generator=generator)[: args.num_samples]],
            evaluator.reference_features,
        )
        for _ in range(args.num_draws)
    ]
    data["draws"] = {
        "random draw (the 2026-12-01 calibration)": spread(random_draws),
        "drawn for the labels i % 10": class_matched_fds(
            train_features,
            split.train_labels,
            evaluator.reference_features,
            args.num_samples,
            args.num_draws,
            generator,
        ),
    }

    # 3. the 3-way split: a classifier that has seen neither the models' train digits nor the reference
    half_a, half_b = train_test_split(
        np.arange(len(split.held_out_labels)),
        test_size=0.5,
        random_state=args.seed,
        stratify=split.held_out_labels.numpy(),
    )
    a_images, a_labels = split.held_out_images[half_a], split.held_out_labels[half_a]
    b_images, b_labels = split.held_out_images[half_b], split.held_out_labels[half_b]
    disjoint = train_digits_classifier(
        DigitsSplit(a_images, a_labels, b_images, b_labels), epochs=args.disjoint_classifier_epochs, seed=args.seed
    )
    data["three_way"] = {}
    for name, classifier in (
        ("evaluator's classifier (trained on the models' train split)", evaluator.classifier),
        ("classifier trained on held-out half A only", disjoint),
    ):
        features, logits = classify(classifier, torch.cat([split.train_images, a_images, b_images]))
        train, a_features, b_features = features.split([len(split.train_images), len(a_images), len(b_images)])
        b_accuracy = (logits[-len(b_images) :].argmax(dim=1) == b_labels).float().mean().item()
        data["three_way"][name] = {
            "accuracy on half B": b_accuracy,
            "train split vs B": class_matched_fds(
                train, split.train_labels, b_features, len(b_images), args.num_draws, generator
            ),
            "held-out half A": fd_of_features(a_features, b_features),
        }

    # 4. the small-sample bias: FD of real vs real as the set grows (class-matched draws, whole reference)
    data["bias"] = {
        str(size): class_matched_fds(
            train_features, split.train_labels, evaluator.reference_features, size, args.num_draws, generator
        )
        for size in sorted({100, 200, args.num_samples, 1000})
    }
    data["load"]["end"] = os.getloadavg()
    data["minutes"] = (time.monotonic() - started) / 60

    base = Path(args.output_dir) / f"metric-{data['date'][:10]}{'-quick' if args.quick else ''}"
    text = markdown(args, data)
    harness.write_results(base, text, data)
    print(text)


def markdown(args: argparse.Namespace, data: dict) -> str:
    n = args.num_samples
    lines = [
        f"# Calibration of the digits quality metric ({data['date']})",
        "",
        *harness.header_lines(data["command"], data["machine"], data["load"]),
        f"- Took {data['minutes']:.1f} min. Digits at {args.resolution} px; reference: the held-out 30% (540 digits);"
        f" real sets from the models' train split (70%); evaluator classifier held-out accuracy"
        f" {100 * data['classifier_held_out_accuracy']:.2f}%",
        "",
        f"## 1. The calibration table (N={n}, as `DigitsEvaluator.calibrate` gives it to the quality benchmark)",
        "",
        *harness.calibration_table(data["calibration"]),
    ]
    floor = data["calibration"]["real train digits (floor)"]
    lines += [
        "",
        f"The floor's noise band (std over draws) is {floor['fd_std']:.2f}. The degraded rows are the first draw's"
        " digits, degraded, so their distance to the floor is the degradation's.",
        "",
        f"## 2. Class proportions (N={n}, {args.num_draws} draws each, FD mean +- std (min .. max))",
        "",
        "| real train digits | FD against the held-out reference |",
        "|---|---|",
    ]
    lines += [f"| {name} | {format_spread(row)} |" for name, row in data["draws"].items()]
    lines += [
        "",
        "Generated sets ask for classes i % 10 and the reference is stratified, so both are class-balanced; a random"
        " draw's class counts wander by about +-5 per class at N=500 (one std), and in a class-discriminative feature"
        " space that moves the mean.",
        "",
        "## 3. Does the classifier flatter the digits it was trained on? (reference: held-out half B)",
        "",
        "| features | accuracy on B | train split vs B (drawn for B's labels) | held-out half A vs B |",
        "|---|---|---|---|",
    ]
    for name, row in data["three_way"].items():
        lines.append(
            f"| {name} | {100 * row['accuracy on half B']:.1f}% |"
            f" {format_spread(row['train split vs B'])} | {row['held-out half A']:.2f} |"
        )
    lines += [
        "",
        "## 4. Small-sample bias: real vs real as the set grows (drawn for the labels i % 10)",
        "",
        "| N | FD against the held-out reference |",
        "|---|---|",
    ]
    lines += [f"| {size} | {format_spread(row)} |" for size, row in data["bias"].items()]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(parse_args())
