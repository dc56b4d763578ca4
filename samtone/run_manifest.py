"""The run manifest `MODEL_DIR/model.json`: what serving needs to rebuild a trained model.

Training writes it once at start (process 0) together with a copy of the vocabulary
(`MODEL_DIR/spm.model`), so a run directory describes itself: inference, export, evaluation,
mining and analysis read this small file, never the Gin config, and so load neither Gin nor
the optimisers. It holds the architecture, the T5 config, the projection size, the token
lengths, the vocabulary file and the logical-axis rules the parameters are sharded by.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
from etils import epath

from samtone.errors import ConfigError, MissingFileError
from samtone.models import dual_encoder
from samtone.models import t5

MANIFEST_FILE = "model.json"
VOCABULARY_FILE = "spm.model"
FORMAT_VERSION = 1


def config_to_json(config: t5.T5Config) -> dict:
    """T5Config fields as JSON values (dtypes by name: "float32", "bfloat16")."""
    fields = dataclasses.asdict(config)
    for name in ("dtype", "param_dtype"):
        fields[name] = jnp.dtype(fields[name]).name
    return fields


def config_from_json(fields: dict) -> t5.T5Config:
    """The T5Config of `config_to_json`'s output."""
    fields = dict(fields)
    for name in ("dtype", "param_dtype"):
        fields[name] = jnp.dtype(fields[name])
    return t5.T5Config(**fields)


@dataclasses.dataclass(frozen=True)
class RunManifest:
    """A trained model's description; `model()` rebuilds the Flax module."""

    architecture: str
    projection_dim: int
    t5_config: t5.T5Config
    query_length: int
    passage_length: int
    vocabulary: str  # absolute path of the SentencePiece model
    logical_axis_rules: Any  # a rule table's name, or the table as [[logical, mesh axis], ...]
    model_parallel: int = 1

    def model(self) -> dual_encoder.DualEncoder:
        return dual_encoder.DualEncoder(self.t5_config, architecture=self.architecture,
                                        projection_dim=self.projection_dim)

    @classmethod
    def of(cls, model: dual_encoder.DualEncoder, *, query_length: int, passage_length: int,
           vocabulary: str, logical_axis_rules: Any, model_parallel: int = 1) -> RunManifest:
        rules = (logical_axis_rules if isinstance(logical_axis_rules, str)
                 else [list(rule) for rule in logical_axis_rules])
        return cls(model.architecture, model.projection_dim, model.config, query_length,
                   passage_length, os.fspath(vocabulary), rules, model_parallel)

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["t5_config"] = config_to_json(self.t5_config)
        return {"format_version": FORMAT_VERSION, **fields}


def write(model_dir: str | os.PathLike, manifest: RunManifest) -> None:
    """Writes model.json and copies the vocabulary next to it (the manifest names the copy)."""
    directory = epath.Path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = directory / VOCABULARY_FILE
    source = epath.Path(manifest.vocabulary)
    if source != vocabulary:
        vocabulary.write_bytes(source.read_bytes())
    fields = manifest.to_json()
    fields["vocabulary"] = VOCABULARY_FILE
    temporary = directory / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps(fields, indent=2) + "\n")
    temporary.replace(directory / MANIFEST_FILE)  # never a half-written manifest


def read(model_dir: str | os.PathLike) -> RunManifest:
    """The manifest of a samtone-train MODEL_DIR; its vocabulary path made absolute."""
    directory = epath.Path(model_dir)
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise MissingFileError(f"{path} not found: the model directory must be the MODEL_DIR of "
                               "a samtone-train run (it writes model.json there)")
    try:
        fields = json.loads(path.read_text())
        version = fields.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{path} has format_version {version!r}; this samtone reads "
                              f"version {FORMAT_VERSION}")
        fields["t5_config"] = config_from_json(fields["t5_config"])
        vocabulary = fields["vocabulary"]
        if "://" not in vocabulary and not os.path.isabs(vocabulary):
            fields["vocabulary"] = os.fspath(directory / vocabulary)
        return RunManifest(**fields)
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not a samtone run manifest: {type(error).__name__}: "
                          f"{error}") from error
