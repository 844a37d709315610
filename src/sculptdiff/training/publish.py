"""Publishing a finished training output folder to the Hugging Face Hub: an allowlist of files, nothing else.

An output folder also holds what must stay on the machine: checkpoints (optimizer state, RNG pickles), logs, staging
folders of interrupted saves, and whatever the user keeps beside them (`.env`). So the push names the files a user
of the model needs (the pipeline's own list from `SculptPipeline.hub_allow_patterns()`, plus the run's sample grid
and arguments) and uploads only those; the `hf upload` command printed after a failed push uploads the same files.
"""

import argparse
import json
import os
import shlex
from pathlib import Path

from accelerate.logging import get_logger
from huggingface_hub import create_repo, upload_folder

from .atomic_files import write_text
from .checkpointing import ResumePoint


logger = get_logger(__name__, log_level="INFO")


# Hidden files and folders at any depth never leave the machine, even inside an allowlisted folder: `.env`,
# `.tmp-save-*` and `.checkpoint-*.staging` folders of an interrupted save. (fnmatch's `*` crosses "/".) A pipeline's
# own push needs no such rule: `save_pretrained` rewrites each component folder whole before it uploads.
HIDDEN_PATTERNS = (".*", "*/.*")
# The run's arguments in the output folder, as `portable_training_args` gives them.
ARGS_FILE_NAME = "training_args.json"
# Never written to `training_args.json`, the logs or the trackers.
SECRET_ARGS = ("hub_token",)
COMMIT_MESSAGE = "Upload SculptPipeline trained with sculptdiff"


class PushToHubError(RuntimeError):
    """The upload failed; the local output is complete and `command` re-runs the upload alone."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


def hub_repo_id(args: argparse.Namespace) -> str:
    """The Hub repo a run publishes to: `--hub_model_id`, else the name of `--output_dir`."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def upload_command(repo_id: str, output_dir: str, allow_patterns: list[str], private: bool = False) -> str:
    """The huggingface_hub CLI command that uploads the same files of `output_dir` as `push_output_dir` does."""
    command = ["hf", "upload", repo_id, output_dir]
    for pattern in allow_patterns:
        command += ["--include", pattern]
    for pattern in HIDDEN_PATTERNS:
        command += ["--exclude", pattern]
    if private:
        command.append("--private")
    return shlex.join(command)


def push_output_dir(
    output_dir: str,
    repo_id: str,
    allow_patterns: list[str],
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = COMMIT_MESSAGE,
) -> str:
    """Create the model repo (if needed) and upload the allowlisted files of `output_dir`; returns the repo id.

    Args:
        output_dir: the training output folder.
        repo_id: the Hub model repo ("namespace/name", or "name" under the token's user).
        allow_patterns: glob patterns (relative to `output_dir`, matched as `huggingface_hub.upload_folder` does)
            of the files to publish, e.g. `pipeline.hub_allow_patterns() + ["sample_grid.png",
            "training_args.json"]`. Hidden files and folders (`HIDDEN_PATTERNS`) are never uploaded.
        token: a Hub token; None uses the huggingface_hub login or `HF_TOKEN`.
        private: create the repo as private.
        commit_message: the message of the upload commit.

    Raises:
        PushToHubError: when the Hub cannot be reached or refuses the upload; the message carries the exact
            `hf upload` command that retries the push alone.
    """
    if not isinstance(allow_patterns, list) or not all(isinstance(pattern, str) for pattern in allow_patterns):
        raise TypeError(f"allow_patterns must be a list of glob patterns (str), got {allow_patterns!r}.")
    if not allow_patterns:
        raise ValueError("allow_patterns is empty: name the files to publish, e.g. pipeline.hub_allow_patterns().")
    try:
        repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            allow_patterns=allow_patterns,
            # a copy: upload_folder appends its own defaults (.git, ...) to the list it is given
            ignore_patterns=list(HIDDEN_PATTERNS),
            token=token,
        )
    # Any failure here (network, auth, HTTP error) leaves a complete local folder: say how to push it later.
    except Exception as error:
        command = upload_command(repo_id, output_dir, allow_patterns, private)
        raise PushToHubError(
            f"Pushing {output_dir!r} to the Hub repo {repo_id!r} failed ({type(error).__name__}: {error}). The"
            f" trained pipeline is complete in {output_dir!r}. Once the Hub is reachable, re-run the push alone"
            f" with:\n    {command}\n(log in first with `hf auth login`, or set HF_TOKEN).",
            command,
        ) from error
    return repo_id


def write_training_args(output_dir: str, args: argparse.Namespace, resume: ResumePoint | None = None):
    """Write the run's arguments (`portable_training_args`) to `output_dir/training_args.json`; a resumed run also
    records its checkpoint and, under `settings_before`, what the checkpoint's run used where this run differs."""
    training_args = portable_training_args(vars(args))
    if resume is not None:
        settings_before = {name: old for name, (old, _) in resume.differences.items()}
        training_args["resumed_from"] = {
            "checkpoint": os.path.basename(os.path.normpath(resume.path)),
            "step": resume.step,
            "settings_before": portable_training_args(settings_before),
        }
    write_text(os.path.join(output_dir, ARGS_FILE_NAME), json.dumps(training_args, indent=2, sort_keys=True))


def push_run(args: argparse.Namespace, allow_patterns: list[str], commit_message: str = COMMIT_MESSAGE) -> str:
    """The end of a run with `--push_to_hub`: push the allowlisted files of `--output_dir` to `hub_repo_id(args)`
    (private with `--hub_private_repo`) and log where; a failure is logged with the command that retries it, then
    raised. Call it on the main process, last, so that a failed push leaves a complete local folder. The token
    comes from HF_TOKEN or `hf auth login`, never from the command line."""
    try:
        pushed = push_output_dir(
            args.output_dir,
            hub_repo_id(args),
            allow_patterns,
            private=args.hub_private_repo,
            commit_message=commit_message,
        )
    except PushToHubError as error:
        logger.error(str(error))
        raise
    logger.info(f"Pushed {args.output_dir} to the Hub repo {pushed}")
    return pushed


def portable_training_args(args: dict, launch_dir: str | None = None) -> dict:
    """The run's arguments as they may be published in `training_args.json`.

    Secrets (`SECRET_ARGS`) are dropped. A top-level string that is an absolute local path (or starts with "~")
    becomes relative to `launch_dir` (default: the current directory, where the run was launched) when it lies
    under it, as the user would type it there; any other absolute path, which would name the machine's folders
    (a home directory, a user name), becomes None. So does every absolute path when `launch_dir` lies above the
    home directory ("/", "/home"): relative to it, a path would still spell the home directory. Relative paths, Hub
    ids, numbers, lists and None are kept as given. Write the result to the output folder itself: the push and the
    printed `hf upload` command upload that file.
    """
    launch_dir = os.path.realpath(launch_dir if launch_dir is not None else os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    launch_dir_above_home = launch_dir != home and _is_within(home, launch_dir)
    portable = {}
    for name, value in args.items():
        if name in SECRET_ARGS:
            continue
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
            path = os.path.realpath(os.path.expanduser(value))
            keep = _is_within(path, launch_dir) and not launch_dir_above_home
            value = os.path.relpath(path, launch_dir) if keep else None
        portable[name] = value
    return portable


def _is_within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder
