"""Output folders written whole or not at all (exports, converted checkpoints).

    check_target(output_dir, overwrite, flag="--output")      # early, before any work
    with write_atomically(output_dir, overwrite) as temporary:
        ...write files into `temporary`...

The files go to a temporary sibling (`.<name>.tmp-<random>`), which is renamed into place
only when the block ends without an exception; on any exception (Ctrl-C included) it is
deleted, and a folder already at `output_dir` is left untouched. So an interrupted write
never leaves a folder that looks complete. An existing non-empty folder is replaced only with
`overwrite`; an empty one is used as if absent. Local paths only.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator

from samtone.errors import OutputExistsError


def check_target(output_dir: str | os.PathLike, overwrite: bool, *,
                 flag: str = "--output") -> None:
    """Refuses a file, or a non-empty folder unless `overwrite`; `flag` names the input."""
    path = os.fspath(output_dir)
    if "://" in path:
        raise OutputExistsError(f"{flag}={path}: only local folders can be written; write "
                                "locally, then copy (gsutil -m cp -r)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"{flag}={path} is a file, not a folder")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise OutputExistsError(f"{flag}={path} exists and is not empty; choose another folder "
                                "or pass --overwrite (overwrite=True)")


@contextlib.contextmanager
def write_atomically(output_dir: str | os.PathLike, overwrite: bool, *,
                     flag: str = "--output") -> Iterator[str]:
    """Yields a temporary folder that becomes `output_dir` when the block succeeds."""
    check_target(output_dir, overwrite, flag=flag)
    output_dir = os.path.abspath(os.fspath(output_dir))
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    temporary = os.path.join(os.path.dirname(output_dir),
                             f".{os.path.basename(output_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(temporary)
    try:
        yield temporary
        check_target(output_dir, overwrite, flag=flag)  # again: another writer may have come first
        if os.path.exists(output_dir):
            previous = f"{temporary}-previous"
            os.rename(output_dir, previous)
            os.rename(temporary, output_dir)
            shutil.rmtree(previous)
        else:
            os.rename(temporary, output_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def match_file_modes(directory: str | os.PathLike, *, like: str | os.PathLike) -> None:
    """Gives every file under `directory` the mode of `like` (safetensors and orbax create
    theirs readable by the owner only)."""
    for folder, _, names in os.walk(directory):
        for name in names:
            shutil.copymode(like, os.path.join(folder, name))
