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

from diffusers import AutoencoderKL
from diffusers.loaders import PeftAdapterMixin
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData

from ..pipelines.sculpt.pipeline_sculpt import SculptPipeline
from .data import DIGITS_DATASET_NAME
from .lora import LORA_WEIGHT_NAME
from .publish import hub_repo_id


SAMPLE_GRID_NAME = "sample_grid.png"
# a LoRA run's samples of the base model, beside its samples with the adapter (SAMPLE_GRID_NAME)
BASE_SAMPLE_GRID_NAME = "sample_grid_base.png"
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
        sample_guidance_scale: the guidance scale the sample grid was rendered with (pipelines; None for a VAE).
        resumed_from_step: the step the run resumed from (0 for a fresh run).
        validation_prompts: the prompts of the sample grid (text models).
        resumed_settings: for a resume from a checkpoint of a run with other settings, name -> (the checkpoint
            run's value, this run's value from the resume on), e.g. `{"learning_rate": (0.001, 0.0005)}`.
        lora_target_modules: the layers a LoRA run adapted (`args.lora_rank` set); None for full training.
        conditioning_dropout_prob: how often the condition was dropped, for a stock diffusers denoiser (whose config
            has no `conditioning_dropout_prob`); None reads the denoiser's config.
    """

    num_train_samples: int
    training_steps: int
    train_seconds: float
    total_batch_size: int
    num_processes: int
    device_type: str
    mixed_precision: str
    sample_guidance_scale: float | None = None
    resumed_from_step: int = 0
    validation_prompts: list[str] | None = None
    resumed_settings: dict[str, tuple] = field(default_factory=dict)
    lora_target_modules: list[str] | None = None
    conditioning_dropout_prob: float | None = None

    @classmethod
    def finished(
        cls,
        accelerator,
        args: argparse.Namespace,
        num_train_samples: int,
        training_steps: int,
        train_seconds: float,
        resume=None,
        **measured,
    ) -> "TrainingRun":
        """The run of `accelerator` with `args` (its batch size and accumulation), resumed from `resume` (a
        `checkpointing.ResumePoint`, None for a fresh run); `measured` sets the other fields."""
        return cls(
            num_train_samples=num_train_samples,
            training_steps=training_steps,
            train_seconds=train_seconds,
            total_batch_size=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
            num_processes=accelerator.num_processes,
            device_type=accelerator.device.type,
            mixed_precision=accelerator.mixed_precision,
            resumed_from_step=resume.step if resume is not None else 0,
            resumed_settings=resume.differences if resume is not None else {},
            **measured,
        )

    def training_time(self) -> str:
        """The card's line on how long training took, where, and whether it resumed."""
        minutes, seconds = divmod(int(self.train_seconds), 60)
        text = f"{minutes} min {seconds} s on {self.num_processes} process(es) ({self.device_type})"
        if self.resumed_from_step:
            text += f" (resumed at step {self.resumed_from_step})"
        return text

    def optimization_hyperparameters(self, args: argparse.Namespace) -> dict:
        """The rows of the hyperparameter table that every training script's shared optimisation flags give."""
        return {
            "learning_rate": args.learning_rate,
            "lr_scheduler": args.lr_scheduler,
            "lr_warmup_steps": args.lr_warmup_steps,
            "train_batch_size (total)": self.total_batch_size,
            "max_train_steps": args.max_train_steps,
            "use_ema": args.use_ema,
            "mixed_precision": self.mixed_precision,
            "seed": args.seed,
        }


def _training_data(args: argparse.Namespace) -> tuple[bool, str, str]:
    """Whether the run trained on the built-in digits, the dataset's name and its description for the card."""
    if args.dataset_name is None and args.train_data_dir is None:
        return True, DIGITS_DATASET_NAME, DIGITS_DESCRIPTION
    dataset_name = args.dataset_name or args.train_data_dir
    return False, dataset_name, f"`{_public_name(dataset_name)}`, column `{args.image_column}`."


