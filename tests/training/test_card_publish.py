"""The model card (template, values from the run) and the Hub push helpers (the real push is tested in tests/hub/)."""

import argparse
import os
import shlex
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from accelerate import Accelerator
from huggingface_hub import ModelCard

from sculptdiff import SculptFlowScheduler, SculptPipeline, SculptScheduler, SculptUNet2DModel
from sculptdiff.training.card import SAMPLE_GRID_NAME, TrainingRun, build_model_card, render_model_card
from sculptdiff.training.checkpointing import ResumePoint
from sculptdiff.training.publish import (
    HIDDEN_PATTERNS,
    PushToHubError,
    hub_repo_id,
    portable_training_args,
    push_output_dir,
    upload_command,
)


TEMPLATE = str(Path(__file__).resolve().parents[2] / "model_cards" / "sculpt_model_card.md")
HYPERPARAMETERS = {"prediction_type": "epsilon", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
HYPERPARAMETERS |= {"conditioning_dropout_prob": 0.1, "learning_rate": 0.001}
ALLOW_PATTERNS = ["model_index.json", "pipeline_sculpt.py", "README.md", "unet/*", "scheduler/*", "sample_grid.png"]


def render(**overrides) -> ModelCard:
    fields = {
        "architecture": "SculptUNet2DModel (U-Net, 2 levels of 8, 16 channels)",
        "conditioning": "class",
        "dataset_name": "sklearn-digits",
        "dataset_description": "Digits.",
        "num_train_samples": 1797,
        "resolution": 16,
        "class_names": [str(index) for index in range(10)],
        "validation_prompts": None,
        "hyperparameters": HYPERPARAMETERS,
        "training_steps": 2400,
        "training_time": "9 min 3 s",
        "sample_grid": "sample_grid.png",
        "sample_guidance_scale": 3.0,
        "sample_inference_steps": 50,
        "sample_eta": 1.0,
    }
    fields.update(overrides)
    return render_model_card(TEMPLATE, "me/sculpt-digits", **fields)


def metadata(card: ModelCard) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


def tiny_pipeline(text_encoder=None, tokenizer=None, vae=None, **unet_config) -> SculptPipeline:
    config = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (8, 16)}
    config |= {"layers_per_block": 1, "attention_levels": (False, True), "attention_head_dim": 8, "norm_num_groups": 4}
    config |= {"conditioning_dropout_prob": 0.1, "prediction_type": "epsilon"}
    unet = SculptUNet2DModel(**(config | unet_config))
    if unet.config.prediction_type == "flow":
        scheduler = SculptFlowScheduler(num_train_timesteps=100)
    else:
        scheduler = SculptScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    return SculptPipeline(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)


def run_args(**overrides) -> argparse.Namespace:
    """The arguments `build_model_card` reads, with train_sculpt.py's defaults."""
    args = {
        "output_dir": "sculpt-digits",
        "push_to_hub": True,
        "hub_model_id": "me/digits",
        "dataset_name": None,
        "train_data_dir": None,
        "image_column": "image",
        "resolution": 8,
        "model_card_template": TEMPLATE,
        "pretrained_model_name_or_path": None,
        "text_encoder_name_or_path": None,
        "vae_name_or_path": None,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "max_train_steps": 30,
        "use_ema": True,
        "ema_power": 0.75,
        "snr_gamma": None,
        "seed": 0,
        "weighting_scheme": "uniform",
        "validation_inference_steps": 50,
        "validation_eta": 1.0,
    }
    return argparse.Namespace(**(args | overrides))


RUN = TrainingRun(
    num_train_samples=1797,
    training_steps=30,
    train_seconds=125.7,
    total_batch_size=64,
    num_processes=2,
    device_type="cpu",
    mixed_precision="no",
    sample_guidance_scale=3.0,
)


