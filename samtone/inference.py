"""Serving a trained dual encoder: texts in, unit-norm float32 embeddings out.

    encoder = Encoder.load("runs/base")                # a samtone-train MODEL_DIR (or an export)
    query_embeddings = encoder.encode_queries(["what is samtone?"])       # [1, D]
    passage_embeddings = encoder.encode_passages(passages)                # [N, D]
    scores = query_embeddings @ passage_embeddings.T                      # cosines

For a run directory, the model comes from its manifest (`model.json`, samtone.run_manifest)
and only the parameters of a checkpoint are read (never the optimiser state), laid out over
the available devices by the run's own logical-axis rules. Nothing here imports Gin or the
optimisers. An export directory (samtone.export) runs its StableHLO modules instead: no Flax
model code at all. `tower_encoder` is the one jitted, sharded tower function, shared with
evaluation during training.

Texts are tokenised and encoded `batch_size` at a time, the last batch padded to full size,
so each tower's jitted function compiles once whatever the number of texts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from samtone import evaluate
from samtone import partitioning
from samtone import run_manifest
from samtone.checkpoints import manager as checkpoint_lib
from samtone.data.tokenizer import Tokenizer
from samtone.errors import ConfigError, MissingFileError

EncodeFn = Callable[[np.ndarray], Any]

# The files of an export directory (written by samtone.export, read by load_exported).
EXPORT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
VOCABULARY_FILE = "spm.model"
ENCODER_METHODS = ("encode_queries", "encode_passages")


def encoder_file(method: str) -> str:
    """File name of the serialised StableHLO of `method` ("encode_queries", ...)."""
    return f"{method}.stablehlo"


@dataclasses.dataclass
class Encoder:
    """A trained model's two towers, and how it tokenises.

    `query_encoder` / `passage_encoder` map int32 token ids [batch, length] to [batch, D]
    embeddings; `encode_queries` / `encode_passages` take texts and call them on batches of
    exactly `batch_size` rows.
    """

    query_encoder: EncodeFn
    passage_encoder: EncodeFn
    tokenizer: Tokenizer
    query_length: int
    passage_length: int
    step: int
    batch_size: int = 128

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 embeddings [len(texts), D] of query texts."""
        return self._encode(self.query_encoder, texts, self.query_length)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 embeddings [len(texts), D] of passage texts."""
        return self._encode(self.passage_encoder, texts, self.passage_length)

    def _encode(self, encoder: EncodeFn, texts: Sequence[str], length: int) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_queries / encode_passages take a list of texts, got one "
                            f"string ({texts[:40]!r}); wrap it in a list")
        return evaluate.encode_texts(encoder, self.tokenizer, texts, length, self.batch_size)

    @classmethod
    def load(cls, path: str | os.PathLike, *, step: int | None = None,
             batch_size: int = 128) -> Encoder:
        """The encoder of a samtone-train MODEL_DIR (checkpoint `step`, default the newest)
        or of a samtone-export directory (which holds one step)."""
        path = os.fspath(path)
        if (epath.Path(path) / CONFIG_FILE).exists():
            if step is not None:
                raise ConfigError(f"{path} is an export, which holds one step only; --step "
                                  "applies to training MODEL_DIRs")
            return load_exported(path, batch_size=batch_size)
        return load_run(path, step=step, batch_size=batch_size)


# --- the jitted towers ------------------------------------------------------------------------


def tower_encoder(model: nn.Module, method: str, param_shardings: Any, token_sharding,
                  mesh: Mesh, rules) -> Callable[[Any, np.ndarray], jax.Array]:
    """(params, host int32 tokens [b, L]) -> replicated embeddings [b, D], jitted and sharded.

    `method` is "encode_queries" or "encode_passages"; the tokens are split over the batch
    axis of `token_sharding`, each device given only its rows.
    """
    def encode(params, tokens):
        with partitioning.axis_rules(mesh, rules):
            return model.apply({"params": params}, tokens, method=method)

    jitted = jax.jit(encode, in_shardings=(param_shardings, token_sharding),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
    return lambda params, tokens: jitted(params, jax.make_array_from_callback(
        tokens.shape, token_sharding, lambda index: tokens[index]))


def token_sharding(mesh: Mesh, rules, batch_size: int):
    """The sharding of [batch_size, L] token batches; batch_size must split over it."""
    sharding = partitioning.batch_shardings(jax.ShapeDtypeStruct((batch_size, 1), np.int32),
                                            mesh, rules)
    batch_axes = sharding.spec[0]
    batch_axes = () if batch_axes is None else np.atleast_1d(batch_axes).tolist()
    batch_shards = math.prod(mesh.shape[axis] for axis in batch_axes)
    if batch_size % batch_shards:
        raise ConfigError(f"batch_size={batch_size} must be divisible by the {batch_shards} "
                          f"devices the batch is split over (mesh {dict(mesh.shape)})")
    return sharding


# --- a samtone-train MODEL_DIR -------------------------------------------------------------


def serving_mesh(model_parallel: int) -> Mesh:
    """All devices, `model_parallel` of them per model copy when that divides their number."""
    count = jax.device_count()
    model_axis = model_parallel if model_parallel >= 1 and count % model_parallel == 0 else 1
    return partitioning.make_mesh((-1, model_axis))


def load_run(model_dir: str | os.PathLike, *, step: int | None = None,
             batch_size: int = 128) -> Encoder:
    """The encoder of checkpoint `step` (default: the newest) of a samtone-train MODEL_DIR."""
    manifest = run_manifest.read(model_dir)
    model = manifest.model()
    rules = manifest.logical_axis_rules
    rules = (partitioning.logical_axis_rules(rules) if isinstance(rules, str)
             else tuple(tuple(rule) for rule in rules))
    mesh = serving_mesh(manifest.model_parallel)
    init = partitioning.params_initializer(
        model, mesh, rules, [(1, manifest.query_length), (1, manifest.passage_length)],
        jax.random.PRNGKey(0))
    param_shardings = partitioning.tree_shardings(jax.eval_shape(init), mesh, rules)
    params, restored_step = checkpoint_lib.read_params(
        epath.Path(model_dir) / "checkpoints", step=step, shardings=param_shardings)
    logging.info("restored the parameters of step %d of %s", restored_step, model_dir)
    tokens = token_sharding(mesh, rules, batch_size)

    def bound(method: str) -> EncodeFn:
        encode = tower_encoder(model, method, param_shardings, tokens, mesh, rules)
        return lambda token_ids: encode(params, token_ids)

    return Encoder(bound("encode_queries"), bound("encode_passages"),
                   Tokenizer(manifest.vocabulary), manifest.query_length,
                   manifest.passage_length, restored_step, batch_size)




# --- a samtone-export directory -----------------------------------------------------------


def read_export_config(export_dir: str | os.PathLike) -> dict:
    """config.json of an export directory, after checking its files are all there."""
    directory = epath.Path(export_dir)
    expected = [CONFIG_FILE, PARAMS_FILE, VOCABULARY_FILE,
                *(encoder_file(method) for method in ENCODER_METHODS)]
    missing = [name for name in expected if not (directory / name).exists()]
    if missing:
        raise MissingFileError(f"{directory} is not a complete samtone-export directory: "
                                f"missing {', '.join(missing)}")
    config = json.loads((directory / CONFIG_FILE).read_text())
    version = config.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise ConfigError(f"{directory / CONFIG_FILE} has format_version {version!r}; this "
                         f"samtone reads version {EXPORT_FORMAT_VERSION}")
    return config


def load_exported(export_dir: str | os.PathLike, *, batch_size: int = 128) -> Encoder:
    """The encoders of a samtone-export directory, run from its StableHLO modules.

    The parameters are read once (params.safetensors) and placed on the default device; each
    tower's module is deserialised and jitted. Its platforms are those it was exported for
    (config.json "platforms"); calling it elsewhere fails with JAX's error naming both.
    """
    directory = epath.Path(export_dir)
    config = read_export_config(directory)
    params = jax.device_put(safetensors.numpy.load_file(os.fspath(directory / PARAMS_FILE)))
    tokenizer = Tokenizer(os.fspath(directory / VOCABULARY_FILE))

    def encoder(method: str) -> EncodeFn:
        serialized = (directory / encoder_file(method)).read_bytes()
        exported = jax.export.deserialize(bytearray(serialized))
        call = jax.jit(exported.call)
        return lambda tokens: call(params, tokens)

    return Encoder(encoder("encode_queries"), encoder("encode_passages"), tokenizer,
                           config["query_length"], config["passage_length"], config["step"],
                           batch_size)
