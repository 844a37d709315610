"""benchmarks/bench_backbones.py: its FLOP count, its model sizes, its scaling fit and the verdicts it prints."""

import json
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


def tiny_dit_run(name="probe", **schedule):
    """A timed run of `tiny_dit()` on 8 px digits, the recipe's objective and seed 0; `schedule` as harness takes it."""
    return harness.build_diffusion_run(
        name, tiny_dit(), build_noise_scheduler(), "epsilon", harness.digits_train_dataset(8), 0, **schedule
    )


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
    run = tiny_dit_run(learning_rate=2e-3, lr_warmup_steps=500)
    run.train_step(0.0)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 500)


def test_the_schedule_probe_keeps_the_peak_rate_where_the_recipe_decays_it():
    probe = bench_backbones.BACKBONES
    for base in ["U-Net S", "DiT S"]:
        family, shape, schedule = probe[f"{base}, constant lr"]
        assert (family, shape, schedule) == (*probe[base][:2], {"lr_scheduler": "constant_with_warmup"})
    rates = {}
    for lr_scheduler in ["cosine", "constant_with_warmup"]:
        torch.manual_seed(0)
        run = tiny_dit_run(lr_scheduler, lr_warmup_steps=1, lr_scheduler=lr_scheduler)
        run.train_step(0.75)
        rates[lr_scheduler] = run.optimizer.param_groups[0]["lr"]
    assert rates["cosine"] == pytest.approx(RECIPE.learning_rate * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert rates["constant_with_warmup"] == RECIPE.learning_rate
    with pytest.raises(ValueError, match="lr_scheduler 'linear': a timed run knows 'cosine' and"):
        tiny_dit_run("linear", lr_scheduler="linear")


def test_the_optimiser_probe_shortens_adams_second_moment_memory_and_nothing_else():
    probe = bench_backbones.BACKBONES
    for base in ["U-Net S", "DiT S"]:
        family, shape, schedule = probe[f"{base}, beta2 0.99"]
        assert (family, shape, schedule) == (*probe[base][:2], {"adam_beta2": 0.99})
    betas = {}
    for adam_beta2 in [RECIPE.adam_beta2, 0.99]:
        run = tiny_dit_run(adam_beta2=adam_beta2)
        run.train_step(0.0)
        betas[adam_beta2] = run.optimizer.param_groups[0]["betas"]
    assert betas == {RECIPE.adam_beta2: (RECIPE.adam_beta1, RECIPE.adam_beta2), 0.99: (RECIPE.adam_beta1, 0.99)}


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


ABLATION = ["--backbones", "U-Net S", "DiT S", "DiT S, no skips", "--steps", "10", "--snapshots", "0.5"]


def results_file(tmp_path, seed: int, fds: dict[str, float], *extra: str, snapshot_fd: float | None = 20.0):
    """A results file of an ablation run at `seed` as bench_backbones writes it, its final FDs at 10 steps `fds`."""
    report = bench_backbones.Report(
        bench_backbones.parse_args([*ABLATION, "--seed", str(seed), "--output_dir", str(tmp_path), *extra])
    )
    report.base = tmp_path / f"seed{seed}"
    report.data["status"] = "complete (32 min)"
    report.data["load"]["after training"] = (2.0, 2.0, 2.0)
    report.data["models"] = {name: {"family": name.split()[0], "steps": 1000 + seed} for name in fds}
    for name, fd in fds.items():
        family = bench_backbones.BACKBONES[name][0]
        report.data["cells"].append(cell(name, family, fd) | {"class_accuracy": 0.9, "steps_trained": 1000})
        if snapshot_fd is not None:
            report.data["cells"].append(
                cell(name, family, snapshot_fd + seed, fraction=0.5) | {"class_accuracy": 0.8, "steps_trained": 500}
            )
    # the JSON as Report.save writes it (the markdown would want every column of a real run)
    harness.write_results(report.base, "", report.data)
    return str(report.base.with_suffix(".json"))


def test_combine_reports_the_means_over_seeds_the_verdict_on_them_and_paired_differences(tmp_path):
    seeds = {0: (8.0, 10.0, 11.0), 1: (9.0, 12.0, 11.0), 2: (10.0, 14.0, 20.0)}
    paths = [
        results_file(tmp_path, seed, dict(zip(["U-Net S", "DiT S", "DiT S, no skips"], fds)))
        for seed, fds in seeds.items()
    ]
    args = bench_backbones.parse_args(["--output_dir", str(tmp_path / "out"), "--combine", *paths])

    markdown = bench_backbones.combine(args)

    # means 9, 12, 14: the best DiT by its mean is DiT S; per-seed ratios 1.25, 1.33, 1.40
    assert (
        "best DiT by its mean (DiT S, 12.00 +- 2.00) vs best U-Net by its mean (U-Net S, 9.00 +- 1.00): ratio of the"
        " means 1.33 (target <= 1.25); per seed 1.25-1.40, within the target in 1 of 3 seeds: **missed**"
    ) in markdown
    # paired per seed: -1, +1, -6 at the end; the snapshots are equal (20 + seed for every model)
    assert (
        "`DiT S` minus `DiT S, no skips`, FD at 10 steps after the whole budget: -2.00 +- 3.61 over the seeds (per seed"
        " -1.00, +1.00, -6.00; `DiT S` better in 2 of 3)"
    ) in markdown
    assert "after 0.5 of the budget: +0.00 +- 0.00" in markdown
    # no pair across families
    assert "`DiT S` minus `U-Net S`" not in markdown and "`U-Net S` minus" not in markdown
    assert "| U-Net S | 1 | 10 | 1 | 9.00 | 1.00 | 0.58 | 8.00, 9.00, 10.00 | 90.0% |" in markdown
    written = json.loads((tmp_path / "out" / f"backbones-{harness.utc_now()[:10]}-3-seeds.json").read_text())
    assert [run["path"] for run in written["runs"]] == paths
    assert {(row["model"], row["fraction"]): row["seeds"] for row in written["rows"]}[("DiT S", 0.5)] == [0, 1, 2]
    assert (tmp_path / "out" / f"backbones-{harness.utc_now()[:10]}-3-seeds.md").read_text() == markdown


def test_combine_leaves_out_a_set_that_not_every_run_scored(tmp_path):
    fds = {"U-Net S": 8.0, "DiT S": 10.0}
    paths = [results_file(tmp_path, 0, fds), results_file(tmp_path, 1, fds, snapshot_fd=None)]
    combined = bench_backbones.summarize_seeds(bench_backbones.load_repeats(paths))
    assert {(row["model"], row["fraction"]) for row in combined} == {("U-Net S", 1.0), ("DiT S", 1.0)}


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("unfinished", "did not finish \\(status 'running'\\): combine complete runs only"),
        ("other budget", "differs from .*seed0.json in --train_minutes: combine runs of one command"),
        ("same seed", "repeat a seed \\(\\[0, 0\\]\\)"),
        ("corrupt", "is not a results file of bench_backbones.py \\(invalid JSON"),
        ("other objective", "differs from .*seed0.json in --prediction_type: combine runs of one command"),
    ],
)
def test_combine_refuses_runs_that_are_not_one_command_at_distinct_seeds(tmp_path, problem, message):
    fds = {"U-Net S": 8.0, "DiT S": 10.0}
    first = results_file(tmp_path, 0, fds)
    second = results_file(tmp_path, 0 if problem == "same seed" else 1, fds)
    if problem == "same seed":
        second = str(Path(second).rename(tmp_path / "copy.json"))
        first = results_file(tmp_path, 0, fds)
    if problem == "unfinished":
        data = json.loads(Path(second).read_text())
        Path(second).write_text(json.dumps(data | {"status": "running"}))
    if problem == "other budget":
        second = results_file(tmp_path, 1, fds, "--train_minutes", "20")
    if problem == "corrupt":
        Path(second).write_text(Path(second).read_text()[:100])
    if problem == "other objective":
        second = results_file(tmp_path, 1, fds, "--prediction_type", "flow")
    with pytest.raises(ValueError, match=message):
        bench_backbones.load_repeats([first, second])


