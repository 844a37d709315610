"""benchmarks/harness.py: the stock digits U-Net that SculptPipeline can guide, and the atomic results files."""

import json
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