def test_class_card_metadata_and_body():
    card = render()
    data = metadata(card)
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert "sculptdiff" in data["tags"] and "class-conditional" in data["tags"]
    assert data["license"] == "apache-2.0"
    # the built-in digits are not a Hub dataset, and there is no base model
    assert "datasets" not in data and "base_model" not in data
    text = card.text
    assert "![samples](sample_grid.png)" in text
    assert "10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in text
    assert 'SculptPipeline.from_pretrained("me/sculpt-digits")' in text
    assert "class_labels=list(range(10))" in text and "    eta=1.0,\n" in text
    assert "50 sampling steps (eta 1.0), guidance scale 3.0" in text
    assert "| learning_rate | 0.001 |" in text
    assert "Trained for 2400 optimisation steps in 9 min 3 s." in text
    assert "10.0%" in text


def test_text_card_with_hub_dataset_and_base_model():
    card = render(
        conditioning="text",
        class_names=None,
        dataset_name="someone/captioned-digits",
        validation_prompts=['a photo of digit "one"'],
        base_model="someone/sculpt-base",
        hyperparameters=HYPERPARAMETERS | {"text_encoder": "sentence-transformers/all-MiniLM-L6-v2"},
    )
    data = metadata(card)
    assert data["pipeline_tag"] == "text-to-image"
    assert data["datasets"] == ["someone/captioned-digits"]
    assert data["base_model"] == "someone/sculpt-base"
    # the prompt is JSON-quoted into the snippet, so quotes in it cannot break the code
    assert 'prompt=["a photo of digit \\"one\\""]' in card.text
    assert "fine-tuned from `someone/sculpt-base`" in card.text


def test_flow_card_has_no_eta():
    card = render(sample_eta=None, hyperparameters=HYPERPARAMETERS | {"prediction_type": "flow"})
    assert "eta" not in card.text.split("## Usage")[1].split("## Training")[0]
    assert "rectified flow" in card.text


def test_local_paths_stay_out_of_the_card(tmp_path):
    # A README on the Hub must not name the machine's folders (home directory, user name): neither in the metadata
    # nor in the body, where the data and the base model appear by their folder name.
    (tmp_path / "my-pets").mkdir()
    card = render(dataset_name=str(tmp_path / "my-pets"), base_model=str(tmp_path / "base"))
    data = metadata(card)
    assert "datasets" not in data and "base_model" not in data
    assert str(tmp_path) not in str(card)
    assert card.text.startswith("\n# SculptPipeline: my-pets, class-conditional")
    assert "fine-tuned from `base`" in card.text


def test_model_card_of_a_dit_pipeline_names_the_transformer(build_tiny_dit):
    """Issue 15: a DiT pipeline has no `unet`; the card reads its `transformer` through `pipeline.denoiser`."""
    transformer = build_tiny_dit(num_layers=2, prediction_type="flow")
    pipeline = SculptPipeline(transformer=transformer, scheduler=SculptFlowScheduler(num_train_timesteps=100))
    text = build_model_card(run_args(), pipeline, RUN).text
    assert "a SculptDiT2DModel (DiT, patch 2, 2 layers, width 16) that denoises 8x8 images" in text
    assert "trained with rectified flow" in text and "5 classes: zero, one, two, three, four" in text
    assert "names: pipe.denoiser.config.id2label" in text and "U-Net" not in text
    assert f"| parameters | {sum(p.numel() for p in transformer.parameters()):,} |" in text
    assert "| patch_size | 2 |" in text and "| num_layers | 2 |" in text and "| num_attention_heads | 2 |" in text
    assert "| attention_head_dim | 8 |" in text and "block_out_channels" not in text
    assert "| long_skip_connections | False |" in text
    # with U-ViT's long skips, the architecture says how many: one per block of the first half
    scheduler = SculptFlowScheduler(num_train_timesteps=100)
    skips = SculptPipeline(transformer=build_tiny_dit(num_layers=5, long_skip_connections=True), scheduler=scheduler)
    text = build_model_card(run_args(), skips, RUN).text
    assert "a SculptDiT2DModel (DiT, patch 2, 5 layers, width 16, 2 long skips) that denoises" in text
    assert "| long_skip_connections | True |" in text


