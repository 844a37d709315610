"""SculptPipeline loads LoRA adapters as diffusers' pipelines do (load_lora_weights, set_adapters, fuse_lora,
unload_lora_weights, save_lora_weights, `cross_attention_kwargs={"scale": s}`), on both backbones."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from sculptdiff import SculptPipeline, SculptScheduler
from sculptdiff.training.lora import add_lora_adapter, save_lora_weights


# (backbone of build_tiny_pipeline, the name the pipeline registers its denoiser under)
BACKBONES = [("unet", "unet"), ("dit", "transformer")]


@pytest.fixture
def write_adapter(tmp_path, build_tiny_unet, build_tiny_dit):
    """`write_adapter(backbone, seed)`: saves a LoRA adapter (rank 4, alpha 8) for the tiny denoiser of `backbone`,
    with random B matrices (a fresh adapter is the identity), and returns its folder."""

    def write(backbone: str, seed: int = 1, **denoiser_overrides) -> str:
        if backbone == "dit":
            denoiser = build_tiny_dit(**denoiser_overrides)
        else:
            denoiser = build_tiny_unet(**denoiser_overrides)
        add_lora_adapter(denoiser, rank=4, alpha=8)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in denoiser.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        folder = tmp_path / f"lora-{backbone}-{seed}"
        save_lora_weights(folder, denoiser)
        return str(folder)

    return write


def sample(pipe: SculptPipeline, **kwargs) -> np.ndarray:
    # guided, so that the scale reaches both branches of the batched pass
    kwargs = {"class_labels": [1, 3], "guidance_scale": 2.0, "num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


def assert_differs(actual: np.ndarray, other: np.ndarray):
    assert np.abs(actual - other).max() > 1e-2


@pytest.mark.parametrize("backbone, denoiser_name", BACKBONES)
def test_adapter_changes_samples_and_scale_sets_its_strength(
    build_tiny_pipeline, write_adapter, backbone, denoiser_name
):
    pipe = build_tiny_pipeline(backbone=backbone)
    base = sample(pipe)
    pipe.load_lora_weights(write_adapter(backbone), adapter_name="digits")
    assert pipe.get_list_adapters() == {denoiser_name: ["digits"]}
    assert pipe.get_active_adapters() == ["digits"]

    tuned = sample(pipe)
    assert_differs(tuned, base)
    # scale 0 is the base model, exactly: the adapter's term is multiplied by zero
    np.testing.assert_array_equal(sample(pipe, cross_attention_kwargs={"scale": 0.0}), base)
    half = sample(pipe, cross_attention_kwargs={"scale": 0.5})
    assert_differs(half, base)
    assert_differs(half, tuned)
    # the scale holds for one call only
    np.testing.assert_allclose(sample(pipe), tuned, atol=1e-6)


@pytest.mark.parametrize("backbone, denoiser_name", BACKBONES)
def test_fuse_unfuse_round_trips_and_fused_pipeline_saves(
    tmp_path, build_tiny_pipeline, write_adapter, backbone, denoiser_name
):
    pipe = build_tiny_pipeline(backbone=backbone)
    pipe.load_lora_weights(write_adapter(backbone))
    tuned = sample(pipe)

    pipe.fuse_lora()
    assert pipe.num_fused_loras == 1
    np.testing.assert_allclose(sample(pipe), tuned, atol=1e-5)
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    np.testing.assert_allclose(sample(pipe), tuned, atol=1e-5)

    # saving an unfused adapter into the model weights would write PEFT layers that no loader reads
    with pytest.raises(ValueError, match="save_lora_weights"):
        pipe.save_pretrained(tmp_path / "unfused")
    # diffusers' recipe for a model with the adapter baked in: fuse, unload the LoRA layers, save
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    fused_half = sample(pipe)
    pipe.save_pretrained(tmp_path / "fused")
    reloaded = SculptPipeline.from_pretrained(tmp_path / "fused")
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample(reloaded), fused_half, atol=1e-6)
    np.testing.assert_allclose(sample(reloaded), sample(pipe, cross_attention_kwargs=None), atol=1e-6)


@pytest.mark.parametrize("backbone, denoiser_name", BACKBONES)
def test_set_adapters_weighs_two_adapters(build_tiny_pipeline, write_adapter, backbone, denoiser_name):
    only_first, only_second = build_tiny_pipeline(backbone=backbone), build_tiny_pipeline(backbone=backbone)
    only_first.load_lora_weights(write_adapter(backbone, seed=1))
    only_second.load_lora_weights(write_adapter(backbone, seed=2))

    pipe = build_tiny_pipeline(backbone=backbone)
    pipe.load_lora_weights(write_adapter(backbone, seed=1), adapter_name="first")
    pipe.load_lora_weights(write_adapter(backbone, seed=2), adapter_name="second")
    assert pipe.get_list_adapters() == {denoiser_name: ["first", "second"]}

    pipe.set_adapters(["first", "second"], adapter_weights=[1.0, 0.0])
    np.testing.assert_allclose(sample(pipe), sample(only_first), atol=1e-6)
    pipe.set_adapters(["first", "second"], adapter_weights=[0.0, 1.0])
    np.testing.assert_allclose(sample(pipe), sample(only_second), atol=1e-6)
    pipe.set_adapters("second")
    assert pipe.get_active_adapters() == ["second"]
    np.testing.assert_allclose(sample(pipe), sample(only_second), atol=1e-6)
    pipe.set_adapters(["first", "second"], adapter_weights=[0.5, 0.7])
    mixed = sample(pipe)
    assert_differs(mixed, sample(only_first))
    assert_differs(mixed, sample(only_second))

    with pytest.raises(ValueError, match="third"):
        pipe.set_adapters(["first", "third"])


@pytest.mark.parametrize("backbone, denoiser_name", BACKBONES)
def test_unload_restores_the_base_model(tmp_path, build_tiny_pipeline, write_adapter, backbone, denoiser_name):
    pipe = build_tiny_pipeline(backbone=backbone)
    base = sample(pipe)
    pipe.load_lora_weights(write_adapter(backbone))
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    np.testing.assert_array_equal(sample(pipe), base)
    # with the adapter gone, the pipeline saves its base model again
    pipe.save_pretrained(tmp_path / "base")
    reloaded = SculptPipeline.from_pretrained(tmp_path / "base")
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(reloaded), base)


@pytest.mark.parametrize("backbone, denoiser_name", BACKBONES)
def test_loads_from_folder_file_weight_name_and_state_dict(
    tmp_path, build_tiny_pipeline, write_adapter, backbone, denoiser_name
):
    folder = write_adapter(backbone)
    from_folder = build_tiny_pipeline(backbone=backbone)
    from_folder.load_lora_weights(folder)
    expected = sample(from_folder)

    # the file keeps the adapter's LoraConfig: alpha 8 over rank 4 (a scale of 2) comes back as such
    weights_path = f"{folder}/pytorch_lora_weights.safetensors"
    state_dict = load_file(weights_path)
    assert all(key.startswith(f"{denoiser_name}.") for key in state_dict)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_file(state_dict, renamed / "digits_lora.safetensors", metadata={"format": "pt"})

    for source, kwargs in (
        (weights_path, {}),
        (folder, {"weight_name": "pytorch_lora_weights.safetensors"}),
    ):
        pipe = build_tiny_pipeline(backbone=backbone)
        pipe.load_lora_weights(source, **kwargs)
        np.testing.assert_allclose(sample(pipe), expected, atol=1e-6)
        assert pipe.denoiser.peft_config["default_0"].lora_alpha == 8

    # without the metadata (a bare state dict or another tool's file) diffusers assumes alpha = rank, as it does for
    # every pipeline: the adapter loads, at half the trained strength here
    for source, kwargs in ((str(renamed), {"weight_name": "digits_lora.safetensors"}), (state_dict, {})):
        pipe = build_tiny_pipeline(backbone=backbone)
        pipe.load_lora_weights(source, **kwargs)
        assert pipe.denoiser.peft_config["default_0"].lora_alpha == 4
        assert_differs(sample(pipe), expected)
        np.testing.assert_allclose(sample(pipe, cross_attention_kwargs={"scale": 2.0}), expected, atol=1e-5)
    # the dict passed in is left as it was
    assert sorted(state_dict) == sorted(load_file(weights_path))


@pytest.mark.parametrize("backbone, denoiser_name", BACKBONES)
def test_bad_files_and_wrong_targets_are_clear_errors(
    tmp_path, build_tiny_pipeline, write_adapter, backbone, denoiser_name
):
    pipe = build_tiny_pipeline(backbone=backbone)
    other_backbone, other_name = BACKBONES[1] if backbone == "unet" else BACKBONES[0]

    # an adapter of the other backbone, keyed for its own component
    with pytest.raises(ValueError, match=rf"holds weights for \['{other_name}'\].*`{denoiser_name}`"):
        pipe.load_lora_weights(write_adapter(other_backbone))
    # a file without component prefixes, as `denoiser.save_lora_adapter` writes it
    prefixed = load_file(f"{write_adapter(backbone)}/pytorch_lora_weights.safetensors")
    unprefixed = {key.split(".", 1)[1]: value for key, value in prefixed.items()}
    with pytest.raises(ValueError, match="load_lora_adapter\\(path, prefix=None\\)"):
        pipe.load_lora_weights(unprefixed)
    # an adapter for another configuration of the same backbone (two blocks, or attention at both levels)
    other_config = {"num_layers": 2} if backbone == "dit" else {"attention_levels": (True, True)}
    with pytest.raises(ValueError, match="layer\\(s\\) that this .* does not have"):
        pipe.load_lora_weights(write_adapter(backbone, seed=3, **other_config))
    # a full model checkpoint is no LoRA file
    pipe.save_pretrained(tmp_path / "pipeline")
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(tmp_path / "pipeline" / denoiser_name / "diffusion_pytorch_model.safetensors"))
    # neither is a file that is not safetensors
    (tmp_path / "broken.safetensors").write_text("not a tensor file")
    with pytest.raises(OSError, match="Unable to load weights"):
        pipe.load_lora_weights(str(tmp_path / "broken.safetensors"))
    # nothing was loaded along the way
    assert pipe.get_list_adapters() == {}

    with pytest.raises(ValueError, match="`unet_lora_layers` or `transformer_lora_layers`"):
        SculptPipeline.save_lora_weights(tmp_path / "nothing")


def test_denoiser_without_peft_support_is_a_clear_error(write_adapter, tiny_stock_dit):
    # diffusers' own DiT has no PeftAdapterMixin: no diffusers loader can put an adapter into it
    transformer = tiny_stock_dit
    pipe = SculptPipeline(transformer=transformer, scheduler=SculptScheduler())
    with pytest.raises(TypeError, match="DiTTransformer2DModel, which cannot hold LoRA adapters"):
        pipe.load_lora_weights(write_adapter("dit"))


@pytest.mark.parametrize("backbone, denoiser_name", BACKBONES)
def test_remote_code_pipeline_loads_lora(tmp_path, build_tiny_pipeline, write_adapter, backbone, denoiser_name):
    folder = write_adapter(backbone)
    pipe = build_tiny_pipeline(backbone=backbone)
    pipe.save_pretrained(tmp_path / "pipeline")
    pipe.load_lora_weights(folder)

    remote = DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True)
    remote.set_progress_bar_config(disable=True)
    # the class diffusers built from the code saved beside the weights, not the installed one
    assert type(remote) is not SculptPipeline and type(remote).__name__ == "SculptPipeline"
    remote.load_lora_weights(folder)
    np.testing.assert_allclose(sample(remote), sample(pipe), atol=1e-6)
