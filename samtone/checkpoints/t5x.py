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

`load_t5x_checkpoint` returns the `target` tree as stored, with t5x names; the converters
below map it onto samtone's T5Encoder / DualEncoder trees. Only unscanned checkpoints
(`layers_0`, `layers_1`, ...) are supported; the optimizer state is read but dropped.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Any

import flax.serialization
import msgpack
import numpy as np

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
    checkpoint_file, checkpoint_dir = _locate(os.fspath(path))
    with open(checkpoint_file, "rb") as f:
        encoded = f.read()
    try:
        contents = flax.serialization.msgpack_restore(encoded)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"{checkpoint_file}: not a T5X msgpack checkpoint ({type(e).__name__}: {e})") from e
    target = _target_of(contents, checkpoint_file)
    return _materialize(target, checkpoint_dir, checkpoint_file)


def _locate(path: str) -> tuple[str, str]:
    if "://" in path:
        raise ValueError(f"{path}: only local checkpoints can be read; copy it locally first (gsutil -m cp -r)")
    if os.path.isdir(path):
        checkpoint_file = os.path.join(path, CHECKPOINT_FILE)
        if not os.path.isfile(checkpoint_file):
            raise FileNotFoundError(
                f"{path}: no '{CHECKPOINT_FILE}' file; expected a T5X checkpoint directory such as "
                f"'.../checkpoint_1000' (found {sorted(os.listdir(path))[:8]})"
            )
        return checkpoint_file, path
    if os.path.isfile(path):
        return path, os.path.dirname(os.path.abspath(path))
    raise FileNotFoundError(f"{path}: no such T5X checkpoint directory or file")


def _target_of(contents: Any, checkpoint_file: str) -> dict:
    if isinstance(contents, dict) and isinstance(contents.get("optimizer"), dict):
        contents = contents["optimizer"]
    if not isinstance(contents, dict) or not isinstance(contents.get("target"), dict):
        found = sorted(contents) if isinstance(contents, dict) else type(contents).__name__
        raise ValueError(
            f"{checkpoint_file}: expected {{'optimizer': {{'target': params, ...}}}}, found top-level {found}"
        )
    return contents["target"]


def _is_tensorstore_spec(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("driver"), str)


def _materialize(target: dict, checkpoint_dir: str, checkpoint_file: str) -> dict:
    """Inline leaves as writable numpy arrays; tensorstore specs read from their folders."""
    specs: list[tuple[tuple[str, ...], dict]] = []

    def walk(node: Any, key: tuple[str, ...]) -> Any:
        where = "/".join(("target",) + key)
        if _is_tensorstore_spec(node):
            specs.append((key, node))
            return None
        if isinstance(node, dict):
            return {str(name): walk(child, key + (str(name),)) for name, child in node.items()}
        if isinstance(node, msgpack.ExtType):
            raise ValueError(f"{checkpoint_file}: {where} uses unsupported msgpack ext type {node.code}")
        if isinstance(node, (np.ndarray, np.generic, int, float, complex, bool)):
            return np.array(node)
        raise ValueError(f"{checkpoint_file}: {where} holds a {type(node).__name__}, expected an array")

    tree = walk(target, ())
    for key, array in zip([key for key, _ in specs], _read_specs(specs, checkpoint_dir, checkpoint_file)):
        node = tree
        for name in key[:-1]:
            node = node[name]
        node[key[-1]] = array
    return tree


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


