"""Serving a trained dual encoder: texts in, unit-norm float32 embeddings out.

    encoders = load_trained_encoders("runs/base")      # a samtone-train MODEL_DIR
    encoders = load_exported("exports/base")           # or a samtone-export directory
    query_embeddings = encoders.encode_queries(["what is samtone?"])       # [1, D]
    passage_embeddings = encoders.encode_passages(passages)                # [N, D]
    scores = query_embeddings @ passage_embeddings.T                       # cosines

`load_trained_encoders` rebuilds the run from MODEL_DIR/config.gin (the Gin config
samtone-train writes) and restores an orbax checkpoint onto the run's mesh, so it needs
samtone's training modules and devices the run's mesh fits on. `load_exported` reads what
samtone.export writes (config.json, params.safetensors, spm.model and one StableHLO module
per tower) and runs the StableHLO: no Gin, no Flax model code, no training config.

Texts are tokenised and encoded `batch_size` at a time, the last batch padded to full size,
so each tower's jitted function compiles once whatever the number of texts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epath

from samtone import evaluate
from samtone.data.tokenizer import Tokenizer

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
class TrainedEncoders:
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


# --- a samtone-train MODEL_DIR -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a training run's config.gin says about its model and tokenisation."""

    model: Any  # samtone.models.dual_encoder.DualEncoder
    query_length: int
    passage_length: int
    vocabulary: str  # the SentencePiece model file
    config_path: str


def read_run_config(model_dir: str | os.PathLike, gin_bindings: Sequence[str] = ()
                    ) -> RunConfig:
    """Parses `model_dir/config.gin` (replacing the process's Gin config) for the model.

    `gin_bindings` are applied after the file, e.g. to point `VOCABULARY` at a moved file.
    The parsed config stays in place for further queries (`gin_setting`).
    """
    import gin  # pylint: disable=import-outside-toplevel
    # Registers samtone's Gin names; imported here because it pulls in the training modules,
    # which serving an export never needs.
    # pylint: disable-next=import-outside-toplevel,unused-import
    from samtone import gin_config  # noqa: F401

    config_path = epath.Path(model_dir) / "config.gin"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: --model_dir must be the MODEL_DIR of "
                                "a samtone-train run (it writes config.gin there)")
    gin.clear_config()
    # skip_unknown: the run may have used configurables from modules not imported here.
    gin.parse_config_files_and_bindings([os.fspath(config_path)], list(gin_bindings),
                                        finalize_config=False, skip_unknown=True)
    model = gin_setting("train.model")
    if model is None:
        raise ValueError(f"{config_path} binds no train.model")
    vocabulary = gin_setting("train.vocabulary")
    if vocabulary is None:
        raise ValueError(f"{config_path} binds no train.vocabulary (the SentencePiece model)")
    return RunConfig(model=model, query_length=gin_setting("train.query_length", 64),
                     passage_length=gin_setting("train.passage_length", 256),
                     vocabulary=os.fspath(vocabulary), config_path=os.fspath(config_path))


def gin_setting(name: str, default=None):
    """A parameter of the parsed config with `%MACRO` and `@fn()` evaluated (`@fn`: the
    configured function); `default` when the config does not bind it."""
    import gin  # pylint: disable=import-outside-toplevel
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return default
    while isinstance(value, gin.config.ConfigurableReference):
        if not value.evaluate:
            return value.scoped_configurable_fn
        value = value.scoped_configurable_fn()
    return value


