"""A Hugging Face T5 folder or a T5X checkpoint as a samtone checkpoint (`samtone-convert`).

    convert("/models/t5-v1_1-base", "converted/base")             # HF: config.json + weights
    convert("t5x/checkpoint_1000", "converted/de", vocabulary="spm.model")        # T5X

The output is a folder laid out like a samtone-train MODEL_DIR:

  model.json           the run manifest (samtone.run_manifest): architecture, T5 config,
                       projection size, lengths, rules; `converted_from` names the source
  spm.model            the vocabulary: `vocabulary`, else the HF folder's spiece.model
  checkpoints/<step>/  an orbax checkpoint whose state is {"params": DualEncoder params},
                       unscanned, float32; step = the T5X step (checkpoint_<step>), else 0

so `samtone.inference.Encoder.load(output)`, `samtone-export --model_dir=output` and
`INIT_CHECKPOINT = output` (samtone.checkpoints.pretrained) all take it.

- Sources: a Hugging Face T5 / T5.1.1 / mT5 folder (config.json and safetensors or
  pytorch_model.bin, read with torch.load(weights_only=True)), or a T5X checkpoint (a folder
  with a `checkpoint` file): a pretrained T5 (the encoder is kept, the decoder dropped) or a
  t5x_retrieval dual encoder (its encoder and projection). A T5X checkpoint has no config:
  the sizes come from the arrays, or from `size` (a T5.1.1 preset), which is then checked.
- The encoder goes into every tower of `architecture` (default sde, exactly a t5x_retrieval
  dual encoder). The projection is the checkpoint's, or for a plain encoder the identity
  (projection_dim = d_model): embeddings are then the normalised mean of the encoder's
  output, and INIT_CHECKPOINT leaves the projection to random initialisation as for any
  pretrained T5.
- Every array's name and shape is checked against the model before any is read (an error
  names the parameter and both shapes). Arrays are then read one at a time (tensorstore for
  T5X, memory-mapped safetensors / .bin for HF) and placed straight onto their shards, laid
  out over all devices by `logical_axis_rules`: on accelerators the host holds one array at a
  time (on a CPU-only machine the devices are host memory: the model is held once).
- The folder is written to a temporary sibling and renamed into place (samtone.output_folder);
  an existing one is replaced only with `overwrite`, and never when it is or holds the source
  or the vocabulary.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from samtone import output_folder
from samtone import run_dir
from samtone import run_manifest
from samtone.checkpoints import hf
from samtone.checkpoints import manager as checkpoint_lib
from samtone.checkpoints import t5x
from samtone.errors import CheckpointError, ConfigError, MissingFileError
from samtone.models import dual_encoder
from samtone.models import t5
from samtone.vocabulary import check_fits_embedding

HF_VOCABULARY_FILE = "spiece.model"  # where a Hugging Face T5 folder keeps its SentencePiece
DEFAULT_QUERY_LENGTH, DEFAULT_PASSAGE_LENGTH = 64, 256


@dataclasses.dataclass
class Source:
    """What a checkpoint holds: its config, where each array goes, and how to read it."""

    kind: str                      # "hf" or "t5x"
    config: t5.T5Config
    step: int
    # encoder parameter path -> (stored shape, read); the projection kernel under
    # ("projection", "kernel") when the checkpoint has one.
    arrays: dict[tuple[str, ...], tuple[tuple[int, ...] | None, Callable[[], np.ndarray]]]
    vocabulary: str | None         # a vocabulary found beside the weights

    @property
    def has_projection(self) -> bool:
        return ("projection", "kernel") in self.arrays


def convert(source_path: str | os.PathLike, output_dir: str | os.PathLike, *,
            architecture: str = "sde", vocabulary: str | os.PathLike | None = None,
            size: str | None = None, query_length: int = DEFAULT_QUERY_LENGTH,
            passage_length: int = DEFAULT_PASSAGE_LENGTH, logical_axis_rules: str = "data",
            model_parallel: int = 1, overwrite: bool = False) -> run_manifest.RunManifest:
    """Writes the samtone checkpoint of `source_path` to `output_dir`; returns its manifest.

    Args:
      source_path: a Hugging Face T5 folder or a T5X checkpoint folder (or its file).
      architecture: sde, ade or ade_spl; every tower starts from the checkpoint's encoder.
      vocabulary: a SentencePiece model to copy (default: the HF folder's spiece.model).
      size: a T5.1.1 preset the T5X arrays must match (default: sizes read off the arrays).
      query_length, passage_length: the lengths Encoder.load and exports use.
      logical_axis_rules, model_parallel: how the parameters are laid out when read.
    """
    if architecture not in dual_encoder.ARCHITECTURES:
        raise ConfigError(f"--architecture={architecture!r}; expected one of "
                          f"{', '.join(dual_encoder.ARCHITECTURES)}")
    if min(query_length, passage_length) < 1:
        raise ConfigError(f"--query_length and --passage_length must be >= 1; got "
                          f"{query_length} and {passage_length}")
    # Before reading anything: never over the source or the vocabulary, even with overwrite.
    run_dir.check_output(output_dir, [("--from", source_path), ("--vocabulary", vocabulary)],
                         flag="--output")
    output_folder.check_target(output_dir, overwrite)
    source = open_source(source_path, size=size)
    vocabulary = os.fspath(vocabulary) if vocabulary is not None else source.vocabulary
    if vocabulary is not None:
        check_fits_embedding(vocabulary, source.config.vocab_size,
                             name=f"--vocabulary={vocabulary}",
                             embedding="the checkpoint's embedding")
    projection_dim = source.config.d_model  # the identity, for a plain encoder
    if source.has_projection:
        shape, read = source.arrays[("projection", "kernel")]
        projection_dim = (shape or read().shape)[-1]
    model = dual_encoder.DualEncoder(source.config, architecture=architecture,
                                     projection_dim=projection_dim)
    manifest = run_manifest.RunManifest.of(
        model, query_length=query_length, passage_length=passage_length,
        vocabulary=vocabulary or "", logical_axis_rules=logical_axis_rules,
        model_parallel=model_parallel, converted_from={
            "path": os.path.abspath(os.fspath(source_path)), "format": source.kind,
            "step": source.step,
            "projection": "checkpoint" if source.has_projection else "identity"})
    shapes, shardings = manifest.params_layout(manifest.serving_mesh())
    where = _placements(architecture)
    _check_shapes(source, shapes, where, source_path)

    with output_folder.write_atomically(output_dir, overwrite) as folder:
        params = _read_and_place(source, shapes, shardings, where)
        manager = checkpoint_lib.make_checkpoint_manager(os.path.join(folder, run_dir.CHECKPOINTS),
                                                         keep=None, async_save=False)
        checkpoint_lib.save_checkpoint(manager, source.step, {"params": params}, {})
        manager.wait_until_finished()
        manager.close()
        del params
        run_manifest.write(folder, manifest)
    logging.info("converted %s (%s) to %s", source_path, source.kind, output_dir)
    return run_manifest.read(output_dir)


# --- sources ------------------------------------------------------------------------------


def open_source(path: str | os.PathLike, *, size: str | None = None) -> Source:
    """The Source of a Hugging Face T5 folder or a T5X checkpoint; nothing is read yet
    beyond headers and the T5X msgpack file."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _hf_source(path, size)
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, t5x.CHECKPOINT_FILE)):
        return _t5x_source(path, size)
    found = "it does not exist" if not os.path.exists(path) else (
        f"it holds {sorted(os.listdir(path))[:8]}" if os.path.isdir(path) else "it is a file")
    raise MissingFileError(f"--from={path} is neither a Hugging Face T5 folder (no "
                           f"config.json) nor a T5X checkpoint (no '{t5x.CHECKPOINT_FILE}' "
                           f"file); {found}")