def _read_specs(specs, checkpoint_dir: str, checkpoint_file: str) -> list[np.ndarray]:
    """Reads every spec's array, all in flight at once when tensorstore is available."""
    folders = []
    for key, spec in specs:
        where = "/".join(("target",) + key)
        if spec["driver"] != "zarr":
            raise ValueError(f"{checkpoint_file}: {where} uses tensorstore driver {spec['driver']!r}; only zarr")
        try:
            folders.append(_folder_of(spec, checkpoint_dir))
        except KeyError:
            raise ValueError(f"{checkpoint_file}: {where} is a tensorstore spec without a path: {spec}") from None
    try:
        import tensorstore
    except ImportError:
        tensorstore = None
    arrays = []
    if tensorstore is not None:
        opened = [
            tensorstore.open({"driver": "zarr", "kvstore": {"driver": "file", "path": folder}}, open=True, read=True)
            for folder in folders
        ]
        reads = []
        for (key, _), folder, future in zip(specs, folders, opened):
            try:
                reads.append(future.result().read())
            except Exception as e:
                raise _read_error(checkpoint_file, key, folder, e) from e
        for (key, _), folder, future in zip(specs, folders, reads):
            try:
                arrays.append(np.asarray(future.result()))
            except Exception as e:
                raise _read_error(checkpoint_file, key, folder, e) from e
    else:
        for (key, _), folder in zip(specs, folders):
            try:
                arrays.append(read_zarr_v2(folder))
            except Exception as e:
                raise _read_error(checkpoint_file, key, folder, e) from e
    for (key, spec), folder, array in zip(specs, folders, arrays):
        expected = spec.get("metadata", {}).get("shape")
        if expected is not None and tuple(expected) != array.shape:
            where = "/".join(("target",) + key)
            raise ValueError(
                f"{checkpoint_file}: {where} should have shape {tuple(expected)}, but {folder} holds {array.shape}"
            )
    return arrays


def _read_error(checkpoint_file: str, key: tuple[str, ...], folder: str, error: Exception) -> ValueError:
    where = "/".join(("target",) + key)
    return ValueError(f"{checkpoint_file}: cannot read {where} from {folder}: {error}")


def read_zarr_v2(folder: str) -> np.ndarray:
    """A zarr v2 array (C order, gzip/zlib/no compression) read with numpy alone.

    The fallback when tensorstore is not installed. Edge chunks are stored full-size, so
    each chunk is decoded whole and cropped to the array's bounds; missing chunks hold the
    fill value.
    """
    with open(os.path.join(folder, ".zarray")) as f:
        meta = json.load(f)
    if meta.get("order", "C") != "C" or meta.get("filters"):
        raise ValueError(f"{folder}: only C-order zarr arrays without filters are supported")
    dtype = _bfloat16() if meta["dtype"] == "bfloat16" else np.dtype(meta["dtype"])
    shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
    compressor = (meta.get("compressor") or {}).get("id")
    decompress = {"gzip": gzip.decompress, "zlib": zlib.decompress, None: bytes}.get(compressor)
    if decompress is None:
        raise ValueError(f"{folder}: unsupported zarr compressor {compressor!r}")
    separator = meta.get("dimension_separator", ".")
    fill = meta.get("fill_value")
    array = np.full(shape, 0 if fill is None else fill, dtype=dtype)
    grid = [range(-(-size // chunk)) for size, chunk in zip(shape, chunks)]
    for index in np.ndindex(*[len(axis) for axis in grid]) if shape else [()]:
        name = separator.join(map(str, index)) if shape else "0"
        chunk_path = os.path.join(folder, name)
        if not os.path.exists(chunk_path):
            continue
        with open(chunk_path, "rb") as f:
            block = np.frombuffer(decompress(f.read()), dtype=dtype).reshape(chunks)
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))
        array[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return array


def _bfloat16() -> np.dtype:
    import ml_dtypes  # a jax dependency

    return np.dtype(ml_dtypes.bfloat16)


# Layout converters.


def _child(tree: dict, name: str, where: str) -> Any:
    if not isinstance(tree, dict) or name not in tree:
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise KeyError(f"T5X params: expected '{where}{name}', found {found} at '{where or '/'}'")
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
        raise ValueError("T5X params: encoder/layers is a scanned layer stack; only unscanned "
                         "checkpoints (encoder/layers_0, layers_1, ...) are supported")
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
        raise KeyError(
            f"T5X params: no 'projection_layer' (found {sorted(t5x_params)}); a pretrained T5 checkpoint "
            "has none: use t5x_encoder_to_samtone with samtone.models.dual_encoder.tower_params"
        )
    return dual_encoder.tower_params(encoder, architecture, t5x_params["projection_layer"])
