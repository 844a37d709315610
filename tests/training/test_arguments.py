"""The flag groups every training script shares: defaults, the recipe behind them, and the checks of each group."""

import argparse
import dataclasses
import re

import pytest

from sculptdiff.training import arguments
from sculptdiff.training.recipe import RECIPE


def build_parser(template: str, recipe=RECIPE) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    arguments.add_data_arguments(parser)
    arguments.add_condition_arguments(parser)
    arguments.add_optimization_arguments(parser, recipe=recipe)
    arguments.add_run_arguments(parser, output_dir="out-default", outputs="the model")
    arguments.add_checkpointing_arguments(parser)
    arguments.add_logging_arguments(parser)
    arguments.add_sampling_arguments(parser)
    arguments.add_hub_arguments(parser, model_card_template=template)
    return parser


def parse(argv: list[str], template: str, recipe=RECIPE) -> argparse.Namespace:
    args = build_parser(template, recipe).parse_args(argv)
    arguments.check_data_arguments(args)
    arguments.check_condition_arguments(args)
    arguments.check_optimization_arguments(args, recipe=recipe)
    arguments.check_run_arguments(args)
    arguments.check_checkpointing_arguments(args)
    arguments.check_logging_arguments(args)
    arguments.check_sampling_arguments(args)
    arguments.check_hub_arguments(args)
    return args


@pytest.fixture
def template(tmp_path) -> str:
    path = tmp_path / "card.md"
    path.write_text("---\n---\n# {{ model_name }}\n")
    return str(path)


def test_defaults_are_the_recipe_and_diffusers_names(template):
    args = parse([], template)
    assert args.learning_rate == RECIPE.learning_rate == 1e-3
    assert args.lr_scheduler == "cosine" and args.lr_warmup_steps == 100
    assert args.train_batch_size == 32 and args.gradient_accumulation_steps == 1
    # neither length flag: the recipe's step count
    assert args.max_train_steps == RECIPE.max_train_steps and args.num_train_epochs is None
    assert args.use_ema and args.ema_power == 0.75
    assert args.output_dir == "out-default" and args.seed is None and args.num_threads is None
    assert args.checkpointing_steps == 500 and args.resume_from_checkpoint is None
    assert args.report_to == "tensorboard" and args.logging_dir == "logs"
    assert args.resolution == 16 and args.image_column == "image" and args.dataset_name is None
    assert not args.push_to_hub and args.model_card_template == template


def test_another_recipe_sets_the_defaults_and_the_step_count(template):
    recipe = dataclasses.replace(RECIPE, learning_rate=1e-4, max_train_steps=7)
    args = parse([], template, recipe)
    assert args.learning_rate == 1e-4 and args.max_train_steps == 7
    assert "Default 7 when neither is given" in build_parser(template, recipe).format_help()
    # an epoch count leaves the step count to the script, which knows the dataset's size
    args = parse(["--num_train_epochs", "2"], template, recipe)
    assert args.max_train_steps is None and args.num_train_epochs == 2


def test_the_output_dir_help_names_what_the_script_writes(template):
    parser = argparse.ArgumentParser()
    arguments.add_run_arguments(parser, output_dir="sculpt-vae", outputs="the VAE and its card")
    (action,) = [action for action in parser._actions if action.dest == "output_dir"]
    assert action.default == "sculpt-vae"
    assert action.help == "Where the VAE and its card, the logs and the checkpoints are written."


def test_use_ema_can_be_turned_off(template):
    assert not parse(["--no-use_ema"], template).use_ema


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset_name", "a", "--train_data_dir", "b"], "Pass one of --dataset_name and --train_data_dir, not both."),
        (["--class_column", "label", "--caption_column", "text"], "--class_column and --caption_column are both set"),
        (["--max_train_samples", "-1"], "--max_train_samples must be >= 0, got -1."),
        (["--resolution", "0"], "--resolution must be >= 1, got 0."),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0."),
        (["--num_threads", "0"], "--num_threads must be >= 1, got 0."),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1, got 0."),
        (["--validation_steps", "-5"], "--validation_steps must be >= 1, got -5."),
        (["--validation_inference_steps", "0"], "--validation_inference_steps must be >= 1, got 0."),
        (["--resume_from_checkpoint", "checkpoint-9"], "--resume_from_checkpoint 'checkpoint-9' is neither"),
    ],
)  # fmt: skip
def test_bad_values_and_combinations_name_the_flag(template, argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(argv, template)


def test_hub_token_is_refused_without_repeating_it(template):
    with pytest.raises(ValueError, match="--hub_token is not accepted") as error:
        parse(["--hub_token", "hf_SECRET"], template)
    assert "hf_SECRET" not in str(error.value)


def test_missing_model_card_template_is_named(tmp_path, template):
    with pytest.raises(
        ValueError, match=re.escape(f"--model_card_template {str(tmp_path / 'no.md')!r} is not a file")
    ):
        parse(["--model_card_template", str(tmp_path / "no.md")], template)


def test_an_explicit_checkpoint_name_resolves_inside_output_dir(tmp_path, template):
    checkpoint = tmp_path / "run" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    args = parse(["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "checkpoint-3"], template)
    assert args.resume_from_checkpoint == str(checkpoint)
    assert parse(["--resume_from_checkpoint", "latest"], template).resume_from_checkpoint == "latest"
