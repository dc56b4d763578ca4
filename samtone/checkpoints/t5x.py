"""Reading T5X checkpoints (msgpack + tensorstore/zarr) into nested dicts of numpy arrays.

On disk a T5X checkpoint directory (`checkpoint_<step>/`) holds:
  * `checkpoint`: msgpack of `{"version", "optimizer": {"target": params, "state": ...}}`,
    written by flax.serialization. A leaf is either an inline array (msgpack ext type 1;
    flax also uses ext 2 for complex and 3 for numpy scalars, and may split big arrays into
    chunks, all undone by `flax.serialization.msgpack_restore`) or a tensorstore spec
    `{"driver": "zarr", "kvstore": {"driver": "gfile" | "file", "path": "target.a.b"},
    "metadata": {...}}` naming a zarr v2 folder inside the directory. (Older specs carry
    the relative path as a top-level "path".)
  * one `target.<dotted param path>` zarr folder per large parameter (gzip chunks).

`load_t5x_checkpoint` returns the `target` tree as stored, with t5x names;
`open_t5x_checkpoint` the same tree without reading the zarr folders: their leaves are
`StoredArray`s (`samtone.checkpoints.lazy.LazyArray`s), each read on its own or by slice, so a
converter holds one array at a time and a process placing them on a mesh reads only the chunks
its devices' shards touch. The converters below map either tree onto samtone's T5Encoder /
DualEncoder trees. Only unscanned checkpoints (`layers_0`, `layers_1`, ...) are supported; the
optimizer state is read but dropped.
"""
from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import zlib
from typing import Any

import flax.serialization
import msgpack
import numpy as np

from samtone.checkpoints import lazy
from samtone.errors import CheckpointError, MissingFileError
from samtone.models import dual_encoder

CHECKPOINT_FILE = "checkpoint"


def load_t5x_checkpoint(path: str | os.PathLike) -> dict:
    """The parameter tree (`optimizer/target`) of a T5X checkpoint, as numpy arrays.

    Args:
      path: the checkpoint directory (`.../checkpoint_1000`) or its `checkpoint` file.

    Returns:
      Nested dicts with t5x names, e.g. for a t5x_retrieval dual encoder
      `{"token_embedder": {"embedding"}, "encoder": {"relpos_bias", "layers_0", ...,
      "encoder_norm"}, "projection_layer": {"kernel"}}`. Arrays keep their stored dtype.
    """
    tree = open_t5x_checkpoint(path)
    stored = [(key, leaf) for key, leaf in _leaves(tree) if isinstance(leaf, StoredArray)]
    for (key, _), array in zip(stored, _read_all([leaf for _, leaf in stored])):
        node = tree
        for name in key[:-1]:
            node = node[name]
        node[key[-1]] = array
    return tree


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class StoredArray(lazy.LazyArray):
    """A parameter kept in its own zarr folder of a T5X checkpoint, read (or sliced) when asked."""

    where: str  # "target/encoder/layers_0/mlp/wi/kernel"
    folder: str
    shape: tuple[int, ...] | None  # as the msgpack spec (else the folder's .zarray) records it
    checkpoint_file: str
    dtype: np.dtype | None = None

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The array, or its slice `index`: tensorstore if installed (only the chunks the
        slice touches), else numpy; the stored shape is checked against the spec's."""
        if self.shape is None:  # the spec recorded none and the folder's .zarray is unreadable
            return self._read(None)
        return super().read(index)

    def _read(self, index: lazy.Index | None) -> np.ndarray:
        try:
            import tensorstore  # pylint: disable=import-outside-toplevel
        except ImportError:
            tensorstore = None
        try:
            if tensorstore is None:
                self.check(tuple(_zarr_metadata(self.folder)["shape"]))
                return read_zarr_v2(self.folder, index)
            store = tensorstore.open(_zarr_spec(self.folder), open=True, read=True).result()
            self.check(tuple(store.shape))
            return np.asarray(store[index or ()].read().result())
        except CheckpointError:
            raise
        except Exception as error:  # pylint: disable=broad-except  (tensorstore, OS, zlib)
            raise self.error(error) from error

    def error(self, error: Exception) -> CheckpointError:
        if not os.path.isdir(self.folder):
            return CheckpointError(f"{self.checkpoint_file}: cannot read {self.where}: its "
                                   f"folder {self.folder} is missing")
        return CheckpointError(f"{self.checkpoint_file}: cannot read {self.where} from "
                               f"{self.folder} (truncated or damaged?): {error}")

    def check(self, stored_shape: tuple[int, ...]) -> None:
        if self.shape is not None and self.shape != stored_shape:
            raise CheckpointError(f"{self.checkpoint_file}: {self.where} should have shape "
                                  f"{self.shape}, but {self.folder} holds {stored_shape}")


