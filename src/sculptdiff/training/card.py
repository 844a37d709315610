"""Model card of a trained SculptPipeline, rendered from a Jinja template with huggingface_hub's ModelCard."""

import os

from huggingface_hub import ModelCard, ModelCardData

from .data import DIGITS_DATASET_NAME


def render_model_card(
    template_path: str,
    model_id: str,
    *,
    conditioning: str,
    dataset_name: str,
    dataset_description: str,
    num_train_samples: int,
    resolution: int,
    class_names: list[str] | None,
    validation_prompts: list[str] | None,
    hyperparameters: dict,
    training_steps: int,
    training_time: str,
    sample_grid: str | None,
    sample_guidance_scale: float,
    sample_inference_steps: int,
    sample_eta: float | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """Fill the template with the run: YAML metadata (from `ModelCardData`) and the Markdown body.

    Args:
        template_path: the Jinja template (the training script passes `model_cards/sculpt_model_card.md`).
        model_id: what the usage snippet loads: the Hub repo id when pushed, else the local output folder.
        conditioning: "class", "text" or "none".
        dataset_name: a Hub dataset id, a local path, or "sklearn-digits" for the built-in digits.
        dataset_description: one sentence about the data.
        hyperparameters: name -> value, listed in the card in insertion order.
        sample_grid: file name of the sample grid inside the model folder, or None.
        sample_eta: the DDPM-family sampler's eta used for the samples (None for flow models).
        base_model: the pipeline this one was fine-tuned from (a Hub id gets into the metadata).
    """
    pipeline_tag = "text-to-image" if conditioning == "text" else "unconditional-image-generation"
    tags = ["sculptdiff", "diffusers", "diffusers-training", pipeline_tag]
    if conditioning == "class":
        tags.append("class-conditional")
    # the built-in digits and local folders are not Hub datasets: only a Hub id goes into the metadata
    hub_dataset = dataset_name if dataset_name != DIGITS_DATASET_NAME and _is_repo_id(dataset_name) else None
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=tags,
        datasets=[hub_dataset] if hub_dataset is not None else None,
        base_model=base_model if base_model is not None and _is_repo_id(base_model) else None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=template_path,
        model_id=model_id,
        conditioning=conditioning,
        dataset_name=dataset_name,
        dataset_description=dataset_description,
        num_train_samples=num_train_samples,
        resolution=resolution,
        class_names=class_names,
        validation_prompts=validation_prompts,
        hyperparameters=hyperparameters,
        training_steps=training_steps,
        training_time=training_time,
        sample_grid=sample_grid,
        sample_guidance_scale=sample_guidance_scale,
        sample_inference_steps=sample_inference_steps,
        sample_eta=sample_eta,
        fine_tuned_from=base_model,
    )


def _is_repo_id(name: str) -> bool:
    """A Hub id ("namespace/name" or "name") rather than a local path that exists or looks like one."""
    return not os.path.exists(name) and not os.path.isabs(name) and name.count("/") <= 1 and not name.startswith(".")
