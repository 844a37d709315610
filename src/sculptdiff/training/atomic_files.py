# Copyright 2026 The sculptdiff developers. Licensed under the Apache License, Version 2.0.
"""Writes that are never seen half done: each one goes to a temporary name beside the target and is renamed into
place (`os.replace` is atomic on one file system). A crash leaves the old file or the new one, never a mix.

`replace_path` (move a staged file or folder onto its target) is implemented once, in the pipeline's module: that
file must stand alone (it is copied beside the weights for the `trust_remote_code` door), so it cannot import it
from here, and everything else imports it from there through this module.
"""

import io
import os

import PIL.Image

from ..pipelines.sculpt.pipeline_sculpt import replace_path


__all__ = ["replace_path", "save_image", "write_bytes", "write_text"]


def write_bytes(path: str, data: bytes):
    """Write `data` to `path` atomically, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "wb") as f:
        f.write(data)
    os.replace(staging, path)


def write_text(path: str, text: str):
    """Write `text` (UTF-8) to `path` atomically, creating its folder."""
    write_bytes(path, text.encode("utf-8"))


def save_image(image, path: str):
    """Save a PIL image to `path` atomically, creating its folder; the format comes from `path`'s extension."""
    buffer = io.BytesIO()
    image.save(buffer, format=PIL.Image.registered_extensions()[os.path.splitext(path)[1].lower()])
    write_bytes(path, buffer.getvalue())
