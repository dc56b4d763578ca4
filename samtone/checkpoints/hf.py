"""The encoder of a Hugging Face T5 / T5.1.1 directory as a samtone `T5Encoder` tree, and back.

Reads config.json and the weights: model.safetensors, a sharded model.safetensors.index.json,
pytorch_model.bin or a sharded pytorch_model.bin.index.json. Torch is only needed for .bin,
which is read with `torch.load(weights_only=True)`: tensors only, nothing else is unpickled.
Decoder and LM-head tensors, if present, are ignored. `hf_t5_encoder_arrays` reads no tensor:
its leaves are `samtone.checkpoints.lazy.LazyArray`s, which read a safetensors tensor slice by
slice (memory-mapped, only the bytes of the slice), so a process placing them on a mesh reads
only the shards its devices hold. A .bin file is not sliced when read: torch.load takes the
whole state dict first (memory-mapped where the file's format allows).
`open_hf_t5_encoder` gives a function reading each whole array (a converter holds one at a
time); `load_hf_t5_encoder` reads them all into a tree.

The inverse, `save_hf_t5_encoder`, writes a folder `transformers.T5EncoderModel` loads.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from samtone.checkpoints import lazy
from samtone.data.tokenizer import EOS_ID, PAD_ID
from samtone.errors import CheckpointError, MissingFileError
from samtone.models.t5 import FEED_FORWARD_PROJS, T5Config, T5Encoder

# transformers' own defaults for keys a config.json may leave out.
_HF_DEFAULTS = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu",
}
# Model types with T5's encoder (umt5 has a position bias per layer, which samtone has not).
T5_MODEL_TYPES = ("t5", "mt5")
_EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}


def t5_config_from_hf(hf_config: dict, *, source: str = "config.json") -> T5Config:
    """Maps a Hugging Face T5 config.json dict onto `T5Config` (float32, no remat, no scan)."""
    model_type = hf_config.get("model_type", "t5")
    if model_type not in T5_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type={model_type!r} is not a T5 model; expected "
                              f"one of {T5_MODEL_TYPES} (a T5.1.1 checkpoint such as "
                              "google/t5-v1_1-base)")
    values = {key: hf_config.get(key, default) for key, default in _HF_DEFAULTS.items()}
    if "num_layers" not in hf_config and "num_hidden_layers" in hf_config:
        values["num_layers"] = hf_config["num_hidden_layers"]
    if values["feed_forward_proj"] not in FEED_FORWARD_PROJS:
        raise CheckpointError(
            f"{source}: feed_forward_proj={values['feed_forward_proj']!r} is not supported; "
            f"expected one of {FEED_FORWARD_PROJS}"
        )
    return T5Config(**values)


def hf_tensor_name(path: tuple[str, ...]) -> tuple[str | tuple[str, ...], bool]:
    """HF tensor name(s) for one of our parameter paths, and whether it needs a transpose.

    HF Linear weights are [out, in] (ours [in, out]); HF's relative_attention_bias is
    [buckets, heads] (ours [heads, buckets]). The token embedding has two names ("shared",
    or "encoder.embed_tokens" in a T5EncoderModel saved alone).
    """
    if path == ("token_embedder", "embedding"):
        return _EMBEDDING_NAMES, False
    if path == ("relpos_bias", "rel_embedding"):
        return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True
    if path == ("encoder_norm", "scale"):
        return "encoder.final_layer_norm.weight", False
    match = re.fullmatch(r"layers_(\d+)", path[0])
    if not match:
        raise KeyError(f"no Hugging Face tensor for parameter {'/'.join(path)}")
    block = f"encoder.block.{match.group(1)}"
    if path[1] == "pre_attention_layer_norm":
        return f"{block}.layer.0.layer_norm.weight", False
    if path[1] == "attention":
        return f"{block}.layer.0.SelfAttention.{_ATTENTION[path[2]]}.weight", True
    if path[1] == "pre_mlp_layer_norm":
        return f"{block}.layer.1.layer_norm.weight", False
    if path[1] == "mlp":
        return f"{block}.layer.1.DenseReluDense.{path[2]}.weight", True
    raise KeyError(f"no Hugging Face tensor for parameter {'/'.join(path)}")


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            files = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [file.name for file in files if not file.is_file()]
            if missing:
                raise MissingFileError(f"{directory / index} names weight files that are "
                                       f"missing: {', '.join(missing)}")
            return files
    raise MissingFileError(
        f"{directory}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        "or pytorch_model.bin.index.json"
    )


class _WeightFiles:
    """The tensors of a Hugging Face checkpoint's weight files, read one name at a time."""

    def __init__(self, files: list[pathlib.Path]):
        self.files = files
        self.origin: dict[str, pathlib.Path] = {}
        self._torch_states: dict[pathlib.Path, dict] = {}
        for file in files:
            self.origin.update(dict.fromkeys(self._names(file), file))

    def _names(self, file: pathlib.Path) -> list[str]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open  # pylint: disable=import-outside-toplevel
            try:
                with safe_open(file, framework="np") as f:
                    return list(f.keys())
            except Exception as error:  # pylint: disable=broad-except  (SafetensorError, OSError)
                raise CheckpointError(f"{file}: not a readable safetensors file (truncated or "
                                      f"damaged?): {error}") from error
        return list(self._torch_state(file))

    def _torch_state(self, file: pathlib.Path) -> dict:
        if file not in self._torch_states:
            try:
                import torch  # pylint: disable=import-outside-toplevel
            except ImportError as error:
                raise ImportError(f"{file}: reading a PyTorch .bin checkpoint needs torch "
                                  "installed") from error
            try:
                # weights_only: tensors and plain containers only; any other pickled object is
                # refused, never constructed.
                self._torch_states[file] = torch.load(file, map_location="cpu",
                                                      weights_only=True, mmap=True)
            except Exception as error:  # pylint: disable=broad-except
                raise CheckpointError(f"{file}: cannot be read as a PyTorch state dict of "
                                      f"tensors (truncated, or holds more than tensors?): "
                                      f"{type(error).__name__}: {error}") from error
        return self._torch_states[file]

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor `name`'s shape, from the file's header (nothing is read)."""
        file = self.origin[name]
        if file.suffix != ".safetensors":
            return tuple(self._torch_state(file)[name].shape)
        from safetensors import safe_open  # pylint: disable=import-outside-toplevel
        with safe_open(file, framework="np") as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """The slice `index` of tensor `name` (all of it by default) as float32 numpy.

        A safetensors file is memory-mapped and only the slice's bytes are read; a .bin
        tensor is sliced from the state dict torch.load gave.
        """
        file = self.origin[name]
        try:
            if file.suffix != ".safetensors":
                import torch  # pylint: disable=import-outside-toplevel
                tensor = self._torch_state(file)[name][index]
                return tensor.detach().to(torch.float32).numpy()
            # ml_dtypes gives numpy the bfloat16 that safetensors' numpy reader needs.
            import ml_dtypes  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
            from safetensors import safe_open  # pylint: disable=import-outside-toplevel
            with safe_open(file, framework="np") as f:
                return f.get_slice(name)[index].astype(np.float32, copy=False)
        except CheckpointError:
            raise
        except Exception as error:  # pylint: disable=broad-except
            raise CheckpointError(f"{file}: cannot read tensor {name!r} (file truncated or "
                                  f"damaged?): {type(error).__name__}: {error}") from error


def read_hf_config(path: str | os.PathLike) -> T5Config:
    """The T5Config of a Hugging Face T5 folder's config.json."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{pathlib.Path(path)}: no config.json (expected a Hugging Face "
                               "T5 directory)")
    try:
        fields = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not JSON: {error}") from error
    return t5_config_from_hf(fields, source=str(config_file))


