"""Model card of a trained SculptPipeline: its values built from the run, rendered from a Jinja template.

`build_model_card` is what a training script calls: it reads the model's facts from the saved pipeline, the recipe
from the run's arguments and what the run measured from a `TrainingRun`; `model_cards/sculpt_model_card.md` only
lays them out. huggingface_hub's `ModelCard.from_template` renders the template, diffusers' `populate_model_card`
adds the library name and tags as diffusers' own training examples do. (diffusers' `load_or_create_model_card`
fills diffusers' generic template, which has no room for classes, samples or the recipe.)
"""

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData

from ..models.transformers.dit_sculpt import SculptDiT2DModel
from ..pipelines.sculpt.pipeline_sculpt import SculptPipeline
from .data import DIGITS_DATASET_NAME
from .publish import hub_repo_id


SAMPLE_GRID_NAME = "sample_grid.png"
DIGITS_DESCRIPTION = (
    "scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`, the UCI optical recognition of"
    " handwritten digits test set): real 8x8 scans with 16 grey levels, 10 classes."
)


@dataclass
class TrainingRun:
    """What a finished training run measured, for its model card; the rest comes from its arguments and pipeline.

    Args:
        num_train_samples: images in the training set.
        training_steps: optimisation steps at the end of the run (counting those before a resume).
        train_seconds: wall-clock time of the training loop of this process.
        total_batch_size: images per optimisation step over all processes and accumulation steps.
        num_processes: `accelerator.num_processes`.
        device_type: `accelerator.device.type`.
        mixed_precision: `accelerator.mixed_precision`.
        sample_guidance_scale: the guidance scale the sample grid was rendered with.
        resumed_from_step: the step the run resumed from (0 for a fresh run).
        validation_prompts: the prompts of the sample grid (text models).
        resumed_settings: for a resume from a checkpoint of a run with other settings, name -> (the checkpoint
            run's value, this run's value from the resume on), e.g. `{"learning_rate": (0.001, 0.0005)}`.
    """

    num_train_samples: int
    training_steps: int
    train_seconds: float
    total_batch_size: int
    num_processes: int
    device_type: str
    mixed_precision: str
    sample_guidance_scale: float
    resumed_from_step: int = 0
    validation_prompts: list[str] | None = None
    resumed_settings: dict[str, tuple] = field(default_factory=dict)


def build_model_card(args: argparse.Namespace, pipeline: SculptPipeline, run: TrainingRun) -> ModelCard:
    """The model card (README.md) of a training output: write `str(card)` into the output folder.

    Args:
        args: the run's arguments, named as in diffusers' training examples; read: `output_dir`, `push_to_hub`,
            `hub_model_id`, `dataset_name`, `train_data_dir`, `image_column`, `resolution`,
            `model_card_template`, `pretrained_model_name_or_path`, `text_encoder_name_or_path`,
            `vae_name_or_path`, `learning_rate`, `lr_scheduler`, `lr_warmup_steps`, `max_train_steps`, `use_ema`,
            `ema_power`, `snr_gamma`, `seed`, `weighting_scheme`, `validation_inference_steps`, `validation_eta`.
        pipeline: the saved pipeline: architecture, conditioning, class names (`id2label`), objective, schedule and
            size are read from its components (its `denoiser`, the U-Net or the transformer), so the card describes
            what ships.
        run: what the run measured.

    Local paths (a dataset folder, a base model or encoder on disk) appear by their folder name only.
    """
    denoiser = pipeline.denoiser
    denoiser_config = denoiser.config
    if denoiser_config.num_class_embeds is not None:
        conditioning = "class"
        id2label = denoiser_config.id2label or {}
        names = [id2label.get(index, str(index)) for index in range(denoiser_config.num_class_embeds)]
    else:
        conditioning = "text" if denoiser_config.cross_attention_dim is not None else "none"
        names = None
    prediction_type = denoiser_config.prediction_type
    if isinstance(denoiser, SculptDiT2DModel):
        architecture = (
            f"SculptDiT2DModel (DiT, patch {denoiser_config.patch_size}, {denoiser_config.num_layers} layers, width"
            f" {denoiser_config.num_attention_heads * denoiser_config.attention_head_dim})"
        )
        shape = {
            "patch_size": denoiser_config.patch_size,
            "num_layers": denoiser_config.num_layers,
            "num_attention_heads": denoiser_config.num_attention_heads,
            "attention_head_dim": denoiser_config.attention_head_dim,
        }
    else:
        channels = ", ".join(str(width) for width in denoiser_config.block_out_channels)
        architecture = (
            f"{type(denoiser).__name__} (U-Net, {len(denoiser_config.block_out_channels)} levels of {channels}"
            " channels)"
        )
        shape = {"block_out_channels": list(denoiser_config.block_out_channels)}

    builtin = args.dataset_name is None and args.train_data_dir is None
    if builtin:
        dataset_name, description = DIGITS_DATASET_NAME, DIGITS_DESCRIPTION
    else:
        dataset_name = args.dataset_name or args.train_data_dir
        description = f"`{_public_name(dataset_name)}`, column `{args.image_column}`."

    hyperparameters = {
        "prediction_type": prediction_type,
        "num_train_timesteps": pipeline.scheduler.config.num_train_timesteps,
        "beta_schedule": pipeline.scheduler.config.get("beta_schedule", "n/a (flow)"),
        "conditioning_dropout_prob": denoiser_config.conditioning_dropout_prob,
        **shape,
        "parameters": f"{sum(parameter.numel() for parameter in denoiser.parameters()):,}",
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps,
        "train_batch_size (total)": run.total_batch_size,
        "max_train_steps": args.max_train_steps,
        "use_ema": args.use_ema,
        "ema_power": args.ema_power if args.use_ema else "n/a",
        "snr_gamma": args.snr_gamma,
        "mixed_precision": run.mixed_precision,
        "seed": args.seed,
    }
    if prediction_type == "flow":
        hyperparameters["weighting_scheme"] = args.weighting_scheme
    pretrained = args.pretrained_model_name_or_path
    if pipeline.text_encoder is not None:
        encoder = args.text_encoder_name_or_path
        hyperparameters["text_encoder"] = (
            _public_name(encoder) if encoder else f"{_public_name(pretrained)} (text_encoder)"
        )
    if pipeline.vae is not None:
        vae = args.vae_name_or_path
        hyperparameters["vae"] = _public_name(vae) if vae else f"{_public_name(pretrained)} (vae)"

    minutes, seconds = divmod(int(run.train_seconds), 60)
    training_time = f"{minutes} min {seconds} s on {run.num_processes} process(es) ({run.device_type})"
    if run.resumed_from_step:
        training_time += f" (resumed at step {run.resumed_from_step})"
    return render_model_card(
        args.model_card_template,
        hub_repo_id(args) if args.push_to_hub else str(Path(args.output_dir).resolve()),
        architecture=architecture,
        conditioning=conditioning,
        dataset_name=dataset_name,
        dataset_description=description,
        num_train_samples=run.num_train_samples,
        resolution=args.resolution,
        class_names=names,
        validation_prompts=run.validation_prompts,
        hyperparameters=hyperparameters,
        training_steps=run.training_steps,
        training_time=training_time,
        sample_grid=SAMPLE_GRID_NAME,
        sample_guidance_scale=run.sample_guidance_scale,
        sample_inference_steps=args.validation_inference_steps,
        sample_eta=None if prediction_type == "flow" else args.validation_eta,
        base_model=pretrained,
        resumed_from_step=run.resumed_from_step,
        resumed_settings={
            name: tuple(_public_value(value) for value in values) for name, values in run.resumed_settings.items()
        },
    )