def test_model_card_of_a_stock_dit_pipeline_names_it_without_long_skips(build_tiny_stock_dit):
    """diffusers' DiTTransformer2DModel (fine-tuned as it is) has no `long_skip_connections` in its config."""
    transformer = build_tiny_stock_dit(in_channels=1, out_channels=2)
    pipeline = SculptPipeline(transformer=transformer, scheduler=SculptScheduler(num_train_timesteps=100))
    text = build_model_card(run_args(), pipeline, replace(RUN, conditioning_dropout_prob=0.1)).text
    assert "a DiTTransformer2DModel (DiT, patch 2, 1 layers, width 16) that denoises" in text
    assert "| long_skip_connections | False |" in text
    # the rate the labels were dropped at is the run's to give: the stock config has none
    with pytest.raises(ValueError, match="DiTTransformer2DModel config has no conditioning_dropout_prob"):
        build_model_card(run_args(), pipeline, RUN)


def test_build_model_card_reads_the_pipeline_the_args_and_the_run():
    id2label = {0: "zero", 1: "one", 2: "two"}
    pipeline = tiny_pipeline(num_class_embeds=3, id2label=id2label)
    card = build_model_card(run_args(), pipeline, RUN)
    data = metadata(card)
    assert data["library_name"] == "diffusers" and "class-conditional" in data["tags"]
    text = card.text
    assert text.startswith("\n# SculptPipeline: sklearn-digits, class-conditional")
    assert "scikit-learn's bundled handwritten digits" in text and "1797 training images, resized to 8x8" in text
    # class names from the U-Net's id2label, in id order: what `pipe.unet.config.id2label` says
    assert "3 classes: zero, one, two" in text and "class_labels=list(range(3))" in text
    assert 'SculptPipeline.from_pretrained("me/digits")' in text
    assert f"![samples]({SAMPLE_GRID_NAME})" in text
    assert "50 sampling steps (eta 1.0), guidance scale 3.0" in text
    # the schedule from the pipeline's scheduler, the size from its U-Net, the recipe from the args
    assert "under a 100-step `squaredcos_cap_v2` noise schedule" in text
    assert "| num_train_timesteps | 100 |" in text and "| block_out_channels | [8, 16] |" in text
    assert "a SculptUNet2DModel (U-Net, 2 levels of 8, 16 channels) that denoises 8x8 images" in text
    assert f"| parameters | {sum(p.numel() for p in pipeline.unet.parameters()):,} |" in text
    assert "| train_batch_size (total) | 64 |" in text and "| ema_power | 0.75 |" in text
    assert "| learning_rate | 0.001 |" in text and "| seed | 0 |" in text
    assert "weighting_scheme" not in text and "| text_encoder |" not in text and "| vae |" not in text
    assert "Trained for 30 optimisation steps in 2 min 5 s on 2 process(es) (cpu)." in text

    resumed = build_model_card(
        run_args(push_to_hub=False, use_ema=False), pipeline, replace(RUN, resumed_from_step=20)
    )
    assert "in 2 min 5 s on 2 process(es) (cpu) (resumed at step 20)." in resumed.text
    assert "| ema_power | n/a |" in resumed.text
    assert "other settings" not in resumed.text

    # a resume on purpose with other settings: the table holds this run's values, the card says what came before
    changed = replace(
        RUN,
        resumed_from_step=20,
        resumed_settings={"learning_rate": (0.001, 0.0005), "train_data_dir": ("/a/b/pets", None)},
    )
    text = build_model_card(run_args(learning_rate=0.0005), pipeline, changed).text
    assert "| learning_rate | 0.0005 |" in text
    assert "Resumed at step 20 from a checkpoint of a run with other settings" in text
    assert "- `learning_rate`: 0.001 until step 20, then 0.0005\n" in text
    assert "- `train_data_dir`: pets until step 20, then None\n\n| hyperparameter | value |" in text
    assert "/a/b" not in text
    # not pushed: the snippet loads the local output folder
    assert f'from_pretrained("{Path("sculpt-digits").resolve()}")' in resumed.text


