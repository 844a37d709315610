"""benchmarks/harness.py: the stock digits U-Net that SculptPipeline can guide, and the atomic results files."""

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import harness  # noqa: E402

from sculptdiff.pipelines.sculpt.pipeline_sculpt import SculptPipeline  # noqa: E402


@pytest.fixture(scope="module")
def stock_unet():
    torch.manual_seed(0)
    return harness.build_stock_digits_unet(16).eval()


def sample(unet, guidance_scale):
    scheduler = DDIMScheduler.from_config(harness.build_stock_noise_scheduler().config)
    pipeline = SculptPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        class_labels=[0, 9],
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_stock_digits_unet_has_the_null_class_where_sculpt_pipeline_reads_it(stock_unet):
    # same size as the benchmarks' published stock model (1,266,337 parameters), null class at num_class_embeds
    assert sum(p.numel() for p in stock_unet.parameters()) == 1_266_337
    assert stock_unet.class_embedding.num_embeddings == stock_unet.config.num_class_embeds + 1 == 11
    with torch.no_grad():
        # the guided branch reads row 10: changing it changes guided samples, and only those
        plain, guided = sample(stock_unet, 1.0), sample(stock_unet, 3.0)
        stock_unet.class_embedding.weight[10] += 1.0
        assert torch.equal(sample(stock_unet, 1.0), plain)
        assert not torch.allclose(sample(stock_unet, 3.0), guided)
        stock_unet.class_embedding.weight[10] -= 1.0


def test_stock_digits_unet_round_trip(tmp_path, stock_unet):
    stock_unet.save_pretrained(tmp_path)
    loaded = harness.load_stock_digits_unet(tmp_path).eval()
    sample_input, timestep, labels = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(sample_input, timestep, labels).sample, stock_unet(sample_input, timestep, labels).sample
        )


def test_write_results_writes_markdown_and_json_and_no_temporary_file(tmp_path):
    harness.write_results(tmp_path / "speed-2026-01-01", "# title\n", {"value": 1.5, "path": tmp_path})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["speed-2026-01-01.json", "speed-2026-01-01.md"]
    assert (tmp_path / "speed-2026-01-01.md").read_text() == "# title\n"
    assert json.loads((tmp_path / "speed-2026-01-01.json").read_text()) == {"value": 1.5, "path": str(tmp_path)}


def test_command_line_quotes_arguments_so_it_can_be_pasted_back(monkeypatch):
    argv = [str(harness.BENCHMARKS_DIR / "bench_quality.py"), "--samplers", "ours (SculptScheduler eta=0)", "DDIM"]
    monkeypatch.setattr(sys, "argv", argv)
    command = harness.command_line()
    assert command.startswith("python benchmarks/bench_quality.py ")
    assert shlex.split(command) == ["python", "benchmarks/bench_quality.py", *argv[1:]]


def test_benchmark_parser_quick_settings_counts_and_training_flags():
    parser = harness.BenchmarkParser(
        "d", results="x-<date>.md", quick={"rounds": 1, "sizes": [8]}, seed="Seed.", train_minutes=3.0
    )
    parser.add_count("rounds", 4, "Rounds.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args([])
    assert (args.seed, args.threads, args.train_minutes, args.num_samples, args.model_dir) == (0, None, 3.0, 500, None)
    assert (args.rounds, args.sizes, args.output_dir) == (4, [16, 32], str(harness.RESULTS_DIR))
    # --quick wins over the command line, whatever the order; training benchmarks train 15 s and score 100 images
    quick = parser.parse_args(["--rounds", "7", "--quick", "--train_minutes", "9"])
    assert (quick.rounds, quick.sizes, quick.train_minutes, quick.num_samples) == (1, [8], 0.25, 100)
    assert "--train_minutes 0.25 --num_samples 100 --rounds 1 --sizes 8" in parser.format_help()
    with pytest.raises(ValueError, match="--rounds must be >= 1, got 0"):
        parser.parse_args(["--rounds", "0"])
    with pytest.raises(ValueError, match="--train_minutes must be > 0"):
        parser.parse_args(["--train_minutes", "0"])
    with pytest.raises(ValueError, match="--num_samples must be >= 20"):
        parser.parse_args(["--num_samples", "10"])
    # a benchmark without training has none of the training flags, and no --seed without its help text
    plain = harness.BenchmarkParser("d", results="y.md", quick={}).parse_args(["--threads", "1"])
    assert vars(plain) == {"threads": 1, "output_dir": str(harness.RESULTS_DIR), "quick": False}


def test_results_header_and_markdown_pieces():
    args = harness.BenchmarkParser("d", results="y.md", quick={}).parse_args([])
    header = harness.results_header(args)
    assert set(header) == {"date", "command", "machine", "load", "args"} and header["args"]["quick"] is False
    assert harness.table_header("a | b | c") == ["| a | b | c |", "|---|---|---|"]
    assert harness.target_line("- FD 2.0 (target <= 3)", True) == "- FD 2.0 (target <= 3): **met**"
    assert harness.target_line("- FD 4.0 (target <= 3)", False).endswith(": **missed**")
    assert harness.calibration_section({}) == [] and harness.noise_band_lines({}, 100) == []
    floor = {"fd": 5.0, "fd_std": 0.5, "num_draws": 8, "precision": 0.9, "recall": 0.9}
    floor.update(class_accuracy=0.99, class_coverage=1.0, class_entropy=2.3)
    calibration = {"real train digits (floor)": floor}
    assert "| real train digits (floor) | 5.00 +- 0.50 (8 draws) |" in "\n".join(
        harness.calibration_section(calibration)
    )
    assert "FD differences below 1.00 are noise" in harness.noise_band_lines(calibration, 100)[0]