def build_model_card(args: argparse.Namespace, pipeline: SculptPipeline, run: TrainingRun) -> ModelCard:
    """The model card (README.md) of a training output: write `str(card)` into the output folder.

    Args:
        args: the run's arguments, named as in diffusers' training examples; read: `output_dir`, `push_to_hub`,
            `hub_model_id`, `dataset_name`, `train_data_dir`, `image_column`, `resolution`,
            `model_card_template`, `pretrained_model_name_or_path`, `text_encoder_name_or_path`,
            `vae_name_or_path`, `learning_rate`, `lr_scheduler`, `lr_warmup_steps`, `max_train_steps`, `use_ema`,
            `ema_power`, `snr_gamma`, `seed`, `weighting_scheme`, `validation_inference_steps`, `validation_eta`,
            and for a LoRA run (`run.lora_target_modules` set) `lora_rank`, `lora_alpha`.
        pipeline: the saved pipeline: architecture, conditioning, class names (`id2label`), objective, schedule and
            size are read from its components (its `denoiser`, the U-Net or the transformer), so the card describes
            what ships.
        run: what the run measured.

    Local paths (a dataset folder, a base model or encoder on disk) appear by their folder name only.
    """
    denoiser = pipeline.denoiser
    denoiser_config = denoiser.config
    # a stock diffusers denoiser (UNet2DModel, DiTTransformer2DModel, ...) has no id2label, no prediction_type (its
    # scheduler's) and no conditioning_dropout_prob
    num_classes = pipeline.num_classes()
    if num_classes is not None:
        conditioning = "class"
        id2label = denoiser_config.get("id2label") or {}
        names = [id2label.get(index, str(index)) for index in range(num_classes)]
    else:
        conditioning = "text" if denoiser_config.get("cross_attention_dim") is not None else "none"
        names = None
    prediction_type = denoiser_config.get("prediction_type") or pipeline.scheduler.config.prediction_type
    conditioning_dropout_prob = run.conditioning_dropout_prob
    if conditioning_dropout_prob is None:
        if "conditioning_dropout_prob" not in denoiser_config:
            raise ValueError(
                f"The {type(denoiser).__name__} config has no conditioning_dropout_prob (a stock diffusers denoiser):"
                " pass the rate the run dropped the condition at, as TrainingRun(conditioning_dropout_prob=...)."
            )
        conditioning_dropout_prob = denoiser_config.conditioning_dropout_prob
    if pipeline.transformer is not None:
        # U-ViT's long skips join the first half of the blocks to the second: none in a 1-block DiT, nor in
        # diffusers' DiTTransformer2DModel, whose config has no such entry
        long_skip_connections = denoiser_config.get("long_skip_connections", False)
        long_skips = denoiser_config.num_layers // 2 if long_skip_connections else 0
        architecture = (
            f"{type(denoiser).__name__} (DiT, patch {denoiser_config.patch_size}, {denoiser_config.num_layers} layers,"
            f" width {denoiser_config.num_attention_heads * denoiser_config.attention_head_dim}"
            f"{f', {long_skips} long skips' if long_skips else ''})"
        )
        shape = {
            "patch_size": denoiser_config.patch_size,
            "num_layers": denoiser_config.num_layers,
            "num_attention_heads": denoiser_config.num_attention_heads,
            "attention_head_dim": denoiser_config.attention_head_dim,
            "long_skip_connections": long_skip_connections,
        }
    else:
        channels = ", ".join(str(width) for width in denoiser_config.block_out_channels)
        architecture = (
            f"{type(denoiser).__name__} (U-Net, {len(denoiser_config.block_out_channels)} levels of {channels}"
            " channels)"
        )
        shape = {"block_out_channels": list(denoiser_config.block_out_channels)}

    _, dataset_name, description = _training_data(args)
    hyperparameters = {
        "prediction_type": prediction_type,
        "num_train_timesteps": pipeline.scheduler.config.num_train_timesteps,
        "beta_schedule": pipeline.scheduler.config.get("beta_schedule", "n/a (flow)"),
        "conditioning_dropout_prob": conditioning_dropout_prob,
        **shape,
        "parameters": f"{sum(parameter.numel() for parameter in denoiser.parameters()):,}",
        **run.optimization_hyperparameters(args),
        "ema_power": args.ema_power if args.use_ema else "n/a",
        "snr_gamma": args.snr_gamma,
    }
    if prediction_type == "flow":
        hyperparameters["weighting_scheme"] = args.weighting_scheme
    pretrained = args.pretrained_model_name_or_path
    lora = None
    if run.lora_target_modules is not None:
        lora = {
            "rank": args.lora_rank,
            "alpha": args.lora_alpha if args.lora_alpha is not None else args.lora_rank,
            "target_modules": run.lora_target_modules,
            "weight_name": LORA_WEIGHT_NAME,
            "base_sample_grid": BASE_SAMPLE_GRID_NAME,
            # what the usage snippet loads the adapter into: the base as given for a local run, else its Hub id
            "base_model_id": pretrained if not args.push_to_hub else _public_name(pretrained),
            # diffusers loads no adapter into a denoiser without PeftAdapterMixin (UNet2DModel, DiTTransformer2DModel):
            # such a run also saves the whole pipeline with the adapter merged, and that is what the snippet loads
            "fused": not isinstance(pipeline.denoiser, PeftAdapterMixin),
        }
        hyperparameters.update({"lora_rank": lora["rank"], "lora_alpha": lora["alpha"]})
    if pipeline.text_encoder is not None:
        encoder = args.text_encoder_name_or_path
        hyperparameters["text_encoder"] = (
            _public_name(encoder) if encoder else f"{_public_name(pretrained)} (text_encoder)"
        )
    if pipeline.vae is not None:
        vae = args.vae_name_or_path
        hyperparameters["vae"] = _public_name(vae) if vae else f"{_public_name(pretrained)} (vae)"

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
        training_time=run.training_time(),
        sample_grid=SAMPLE_GRID_NAME,
        sample_guidance_scale=run.sample_guidance_scale,
        sample_inference_steps=args.validation_inference_steps,
        sample_eta=None if prediction_type == "flow" else args.validation_eta,
        base_model=pretrained,
        resumed_from_step=run.resumed_from_step,
        resumed_settings={
            name: tuple(_public_value(value) for value in values) for name, values in run.resumed_settings.items()
        },
        lora=lora,
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
    lora: dict | None = None,
) -> ModelCard:
    """Fill the template with the run's values: YAML metadata (from `ModelCardData`) and the Markdown body.

    Args:
        template_path: the Jinja template (the training script passes `model_cards/sculpt_model_card.md`).
        model_id: what the usage snippet loads: the Hub repo id when pushed, else the local output folder.
        architecture: the denoiser, named with its shape, e.g. "SculptDiT2DModel (DiT, patch 2, 6 layers, width 96,
            3 long skips)".
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
        lora: for a LoRA adapter (the card's template is `model_cards/sculpt_lora_model_card.md`): its `rank`,
            `alpha`, `target_modules`, `weight_name`, `base_sample_grid` and the `base_model_id` it loads into.

    Training scripts call `build_model_card`, which computes all of these from the run. Local paths (`dataset_name`, `base_model`) appear in the body by their folder name and never in the metadata.
    """
    pipeline_tag = "text-to-image" if conditioning == "text" else "unconditional-image-generation"
    tags = ["sculptdiff", "diffusers", "diffusers-training", pipeline_tag]
    if conditioning == "class":
        tags.append("class-conditional")
    if lora is not None:
        tags.append("lora")
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
        lora=lora,
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


