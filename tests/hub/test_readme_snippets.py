"""Every Python snippet of the README runs as printed, in a fresh process, and does what its text says.

The snippets name a Hub repo (google/ddpm-cifar10-32) and the folders a user would have (`sculpt-digits` from the
main job, `sculpt-captions` from a caption run): the test puts tiny stand-ins for them on the test Hub and in the
working folder, runs each snippet unchanged, then checks its variables in the same process.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, LCMScheduler

from sculptdiff import SculptUNet2DModel
from sculptdiff.training.lora import add_lora_adapter, save_lora_weights


README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)

# A line that picks out each snippet, and the checks run after it in the same process.
CHECKS = {
    "unet = SculptUNet2DModel(": """
assert noise_pred.shape == (4, 1, 16, 16)
assert torch.equal(SculptUNet2DModel.from_pretrained("my-unet").conv_in.weight, unet.conv_in.weight)
""",
    'pipe = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")': """
abar = scheduler.alphas_cumprod[500]
assert torch.allclose(x_t, abar.sqrt() * x_0 + (1 - abar).sqrt() * eps)
assert type(pipe.scheduler) is SculptScheduler and len(pipe.scheduler.timesteps) == 50
assert image.size == (pipe.unet.config.sample_size,) * 2
""",
    'scheduler = SculptFlowScheduler(shift=3.0, solver="heun")': """
assert torch.allclose(target, eps - x_0)
assert sample.abs().max() < 1e-4, sample.abs().max()
""",
    'text_pipe = SculptPipeline.from_pretrained("sculpt-captions")': """
assert (len(digits), len(anything), len(images)) == (2, 4, 1)
assert digits[0].size == (8, 8) and images[0].mode == "RGB"
""",
    "dit = SculptDiT2DModel(": """
assert noise_pred.shape == (4, 1, 16, 16)
assert dit_pipe.unet is None and len(images) == 2 and images[0].size == (16, 16)
""",
    "pipe.register_modules(guider=ClassifierFreeGuidance(": """
import numpy as np
assert type(pipe.guider).__name__ == "AdaptiveProjectedGuidance"
assert len(interval) == len(projected) == 2 and not np.array_equal(np.asarray(interval[0]), np.asarray(projected[0]))
""",
    'DiffusionPipeline.from_pretrained("sculpt-digits", trust_remote_code=True)': """
# the second door ran the code saved beside the weights, not the installed package
assert type(pipe).__name__ == "SculptPipeline" and not type(pipe).__module__.startswith("sculptdiff")
assert type(pipe.unet).__name__ == "SculptUNet2DModel" and not type(pipe.unet).__module__.startswith("sculptdiff")
""",
    'pipe.load_lora_weights("sculpt-digits-lora"': """
import numpy as np
assert not np.array_equal(np.asarray(tuned[0]), np.asarray(half[0]))
fused = SculptPipeline.from_pretrained("sculpt-digits-fused")(
    class_labels=[3, 7], num_inference_steps=10, generator=torch.Generator().manual_seed(0)
).images
assert np.abs(np.asarray(fused[0], dtype=float) - np.asarray(tuned[0], dtype=float)).max() <= 1
""",
    'SculptPipeline.from_pretrained("sculpt-digits-lcm")': """
from diffusers import LCMScheduler
calls = []
pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
pipe(class_labels=[3], num_inference_steps=4, guidance_scale=3.0)
# one model call per step, un-doubled: the guidance scale is an input of the student
assert type(pipe.scheduler) is LCMScheduler and calls == [1, 1, 1, 1], calls
assert len(images) == 10 and Path("seven-lcm.png").is_file()
""",
}


CHECKS_IMPORTS = "from pathlib import Path\n\nimport torch\nfrom sculptdiff import SculptPipeline, SculptScheduler, SculptUNet2DModel\n"


def snippet(key: str) -> str:
    (code,) = [code for code in SNIPPETS if key in code]
    return code


def test_every_readme_snippet_is_checked():
    assert len(SNIPPETS) == len(CHECKS)
    for code in SNIPPETS:
        assert sum(key in code for key in CHECKS) == 1, code


@pytest.fixture
def user_folder(hub, tmp_path, build_tiny_pipeline, build_tiny_text_pipeline, tiny_stock_unet) -> Path:
    """The working folder of a user who ran the main job and a caption run, with a DDPM model on the Hub."""
    # the README's digits model: ten classes named "0" to "9"
    digits = build_tiny_pipeline(num_class_embeds=10, id2label={index: str(index) for index in range(10)})
    digits.save_pretrained(tmp_path / "sculpt-digits")
    # the caption run: RGB images conditioned on text through cross-attention
    captions = build_tiny_text_pipeline(in_channels=3, out_channels=3)
    captions.save_pretrained(tmp_path / "sculpt-captions")

    # a LoRA run on it: an adapter whose B matrices are drawn at random (a fresh adapter is the identity)
    unet = SculptUNet2DModel.from_pretrained(tmp_path / "sculpt-digits", subfolder="unet")
    add_lora_adapter(unet, rank=4)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    save_lora_weights(tmp_path / "sculpt-digits-lora", unet)
    # a distilled student: a guidance-scale input, diffusers' LCMScheduler
    student = build_tiny_pipeline(
        num_class_embeds=10,
        id2label={index: str(index) for index in range(10)},
        time_cond_proj_dim=8,
        scheduler=LCMScheduler(beta_schedule="squaredcos_cap_v2", original_inference_steps=48),
    )
    student.save_pretrained(tmp_path / "sculpt-digits-lcm")

    DDPMPipeline(unet=tiny_stock_unet, scheduler=DDPMScheduler()).push_to_hub("google/ddpm-cifar10-32")
    return tmp_path


@pytest.mark.filterwarnings(
    # diffusers 0.42.1 passes the deprecated `local_dir_use_symlinks` when it downloads from a repo id; not ours
    "ignore:The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`:UserWarning"
)
@pytest.mark.parametrize(
    "key",
    list(CHECKS),
    ids=["unet", "scheduler-swap", "flow", "pipeline-modes", "dit", "guiders", "doors", "lora", "lcm-student"],
)
def test_readme_snippet_runs_as_printed(hub, user_folder, key):
    program = f"{snippet(key)}\n# checks added by the test\n{CHECKS_IMPORTS}{CHECKS[key]}"
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=user_folder,
        env=hub.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{program}\n{result.stderr[-4000:]}"