def render_model_card(
    template_path: str,
    model_id: str,
    *,
    architecture: str,
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
    resumed_from_step: int = 0,
    resumed_settings: dict[str, tuple] | None = None,
) -> ModelCard:
    """Fill the template with the run's values: YAML metadata (from `ModelCardData`) and the Markdown body.

    Args:
        template_path: the Jinja template (the training script passes `model_cards/sculpt_model_card.md`).
        model_id: what the usage snippet loads: the Hub repo id when pushed, else the local output folder.
        architecture: the denoiser, named with its shape, e.g. "SculptDiT2DModel (DiT, patch 2, 6 layers, width 96)".
        conditioning: "class", "text" or "none".
        dataset_name: a Hub dataset id, a local path, or "sklearn-digits" for the built-in digits.
        dataset_description: one sentence about the data.
        hyperparameters: name -> value, listed in the card in insertion order; the text also reads
            `prediction_type`, `num_train_timesteps`, `beta_schedule`, `conditioning_dropout_prob` and, when present,
            `text_encoder` and `vae` from it.
        sample_grid: file name of the sample grid inside the model folder, or None.
        sample_eta: the DDPM-family sampler's eta used for the samples (None for flow models).
        base_model: the pipeline this one was fine-tuned from (a Hub id gets into the metadata).
        resumed_from_step: the step a resumed run started from.
        resumed_settings: name -> (value before `resumed_from_step`, value after) of the settings a resume changed.

    Training scripts call `build_model_card`, which computes all of these from the run. Local paths (`dataset_name`, `base_model`) appear in the body by their folder name and never in the metadata.
    """
    pipeline_tag = "text-to-image" if conditioning == "text" else "unconditional-image-generation"
    tags = ["sculptdiff", "diffusers", "diffusers-training", pipeline_tag]
    if conditioning == "class":
        tags.append("class-conditional")
    # the built-in digits and local folders are not Hub datasets: only a Hub id goes into the metadata
    hub_dataset = dataset_name if dataset_name != DIGITS_DATASET_NAME and _is_repo_id(dataset_name) else None
    card_data = ModelCardData(
        pipeline_tag=pipeline_tag,
        license=license,
        datasets=[hub_dataset] if hub_dataset is not None else None,
        base_model=base_model if base_model is not None and _is_repo_id(base_model) else None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=template_path,
        model_id=model_id,
        architecture=architecture,
        conditioning=conditioning,
        dataset_name=_public_name(dataset_name),
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
        fine_tuned_from=_public_name(base_model) if base_model is not None else None,
        resumed_from_step=resumed_from_step,
        resumed_settings=resumed_settings,
    )
    # library_name "diffusers" and the tags, as diffusers' training examples add them
    return populate_model_card(card, tags=tags)


def _is_repo_id(name: str) -> bool:
    """A Hub id ("namespace/name" or "name") rather than a local path that exists or looks like one."""
    return (
        not os.path.exists(name)
        and not os.path.isabs(name)
        and name.count("/") <= 1
        and not name.startswith((".", "~"))
    )


def _public_name(name: str) -> str:
    """A Hub id as it is; a local path by its folder name, which names the data without the machine's folders."""
    return name if _is_repo_id(name) else os.path.basename(os.path.normpath(name))


def _public_value(value):
    """A setting as the card may show it: a local path by its folder name, anything else as it is."""
    return _public_name(value) if isinstance(value, str) else value