def test_build_model_card_of_a_latent_text_model_from_local_folders(
    tmp_path, tiny_text_encoder, tiny_tokenizer, tiny_vae
):
    pipeline = tiny_pipeline(
        text_encoder=tiny_text_encoder, tokenizer=tiny_tokenizer, vae=tiny_vae, cross_attention_dim=32, in_channels=4
    )
    (tmp_path / "captioned").mkdir()
    args = run_args(
        train_data_dir=str(tmp_path / "captioned"),
        image_column="img",
        pretrained_model_name_or_path=str(tmp_path / "base-model"),
        vae_name_or_path=str(tmp_path / "my-vae"),
    )
    card = build_model_card(args, pipeline, replace(RUN, validation_prompts=["a photo of digit one"]))
    data = metadata(card)
    assert data["pipeline_tag"] == "text-to-image" and "datasets" not in data and "base_model" not in data
    assert str(tmp_path) not in str(card)
    text = card.text
    assert text.startswith("\n# SculptPipeline: captioned, text-to-image")
    assert "`captioned`, column `img`." in text and "fine-tuned from `base-model`" in text
    assert "| text_encoder | base-model (text_encoder) |" in text and "| vae | my-vae |" in text
    assert "in the latent space of the VAE `my-vae`" in text
    assert 'prompt=["a photo of digit one"]' in text


def test_build_model_card_of_an_unconditional_flow_model():
    card = build_model_card(run_args(), tiny_pipeline(prediction_type="flow", conditioning_dropout_prob=0.0), RUN)
    assert metadata(card)["pipeline_tag"] == "unconditional-image-generation"
    assert "The model is unconditional." in card.text and "rectified flow" in card.text
    assert "| weighting_scheme | uniform |" in card.text and "| beta_schedule | n/a (flow) |" in card.text
    assert "eta" not in card.text.split("## Usage")[1].split("## Training")[0]


def test_upload_command_uploads_the_allowlist_without_hidden_files():
    command = upload_command("me/sculpt digits", "/out dir", ["model_index.json", "unet/*"], private=True)
    assert shlex.split(command) == [
        "hf", "upload", "me/sculpt digits", "/out dir", "--include", "model_index.json", "--include", "unet/*",
        "--exclude", ".*", "--exclude", "*/.*", "--private",
    ]  # fmt: skip
    assert HIDDEN_PATTERNS == (".*", "*/.*")


def test_push_refuses_a_missing_allowlist(tmp_path):
    with pytest.raises(ValueError, match="allow_patterns is empty"):
        push_output_dir(str(tmp_path), "me/model", [])
    with pytest.raises(TypeError, match="allow_patterns must be a list of glob patterns"):
        push_output_dir(str(tmp_path), "me/model", "unet/*")


def test_push_to_an_unreachable_hub_raises_with_the_retry_command(tmp_path, monkeypatch):
    # a port nobody listens on: bind, read the number, close
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(PushToHubError, match="re-run the push alone") as error:
        push_output_dir(str(tmp_path), "me/model", ALLOW_PATTERNS, token="hf_secret_token")
    assert error.value.command == upload_command("me/model", str(tmp_path), ALLOW_PATTERNS)
    assert "--include 'unet/*'" in str(error.value) and "hf_secret_token" not in str(error.value)


def test_hub_repo_id_defaults_to_the_output_folder_name(tmp_path):
    assert hub_repo_id(run_args(hub_model_id="me/x")) == "me/x"
    assert hub_repo_id(run_args(hub_model_id=None, output_dir=str(tmp_path / "runs" / "digits-1"))) == "digits-1"


