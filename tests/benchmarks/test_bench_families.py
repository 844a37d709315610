"""benchmarks/bench_families.py: the seeds' claims are judged from the numbers, and the summary counts failures."""

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_families  # noqa: E402


CALIBRATION = {
    bench_families.CONDITIONAL_FLOOR: {"fd": 5.0, "fd_std": 0.5, "recall": 0.9},
    bench_families.UNCONDITIONAL_FLOOR: {"fd": 10.0, "fd_std": 1.0, "recall": 0.9},
    "real, blurred sigma=1 px": {"fd": 30.0},
    "pure noise N(0, 1)": {"fd": 400.0},
}


def result(name, family, seed, fd, recall=0.8, collapse=0.0, sharp=1.0, calls=1, speed=None, loss=0.1):
    scored = {
        "fd": fd,
        "precision": 0.9,
        "recall": recall,
        "class_coverage": 1.0,
        "mode_collapse": collapse,
        "sharpness": sharp,
    }
    entry = {
        "name": name,
        "family": family,
        "seed": seed,
        "calls": calls,
        "training_seconds": 60.0,
        "final_loss": loss,
        "conditional": None,
        "unconditional": scored,
    }
    if speed is not None:
        entry["images_per_second"] = speed
    return entry


def seed_like_results():
    """Numbers that agree with the seed's table: a collapsing, unstable GAN, a blurry VAE, a slow, diverse diffusion
    model (speed measured at seed 0, as the benchmark does)."""
    results = []
    for seed, (gan_fd, vae_fd, diffusion_fd) in enumerate([(12.0, 60.0, 11.0), (40.0, 61.0, 11.5)]):
        fast, slow = (5000.0, 40.0) if seed == 0 else (None, None)
        results.append(result("GAN", "GAN", seed, gan_fd, recall=0.5, collapse=0.2, speed=fast))
        results.append(result("VAE", "VAE", seed, vae_fd, recall=0.75, sharp=0.6, loss=None, speed=fast))
        results.append(result("U-Net, 50 steps", "diffusion", seed, diffusion_fd, recall=0.9, calls=50, speed=slow))
    return results


def test_seed_like_numbers_confirm_every_claim():
    summary = bench_families.summarize(seed_like_results(), CALIBRATION)
    cells = bench_families.verdicts(summary, CALIBRATION)
    for trait in ("diversity", "stability", "speed"):
        for family in ("GAN", "VAE", "diffusion"):
            assert cells[trait][family][1] == "holds", (trait, family, cells[trait][family])
    assert cells["quality"]["VAE"][1] == "holds"
    assert cells["quality"]["diffusion"][1] == "holds"
    # the GAN's mean FD (26) is far from diffusion's (11.25): its "very high quality" does not hold here
    assert cells["quality"]["GAN"][1] == "does not hold"


def test_contrary_numbers_refute_the_claims():
    results = seed_like_results()
    for entry in results:
        if entry["family"] == "GAN":
            entry["unconditional"].update(fd=11.0, recall=0.95, mode_collapse=0.0)
        if entry["family"] == "diffusion":
            entry["unconditional"].update(recall=0.6)
            if "images_per_second" in entry:
                entry["images_per_second"] = 9000.0
    summary = bench_families.summarize(results, CALIBRATION)
    cells = bench_families.verdicts(summary, CALIBRATION)
    assert cells["quality"]["GAN"][1] == "holds"
    assert cells["diversity"]["GAN"][1] == "does not hold"
    assert cells["diversity"]["diffusion"][1] == "does not hold"
    assert cells["stability"]["GAN"][1] == "does not hold"
    assert cells["speed"]["diffusion"][1] == "does not hold"


def test_summary_counts_diverged_and_collapsed_runs():
    results = [
        result("GAN", "GAN", 0, 20.0),
        result("GAN", "GAN", 1, 500.0),  # worse than pure noise: diverged
        result("GAN", "GAN", 2, 20.0, loss=float("nan")),  # non-finite loss: diverged
        result("GAN", "GAN", 3, 20.0, collapse=0.2),  # two classes of ten below 5%: collapsed
        result("GAN", "GAN", 4, 20.0, collapse=0.1),  # one class: not collapsed
    ]
    entry = bench_families.summarize(results, CALIBRATION)["GAN"]
    assert (entry["diverged"], entry["collapsed"], entry["seeds"]) == (2, 1, 5)
    assert entry["unconditional"]["fd"] == pytest.approx(116.0)


def test_class_conditional_rows_are_judged_on_their_class_matched_samples():
    """A diffusion model's null class trains on a tenth of the batches; its class-matched samples are what it was
    built to draw, and what the GAN's "unconditional" random-class samples also are."""
    results = seed_like_results()
    for entry in results:
        if entry["family"] == "diffusion":
            # a weak null class (FD 80 against the random-draw floor 10), strong class-matched samples (6 against 5)
            entry["conditional"] = {**entry["unconditional"], "fd": 6.0, "recall": 0.92}
            entry["unconditional"] = {**entry["unconditional"], "fd": 80.0, "recall": 0.5}
    summary = bench_families.summarize(results, CALIBRATION)
    score = bench_families.quality(summary["U-Net, 50 steps"], CALIBRATION)
    assert (score["kind"], score["ratio"], score["blurred"]) == ("conditional", pytest.approx(1.2), 6.0)
    assert bench_families.quality(summary["VAE"], CALIBRATION)["kind"] == "unconditional"
    cells = bench_families.verdicts(summary, CALIBRATION)
    assert cells["quality"]["diffusion"] == (
        "FD 6.00 = 1.20x real (conditional), precision 0.900, sharpness 1.00 [U-Net, 50 steps]",
        "holds",
    )
    assert cells["diversity"]["diffusion"][0].startswith("recall 0.920")


def test_render_recomputes_the_verdicts_of_a_saved_run(tmp_path):
    import json

    import harness

    args = bench_families.parse_args(["--seeds", "2"])
    data = {
        "date": "2026-12-02 04:00 UTC",
        "command": "python benchmarks/bench_families.py --seeds 2",
        "machine": harness.machine_info(),
        "load": {"start": [0.0, 0.0, 0.0]},
        "args": vars(args),
        # the full calibration rows a run writes
        "calibration": {
            name: {
                "precision": 0.9,
                "class_accuracy": 1.0,
                "class_coverage": 1.0,
                "class_entropy": 1.0,
                "num_draws": 8,
                "recall": 0.9,
                **row,
            }
            for name, row in CALIBRATION.items()
        },
        "notes": [],
        "results": seed_like_results(),
        "summary": {},
        "verdicts": {trait: {} for trait in bench_families.SEED_CLAIMS},
        "status": "complete (1 min)",
    }
    path = tmp_path / "families-2026-12-02.json"
    path.write_text(json.dumps(data))
    bench_families.render(path)
    rendered = json.loads(path.read_text())
    assert rendered["verdicts"]["quality"]["diffusion"][1] == "holds"
    assert rendered["summary"]["GAN"]["seeds"] == 2 and rendered["status"] == "complete (1 min)"
    markdown = path.with_suffix(".md").read_text()
    assert "verdicts recomputed by" in markdown and "| quality | diffusion | very high, fine detail |" in markdown


def test_one_seed_leaves_stability_unmeasured():
    results = [entry for entry in seed_like_results() if entry["seed"] == 0]
    cells = bench_families.verdicts(bench_families.summarize(results, CALIBRATION), CALIBRATION)
    assert all(cell[1] == "not measured (1 seed)" for cell in cells["stability"].values())


def test_sharpness_drops_with_blur():
    from sculptdiff.evaluation.digits import gaussian_blur

    images = torch.rand(8, 1, 16, 16) * 2 - 1
    assert bench_families.sharpness(gaussian_blur(images, 1.0)) < 0.5 * bench_families.sharpness(images)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="--budget_minutes"):
        bench_families.parse_args(["--budget_minutes", "0"])
    with pytest.raises(ValueError, match="--seeds"):
        bench_families.parse_args(["--seeds", "0"])
    with pytest.raises(ValueError, match="--other_steps"):
        bench_families.parse_args(["--other_steps", "10", "0"])
    quick = bench_families.parse_args(["--quick"])
    assert (quick.seeds, quick.num_samples, quick.steps, quick.other_steps) == (1, 100, [10], [10])
    default = bench_families.parse_args([])
    assert (default.steps, default.other_steps) == ([10, 50], [10])


def test_harness_trains_a_gan_and_a_diffusion_model_interleaved_on_their_own_clocks():
    import gan
    import harness

    from sculptdiff.training.recipe import build_noise_scheduler

    torch.manual_seed(0)
    unet = harness.build_sculpt_digits_unet(
        16, block_out_channels=(8, 16), attention_levels=(False, True), attention_head_dim=8, norm_num_groups=4
    )
    dataset = harness.digits_train_dataset(16)
    run = harness.build_diffusion_run("unet", unet, build_noise_scheduler(), "epsilon", dataset, seed=0)
    images = torch.rand(16, 1, 16, 16) * 2 - 1
    trainer = gan.GANTrainer(images, torch.arange(16) % 10, gan.GANSettings(batch_size=8, width=8), seed=0)
    before = [p.clone() for p in unet.parameters()]
    harness.train_interleaved([run, trainer], budget_seconds=0.5, log=print)
    for member in (run, trainer):
        assert member.seconds >= 0.5 and member.steps >= 1 and len(member.losses) == member.steps
    assert any(not torch.equal(b, a) for b, a in zip(before, unet.parameters()))
    model = run.finish()
    assert not model.training
    samples, calls = harness.sample_digits(model, run.noise_scheduler, 2, seed=0, batch_size=3)
    assert samples.shape == (3, 1, 16, 16) and calls == 2
    assert samples.min() >= -1 and samples.max() <= 1


def test_a_run_of_one_family_leaves_the_comparative_verdicts_open():
    """`--families dit` measures the DiT row alone: "the best quality", "the highest recall", "the largest spread" and
    "slower than every one-step row" have nothing to be read against, and must not come out as "does not hold"."""
    results = [entry for entry in seed_like_results() if entry["family"] == "diffusion"]
    cells = bench_families.verdicts(bench_families.summarize(results, CALIBRATION), CALIBRATION)
    assert {trait: cells[trait]["diffusion"][1] for trait in cells} == {
        "quality": bench_families.ALONE,
        "diversity": bench_families.ALONE,
        "stability": bench_families.ALONE,
        "speed": bench_families.ALONE,
    }
    # the VAE's diversity ("good": recall near real digits', nothing collapsed) and one-step speed need no other family
    results = [entry for entry in seed_like_results() if entry["family"] == "VAE"]
    cells = bench_families.verdicts(bench_families.summarize(results, CALIBRATION), CALIBRATION)
    assert (cells["quality"]["VAE"][1], cells["stability"]["VAE"][1]) == (bench_families.ALONE, bench_families.ALONE)
    assert (cells["diversity"]["VAE"][1], cells["speed"]["VAE"][1]) == ("holds", "holds")
