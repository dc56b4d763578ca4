"""Paths the user gave, made absolute once: relative to the current folder, `~` expanded.

URLs (gs://, s3://) are kept as given. Every command and the library use these two, so a run's
config.gin, manifest and printed next steps work from any folder.
"""
from __future__ import annotations

import os


def absolute_path(path: str | os.PathLike | None) -> str | None:
    """A local path made absolute (relative to the current folder); URLs (gs://) as given."""
    if path is None:
        return None
    text = os.fspath(path)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def absolute_paths(paths):
    """`absolute_path` of a path or of each path of a list; other values as given."""
    if isinstance(paths, (str, os.PathLike)):
        return absolute_path(paths)
    if isinstance(paths, (list, tuple)):
        return type(paths)(absolute_paths(path) for path in paths)
    return paths
