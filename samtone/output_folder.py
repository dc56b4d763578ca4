"""Outputs written whole or not at all, and never over an existing one unless asked.

Whole folders (exports, converted checkpoints):

    check_target(output_dir, overwrite, flag="--output")      # early, before any work
    with write_atomically(output_dir, overwrite) as temporary:
        ...write files into `temporary`...

The files go to a temporary sibling (`.<name>.tmp-<random>`), which is renamed into place
only when the block ends without an exception; on any exception (Ctrl-C included) it is
deleted, and a folder already at `output_dir` is left untouched. So an interrupted write
never leaves a folder that looks complete. An existing non-empty folder is replaced only with
`overwrite`; an empty one is used as if absent. Local paths only.

Named files in a folder that may hold other things (samtone-eval's metrics.json and run.trec
beside training's per-step evaluations, samtone-analyze's figures), and single files
(samtone-mine's JSONL):

    check_files(output_dir, ["run.trec", "metrics.json"], overwrite, flag="--output")
    with write_files_atomically(output_dir, names, overwrite) as temporary: ...
    with write_file_atomically(path, overwrite, flag="--output") as temporary_path: ...

Files are written under temporary names in the same folder (a hidden `.output.tmp-<random>`
folder inside `output_dir`, a hidden sibling of a single file) and moved into place by rename
when the block succeeds, the last name last (it marks the set complete); on any exception
(Ctrl-C included) the temporaries are deleted and existing files are left as they were.
Folders of named files may be any path etils reads; single files are local.

`check_inputs_exist` names the flag of an input path that does not exist.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterable, Iterator, Sequence

from etils import epath

from samtone.data import files
from samtone.errors import MissingFileError, OutputExistsError


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


def _temporary_name(path: str) -> str:
    """A hidden sibling of `path`, unique to this write."""
    return os.path.join(os.path.dirname(path),
                        f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")


def check_files(output_dir: str | os.PathLike, names: Sequence[str], overwrite: bool, *,
                flag: str = "--output") -> None:
    """Refuses a folder that is a file, or that holds any of `names` unless `overwrite`.
    Any path etils reads (a run folder on gs:// keeps its evaluations there)."""
    folder = epath.Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{flag}={os.fspath(folder)} is a file, not a folder")
    existing = [name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        them = "it" if len(existing) == 1 else "them"
        raise OutputExistsError(f"{flag}={os.fspath(folder)} already holds "
                                f"{', '.join(existing)}; pass --overwrite to replace {them}, "
                                f"or choose another {flag}")


@contextlib.contextmanager
def write_files_atomically(output_dir: str | os.PathLike, names: Sequence[str],
                           overwrite: bool, *, flag: str = "--output") -> Iterator[str]:
    """Yields a temporary folder inside `output_dir`; when the block succeeds, the files
    `names` written there replace those of `output_dir`, in that order."""
    check_files(output_dir, names, overwrite, flag=flag)
    folder = epath.Path(output_dir)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".output.tmp-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        yield os.fspath(temporary)
        check_files(folder, names, overwrite, flag=flag)  # another writer may have come first
        for name in names:
            (temporary / name).replace(folder / name)
    finally:
        temporary.rmtree(missing_ok=True)
        if created and not any(folder.iterdir()):  # a failed write leaves no empty folder
            folder.rmdir()


def check_file(path: str | os.PathLike, overwrite: bool, *, flag: str = "--output") -> None:
    """Refuses a folder, or an existing file unless `overwrite`; local paths only."""
    path = os.fspath(path)
    if "://" in path:
        raise OutputExistsError(f"{flag}={path}: only local files can be written; write "
                                "locally, then copy (gsutil cp)")
    if os.path.isdir(path):
        raise OutputExistsError(f"{flag}={path} is a folder; name a file")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{flag}={path} exists; pass --overwrite to replace it, or "
                                f"choose another {flag}")


@contextlib.contextmanager
def write_file_atomically(path: str | os.PathLike, overwrite: bool, *,
                          flag: str = "--output") -> Iterator[str]:
    """Yields a temporary path beside `path`, which replaces `path` when the block succeeds
    and is deleted on any exception."""
    check_file(path, overwrite, flag=flag)
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = _temporary_name(path)
    try:
        yield temporary
        check_file(path, overwrite, flag=flag)  # another writer may have come first
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def check_inputs_exist(inputs: Iterable[tuple[str, str | Sequence[str] | None]]) -> None:
    """Refuses an input path (or glob) that names nothing, naming its flag: `inputs` are
    (flag, path or paths) pairs, e.g. ("--data", ["a.jsonl", "b/*.tsv"])."""
    for flag, paths in inputs:
        for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths or ():
            try:
                files.expand_paths(path)
            except MissingFileError as error:
                raise MissingFileError(f"{flag}={os.fspath(path)}: {error}") from None