def _hf_source(path: str, size: str | None) -> Source:
    config, readers = hf.open_hf_t5_encoder(path)
    if size is not None:
        _check_same_sizes(config, t5.t5_1_1_config(size), f"{path}/config.json",
                          f"--size={size}")
    shapes = hf.encoder_shapes(config)  # the reader checked the stored shapes against them
    vocabulary = os.path.join(path, HF_VOCABULARY_FILE)
    return Source("hf", config, 0, {key: (shapes[key], read) for key, read in readers.items()},
                  vocabulary if os.path.isfile(vocabulary) else None)


def _t5x_source(path: str, size: str | None) -> Source:
    tree = t5x.open_t5x_checkpoint(path)
    tree = tree.get("params", tree)
    encoder = t5x.t5x_encoder_to_samtone(tree)
    leaves = traverse_util.flatten_dict(encoder)
    if "projection_layer" in tree:
        if not isinstance(tree["projection_layer"], dict) or "kernel" not in tree[
                "projection_layer"]:
            raise CheckpointError(f"{path}: projection_layer has no kernel (not a "
                                  "t5x_retrieval dual encoder?)")
        leaves[("projection", "kernel")] = tree["projection_layer"]["kernel"]
    config = (t5.t5_1_1_config(size, dropout_rate=0.0) if size is not None
              else t5_config_from_shapes(leaves, path))
    match = re.search(r"checkpoint_(\d+)$", os.path.abspath(path if os.path.isdir(path)
                                                            else os.path.dirname(path)))
    arrays = {key: (_shape(leaf), _reader(leaf)) for key, leaf in leaves.items()}
    return Source("t5x", config, int(match.group(1)) if match else 0, arrays, None)


def _shape(leaf: Any) -> tuple[int, ...] | None:
    return leaf.shape if isinstance(leaf, t5x.StoredArray) else tuple(np.shape(leaf))


