"""benchmarks/bench_quality.py: the guider sweep (diffusers' guiders through SculptPipeline's `guider`), the student
rows (a guidance-distilled denoiser with LCMScheduler), and the verdicts computed from the measured numbers."""

import sys
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance, FrequencyDecoupledGuidance


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_quality  # noqa: E402
import harness  # noqa: E402

from sculptdiff import SculptScheduler  # noqa: E402


def tiny_digits_unet(build_tiny_unet, **overrides):
    # the benchmark's data shape: 10 classes, one channel, 16 px
    return build_tiny_unet(sample_size=16, num_class_embeds=10, id2label=None, **overrides)


def test_parse_guider_spells_each_setting_as_the_call_that_builds_it():
    setting = bench_quality.parse_guider(" ClassifierFreeGuidance(guidance_scale=3, start=0.2, stop=0.9) ")
    assert setting.spec == "ClassifierFreeGuidance(guidance_scale=3.0, start=0.2, stop=0.9)"
    guider = setting.build()
    assert isinstance(guider, ClassifierFreeGuidance)
    assert (guider.guidance_scale, guider._start, guider._stop) == (3.0, 0.2, 0.9)
    # a fresh guider per set: APG's momentum buffer must not carry over from one set to the next
    assert setting.build() is not guider

    # integers become floats (FDG tests `isinstance(start, float)`), except integer arguments
    fdg = bench_quality.parse_guider("FrequencyDecoupledGuidance(guidance_scales=[5, 1], start=0)").build()
    assert isinstance(fdg, FrequencyDecoupledGuidance) and fdg.guidance_scales == [5.0, 1.0]
    zero_star = bench_quality.parse_guider("ClassifierFreeZeroStarGuidance(guidance_scale=3, zero_init_steps=1)")
    assert zero_star.spec == "ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1)"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("Foo(guidance_scale=3)", "not one of diffusers' guiders"),
        ("BaseGuidance()", "not one of diffusers' guiders"),
        ("ClassifierFreeGuidance(w=3)", "takes no ['w']"),
        ("ClassifierFreeGuidance(3)", "literal keyword arguments"),
        ("ClassifierFreeGuidance(guidance_scale=x)", "literal keyword arguments"),
        ("FrequencyDecoupledGuidance(guidance_scales=[3.0, 1.5], start=[0.0])", "should have the same length"),
    ],
)
def test_parse_args_refuses_a_bad_guider_before_any_training(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        bench_quality.parse_args(["--guiders", spec])


def test_default_and_quick_guider_lists():
    default = bench_quality.parse_args([])
    assert len(default.guiders) == len(bench_quality.DEFAULT_GUIDERS)
    classes = {spec.split("(")[0] for spec in default.guiders}
    assert classes == {
        "ClassifierFreeGuidance",
        "AdaptiveProjectedGuidance",
        "ClassifierFreeZeroStarGuidance",
        "TangentialClassifierFreeGuidance",
        "FrequencyDecoupledGuidance",
    }
    # --quick keeps one setting of each class; `--guiders` alone turns the sweep off
    assert {spec.split("(")[0] for spec in bench_quality.parse_args(["--quick"]).guiders} == classes
    assert bench_quality.parse_args(["--guiders"]).guiders == []
    assert bench_quality.parse_args(["--student", "a", "--student", "b", "c"]).student == ["a", "b", "c"]


def test_guided_sets_go_through_the_pipelines_guider_and_count_evaluations(build_tiny_unet):
    unet = tiny_digits_unet(build_tiny_unet)
    labels = torch.arange(4)
    built_in, nfe = harness.sample_digits(unet, SculptScheduler(), 4, seed=0, class_labels=labels, guidance_scale=3.0)
    assert nfe == 8  # one batched [uncond, cond] pass per step counts twice
    guided, guided_nfe = harness.sample_digits(
        unet, SculptScheduler(), 4, 0, labels, guidance_scale=None, guider=ClassifierFreeGuidance(guidance_scale=3.0)
    )
    torch.testing.assert_close(guided, built_in, rtol=1e-5, atol=1e-5)
    assert guided_nfe == 8

    # guidance in an interval: steps 1 and 2 of 4 are guided, the others take the conditional pass only
    interval = bench_quality.parse_guider("ClassifierFreeGuidance(guidance_scale=3.0, start=0.25, stop=0.75)")
    job = bench_quality.Job(
        bench_quality.scored_run("tiny", unet, SculptScheduler(), "epsilon"),
        bench_quality.Sampler("ours", SculptScheduler(), True),
        4,
        None,
        interval,
        sweep="guiders",
    )
    images, interval_nfe = bench_quality.sample_job(job, labels, seed=0)
    assert interval_nfe == 6
    assert not torch.allclose(images, guided, atol=1e-4)
    assert images.min() >= -1 and images.max() <= 1

    # an APG update without its parallel part is not CFG
    apg_guider = AdaptiveProjectedGuidance(guidance_scale=3.0, eta=0.0)
    apg, _ = harness.sample_digits(unet, SculptScheduler(), 4, 0, labels, guidance_scale=None, guider=apg_guider)
    assert not torch.allclose(apg, guided, atol=1e-4)


@pytest.fixture
def student_folder(tmp_path, build_tiny_unet):
    unet = tiny_digits_unet(build_tiny_unet, time_cond_proj_dim=8)
    scheduler = LCMScheduler.from_config(SculptScheduler().config)
    pipeline = bench_quality.SculptPipeline(unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(tmp_path / "student")
    return tmp_path / "student"


def test_student_rows_take_one_evaluation_per_step_and_are_timed(student_folder):
    args = bench_quality.parse_args(["--student", str(student_folder)])
    [(run, sampler)] = bench_quality.load_students(args)
    assert run.name == "student student" and sampler.name == "LCMScheduler"
    labels = torch.arange(4)
    job = bench_quality.Job(run, sampler, 2, 3.0, sweep="students", timed=True)
    images, nfe = bench_quality.sample_job(job, labels, seed=0)
    assert nfe == 2 and images.shape == (4, 1, 16, 16)
    # w is the student's input: another w gives other images from the same single pass per step
    other, _ = bench_quality.sample_job(bench_quality.Job(run, sampler, 2, 1.0), labels, seed=0)
    assert not torch.allclose(images, other, atol=1e-4)
    assert bench_quality.images_per_second(job, batch_size=4, seed=0, repeats=1) > 0


def test_a_student_without_a_guidance_input_is_refused(tmp_path, build_tiny_unet):
    pipeline = bench_quality.SculptPipeline(unet=tiny_digits_unet(build_tiny_unet), scheduler=SculptScheduler())
    pipeline.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        bench_quality.load_students(bench_quality.parse_args(["--student", str(tmp_path / "plain")]))
    with pytest.raises(ValueError, match="no model_index.json"):
        bench_quality.load_students(bench_quality.parse_args(["--student", str(tmp_path / "missing")]))


def metrics(fd: float, accuracy: float) -> dict:
    return {"fd": fd, "class_accuracy": accuracy, "precision": 0.9, "recall": 0.8, "class_coverage": 1.0}


def test_guider_verdict_is_the_best_setting_within_the_target(tmp_path):
    report = bench_quality.Report(bench_quality.parse_args(["--output_dir", str(tmp_path)]), "2026-12-02")
    base = {"sampler": "ours", "steps": 10, "nfe": 20.0, "seconds": 1.0, "class_entropy": 1.0}
    report.data["cells"] = [
        {**base, "model": "a", "guidance": 1.0, "guider": None, "sweep": "steps", **metrics(8.0, 0.990)},
        {**base, "model": "a", "guidance": None, "guider": "G1", "sweep": "guiders", **metrics(9.0, 0.996)},
        {**base, "model": "a", "guidance": None, "guider": "G2", "sweep": "guiders", **metrics(10.0, 0.998)},
        {**base, "model": "a", "guidance": None, "guider": "G3", "sweep": "guiders", **metrics(7.0, 0.994)},
        {**base, "model": "b", "guidance": 1.0, "guider": None, "sweep": "steps", **metrics(8.0, 0.990)},
        {**base, "model": "b", "guidance": None, "guider": "G1", "sweep": "guiders", **metrics(10.5, 0.999)},
        {**base, "model": "b", "guidance": None, "guider": "G2", "sweep": "guiders", **metrics(9.0, 0.992)},
    ]
    first, second = report.guider_targets()
    # a: G3 has the lowest FD but misses 99.5%; G1 is within 1.3 x 8.0 = 10.4
    assert "best `G1`, FD 9.00 (1.12x)" in first and first.endswith("**met**")
    # b: the only accurate setting is 10.5 > 10.4
    assert "`G1`, FD 10.50 (1.31x)" in second and second.endswith("**missed**")
    markdown = report.markdown()
    assert "| a | none (w = 1) | 20 | 8.00 | 1.00 |" in markdown and "| a | `G2` | 20 | 10.00 | 1.25 |" in markdown


def test_student_verdicts_compare_with_the_teacher_at_its_guided_step_count(tmp_path):
    args = bench_quality.parse_args(["--output_dir", str(tmp_path), "--student", "s", "--student_guidance_scale", "2"])
    report = bench_quality.Report(args, "2026-12-02")
    report.data["students"] = {"teacher": "t", "teacher_sampler": "ours", "students": ["s"], "guidance": 2.0}
    base = {"guidance": 2.0, "guider": None, "sweep": "students", "seconds": 1.0, "images_per_second": 50.0}
    report.data["cells"] = [
        {**base, "model": "t", "sampler": "ours", "steps": 20, "nfe": 40.0, **metrics(6.0, 0.995)},
        {**base, "model": "s", "sampler": "LCMScheduler", "steps": 4, "nfe": 4.0, **metrics(5.5, 0.993)},
        {**base, "model": "s", "sampler": "LCMScheduler", "steps": 1, "nfe": 1.0, **metrics(12.5, 0.97)},
    ]
    four, one = report.student_targets()
    assert "at 4 steps: FD 5.50" in four and "FD 6.00" in four and four.endswith("**met**")
    assert "2.08x the teacher's 20-step FD 6.00" in one and one.endswith("**missed**")
    report.data["cells"][1].update(class_accuracy=0.985)  # no worse in FD, but below 99% accuracy
    assert report.student_targets()[0].endswith("**missed**")
    assert "| s | LCMScheduler | 4 | 2 | 4 | 5.50 |" in report.markdown()


def test_sampling_plan_of_a_guider_re_scoring_run(build_tiny_unet, student_folder):
    guiders = ["TangentialClassifierFreeGuidance(guidance_scale=3.0)", "ClassifierFreeGuidance(guidance_scale=2.0)"]
    args = bench_quality.parse_args(
        ["--no-step_sweep", "--guidance_scales", "1", "--guiders", *guiders, "--student", str(student_folder)]
    )
    run = bench_quality.scored_run("sculptdiff", tiny_digits_unet(build_tiny_unet), SculptScheduler(), "epsilon")
    students = bench_quality.load_students(args)
    teacher = (run, bench_quality.samplers_for(run)[-1])
    jobs = bench_quality.sampling_plan(args, [run], students, teacher)
    sweeps = [(job.sweep, job.sampler.name, job.steps, job.guidance, job.guider and job.guider.spec) for job in jobs]
    main = "ours (SculptScheduler eta=0)"
    # no step sweep: the main sampler's w = 1 baseline at --guidance_steps first, then one set per guider
    assert sweeps[0] == ("steps", main, 10, 1.0, None)
    assert [s[4] for s in sweeps if s[0] == "guiders"] == guiders
    assert all(s[1] == main and s[2] == 10 and s[3] is None for s in sweeps if s[0] == "guiders")
    # the teacher at the student's step counts and at --teacher_steps, with the student's w; all timed
    students_rows = [(job.run.name, job.steps) for job in jobs if job.sweep == "students"]
    assert sorted(students_rows) == sorted(
        [("sculptdiff", steps) for steps in (1, 2, 4, 8, 20)] + [("student student", steps) for steps in (1, 2, 4, 8)]
    )
    assert all(job.timed and job.guidance == 3.0 for job in jobs if job.sweep == "students")
    assert len(jobs) == 1 + 2 + 9
