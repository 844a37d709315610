"""The model card template and the Hub push helpers (the real push is tested in tests/hub/)."""

import shlex
import socket
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from sculptdiff.training.card import render_model_card
from sculptdiff.training.publish import IGNORE_PATTERNS, PushToHubError, push_output_dir, upload_command


TEMPLATE = str(Path(__file__).resolve().parents[2] / "model_cards" / "sculpt_model_card.md")
HYPERPARAMETERS = {"prediction_type": "epsilon", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
HYPERPARAMETERS |= {"conditioning_dropout_prob": 0.1, "learning_rate": 0.001}


def render(**overrides) -> ModelCard:
    fields = {
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


def test_local_paths_stay_out_of_the_metadata(tmp_path):
    data = metadata(render(dataset_name=str(tmp_path), base_model=str(tmp_path)))
    assert "datasets" not in data and "base_model" not in data


def test_upload_command_matches_the_push():
    command = upload_command("me/sculpt digits", "/out dir", private=True)
    assert shlex.split(command) == [
        "hf", "upload", "me/sculpt digits", "/out dir", "--exclude", "checkpoint-*", "--exclude", "logs/*", "--private"
    ]  # fmt: skip
    assert IGNORE_PATTERNS == ["checkpoint-*", "logs/*"]


def test_push_to_an_unreachable_hub_raises_with_the_retry_command(tmp_path, monkeypatch):
    # a port nobody listens on: bind, read the number, close
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(PushToHubError, match="re-run the push alone") as error:
        push_output_dir(str(tmp_path), "me/model", token="hf_secret_token")
    assert error.value.command == upload_command("me/model", str(tmp_path))
    assert "hf_secret_token" not in str(error.value)