def encoder_shapes(config: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter path of an unscanned T5Encoder of `config`, and its shape."""
    abstract = jax.eval_shape(
        lambda: T5Encoder(config).init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"])
    return {path: leaf.shape for path, leaf in
            traverse_util.flatten_dict(nn.unbox(abstract)).items()}


def hf_t5_encoder_arrays(path: str | os.PathLike) -> tuple[T5Config, dict]:
    """(T5Config, the unscanned T5Encoder tree) of a Hugging Face T5 folder, its leaves float32
    `LazyArray`s in samtone's layout (a Linear weight transposed), none read yet.

    Every expected tensor is checked to exist and to have the shape config.json implies (from
    the files' headers) first; an error names the tensor, the parameter and both shapes.
    """
    directory = pathlib.Path(path)
    config = read_hf_config(directory)
    files = _weight_files(directory)
    weights = _WeightFiles(files)
    arrays = {}
    for our_path, shape in encoder_shapes(config).items():
        hf_name, transpose = hf_tensor_name(our_path)
        candidates = [hf_name] if isinstance(hf_name, str) else list(hf_name)
        name = next((c for c in candidates if c in weights.origin), None)
        if name is None:
            raise CheckpointError(
                f"{', '.join(map(str, files))}: missing tensor "
                f"{' or '.join(map(repr, candidates))} for {'/'.join(our_path)} (config.json: "
                f"num_layers={config.num_layers}, feed_forward_proj={config.feed_forward_proj!r})")
        stored = weights.shape(name)
        if (stored[::-1] if transpose else stored) != shape:
            raise CheckpointError(
                f"{weights.origin[name]}: tensor {name!r} has shape {stored}; config.json "
                f"implies {shape[::-1] if transpose else shape} for {'/'.join(our_path)}")
        tensor = lazy.Sliced(stored, np.dtype(np.float32),
                             lambda index, name=name: weights.read(name, index))
        arrays[our_path] = tensor.T if transpose else tensor
    return config, traverse_util.unflatten_dict(arrays)


def open_hf_t5_encoder(path: str | os.PathLike
                       ) -> tuple[T5Config, dict[tuple[str, ...], Callable[[], np.ndarray]]]:
    """(T5Config, parameter path -> a function reading that whole float32 array) of a Hugging
    Face T5 folder, without reading any array (checked as `hf_t5_encoder_arrays` does)."""
    config, arrays = hf_t5_encoder_arrays(path)
    return config, {our_path: (lambda array=array: np.ascontiguousarray(array.read()))
                    for our_path, array in traverse_util.flatten_dict(arrays).items()}


def load_hf_t5_encoder(path) -> tuple[T5Config, dict]:
    """Reads a Hugging Face T5 directory into (T5Config, params) of plain float32 numpy arrays.

    The params are the unscanned, unboxed `T5Encoder` tree (t5x names); use
    `samtone.models.t5.stack_layer_params` for a `scan_layers=True` model.
    """
    config, readers = open_hf_t5_encoder(path)
    return config, traverse_util.unflatten_dict(
        {our_path: read() for our_path, read in readers.items()})


# --- the inverse: samtone -> transformers ---------------------------------------------------


def to_hf_config(config: T5Config):
    """The transformers.T5Config of a T5EncoderModel with samtone's `config` (float32)."""
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


def to_hf_state_dict(encoder_params: Any) -> dict[str, np.ndarray]:
    """An unscanned T5Encoder tree as transformers' T5EncoderModel tensors (float32 numpy).

    Linear weights and the relative attention bias are transposed; the bias lives in block 0,
    shared by all layers as here.
    """
    tensors = {}
    for path, value in traverse_util.flatten_dict(nn.unbox(encoder_params)).items():
        name, transpose = hf_tensor_name(path)
        if not isinstance(name, str):  # the token embedding's names; T5 stores "shared"
            name = "shared.weight"
        value = np.asarray(jax.device_get(value), np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    return tensors


def save_hf_t5_encoder(directory: str | os.PathLike, config: T5Config, encoder_params: Any
                       ) -> None:
    """config.json and model.safetensors that transformers.T5EncoderModel.from_pretrained reads."""
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
    os.makedirs(directory, exist_ok=True)
    to_hf_config(config).save_pretrained(directory)
    safetensors.numpy.save_file(to_hf_state_dict(encoder_params),
                                os.path.join(directory, "model.safetensors"),
                                metadata={"format": "pt"})
