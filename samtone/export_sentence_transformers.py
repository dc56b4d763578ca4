"""Writing a trained dual encoder as a sentence-transformers folder.

    write_sentence_transformers("exports/base-st", model=model, params=params,
                                vocabulary="spm.model", query_length=64, passage_length=256)

gives a folder that the sentence-transformers package (>= 6.2, with transformers >= 5 and
torch) loads without samtone:

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("exports/base-st")
    query_embeddings = model.encode_query(["what is samtone?"])    # samtone's encode_queries
    passage_embeddings = model.encode_document(passages)            # samtone's encode_passages

Each tower becomes the module chain

    Transformer   a transformers.T5EncoderModel (float32 safetensors) and a fast tokenizer
                  converted from the run's SentencePiece model: T5's ids (pad 0, EOS 1,
                  unk 2), no extra_ids, EOS appended and kept when a text is truncated
    Pooling       mean over the non-padding tokens
    Dense         the projection, without bias, activation torch.nn.Identity
    Normalize     L2

- ade, ade_spl: a Router with a "query" and a "document" route (each with its own
  Transformer; ade_spl's two routes share one Dense, as the towers share one projection).
  `encode` without a task takes the document route.
- sde: one plain chain; its Transformer truncates at query_length under `encode_query` and at
  passage_length under `encode_document` and `encode`.

The lengths are truncation limits: sentence-transformers pads each batch to its longest text,
which does not change the embeddings (padding is masked and left out of the mean).

The folder is written to a temporary sibling and renamed into place, so a reader never sees
half of it; an existing non-empty output_dir is replaced only with `overwrite`. A `manifest`
is saved beside the modules as samtone_export.json.

Known differences from samtone's Tokenizer: a text containing the literal strings "<pad>",
"</s>" or "<unk>" gets those special ids from the Hugging Face tokenizer, where SentencePiece
spells the characters out. The towers compute in float32 whatever the training dtype.
"""
from __future__ import annotations

# Shares samtone.export's target checks and atomic rename, and the inverse of
# samtone.checkpoints.hf's parameter names, rather than copying them.
# pylint: disable=protected-access

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy
import sentencepiece
from absl import logging
from etils import epath
from flax import traverse_util

from samtone import export
from samtone.checkpoints import hf
from samtone.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from samtone.errors import ConfigError
from samtone.models import dual_encoder, t5

MANIFEST_FILE = "samtone_export.json"
QUERY_ROUTE, DOCUMENT_ROUTE = "query", "document"
MIN_SENTENCE_TRANSFORMERS = (6, 2)


@dataclasses.dataclass(frozen=True)
class Tower:
    """Where one route's weights live in the dual-encoder tree, and its truncation length."""

    encoder: str      # the T5Encoder subtree: "encoder", "query_encoder", "passage_encoder"
    projection: str   # the Dense subtree: "projection_layer", "query_projection_layer", ...
    max_length: int


def towers(architecture: str, query_length: int, passage_length: int) -> dict[str, Tower]:
    """The route name -> Tower of `architecture` (sde has one tower, named "document")."""
    if architecture == "sde":
        return {DOCUMENT_ROUTE: Tower("encoder", "projection_layer", passage_length)}
    if architecture == "ade":
        return {QUERY_ROUTE: Tower("query_encoder", "query_projection_layer", query_length),
                DOCUMENT_ROUTE: Tower("passage_encoder", "passage_projection_layer",
                                      passage_length)}
    if architecture == "ade_spl":
        return {QUERY_ROUTE: Tower("query_encoder", "projection_layer", query_length),
                DOCUMENT_ROUTE: Tower("passage_encoder", "projection_layer", passage_length)}
    raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                     f"{dual_encoder.ARCHITECTURES}")


