"""Publishing a finished training output folder to the Hugging Face Hub."""

import shlex

from huggingface_hub import create_repo, upload_folder


# Resumable training state and event logs stay local; the Hub gets the pipeline, the card and the samples.
IGNORE_PATTERNS = ["checkpoint-*", "logs/*"]


class PushToHubError(RuntimeError):
    """The upload failed; the local output is complete and `command` re-runs the upload alone."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


def upload_command(repo_id: str, output_dir: str, private: bool = False) -> str:
    """The huggingface_hub CLI command that uploads `output_dir` like `push_output_dir` does."""
    command = ["hf", "upload", repo_id, output_dir, "--exclude", "checkpoint-*", "--exclude", "logs/*"]
    if private:
        command.append("--private")
    return shlex.join(command)


def push_output_dir(
    output_dir: str,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SculptPipeline trained with sculptdiff",
) -> str:
    """Create the model repo (if needed) and upload `output_dir` without checkpoints and logs; returns the repo id.

    Raises:
        PushToHubError: when the Hub cannot be reached or refuses the upload; the message carries the exact
            `hf upload` command that retries the push alone.
    """
    try:
        repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            ignore_patterns=IGNORE_PATTERNS,
            token=token,
        )
    # Any failure here (network, auth, HTTP error) leaves a complete local folder: say how to push it later.
    except Exception as error:
        command = upload_command(repo_id, output_dir, private)
        raise PushToHubError(
            f"Pushing {output_dir!r} to the Hub repo {repo_id!r} failed ({type(error).__name__}: {error}). The"
            f" trained pipeline is complete in {output_dir!r}. Once the Hub is reachable, re-run the push alone"
            f" with:\n    {command}\n(log in first with `hf auth login`, or set HF_TOKEN).",
            command,
        ) from error
    return repo_id
