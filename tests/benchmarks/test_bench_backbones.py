"""benchmarks/bench_backbones.py: its FLOP count, its model sizes, its scaling fit and the verdicts it prints."""

import math
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_backbones  # noqa: E402
import harness  # noqa: E402

from sculptdiff.training.objective import diffusion_loss  # noqa: E402
from sculptdiff.training.recipe import RECIPE, build_noise_scheduler, default_dit_config  # noqa: E402


def tiny_dit(num_layers=2, heads=2, head_dim=8):
    torch.manual_seed(0)
    return harness.build_sculpt_digits_dit(
        8, num_layers=num_layers, num_attention_heads=heads, attention_head_dim=head_dim
    ).train()


def test_train_step_flops_counts_the_dit_attention_that_flop_counter_mode_misses_on_cpu():
    model, scheduler = tiny_dit(), build_noise_scheduler()
    images, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    with FlopCounterMode(display=False) as plain:
        diffusion_loss(model, scheduler, images, RECIPE.prediction_type, class_labels=labels).backward()
    model.zero_grad(set_to_none=True)

    counted = bench_backbones.train_step_flops(model, scheduler, images, labels)

    # per layer: Q K^T and (softmax) V, 2 x (2 B H L^2 d) forward, 2.5x that backward (torch's SDPA formulas);
    # 8 px in 2 px patches: L = 16 tokens
    batch, heads, tokens, head_dim = 4, 2, 16, 8
    attention_forward = 4 * batch * heads * tokens**2 * head_dim
    assert counted - plain.get_total_flops() == 2 * (attention_forward + 2.5 * attention_forward)
    assert all(parameter.grad is None for parameter in model.parameters())


def test_train_step_flops_grows_with_the_batch_linearly():
    model, scheduler = tiny_dit(), build_noise_scheduler()
    small = bench_backbones.train_step_flops(model, scheduler, torch.randn(2, 1, 8, 8), torch.arange(2))
    large = bench_backbones.train_step_flops(model, scheduler, torch.randn(6, 1, 8, 8), torch.arange(6))
    assert large == 3 * small


def test_backbones_are_the_recipes_models_and_one_smaller_of_each_family():
    sizes = {}
    for name in bench_backbones.DEFAULT_BACKBONES:
        family, shape, schedule = bench_backbones.BACKBONES[name]
        assert schedule == {}
        model = bench_backbones.FAMILY_BUILDERS[family](16, **shape)
        sizes[name] = (type(model).__name__, sum(parameter.numel() for parameter in model.parameters()))
    assert sizes == {
        "U-Net S": ("SculptUNet2DModel", 300_641),
        "U-Net M": ("SculptUNet2DModel", 1_192_641),
        "DiT S": ("SculptDiT2DModel", 503_108),
        "DiT M": ("SculptDiT2DModel", 1_114_084),
    }
    # "M" is what train_sculpt.py builds by default for each --model_type
    assert bench_backbones.BACKBONES["U-Net M"][1] == bench_backbones.BACKBONES["DiT M"][1] == {}


def test_fit_power_law_recovers_the_exponent_and_needs_two_compute_levels():
    flops = [1e12, 4e12, 1.6e13, 6.4e13]
    assert bench_backbones.fit_power_law(flops, [300 * f**-0.5 for f in flops]) == pytest.approx(-0.5)
    assert bench_backbones.fit_power_law([1e12, 1e12], [10.0, 12.0]) is None


def test_matmul_gflops_is_a_positive_rate_by_both_clocks():
    rates = bench_backbones.matmul_gflops(64, repeats=2)
    assert set(rates) == {"wall", "cpu"} and all(0 < rate < math.inf for rate in rates.values())


def test_efficiency_divides_counted_flops_by_time_and_by_the_peak_of_the_same_clock():
    run = SimpleNamespace(name="DiT M", flops_per_step=2e9, steps=10, seconds=4.0)
    peaks = [{"wall": 8.0, "cpu": 10.0}, {"wall": 10.0, "cpu": 10.0}, {"wall": 12.0, "cpu": 10.0}]
    result = bench_backbones.efficiency([run], {"DiT M": {"wall": 0.5, "cpu": 0.4}}, peaks)
    info = result["models"]["DiT M"]
    assert result["peak_gflops"] == {"wall": 10.0, "cpu": 10.0}
    # 2 GFLOP x 10 steps in 4 s of training; 2 GFLOP in 0.5 wall s, in 0.4 CPU s
    assert (info["step_gflops"], info["step_peak_fraction"]) == (5.0, 0.5)
    assert info["forward_backward_gflops"] == {"wall": 4.0, "cpu": 5.0}
    assert info["forward_backward_peak_fraction"] == {"wall": 0.4, "cpu": 0.5}


def test_parse_args_refuses_a_step_list_without_the_target_and_snapshots_outside_the_budget():
    with pytest.raises(ValueError, match="--steps .* include 10"):
        bench_backbones.parse_args(["--steps", "5", "20"])
    with pytest.raises(ValueError, match="--snapshots"):
        bench_backbones.parse_args(["--snapshots", "0.5", "1.0"])
    quick = bench_backbones.parse_args(["--quick"])
    assert (quick.train_minutes, quick.num_samples, quick.steps) == (0.25, 100, [5, 10])
    with pytest.raises(ValueError, match="--backbones must include a U-Net and a DiT"):
        bench_backbones.parse_args(["--backbones", "DiT M", "DiT deep"])


