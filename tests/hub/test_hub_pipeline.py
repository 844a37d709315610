"""SculptPipeline and its components published to, and loaded from, the test Hub (hub_server.py).

The two ways to load a pipeline repo run in a fresh Python process each (`hub.env` points it at the server), so
that nothing imported or cached by this process can help: through sculptdiff, and through diffusers' custom-code
mechanism with sculptdiff made unimportable. Offline reuse then loads from the cache that process filled.
"""

import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from sculptdiff import SculptPipeline, SculptScheduler, SculptUNet2DModel


# diffusers 0.42.1's ModelMixin/SchedulerMixin.from_pretrained pass `local_dir_use_symlinks` to hf_hub_download on
# every load from a repo id, which huggingface_hub 2.x warns about: not ours to fix, and exactly this one message.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`:UserWarning"
)


def sample(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        class_labels=[0, 3], guidance_scale=2.0, num_inference_steps=2, generator=generator, output_type="np"
    ).images


# Loads a pipeline from the Hub (or a folder) in a fresh process and saves the images of `sample`, whose source it
# runs: argv = loader, repo id or folder, output .npy, torch threads (the parent's, so that both processes add up in
# the same order); prints the modules the pipeline, its denoiser and its scheduler came from.
LOAD_AND_SAMPLE = f"""
import sys

loader, repo_id, output, threads = sys.argv[1:]
if loader == "remote-code":
    # Only diffusers may be needed: make the installed sculptdiff unimportable.
    sys.modules["sculptdiff"] = None

import numpy as np
import torch

torch.set_num_threads(int(threads))
if loader == "remote-code":
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
else:
    from sculptdiff import SculptPipeline

    pipe = SculptPipeline.from_pretrained(repo_id)
pipe.set_progress_bar_config(disable=True)


{inspect.getsource(sample)}

np.save(output, sample(pipe))
print(type(pipe).__module__, type(pipe).__name__, type(pipe.denoiser).__module__, type(pipe.scheduler).__module__)
"""


def load_and_sample_in_fresh_process(hub, tmp_path, loader: str, repo_id: str) -> tuple[np.ndarray, str]:
    output = tmp_path / f"{loader}-{len(list(tmp_path.glob('*.npy')))}.npy"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_SAMPLE, loader, repo_id, str(output), str(torch.get_num_threads())],
        env=hub.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return np.load(output), result.stdout


def local_reference(pipe: SculptPipeline, folder) -> np.ndarray:
    pipe.save_pretrained(folder)
    return sample(SculptPipeline.from_pretrained(folder))


