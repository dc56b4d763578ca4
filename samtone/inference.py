"""Serving a trained dual encoder: texts in, unit-norm float32 embeddings out.

    encoder = Encoder.load("runs/base")            # a run, a converted checkpoint, an export
    query_embeddings = encoder.encode_queries(["what is samtone?"])       # [1, D]
    passage_embeddings = encoder.encode_passages(passages)                # [N, D]
    scores = query_embeddings @ passage_embeddings.T                      # cosines

`Encoder.load(path)` takes
  - a samtone-train MODEL_DIR or a samtone-convert output (checkpoint `step`, default the
    newest): the model comes from its manifest (`model.json`, samtone.run_manifest) and only
    the parameters of the checkpoint are read (never the optimiser state);
  - a samtone-export folder of any format (samtone.export; its manifest is
    samtone_export.json): `jax` runs its StableHLO modules (no Flax model code at all);
    `sentence_transformers` and `saved_model` folders have their weights read back into
    samtone's parameters (no torch, no TensorFlow).
Parameters are laid out over the available devices by the model's own logical-axis rules,
so a model larger than one device loads. Nothing here imports Gin or the optimisers.
`tower_encoder` is the one jitted, sharded tower function, shared with evaluation during
training.

Texts are tokenised and encoded `batch_size` at a time in length buckets (samtone.encoding),
the last batch of each bucket padded to full size, so each tower's jitted function compiles
a few times (once per bucket length) whatever the number and lengths of texts.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from samtone import encoding
from samtone import export
from samtone import partitioning
from samtone import run_manifest
from samtone.data.tokenizer import Tokenizer
from samtone.errors import ConfigError
from samtone.export import manifest as export_manifest
from samtone.export import params as export_params
from samtone.export import stablehlo

EncodeFn = Callable[[np.ndarray], Any]


@dataclasses.dataclass
class Encoder:
    """A trained model's two towers, and how it tokenises.

    `query_encoder` / `passage_encoder` map int32 token ids [batch, length] to [batch, D]
    embeddings; `encode_queries` / `encode_passages` take texts and call them on batches of
    exactly `batch_size` rows, `length` a bucket length (samtone.encoding) when
    `length_buckets`, else always the full query / passage length (for towers of one fixed
    length, such as exported StableHLO).
    """

    query_encoder: EncodeFn
    passage_encoder: EncodeFn
    tokenizer: Tokenizer
    query_length: int
    passage_length: int
    step: int
    batch_size: int = 128
    length_buckets: bool = True

    def encode_queries(self, texts: Sequence[str], *, progress: bool | None = None
                       ) -> np.ndarray:
        """Unit-norm float32 embeddings [len(texts), D] of query texts, in their order."""
        return self._encode(self.query_encoder, texts, self.query_length, progress, "query")

    def encode_passages(self, texts: Sequence[str], *, progress: bool | None = None
                        ) -> np.ndarray:
        """Unit-norm float32 embeddings [len(texts), D] of passage texts, in their order."""
        return self._encode(self.passage_encoder, texts, self.passage_length, progress,
                            "passage")

    def passage_chunks(self, texts: Sequence[str], *, progress: bool | None = None
                       ) -> Iterator[np.ndarray]:
        """`encode_passages` of consecutive windows of `texts`, yielded as they are ready
        (a corpus of millions streams into samtone.search.PassageIndex.from_chunks)."""
        return encoding.encode_chunks(self.passage_encoder, self.tokenizer, texts,
                                      self.passage_length, self.batch_size,
                                      buckets=self.length_buckets, progress=progress,
                                      unit="passage")

    def _encode(self, encoder: EncodeFn, texts: Sequence[str], length: int,
                progress: bool | None, unit: str) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_queries / encode_passages take a list of texts, got one "
                            f"string ({texts[:40]!r}); wrap it in a list")
        return encoding.encode_texts(encoder, self.tokenizer, texts, length, self.batch_size,
                                     buckets=self.length_buckets, progress=progress, unit=unit)

    @classmethod
    def load(cls, path: str | os.PathLike, *, step: int | None = None,
             batch_size: int = 128) -> Encoder:
        """The encoder of a samtone-train MODEL_DIR or samtone-convert output (checkpoint
        `step`, default the newest), or of a samtone-export folder of any format (which
        holds one step)."""
        path = os.fspath(path)
        if export_manifest.is_export(path):
            if step is not None:
                raise ConfigError(f"{path} is an export, which holds one step only; --step "
                                  "applies to MODEL_DIRs")
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


def load_run(model_dir: str | os.PathLike, *, step: int | None = None,
             batch_size: int = 128) -> Encoder:
    """The encoder of checkpoint `step` (default: the newest) of a samtone-train MODEL_DIR or
    a samtone-convert output."""
    run = run_manifest.read(model_dir)
    params, restored_step, shardings, mesh = run_manifest.read_params(model_dir, run, step=step)
    logging.info("restored the parameters of step %d of %s", restored_step, model_dir)
    return flax_encoder(run, params, shardings, mesh, step=restored_step, batch_size=batch_size)


def flax_encoder(run: run_manifest.RunManifest, params: Any, shardings: Any, mesh: Mesh, *,
                 step: int, batch_size: int) -> Encoder:
    """The Encoder of `run`'s model with `params` placed on `shardings` over `mesh`."""
    if not run.vocabulary:
        raise ConfigError("the model has no vocabulary (spm.model): it was converted without "
                          "one; run samtone-convert again with --vocabulary=SPM_MODEL")
    model, rules = run.model(), run.rules()
    tokens = token_sharding(mesh, rules, batch_size)

    def bound(method: str) -> EncodeFn:
        encode = tower_encoder(model, method, shardings, tokens, mesh, rules)
        return lambda token_ids: encode(params, token_ids)

    return Encoder(bound("encode_queries"), bound("encode_passages"), Tokenizer(run.vocabulary),
                   run.query_length, run.passage_length, step, batch_size)


# --- a samtone-export folder --------------------------------------------------------------


def load_exported(export_dir: str | os.PathLike, *, batch_size: int = 128) -> Encoder:
    """The encoders of a samtone-export folder of any format (samtone_export.json says which).

    `jax`: the parameters (params.safetensors) are placed on the default device and each
    tower's StableHLO module is deserialised and jitted; it runs on the platforms it was
    exported for (the manifest's "platforms"), elsewhere JAX's error names both.
    `sentence_transformers`, `saved_model`: the weights are read back into samtone's
    parameters, laid out over the available devices by the model's rules, and run by the
    Flax model the manifest describes.
    """
    export_dir = os.fspath(export_dir)
    manifest = export_manifest.read(export_dir)
    run = manifest.run
    if manifest.format == "jax":
        flat = stablehlo.read_params(export_dir)
        export_params.check_params(export_params.unflatten_params(flat), run.model(),
                                   where=export_dir)
        encoders = stablehlo.read_encoders(export_dir, jax.device_put(flat))
        return Encoder(encoders["encode_queries"], encoders["encode_passages"],
                       Tokenizer(run.vocabulary), run.query_length, run.passage_length,
                       manifest.step, batch_size, length_buckets=False)  # fixed lengths
    _, params = export.read_export_params(export_dir)
    mesh = run.serving_mesh()
    _, shardings = run.params_layout(mesh)
    return flax_encoder(run, jax.device_put(params, shardings), shardings, mesh,
                        step=manifest.step, batch_size=batch_size)