def test_portable_training_args_publish_no_local_folders(tmp_path, monkeypatch):
    launch_dir = tmp_path / "project"
    args = {
        "output_dir": str(launch_dir / "runs" / "digits"),
        "model_card_template": str(launch_dir / "model_cards" / "card.md"),
        "train_data_dir": str(tmp_path / "home" / "alice" / "pets"),
        "cache_dir": "~/.cache/sculpt",
        "logging_dir": "logs",
        "dataset_name": "someone/digits",
        "resume_from_checkpoint": "latest",
        "pretrained_model_name_or_path": "../base",
        "validation_prompts": ["/not a path, a prompt"],
        "learning_rate": 0.001,
        "seed": None,
        "hub_token": "hf_secret",
    }
    # relative paths, Hub ids, keywords, lists, numbers: as given; the token: gone
    expected = {name: value for name, value in args.items() if name != "hub_token"}
    # under the launch folder: as the user would type it there
    expected["output_dir"] = os.path.join("runs", "digits")
    expected["model_card_template"] = os.path.join("model_cards", "card.md")
    # elsewhere on the machine: withheld
    expected["train_data_dir"] = expected["cache_dir"] = None
    assert portable_training_args(args, launch_dir=str(launch_dir)) == expected
    # by default relative to the working directory the run was launched from
    assert portable_training_args({"output_dir": os.path.join(os.getcwd(), "out")}) == {"output_dir": "out"}
    # launched from "/" or "/home", a relative path would still spell the home directory: withheld
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "alice"))
    alice = {"train_data_dir": str(tmp_path / "home" / "alice" / "pets")}
    assert portable_training_args(alice, launch_dir="/") == {"train_data_dir": None}
    assert portable_training_args(alice, launch_dir=str(tmp_path / "home")) == {"train_data_dir": None}
    assert portable_training_args(alice, launch_dir=str(tmp_path / "home" / "alice")) == {"train_data_dir": "pets"}


def test_a_finished_run_reads_the_batch_size_the_accelerator_and_the_resume():
    accelerator = Accelerator(cpu=True)
    args = argparse.Namespace(train_batch_size=3, gradient_accumulation_steps=2)
    resume = ResumePoint("out/checkpoint-5", 5, {"learning_rate": (1e-3, 5e-4)})
    run = TrainingRun.finished(accelerator, args, 100, 8, 2.5, resume, sample_guidance_scale=3.0)
    measured = (run.num_train_samples, run.training_steps, run.train_seconds, run.sample_guidance_scale)
    assert measured == (100, 8, 2.5, 3.0)
    assert (run.total_batch_size, run.num_processes, run.device_type, run.mixed_precision) == (6, 1, "cpu", "no")
    assert (run.resumed_from_step, run.resumed_settings) == (5, {"learning_rate": (1e-3, 5e-4)})
    fresh = TrainingRun.finished(accelerator, args, 100, 8, 2.5)
    assert (fresh.resumed_from_step, fresh.resumed_settings) == (0, {})


@pytest.mark.parametrize("stock", [False, True])
def test_lora_card_snippet_loads_the_adapter_or_the_merged_pipeline(stock, tiny_stock_unet):
    # a stock UNet2DModel takes no adapter through diffusers' loaders: its LoRA run saves the merged pipeline too
    pipeline = SculptPipeline(unet=tiny_stock_unet, scheduler=SculptScheduler()) if stock else tiny_pipeline()
    template = Path(__file__).resolve().parents[2] / "model_cards" / "sculpt_lora_model_card.md"
    args = run_args(
        lora_rank=4, lora_alpha=None, pretrained_model_name_or_path="me/base-digits", model_card_template=str(template)
    )
    # the trainer tells the card the dropout of a stock denoiser, whose config has none
    run = TrainingRun(
        **{
            **vars(RUN),
            "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            "conditioning_dropout_prob": 0.0 if stock else None,
        }
    )
    usage = build_model_card(args, pipeline, run).text.split("## Usage")[1]
    if stock:
        assert 'SculptPipeline.from_pretrained("me/digits")' in usage and "load_lora_weights" not in usage
    else:
        assert 'SculptPipeline.from_pretrained("me/base-digits")' in usage
        assert 'pipe.load_lora_weights("me/digits")' in usage