def build_distilled_model_card(args: argparse.Namespace, pipeline: SculptPipeline, run: TrainingRun) -> ModelCard:
    """The model card (README.md) of a latent-consistency-distilled student: its teacher, the guidance range it
    learned, its sample grid at 1/2/4 steps and a 4-step snippet, rendered from `args.model_card_template`.

    Args:
        args: the distillation's arguments; read: `output_dir`, `push_to_hub`, `hub_model_id`, `dataset_name`,
            `train_data_dir`, `image_column`, `teacher`, `model_card_template`, `w_min`, `w_max`,
            `num_ddim_timesteps`, `loss_type`, `timestep_scaling_factor`, `ema_decay`, `time_cond_proj_dim`,
            `learning_rate`, `lr_scheduler`, `lr_warmup_steps`, `max_train_steps`, `use_ema`, `seed`,
            `validation_inference_steps`, `validation_guidance_scale`.
        pipeline: the saved student pipeline (its `denoiser` and `LCMScheduler`).
        run: what the run measured.
    """
    denoiser_config = pipeline.denoiser.config
    num_classes = pipeline.num_classes()
    id2label = denoiser_config.get("id2label") or {}
    names = [id2label.get(str(index), str(index)) for index in range(num_classes)] if num_classes else None
    conditioning = "class" if num_classes else "text"
    builtin, dataset_name, _ = _training_data(args)
    hyperparameters = {
        "teacher": _public_name(args.teacher),
        "prediction_type": denoiser_config.prediction_type,
        "w range (guidance_scale)": f"[{args.w_min}, {args.w_max}]",
        "num_ddim_timesteps": args.num_ddim_timesteps,
        "loss_type": args.loss_type,
        "timestep_scaling_factor": args.timestep_scaling_factor,
        "ema_decay (target network)": args.ema_decay,
        "time_cond_proj_dim": args.time_cond_proj_dim,
        **run.optimization_hyperparameters(args),
    }
    pipeline_tag = "text-to-image" if conditioning == "text" else "unconditional-image-generation"
    tags = ["sculptdiff", "diffusers", "diffusers-training", pipeline_tag, "lcm", "latent-consistency-distillation"]
    card_data = ModelCardData(
        pipeline_tag=pipeline_tag,
        license="apache-2.0",
        base_model=args.teacher if _is_repo_id(args.teacher) else None,
        datasets=[dataset_name] if not builtin and _is_repo_id(dataset_name) else None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=args.model_card_template,
        model_id=hub_repo_id(args) if args.push_to_hub else str(Path(args.output_dir).resolve()),
        teacher=_public_name(args.teacher),
        denoiser_class=type(pipeline.denoiser).__name__,
        conditioning=conditioning,
        class_names=names,
        validation_prompts=run.validation_prompts,
        dataset_name=_public_name(dataset_name),
        num_train_samples=run.num_train_samples,
        w_min=args.w_min,
        w_max=args.w_max,
        sample_grid=SAMPLE_GRID_NAME,
        sample_inference_steps=list(args.validation_inference_steps),
        sample_guidance_scale=args.validation_guidance_scale,
        hyperparameters=hyperparameters,
        training_steps=run.training_steps,
        training_time=run.training_time(),
    )
    return populate_model_card(card, tags=tags)