def test_combine_needs_two_results_files():
    with pytest.raises(ValueError, match="--combine needs the results of at least 2 seeds"):
        bench_backbones.parse_args(["--combine", "one.json"])


def test_results_written_before_the_objective_flag_combine_with_epsilon_runs(tmp_path):
    fds = {"U-Net S": 8.0, "DiT S": 10.0}
    older = results_file(tmp_path, 0, fds)
    data = json.loads(Path(older).read_text())
    del data["args"]["prediction_type"]
    Path(older).write_text(json.dumps(data))
    assert len(bench_backbones.load_repeats([older, results_file(tmp_path, 1, fds)])) == 2
    with pytest.raises(ValueError, match="in --prediction_type"):
        bench_backbones.load_repeats([older, results_file(tmp_path, 2, fds, "--prediction_type", "flow")])


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow"])
def test_the_objective_flag_sets_every_models_objective_schedule_and_sampler(tmp_path, prediction_type):
    args = bench_backbones.parse_args(
        ["--backbones", "U-Net S", "DiT S", "--prediction_type", prediction_type, "--output_dir", str(tmp_path)]
    )
    noise_scheduler = build_noise_scheduler(prediction_type=args.prediction_type)
    runs = bench_backbones.build_runs(args, noise_scheduler)
    assert [(run.objective, run.model.config.prediction_type) for run in runs] == [(prediction_type,) * 2] * 2
    assert all(run.noise_scheduler is noise_scheduler for run in runs)
    sampler = bench_backbones.main_sampler(noise_scheduler)
    if prediction_type == "flow":
        assert (type(sampler).__name__, sampler.config.solver) == ("SculptFlowScheduler", "euler")
    else:
        assert (type(sampler).__name__, sampler.config.eta) == ("SculptScheduler", 0.0)
    report = bench_backbones.Report(args)
    markdown = report.markdown()
    if prediction_type == "flow":
        assert "interleaved; rectified flow (the velocity objective)" in markdown
        assert "- Sampling: SculptFlowScheduler, Euler, 500 images per set" in markdown
    else:
        assert "interleaved; the epsilon objective on the recipe's cosine betas" in markdown
        assert "- Sampling: SculptScheduler eta=0 (DDIM), 500 images per set" in markdown
