"""Format `sentence_transformers`: a folder the sentence-transformers package loads.

The folder loads with sentence-transformers >= 6.2 (with transformers >= 5 and torch) and no
samtone:

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
`read_params` reads the folder back into samtone's parameter tree (samtone.inference does, for
`Encoder.load`).

Known differences from samtone's Tokenizer: a text containing the literal strings "<pad>",
"</s>" or "<unk>" gets those special ids from the Hugging Face tokenizer, where SentencePiece
spells the characters out. The towers compute in float32 whatever the training dtype.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import tempfile

import numpy as np
import safetensors.numpy
import sentencepiece

from samtone.checkpoints import hf
from samtone.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from samtone.errors import CheckpointError, MissingDependencyError, MissingFileError
from samtone.models import dual_encoder

QUERY_ROUTE, DOCUMENT_ROUTE = "query", "document"
MIN_SENTENCE_TRANSFORMERS = (6, 2)
DENSE_WEIGHT = "linear.weight"  # the Dense module's [out, in] kernel in its model.safetensors


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


def write_files(folder: str, *, model: dual_encoder.DualEncoder, params: dict,
                vocabulary_file: str, query_length: int, passage_length: int) -> dict:
    """Writes `model` with `params` (the unscanned, unboxed tree) as a sentence-transformers
    folder into the existing `folder`; `vocabulary_file` is a local SentencePiece model.
    Returns the manifest's format fields."""
    sentence_transformer, st_modules = import_sentence_transformers()
    # The towers are staged as Hugging Face folders, which sentence-transformers loads and
    # then saves in its own layout (without transformers' per-file progress bars).
    staging = os.path.join(folder, ".staging")
    os.makedirs(staging)
    with _no_progress_bars():
        modules = _modules(st_modules, staging, model, params, vocabulary_file, query_length,
                           passage_length)
        sentence_transformer(modules=modules, device="cpu").save(folder,
                                                                 create_model_card=False)
    shutil.rmtree(staging)
    return {"sentence_transformers_version": importlib.metadata.version("sentence-transformers")}


def _modules(st_modules, staging: str, model: dual_encoder.DualEncoder, params: dict,
             vocabulary_file: str, query_length: int, passage_length: int) -> list:
    """The sentence-transformers modules of `model`, its towers staged under `staging`."""
    routes, projections = {}, {}
    for route, tower in towers(model.architecture, query_length, passage_length).items():
        tower_dir = os.path.join(staging, route)
        hf.save_hf_t5_encoder(tower_dir, model.config, params[tower.encoder])
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


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging as hf_logging  # pylint: disable=import-outside-toplevel
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


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
    kernel = np.asarray(projection_params["kernel"], np.float32)  # [in, out]
    return st_modules.Dense(kernel.shape[0], kernel.shape[1], bias=False,
                            activation_function=torch.nn.Identity(),
                            init_weight=torch.from_numpy(np.ascontiguousarray(kernel.T)))


def import_sentence_transformers():
    """(the SentenceTransformer class, the module holding Transformer, Pooling, Dense, ...)."""
    try:
        found = importlib.metadata.version("sentence-transformers")
        # pylint: disable=import-outside-toplevel
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer import modules
    except (ImportError, importlib.metadata.PackageNotFoundError) as error:
        raise MissingDependencyError(
            "--format=sentence_transformers needs sentence-transformers>=6.2 (with "
            "transformers>=5 and torch): pip install 'samtone[sentence-transformers]'"
        ) from error
    major_minor = re.match(r"(\d+)\.(\d+)", found)
    if not major_minor or tuple(map(int, major_minor.groups())) < MIN_SENTENCE_TRANSFORMERS:
        raise MissingDependencyError("--format=sentence_transformers needs "
                                     f"sentence-transformers>=6.2; found {found}")
    return SentenceTransformer, modules


# --- reading a folder back ------------------------------------------------------------------


def _route_modules(folder: str) -> dict[str, list[str]]:
    """route -> its module folders (relative), from modules.json / router_config.json."""
    modules_file = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_file):
        raise MissingFileError(f"{folder} is not a complete sentence-transformers folder: "
                               "missing modules.json")
    with open(modules_file, encoding="utf-8") as f:
        modules = json.load(f)
    if len(modules) == 1 and modules[0]["type"].endswith(".Router"):
        router = modules[0]["path"]
        with open(os.path.join(folder, router, "router_config.json"), encoding="utf-8") as f:
            structure = json.load(f)["structure"]
        return {route: [os.path.join(router, name) for name in names]
                for route, names in structure.items()}
    return {DOCUMENT_ROUTE: [module["path"] for module in modules]}


def read_params(folder: str | os.PathLike, architecture: str) -> dict:
    """samtone's (unscanned) parameter tree of a folder `write_files` wrote."""
    folder = os.fspath(folder)
    structure = _route_modules(folder)
    params = {}
    for route, tower in towers(architecture, 1, 1).items():
        if route not in structure:
            raise CheckpointError(f"{folder}: the {architecture} model needs a {route!r} route; "
                                  f"the folder has {sorted(structure)}")
        names = structure[route]
        transformer = next((n for n in names if n == "" or n.endswith("Transformer")), None)
        dense = next((n for n in names if n.endswith("Dense")), None)
        if transformer is None or dense is None:
            raise CheckpointError(f"{folder}: route {route!r} has modules {names}; expected a "
                                  "Transformer and a Dense")
        _, params[tower.encoder] = hf.load_hf_t5_encoder(os.path.join(folder, transformer))
        weights_file = os.path.join(folder, dense, "model.safetensors")
        try:
            weight = safetensors.numpy.load_file(weights_file)[DENSE_WEIGHT]
        except FileNotFoundError as error:
            raise MissingFileError(f"{weights_file} is missing") from error
        except Exception as error:  # pylint: disable=broad-except  (SafetensorError, KeyError)
            raise CheckpointError(f"{weights_file}: cannot read {DENSE_WEIGHT!r} (truncated or "
                                  f"damaged?): {type(error).__name__}: {error}") from error
        params[tower.projection] = {"kernel": np.ascontiguousarray(weight.T)}
    return params