def _reader(leaf: Any) -> Callable[[], np.ndarray]:
    if isinstance(leaf, t5x.StoredArray):
        return lambda: np.asarray(leaf.read(), np.float32)
    return lambda: np.asarray(leaf, np.float32)


def t5_config_from_shapes(leaves: dict[tuple[str, ...], Any], source: str) -> t5.T5Config:
    """The T5Config a T5X encoder's arrays imply (max distance and epsilon: T5's defaults)."""
    def shape(*key):
        if key not in leaves or _shape(leaves[key]) is None:
            raise CheckpointError(f"{source}: no shape for {'/'.join(key)}; pass --size")
        return _shape(leaves[key])

    vocab_size, d_model = shape("token_embedder", "embedding")
    num_heads, num_buckets = shape("relpos_bias", "rel_embedding")
    joined_kv = shape("layers_0", "attention", "query", "kernel")[1]
    gated = ("layers_0", "mlp", "wi_0", "kernel") in leaves
    d_ff = shape("layers_0", "mlp", "wi_0" if gated else "wi", "kernel")[1]
    num_layers = len({key[0] for key in leaves if re.fullmatch(r"layers_\d+", key[0])})
    if joined_kv % num_heads:
        raise CheckpointError(f"{source}: layers_0/attention/query/kernel has {joined_kv} "
                              f"columns, not a multiple of the {num_heads} heads of "
                              "relpos_bias/rel_embedding")
    return t5.T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=joined_kv // num_heads,
                       d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
                       relative_attention_num_buckets=num_buckets, dropout_rate=0.0,
                       feed_forward_proj="gated-gelu" if gated else "relu")


# --- placing the arrays -------------------------------------------------------------------


def _placements(architecture: str) -> dict[str, tuple[str, ...]]:
    """Source part ("encoder", "projection") -> the DualEncoder subtrees it goes into."""
    towers = dual_encoder.tower_params({}, architecture, projection={})
    return {"encoder": tuple(name for name in towers if name.endswith("encoder")),
            "projection": tuple(name for name in towers if name.endswith("projection_layer"))}


def _targets(key: tuple[str, ...], where: dict) -> list[tuple[str, ...]]:
    if key[0] == "projection":
        return [(name, "kernel") for name in where["projection"]]
    return [(name, *key) for name in where["encoder"]]


def _check_shapes(source: Source, shapes: Any, where: dict, path: Any) -> None:
    expected = {"/".join(key): leaf.shape
                for key, leaf in traverse_util.flatten_dict(shapes).items()}
    found = {}
    for key, (shape, _) in source.arrays.items():
        for target in _targets(key, where):
            found["/".join(target)] = shape
    if not source.has_projection:  # the identity goes there
        found.update({name: shape for name, shape in expected.items()
                      if name.endswith("projection_layer/kernel")})
    # A stored shape the metadata does not record is checked when it is read.
    found = {name: expected.get(name) if shape is None else shape
             for name, shape in found.items()}
    run_manifest.check_shapes(found, expected, where=f"{path}",
                              what=f"a T5 encoder of {_sizes(source.config)}")


def _read_and_place(source: Source, shapes: Any, shardings: Any, where: dict) -> dict:
    """The DualEncoder parameters, each array read once and placed on its shards (the towers
    of ade and ade_spl share the placed array until training updates them apart)."""
    flat_shapes = traverse_util.flatten_dict(shapes)
    flat_shardings = traverse_util.flatten_dict(shardings)
    params = {}
    for key, (_, read) in source.arrays.items():
        targets = _targets(key, where)
        array = read()
        expected = flat_shapes[targets[0]].shape
        if array.shape != expected:  # only where the metadata recorded no shape
            raise CheckpointError(f"{'/'.join(key)} of the checkpoint has shape {array.shape}; "
                                  f"{'/'.join(targets[0])} needs {expected}")
        placed = jax.device_put(array, flat_shardings[targets[0]])
        del array
        for target in targets:
            params[target] = placed
    if not source.has_projection:
        identity = np.eye(source.config.d_model, dtype=np.float32)
        for name in where["projection"]:
            params[(name, "kernel")] = jax.device_put(identity, flat_shardings[(name, "kernel")])
    return traverse_util.unflatten_dict(params)


# --- checks ---------------------------------------------------------------------------------


def _sizes(config: t5.T5Config) -> str:
    return ", ".join(f"{name}={getattr(config, name)}" for name in (
        "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj"))


def _check_same_sizes(found: t5.T5Config, expected: t5.T5Config, found_where: str,
                      expected_where: str) -> None:
    fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
              "feed_forward_proj")
    different = [f"{name}: {getattr(found, name)} vs {getattr(expected, name)}"
                 for name in fields if getattr(found, name) != getattr(expected, name)]
    if different:
        raise CheckpointError(f"{found_where} does not match {expected_where}: "
                              + ", ".join(different))
