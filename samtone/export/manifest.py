"""`samtone_export.json`: what every samtone-export folder says about itself.

    {"format_version": 1, "format": "jax" | "sentence_transformers" | "saved_model",
     "architecture", "projection_dim", "t5_config", "query_length", "passage_length",
     "vocabulary": "spm.model", "vocabulary_sha256", "vocabulary_pieces",
     "logical_axis_rules", "model_parallel",
     "step", "source": {"model_dir", "step"} (or null), "samtone_version", "jax_version",
     ...the format's own fields ("platforms", "signatures")}

The model fields are those of the run's manifest (samtone.run_manifest, `model.json`), with
the T5 config of the exported (unscanned) layout, so `read(folder).run.model()` rebuilds the
model; `spm.model` beside it is the run's vocabulary, checked against its sha256 on reading.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
from etils import epath

import samtone
from samtone import run_manifest
from samtone.errors import CheckpointError, ConfigError, MissingFileError

MANIFEST_FILE = "samtone_export.json"
VOCABULARY_FILE = "spm.model"
FORMAT_VERSION = 1
FORMATS = ("jax", "sentence_transformers", "saved_model")


@dataclasses.dataclass(frozen=True)
class ExportManifest:
    """An export folder's manifest; `run.vocabulary` is the absolute path of its spm.model."""

    format: str
    run: run_manifest.RunManifest
    step: int
    fields: dict  # everything in the file, the format's own fields included


def vocabulary_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a vocabulary file's bytes (any path etils reads)."""
    return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()


def manifest_fields(export_format: str, run: run_manifest.RunManifest, *, step: int,
                    vocabulary_file: str | os.PathLike, vocabulary_pieces: int,
                    source: dict | None, **format_fields: Any) -> dict:
    """The JSON object of samtone_export.json (`run` describes the exported model)."""
    if export_format not in FORMATS:
        raise ConfigError(f"--format={export_format!r}; expected one of {', '.join(FORMATS)}")
    model_fields = run.to_json()
    del model_fields["format_version"]
    model_fields["vocabulary"] = VOCABULARY_FILE
    return {"format_version": FORMAT_VERSION, "format": export_format, **model_fields,
            "vocabulary_sha256": vocabulary_sha256(vocabulary_file),
            "vocabulary_pieces": int(vocabulary_pieces), "step": int(step), "source": source,
            "samtone_version": samtone.__version__, "jax_version": jax.__version__,
            **format_fields}


def write(directory: str | os.PathLike, fields: dict) -> None:
    with open(os.path.join(directory, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(fields, f, indent=2)
        f.write("\n")


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a samtone-export folder (it has samtone_export.json)."""
    return (epath.Path(path) / MANIFEST_FILE).exists()


def read(directory: str | os.PathLike) -> ExportManifest:
    """The manifest of an export folder, after checking its vocabulary against the checksum."""
    directory = epath.Path(directory)
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise MissingFileError(f"{path} not found: not a samtone-export folder")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not JSON: {error}") from error
    version = fields.get("format_version")
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {version!r}; this samtone reads version "
                          f"{FORMAT_VERSION}")
    if fields.get("format") not in FORMATS:
        raise ConfigError(f"{path}: format {fields.get('format')!r} is not one of {FORMATS}")
    run = run_manifest.RunManifest.from_json(fields, source=str(path))
    vocabulary = directory / VOCABULARY_FILE
    if not vocabulary.exists():
        raise MissingFileError(f"{directory} is not a complete samtone-export folder: missing "
                               f"{VOCABULARY_FILE}")
    if vocabulary_sha256(vocabulary) != fields.get("vocabulary_sha256"):
        raise CheckpointError(f"{vocabulary} does not match the vocabulary_sha256 of {path} "
                              "(replaced or damaged?)")
    run = dataclasses.replace(run, vocabulary=os.fspath(vocabulary))
    return ExportManifest(fields["format"], run, int(fields.get("step", 0)), fields)