def open_t5x_checkpoint(path: str | os.PathLike) -> dict:
    """The `optimizer/target` tree of a T5X checkpoint without reading its zarr folders.

    Leaves are numpy arrays (those stored inline in the msgpack file) or `StoredArray`s,
    each read on its own with `.read()`, or a slice of it with `.read(index)`.
    """
    checkpoint_file, checkpoint_dir = _locate(os.fspath(path))
    with open(checkpoint_file, "rb") as f:
        encoded = f.read()
    try:
        contents = flax.serialization.msgpack_restore(encoded)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise CheckpointError(f"{checkpoint_file}: not a T5X msgpack checkpoint (truncated or "
                              f"damaged?) ({type(e).__name__}: {e})") from e
    target = _target_of(contents, checkpoint_file)
    return _walk(target, checkpoint_dir, checkpoint_file)


def _leaves(tree: dict, key: tuple[str, ...] = ()):
    for name, child in tree.items():
        if isinstance(child, dict):
            yield from _leaves(child, key + (name,))
        else:
            yield key + (name,), child


def _locate(path: str) -> tuple[str, str]:
    if "://" in path:
        raise CheckpointError(f"{path}: only local checkpoints can be read; copy it locally "
                              "first (gsutil -m cp -r)")
    if os.path.isdir(path):
        checkpoint_file = os.path.join(path, CHECKPOINT_FILE)
        if not os.path.isfile(checkpoint_file):
            raise MissingFileError(
                f"{path}: no '{CHECKPOINT_FILE}' file; expected a T5X checkpoint directory such as "
                f"'.../checkpoint_1000' (found {sorted(os.listdir(path))[:8]})"
            )
        return checkpoint_file, path
    if os.path.isfile(path):
        return path, os.path.dirname(os.path.abspath(path))
    raise MissingFileError(f"{path}: no such T5X checkpoint directory or file")


def _target_of(contents: Any, checkpoint_file: str) -> dict:
    if isinstance(contents, dict) and isinstance(contents.get("optimizer"), dict):
        contents = contents["optimizer"]
    if not isinstance(contents, dict) or not isinstance(contents.get("target"), dict):
        found = sorted(contents) if isinstance(contents, dict) else type(contents).__name__
        raise CheckpointError(
            f"{checkpoint_file}: expected {{'optimizer': {{'target': params, ...}}}}, "
            f"found top-level {found}"
        )
    return contents["target"]


def _is_tensorstore_spec(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("driver"), str)


def _walk(target: dict, checkpoint_dir: str, checkpoint_file: str) -> dict:
    """Inline leaves as writable numpy arrays; tensorstore specs as `StoredArray`s."""

    def walk(node: Any, key: tuple[str, ...]) -> Any:
        where = "/".join(("target",) + key)
        if _is_tensorstore_spec(node):
            if node["driver"] != "zarr":
                raise CheckpointError(f"{checkpoint_file}: {where} uses tensorstore driver "
                                      f"{node['driver']!r}; only zarr")
            try:
                folder = _folder_of(node, checkpoint_dir)
            except KeyError:
                raise CheckpointError(f"{checkpoint_file}: {where} is a tensorstore spec "
                                      f"without a path: {node}") from None
            metadata = node.get("metadata") or {}
            if "shape" not in metadata or "dtype" not in metadata:
                try:
                    metadata = {**_zarr_metadata(folder), **metadata}
                except (OSError, ValueError):
                    pass  # a missing or damaged folder is reported when it is read
            shape, dtype = metadata.get("shape"), metadata.get("dtype")
            return StoredArray(where, folder, None if shape is None else tuple(shape),
                               checkpoint_file, None if dtype is None else _numpy_dtype(dtype))
        if isinstance(node, dict):
            return {str(name): walk(child, key + (str(name),)) for name, child in node.items()}
        if isinstance(node, msgpack.ExtType):
            raise CheckpointError(f"{checkpoint_file}: {where} uses unsupported msgpack ext "
                                  f"type {node.code}")
        if isinstance(node, (np.ndarray, np.generic, int, float, complex, bool)):
            return np.array(node)
        raise CheckpointError(f"{checkpoint_file}: {where} holds a {type(node).__name__}, "
                              "expected an array")

    return walk(target, ())


def _folder_of(spec: dict, checkpoint_dir: str) -> str:
    """Local folder of a spec's zarr array: its kvstore path relative to the checkpoint dir."""
    kvstore = spec.get("kvstore")
    relative = kvstore.get("path") if isinstance(kvstore, dict) else None
    if relative is None:
        relative = spec.get("path")  # pre-kvstore tensorstore specs
    if not isinstance(relative, str):
        raise KeyError("no kvstore path")
    if "://" in relative or os.path.isabs(relative):
        # Written with an absolute (often gs://) path: the folder keeps its name locally.
        relative = relative.rstrip("/").rsplit("/", 1)[-1]
    return os.path.join(checkpoint_dir, relative)


def _zarr_spec(folder: str) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": folder}}


def _read_all(stored: list[StoredArray]) -> list[np.ndarray]:
    """Reads every array, all in flight at once when tensorstore is available."""
    try:
        import tensorstore  # pylint: disable=import-outside-toplevel
    except ImportError:
        return [leaf.read() for leaf in stored]
    opened = [tensorstore.open(_zarr_spec(leaf.folder), open=True, read=True) for leaf in stored]
    reads = []
    for leaf, future in zip(stored, opened):
        try:
            reads.append(future.result().read())
        except Exception as e:  # pylint: disable=broad-except
            raise leaf.error(e) from e
    arrays = []
    for leaf, future in zip(stored, reads):
        try:
            arrays.append(np.asarray(future.result()))
        except Exception as e:  # pylint: disable=broad-except
            raise leaf.error(e) from e
        leaf.check(arrays[-1].shape)
    return arrays