def test_push_to_hub_then_load_in_fresh_process_and_offline(hub, tmp_path, monkeypatch, build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    pipe.push_to_hub("ns/sculpt")
    expected = local_reference(pipe, tmp_path / "local")

    files = set(HfApi().list_repo_files("ns/sculpt"))
    assert {"model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors"} <= files
    assert "scheduler/scheduler_config.json" in files

    images, loaded = load_and_sample_in_fresh_process(hub, tmp_path, "sculptdiff", "ns/sculpt")
    np.testing.assert_array_equal(images, expected)
    assert loaded.split() == [
        "sculptdiff.pipelines.sculpt.pipeline_sculpt",
        "SculptPipeline",
        "sculptdiff.models.unet_sculpt",
        "sculptdiff.schedulers.scheduling_sculpt",
    ]

    # After that one download (into the shared HF_HOME) the cache is enough: server down, HF_HUB_OFFLINE=1.
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    np.testing.assert_array_equal(sample(SculptPipeline.from_pretrained("ns/sculpt")), expected)


def test_diffusion_pipeline_trust_remote_code_without_sculptdiff(hub, tmp_path, build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    pipe.push_to_hub("ns/sculpt-remote")
    expected = local_reference(pipe, tmp_path / "local")

    images, loaded = load_and_sample_in_fresh_process(hub, tmp_path, "remote-code", "ns/sculpt-remote")
    np.testing.assert_array_equal(images, expected)
    pipeline_module, pipeline_class, unet_module, scheduler_module = loaded.split()
    assert pipeline_class == "SculptPipeline"
    # The classes came from the code files in the repo, through diffusers' dynamic modules.
    assert not any(module.startswith("sculptdiff") for module in (pipeline_module, unet_module, scheduler_module))


@pytest.mark.parametrize("source", ["folder", "repo"])
@pytest.mark.parametrize("loader", ["sculptdiff", "remote-code"])
def test_both_doors_load_a_dit_pipeline_in_a_fresh_process(hub, tmp_path, loader, source, build_tiny_pipeline):
    # the denoiser is a SculptDiT2DModel registered as `transformer`, with its code file beside its weights
    pipe = build_tiny_pipeline(backbone="dit", scheduler=SculptScheduler(num_train_timesteps=100))
    pipe.push_to_hub("ns/sculpt-dit")
    expected = local_reference(pipe, tmp_path / "local")
    repo_files = set(HfApi().list_repo_files("ns/sculpt-dit"))
    assert {
        "model_index.json",
        "pipeline_sculpt.py",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/sculptdiff.models.transformers.dit_sculpt.py",
        "scheduler/scheduler_config.json",
    } <= repo_files
    assert not any(path.startswith("unet/") for path in repo_files)

    source = str(tmp_path / "local") if source == "folder" else "ns/sculpt-dit"
    images, loaded = load_and_sample_in_fresh_process(hub, tmp_path, loader, source)
    np.testing.assert_array_equal(images, expected)
    pipeline_module, pipeline_class, transformer_module, scheduler_module = loaded.split()
    assert pipeline_class == "SculptPipeline"
    if loader == "sculptdiff":
        assert transformer_module == "sculptdiff.models.transformers.dit_sculpt"
    else:
        # the class came from the code file beside the weights, through diffusers' dynamic modules
        assert not any(module.startswith("sculptdiff") for module in (pipeline_module, transformer_module))
        assert transformer_module.endswith("sculptdiff.models.transformers.dit_sculpt")


def test_save_pretrained_push_and_revision_pinning(hub, tmp_path, build_tiny_pipeline):
    folder = tmp_path / "output"
    first_pipe = build_tiny_pipeline(seed=0)
    first_pipe.save_pretrained(folder, push_to_hub=True, repo_id="ns/versions")
    first_commit = HfApi().model_info("ns/versions").sha
    second_pipe = build_tiny_pipeline(seed=1)
    second_pipe.save_pretrained(folder, push_to_hub=True, repo_id="ns/versions")
    second_commit = HfApi().model_info("ns/versions").sha
    assert first_commit != second_commit

    latest = SculptPipeline.from_pretrained("ns/versions")
    pinned = SculptPipeline.from_pretrained("ns/versions", revision=first_commit)
    np.testing.assert_array_equal(sample(latest), sample(second_pipe))
    np.testing.assert_array_equal(sample(pinned), sample(first_pipe))
    assert not np.array_equal(sample(latest), sample(pinned))
    assert "sculptdiff" in ModelCard.load("ns/versions").data.tags


def test_components_push_and_subfolder_loads(hub, build_tiny_pipeline):
    # a scheduler setting other than the default, to see it travel
    pipe = build_tiny_pipeline(scheduler=SculptScheduler(num_train_timesteps=100))
    pipe.unet.push_to_hub("ns/unet-only")
    pipe.scheduler.push_to_hub("ns/scheduler-only")
    pipe.push_to_hub("ns/whole")

    for unet in (
        SculptUNet2DModel.from_pretrained("ns/unet-only"),
        SculptUNet2DModel.from_pretrained("ns/whole", subfolder="unet"),
    ):
        assert unet.config.id2label == pipe.unet.config.id2label
        for name, tensor in pipe.unet.state_dict().items():
            assert torch.equal(unet.state_dict()[name], tensor), name
    for scheduler in (
        SculptScheduler.from_pretrained("ns/scheduler-only"),
        SculptScheduler.from_pretrained("ns/whole", subfolder="scheduler"),
    ):
        assert isinstance(scheduler, SculptScheduler)
        assert scheduler.config.num_train_timesteps == 100
        assert torch.equal(scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)


def test_scheduler_from_hub_swapped_into_stock_ddpm_pipeline(hub, tiny_stock_unet):
    DDPMPipeline(unet=tiny_stock_unet, scheduler=DDPMScheduler(num_train_timesteps=100)).push_to_hub("ns/stock-ddpm")
    sculpt_scheduler = SculptScheduler(num_train_timesteps=100, eta=1.0)
    sculpt_scheduler.push_to_hub("ns/sculpt-scheduler")

    def ddpm_images(scheduler) -> np.ndarray:
        pipe = DDPMPipeline.from_pretrained("ns/stock-ddpm")
        pipe.scheduler = scheduler
        pipe.set_progress_bar_config(disable=True)
        return pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images

    from_hub = SculptScheduler.from_pretrained("ns/sculpt-scheduler")
    assert from_hub.config.eta == 1.0
    images = ddpm_images(from_hub)
    np.testing.assert_array_equal(images, ddpm_images(sculpt_scheduler))
    assert not np.array_equal(images, ddpm_images(SculptScheduler(num_train_timesteps=100, eta=0.0)))


def test_missing_repo_revision_and_file(hub, build_tiny_pipeline):
    # diffusers' download (as for any pipeline) falls back to the cache and raises OSError from the Hub's typed error
    with pytest.raises(OSError, match="Cannot load model ns/absent") as error:
        SculptPipeline.from_pretrained("ns/absent")
    assert isinstance(error.value.__cause__, RepositoryNotFoundError)
    build_tiny_pipeline().push_to_hub("ns/present")
    with pytest.raises(OSError, match="Cannot load model ns/present") as error:
        SculptPipeline.from_pretrained("ns/present", revision="no-such-branch")
    assert isinstance(error.value.__cause__, RevisionNotFoundError)
    HfApi().create_repo("ns/empty")
    with pytest.raises(RemoteEntryNotFoundError):
        SculptPipeline.from_pretrained("ns/empty")
    with pytest.raises(OSError, match="ns/absent"):
        SculptUNet2DModel.from_pretrained("ns/absent")
    with pytest.raises(OSError, match="config.json"):
        SculptUNet2DModel.from_pretrained("ns/present", subfolder="no-such-folder")


def test_push_uploads_only_what_the_pipeline_owns(hub, tmp_path, build_tiny_pipeline):
    """A training output folder also holds checkpoints, logs, secrets and staging folders: none of it leaves."""
    folder = tmp_path / "output"
    for path, content in {
        "checkpoint-10/optimizer.bin": b"optimizer state",
        "checkpoint-10/random_states_0.pkl": b"rng",
        "logs/events.out.tfevents": b"events",
        ".env": b"HF_TOKEN=hf_secret",
        # save_pretrained rewrites the component folders whole: a stray file in one does not survive to the upload
        "unet/.env": b"HF_TOKEN=hf_secret",
        ".tmp-save-abc/unet/config.json": b"{}",
        ".checkpoint-20.staging/model.safetensors": b"partial",
        "unet.old-123/config.json": b"{}",
        "notes.txt": b"private notes",
    }.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    pipe = build_tiny_pipeline()
    assert pipe.hub_allow_patterns() == [
        "model_index.json",
        "pipeline_sculpt.py",
        "README.md",
        "unet/*",
        "scheduler/*",
    ]

    pipe.save_pretrained(folder, push_to_hub=True, repo_id="ns/clean")
    owned = {
        "model_index.json",
        "pipeline_sculpt.py",
        "README.md",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/sculptdiff.models.unet_sculpt.py",
        "scheduler/scheduler_config.json",
        "scheduler/sculptdiff.schedulers.scheduling_sculpt.py",
    }
    # the server adds .gitattributes to every new repo, as the Hub does
    assert set(HfApi().list_repo_files("ns/clean")) == owned | {".gitattributes"}
    np.testing.assert_array_equal(sample(SculptPipeline.from_pretrained("ns/clean")), sample(pipe))

    # push_to_hub (diffusers' path, through a temporary folder) keeps to the same list
    pipe.push_to_hub("ns/clean-direct")
    assert set(HfApi().list_repo_files("ns/clean-direct")) == owned | {".gitattributes"}


def test_pickle_only_repo_loads_tensors_only(hub, tmp_path, build_tiny_pipeline):
    pipe = build_tiny_pipeline()
    pipe.push_to_hub("ns/pickled", safe_serialization=False)
    assert "unet/diffusion_pytorch_model.bin" in HfApi().list_repo_files("ns/pickled")
    # use_safetensors=None: diffusers' download fetches the .bin, read with torch.load(weights_only=True)
    np.testing.assert_array_equal(sample(SculptPipeline.from_pretrained("ns/pickled")), sample(pipe))
    # use_safetensors=True stays strict (diffusers' own refusal, before anything is downloaded)
    with pytest.raises(OSError, match="Could not find the necessary `safetensors` weights"):
        SculptPipeline.from_pretrained("ns/pickled", use_safetensors=True)