RECONSTRUCTION_GRID_NAME = "reconstruction_grid.png"


def build_vae_model_card(
    args: argparse.Namespace, vae: AutoencoderKL, run: TrainingRun, statistics: dict[str, float]
) -> ModelCard:
    """The model card (README.md) of an autoencoder trained by `train_vae.py`: data, config, reconstruction error
    and latent scale, rendered from `args.model_card_template` (`model_cards/vae_model_card.md`).

    Args:
        args: the run's arguments; read: `output_dir`, `push_to_hub`, `hub_model_id`, `dataset_name`,
            `train_data_dir`, `image_column`, `resolution`, `model_card_template`, `rec_loss`, `kl_scale`,
            `learning_rate`, `lr_scheduler`, `lr_warmup_steps`, `max_train_steps`, `use_ema`, `seed`.
        vae: the saved autoencoder (its config, with the measured `scaling_factor`).
        run: what the run measured (`sample_guidance_scale` is not used).
        statistics: over the training data: `latent_mean`, `latent_std`, `reconstruction_mse`, `reconstruction_l1`,
            `reconstruction_psnr` (pixels in [0, 1]).
    """
    config = vae.config
    builtin, dataset_name, description = _training_data(args)
    factor = 2 ** (len(config.block_out_channels) - 1)
    hyperparameters = {
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "latent_channels": config.latent_channels,
        "parameters": f"{sum(parameter.numel() for parameter in vae.parameters()):,}",
        "rec_loss": args.rec_loss,
        "kl_scale": args.kl_scale,
        **run.optimization_hyperparameters(args),
    }
    card_data = ModelCardData(
        license="apache-2.0",
        datasets=[dataset_name] if not builtin and _is_repo_id(dataset_name) else None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=args.model_card_template,
        model_id=hub_repo_id(args) if args.push_to_hub else str(Path(args.output_dir).resolve()),
        dataset_name=_public_name(dataset_name),
        dataset_description=description,
        num_train_samples=run.num_train_samples,
        resolution=args.resolution,
        in_channels=config.in_channels,
        latent_size=args.resolution // factor,
        latent_channels=config.latent_channels,
        scaling_factor=config.scaling_factor,
        statistics=statistics,
        reconstruction_grid=RECONSTRUCTION_GRID_NAME,
        hyperparameters=hyperparameters,
        training_steps=run.training_steps,
        training_time=run.training_time(),
        resumed_from_step=run.resumed_from_step,
    )
    return populate_model_card(card, tags=["sculptdiff", "diffusers", "diffusers-training", "autoencoder", "vae"])