def _zarr_metadata(folder: str) -> dict:
    with open(os.path.join(folder, ".zarray")) as f:
        return json.load(f)


def _numpy_dtype(name: str) -> np.dtype:
    return _bfloat16() if name == "bfloat16" else np.dtype(name)


def read_zarr_v2(folder: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """A zarr v2 array (C order, gzip/zlib/no compression), or its slice `index`, read with
    numpy alone.

    The fallback when tensorstore is not installed. Only the chunks the slice touches are
    read; edge chunks are stored full-size, so each is decoded whole and cropped. Missing
    chunks hold the fill value.
    """
    meta = _zarr_metadata(folder)
    if meta.get("order", "C") != "C" or meta.get("filters"):
        raise ValueError(f"{folder}: only C-order zarr arrays without filters are supported")
    dtype = _numpy_dtype(meta["dtype"])
    shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
    compressor = (meta.get("compressor") or {}).get("id")
    decompress = {"gzip": gzip.decompress, "zlib": zlib.decompress, None: bytes}.get(compressor)
    if decompress is None:
        raise ValueError(f"{folder}: unsupported zarr compressor {compressor!r}")
    separator = meta.get("dimension_separator", ".")
    fill = meta.get("fill_value")
    wanted = lazy.bounded(index, shape)
    array = np.full([axis.stop - axis.start for axis in wanted], 0 if fill is None else fill,
                    dtype=dtype)
    grid = [range(axis.start // chunk, -(-axis.stop // chunk))
            for axis, chunk in zip(wanted, chunks)]
    for chunk_index in itertools.product(*grid):
        name = separator.join(map(str, chunk_index)) if shape else "0"
        chunk_path = os.path.join(folder, name)
        if not os.path.exists(chunk_path):
            continue
        with open(chunk_path, "rb") as f:
            block = np.frombuffer(decompress(f.read()), dtype=dtype).reshape(chunks)
        # The part of this chunk inside `wanted`, in the array's, the block's and the output's
        # coordinates.
        overlap = [slice(max(i * c, axis.start), min((i + 1) * c, axis.stop))
                   for i, c, axis in zip(chunk_index, chunks, wanted)]
        array[tuple(slice(o.start - axis.start, o.stop - axis.start)
                    for o, axis in zip(overlap, wanted))] = block[
            tuple(slice(o.start - i * c, o.stop - i * c)
                  for o, i, c in zip(overlap, chunk_index, chunks))]
    return array


def _bfloat16() -> np.dtype:
    import ml_dtypes  # a jax dependency

    return np.dtype(ml_dtypes.bfloat16)


# Layout converters.


def _child(tree: dict, name: str, where: str) -> Any:
    if not isinstance(tree, dict) or name not in tree:
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"T5X params: expected '{where}{name}', found {found} at "
                              f"'{where or '/'}' (not a T5 encoder checkpoint?)")
    return tree[name]


def t5x_encoder_to_samtone(t5x_params: dict) -> dict:
    """A samtone T5Encoder tree from a T5X model's params (the decoder, if any, is ignored).

    T5X keeps the shared embedding at the top (`token_embedder/embedding`) and the encoder
    stack under `encoder/`; samtone's T5Encoder owns its embedding:
    `{token_embedder, relpos_bias, layers_0..., encoder_norm}`. Arrays are not copied.
    """
    t5x_params = t5x_params.get("params", t5x_params)
    encoder = _child(t5x_params, "encoder", "")
    if "layers" in encoder:
        raise CheckpointError("T5X params: encoder/layers is a scanned layer stack; only "
                              "unscanned checkpoints (encoder/layers_0, layers_1, ...) "
                              "are supported")
    for name in ("relpos_bias", "encoder_norm", "layers_0"):
        _child(encoder, name, "encoder/")
    return {"token_embedder": _child(t5x_params, "token_embedder", ""), **encoder}


def t5x_dual_encoder_to_samtone(t5x_params: dict, architecture: str) -> dict:
    """A samtone DualEncoder tree from a t5x_retrieval dual encoder (one shared tower).

    sde keeps the single tower: `{encoder, projection_layer}`. For ade and ade_spl both
    towers start from the same encoder (and, for ade, both projections from the same
    kernel); the arrays are shared, not copied, until placed on devices.
    """
    t5x_params = t5x_params.get("params", t5x_params)
    encoder = t5x_encoder_to_samtone(t5x_params)
    if "projection_layer" not in t5x_params:
        raise CheckpointError(
            f"T5X params: no 'projection_layer' (found {sorted(t5x_params)}); "
            "a pretrained T5 checkpoint has none: use t5x_encoder_to_samtone with "
            "samtone.models.dual_encoder.tower_params"
        )
    return dual_encoder.tower_params(encoder, architecture, t5x_params["projection_layer"])