def write_sentence_transformers(output_dir: str | os.PathLike, *,
                                model: dual_encoder.DualEncoder, params: Any,
                                vocabulary: str | os.PathLike, query_length: int,
                                passage_length: int, manifest: dict | None = None,
                                overwrite: bool = False) -> None:
    """Writes `model` with `params` (either layer layout, boxed or not) as a
    sentence-transformers folder at `output_dir` (a local path).

    Args:
      vocabulary: the run's SentencePiece .model file (any path etils reads).
      query_length, passage_length: the run's lengths in tokens, EOS included; longer texts
        are truncated to them as samtone's Tokenizer does.
      manifest: JSON-serialisable facts about the run, saved as samtone_export.json.
      overwrite: replace a non-empty output_dir.
    """
    sentence_transformer, st_modules = _import_sentence_transformers()
    export._check_target(output_dir, overwrite)
    if min(query_length, passage_length) < 1:
        raise ConfigError(f"query_length and passage_length must be >= 1 (room for EOS); got "
                          f"{query_length} and {passage_length}")
    manifest_text = None if manifest is None else json.dumps(manifest, indent=2) + "\n"
    params = t5.unstack_layer_params(nn.unbox(params))
    params = params.get("params", params)
    export._check_params(export.flatten_params(params), export.serving_dual_encoder(model),
                         query_length, passage_length)

    output_dir = os.path.abspath(os.fspath(output_dir))
    temporary = os.path.join(os.path.dirname(output_dir),
                             f".{os.path.basename(output_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(temporary)
    try:
        # The towers are staged as Hugging Face folders, which sentence-transformers loads and
        # then saves in its own layout.
        staging = os.path.join(temporary, ".staging")
        os.makedirs(staging)
        vocabulary_file = os.path.join(staging, "spm.model")
        with open(vocabulary_file, "wb") as f:
            f.write(epath.Path(vocabulary).read_bytes())
        _check_vocabulary(vocabulary_file, vocabulary, model.config)
        modules = _modules(st_modules, staging, model, params, vocabulary_file, query_length,
                           passage_length)
        sentence_transformer(modules=modules, device="cpu").save(temporary,
                                                                 create_model_card=False)
        shutil.rmtree(staging)
        _match_file_modes(temporary, like=os.path.join(temporary, "modules.json"))
        if manifest_text is not None:
            with open(os.path.join(temporary, MANIFEST_FILE), "w", encoding="utf-8") as f:
                f.write(manifest_text)
        export._move_into_place(temporary, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logging.info("wrote the %s model as a sentence-transformers folder to %s",
                 model.architecture, output_dir)


def _modules(st_modules, staging: str, model: dual_encoder.DualEncoder, params: dict,
             vocabulary_file: str, query_length: int, passage_length: int) -> list:
    """The sentence-transformers modules of `model`, its towers staged under `staging`."""
    routes, projections = {}, {}
    for route, tower in towers(model.architecture, query_length, passage_length).items():
        tower_dir = os.path.join(staging, route)
        write_hf_t5_encoder(tower_dir, model.config, params[tower.encoder])
        hf_tokenizer(vocabulary_file, tower.max_length).save_pretrained(tower_dir)
        # sde's one tower serves both sides: it truncates per task.
        lengths = ({"query_length": query_length, "document_length": passage_length}
                   if model.architecture == "sde" else {})
        if tower.projection not in projections:  # ade_spl's routes share one
            projections[tower.projection] = _dense(st_modules, params[tower.projection])
        routes[route] = [st_modules.Transformer(tower_dir, **lengths),
                         st_modules.Pooling(model.config.d_model, "mean"),
                         projections[tower.projection], st_modules.Normalize()]
    if model.architecture == "sde":
        return routes[DOCUMENT_ROUTE]
    return [st_modules.Router.for_query_document(
        query_modules=routes[QUERY_ROUTE], document_modules=routes[DOCUMENT_ROUTE],
        default_route=DOCUMENT_ROUTE)]


# --- the parts -----------------------------------------------------------------------------


def hf_t5_config(config: t5.T5Config):
    """The transformers.T5Config of a T5Encoder with samtone's `config` (float32)."""
    import transformers  # pylint: disable=import-outside-toplevel
    return transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
        d_ff=config.d_ff, num_layers=config.num_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate, layer_norm_epsilon=config.layer_norm_epsilon,
        feed_forward_proj=config.feed_forward_proj, use_cache=False, pad_token_id=PAD_ID,
        eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, architectures=["T5EncoderModel"],
        dtype="float32")


def hf_t5_state_dict(encoder_params: Any) -> dict[str, np.ndarray]:
    """An unscanned T5Encoder tree as transformers' T5EncoderModel tensors (float32 numpy).

    The inverse of samtone.checkpoints.hf's mapping: Linear weights and the relative
    attention bias are transposed; the bias lives in block 0, shared by all layers as here.
    """
    tensors = {}
    for path, value in traverse_util.flatten_dict(jax.device_get(encoder_params)).items():
        name, transpose = hf._hf_name(path)
        if not isinstance(name, str):  # the token embedding's names; T5 stores "shared"
            name = "shared.weight"
        value = np.asarray(value, np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    return tensors


def write_hf_t5_encoder(directory: str, config: t5.T5Config, encoder_params: Any) -> None:
    """config.json and model.safetensors that transformers.T5EncoderModel.from_pretrained reads."""
    os.makedirs(directory, exist_ok=True)
    hf_t5_config(config).save_pretrained(directory)
    safetensors.numpy.save_file(hf_t5_state_dict(encoder_params),
                                os.path.join(directory, "model.safetensors"),
                                metadata={"format": "pt"})


def hf_tokenizer(vocabulary_file: str | os.PathLike, max_length: int):
    """A transformers fast tokenizer of a T5-convention SentencePiece file (local path) that
    gives samtone's Tokenizer ids: pieces[:max_length - 1] + [EOS] with truncation=True.

    transformers builds it from the SentencePiece model's own normaliser settings; EOS comes
    from the post-processor, which truncation leaves room for.
    """
    from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
    Tokenizer(vocabulary_file)  # checks T5's pad and EOS ids
    pieces = sentencepiece.SentencePieceProcessor(model_file=os.fspath(vocabulary_file))
    with tempfile.TemporaryDirectory() as directory:
        # The name transformers looks for a SentencePiece model by.
        shutil.copyfile(vocabulary_file, os.path.join(directory, "tokenizer.model"))
        return PreTrainedTokenizerFast.from_pretrained(
            directory, pad_token=pieces.IdToPiece(PAD_ID), eos_token=pieces.IdToPiece(EOS_ID),
            unk_token=pieces.IdToPiece(pieces.unk_id()), add_bos_token=False,
            add_eos_token=True, model_max_length=max_length, local_files_only=True)


def _dense(st_modules, projection_params: dict):
    import torch  # pylint: disable=import-outside-toplevel
    kernel = np.asarray(jax.device_get(projection_params["kernel"]), np.float32)  # [in, out]
    return st_modules.Dense(kernel.shape[0], kernel.shape[1], bias=False,
                            activation_function=torch.nn.Identity(),
                            init_weight=torch.from_numpy(np.ascontiguousarray(kernel.T)))


def _match_file_modes(directory: str, like: str) -> None:
    """safetensors creates its files readable by the owner only; give them `like`'s mode."""
    for folder, _, names in os.walk(directory):
        for name in names:
            if name.endswith(".safetensors"):
                shutil.copymode(like, os.path.join(folder, name))


def _check_vocabulary(local_file: str, vocabulary: Any, config: t5.T5Config) -> None:
    """`local_file` is the staged copy of `vocabulary`, the path errors name."""
    try:
        tokenizer = Tokenizer(local_file)
    except ValueError as error:
        raise ConfigError(f"vocabulary {vocabulary}: {error}") from error
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"vocabulary {vocabulary} has {tokenizer.vocab_size} pieces but the "
                          f"model's embedding has vocab_size={config.vocab_size} rows")


def _import_sentence_transformers():
    """(the SentenceTransformer class, the module holding Transformer, Pooling, Dense, ...)."""
    try:
        found = importlib.metadata.version("sentence-transformers")
        # pylint: disable=import-outside-toplevel
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer import modules
    except (ImportError, importlib.metadata.PackageNotFoundError) as error:
        raise ImportError("write_sentence_transformers needs sentence-transformers>=6.2 (with "
                          "transformers>=5 and torch): pip install 'sentence-transformers>=6.2'"
                          ) from error
    major_minor = re.match(r"(\d+)\.(\d+)", found)
    if not major_minor or tuple(map(int, major_minor.groups())) < MIN_SENTENCE_TRANSFORMERS:
        raise ImportError(f"write_sentence_transformers needs sentence-transformers>=6.2; "
                          f"found {found}")
    return SentenceTransformer, modules