def test_every_probe_changes_only_what_its_name_says():
    probe = bench_backbones.BACKBONES
    learning_rate_probes = 0
    for name, (family, shape, schedule) in probe.items():
        base, _, learning_rate = name.partition(", lr ")
        if learning_rate:
            # "<model>, lr X": the model's family and shape, the learning rate X (and at most a warm-up)
            assert (family, shape) == probe[base][:2]
            assert schedule["learning_rate"] == float(learning_rate)
            assert set(schedule) <= {"learning_rate", "lr_warmup_steps"}
            learning_rate_probes += 1
    assert learning_rate_probes == 9
    assert probe["DiT M, lr 3e-4"] == ("DiT", {}, {"learning_rate": 3e-4})
    # the ablation removes the long skips of the recipe's DiT, and only them
    assert default_dit_config()["long_skip_connections"]
    assert probe["DiT S, no skips"] == ("DiT", {**probe["DiT S"][1], "long_skip_connections": False}, {})
    assert probe["DiT patch 1"][1]["patch_size"] == 1 and probe["DiT deep"][1]["num_layers"] == 12
    # the learning rate reaches the optimiser through the run's schedule: warm-up step 1 of 500, cosine at 0
    torch.manual_seed(0)
    run = harness.build_diffusion_run(
        "probe",
        tiny_dit(),
        build_noise_scheduler(),
        "epsilon",
        harness.digits_train_dataset(8),
        0,
        learning_rate=2e-3,
        lr_warmup_steps=500,
    )
    run.train_step(0.0)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 500)


def cell(model, family, fd, fraction=1.0, steps=10, guidance=1.0, train_flops=1e12):
    return {
        "model": model,
        "family": family,
        "fraction": fraction,
        "steps": steps,
        "guidance": guidance,
        "fd": fd,
        "train_flops": train_flops,
    }


@pytest.mark.parametrize(("dit_fd", "verdict"), [(12.5, "met"), (13.0, "missed")])
def test_verdict_compares_the_best_dit_with_the_best_unet_at_ten_steps(tmp_path, dit_fd, verdict):
    report = bench_backbones.Report(bench_backbones.parse_args(["--output_dir", str(tmp_path)]))
    report.data["models"] = {
        name: {"family": bench_backbones.BACKBONES[name][0]} for name in bench_backbones.DEFAULT_BACKBONES
    }
    report.data["cells"] = [
        cell("U-Net S", "U-Net", 14.0),
        cell("U-Net M", "U-Net", 10.0),
        # a better U-Net at 20 steps and a better DiT snapshot do not count: final models, 10 steps, w=1
        cell("U-Net M", "U-Net", 5.0, steps=20),
        cell("DiT S", "DiT", 30.0),
        cell("DiT M", "DiT", dit_fd),
        cell("DiT S", "DiT", 9.0, fraction=0.5),
    ]
    lines = "\n".join(report.verdicts())
    assert f"best DiT (DiT M, {dit_fd:.2f}) vs best U-Net (U-Net M, 10.00)" in lines
    assert f"ratio {dit_fd / 10:.2f} (target <= 1.25): **{verdict}**" in lines


def test_scaling_fit_uses_each_familys_snapshots_and_sizes(tmp_path):
    report = bench_backbones.Report(bench_backbones.parse_args(["--output_dir", str(tmp_path)]))
    report.data["cells"] = [
        cell("DiT S", "DiT", 40.0, fraction=0.5, train_flops=1e12),
        cell("DiT M", "DiT", 10.0, train_flops=1e14),
        cell("U-Net M", "U-Net", 20.0, train_flops=1e13),
        # guided and other step counts are not scaling points
        cell("DiT M", "DiT", 1.0, guidance=3.0, train_flops=1e15),
    ]
    report.fit_scaling()
    assert report.data["scaling"]["DiT"] == {"slope": pytest.approx(math.log10(10 / 40) / 2), "points": 2}
    assert report.data["scaling"]["U-Net"] == {"slope": None, "points": 1}


def test_scoring_plan_puts_the_targets_cells_first():
    args = bench_backbones.parse_args(["--steps", "5", "10", "20", "--snapshots", "0.25"])
    runs = [SimpleNamespace(name=name) for name in bench_backbones.DEFAULT_BACKBONES]
    plan = [
        (run.name, fraction, steps, guidance)
        for run, fraction, steps, guidance in bench_backbones.scoring_plan(args, runs)
    ]
    assert plan[:4] == [(name, 1.0, 10, 1.0) for name in bench_backbones.DEFAULT_BACKBONES]
    assert plan[4:8] == [(name, 1.0, 10, 3.0) for name in bench_backbones.DEFAULT_BACKBONES]
    assert len(plan) == 4 * (3 + 1 + 1)
    assert plan[-4:] == [(name, 0.25, 10, 1.0) for name in bench_backbones.DEFAULT_BACKBONES]


def test_backbone_run_keeps_the_ema_weights_once_when_its_clock_passes_a_snapshot_fraction():
    torch.manual_seed(0)
    scheduler = build_noise_scheduler()
    run = harness.build_diffusion_run("tiny", tiny_dit(), scheduler, "epsilon", harness.digits_train_dataset(8), 0)
    run = bench_backbones.BackboneRun(
        **{column.name: getattr(run, column.name) for column in fields(run)}, snapshot_fractions=(0.5,)
    )
    run.train_step(0.2)
    assert run.snapshots == {}
    run.train_step(0.5)
    kept_steps, kept = run.snapshots[0.5]
    # the weights before this step: one step trained
    assert kept_steps == 1 and run.steps == 2
    run.train_step(0.8)
    assert run.snapshots[0.5][1] is kept
    assert any(not torch.equal(weight, shadow) for weight, shadow in zip(kept, run.ema.shadow_params))