def load_trained_encoders(model_dir: str, *, step: int | None = None, batch_size: int = 128,
                          gin_bindings: Sequence[str] = ()) -> TrainedEncoders:
    """Rebuilds the model of `model_dir/config.gin` and restores a checkpoint's parameters.

    Uses what `samtone-train` leaves in MODEL_DIR: `config.gin` (the run's Gin config) and
    `checkpoints/<step>` (orbax), restored onto the config's mesh and rule table as training
    does (override them with `gin_bindings` where this machine's devices differ). Replaces
    the process's Gin config with the run's. `step=None`: the newest checkpoint.
    """
    # pylint: disable=import-outside-toplevel  (training modules: see read_run_config)
    from samtone import optimizers
    from samtone import partitioning
    from samtone import train_step
    from samtone.checkpoints import manager as checkpoint_lib

    run = read_run_config(model_dir, gin_bindings)
    model = run.model
    mesh = gin_setting("train.mesh") or partitioning.make_mesh()
    rules = gin_setting("train.logical_axis_rules", "data")
    rules = partitioning.logical_axis_rules(rules) if isinstance(rules, str) else rules
    # The optimiser only shapes the checkpoint's optimiser state, restored and let go.
    optimizer_factory = gin_setting("train.optimizer_factory", optimizers.make_optimizer)
    optimizer = optimizer_factory(total_steps=gin_setting("train.num_train_steps"))
    tokenizer = Tokenizer(run.vocabulary)

    token_sharding = partitioning.batch_shardings(
        jax.ShapeDtypeStruct((batch_size, 1), np.int32), mesh, rules)
    batch_axes = token_sharding.spec[0]
    batch_axes = () if batch_axes is None else np.atleast_1d(batch_axes).tolist()
    batch_shards = math.prod(mesh.shape[axis] for axis in batch_axes)
    if batch_size % batch_shards:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {batch_shards} "
                         f"devices the batch is split over (mesh {dict(mesh.shape)})")
    example_batch = {"query_tokens": np.zeros((batch_shards, run.query_length), np.int32),
                     "passage_tokens": np.zeros((batch_shards, run.passage_length), np.int32)}
    shapes, shardings = train_step.train_state_shardings(model, optimizer, example_batch,
                                                         mesh, rules)
    manager = checkpoint_lib.make_checkpoint_manager(
        epath.Path(model_dir) / "checkpoints", async_save=False)
    restored = checkpoint_lib.restore_checkpoint(
        manager, checkpoint_lib.abstract_state(shapes, shardings), step=step)
    manager.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {epath.Path(model_dir) / 'checkpoints'}")
    trained_params, restored_step = restored[0].params, restored[2]  # optimiser state let go
    logging.info("restored step %d of %s", restored_step, model_dir)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def encoder(method: str) -> EncodeFn:
        def encode(params, tokens):
            with partitioning.axis_rules(mesh, rules):
                return model.apply({"params": params}, tokens, method=method)

        jitted = jax.jit(encode, in_shardings=(shardings.params, token_sharding),
                         out_shardings=replicated)
        return lambda tokens: jitted(trained_params, jax.make_array_from_callback(
            tokens.shape, token_sharding, lambda index: tokens[index]))

    return TrainedEncoders(encoder("encode_queries"), encoder("encode_passages"), tokenizer,
                           run.query_length, run.passage_length, restored_step, batch_size)


# --- a samtone-export directory -----------------------------------------------------------


def read_export_config(export_dir: str | os.PathLike) -> dict:
    """config.json of an export directory, after checking its files are all there."""
    directory = epath.Path(export_dir)
    expected = [CONFIG_FILE, PARAMS_FILE, VOCABULARY_FILE,
                *(encoder_file(method) for method in ENCODER_METHODS)]
    missing = [name for name in expected if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a complete samtone-export directory: "
                                f"missing {', '.join(missing)}")
    config = json.loads((directory / CONFIG_FILE).read_text())
    version = config.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_FILE} has format_version {version!r}; this "
                         f"samtone reads version {EXPORT_FORMAT_VERSION}")
    return config


def load_exported(export_dir: str | os.PathLike, *, batch_size: int = 128) -> TrainedEncoders:
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

    return TrainedEncoders(encoder("encode_queries"), encoder("encode_passages"), tokenizer,
                           config["query_length"], config["passage_length"], config["step"],
                           batch_size)
