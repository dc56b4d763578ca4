"""Import the encoder of a Hugging Face T5 / T5.1.1 directory as a samtone `T5Encoder` tree.

Reads config.json and the weights: model.safetensors, a sharded model.safetensors.index.json,
pytorch_model.bin or a sharded pytorch_model.bin.index.json. Torch is only needed for .bin.
Decoder and LM-head tensors, if present, are ignored.
"""
from __future__ import annotations

import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samtone.models.t5 import FEED_FORWARD_PROJS, T5Config, T5Encoder

# transformers' own defaults for keys a config.json may leave out.
_HF_DEFAULTS = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu",
}
_EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}


def t5_config_from_hf(hf_config: dict, *, source: str = "config.json") -> T5Config:
    """Maps a Hugging Face T5 config.json dict onto `T5Config` (float32, no remat, no scan)."""
    values = {key: hf_config.get(key, default) for key, default in _HF_DEFAULTS.items()}
    if "num_layers" not in hf_config and "num_hidden_layers" in hf_config:
        values["num_layers"] = hf_config["num_hidden_layers"]
    if values["feed_forward_proj"] not in FEED_FORWARD_PROJS:
        raise ValueError(
            f"{source}: feed_forward_proj={values['feed_forward_proj']!r} is not supported; "
            f"expected one of {FEED_FORWARD_PROJS}"
        )
    return T5Config(**values)


def _hf_name(path: tuple[str, ...]) -> tuple[str | tuple[str, ...], bool]:
    """HF tensor name(s) for one of our parameter paths, and whether it needs a transpose.

    HF Linear weights are [out, in] (ours [in, out]); HF's relative_attention_bias is
    [buckets, heads] (ours [heads, buckets]).
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
            return [directory / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{directory}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        "or pytorch_model.bin.index.json"
    )


def _read_safetensors(file: pathlib.Path, wanted: set[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(file, framework="np") as f:
        names = wanted.intersection(f.keys())
        bf16 = {name for name in names if f.get_slice(name).get_dtype() == "BF16"}
        tensors.update({name: f.get_tensor(name).astype(np.float32) for name in names - bf16})
    if bf16:  # numpy has no bfloat16: read those through JAX, on the host.
        with jax.default_device(jax.devices("cpu")[0]), safe_open(file, framework="flax") as f:
            tensors.update({name: np.asarray(f.get_tensor(name), np.float32) for name in bf16})
    return tensors


def _read_torch(file: pathlib.Path, wanted: set[str]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{file}: reading a PyTorch .bin checkpoint needs torch installed") from error
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return {name: state[name].detach().to(torch.float32).numpy() for name in wanted.intersection(state)}


def load_hf_t5_encoder(path) -> tuple[T5Config, dict]:
    """Reads a Hugging Face T5 directory into (T5Config, params) of plain float32 numpy arrays.

    The params are the unscanned, unboxed `T5Encoder` tree (t5x names); use
    `samtone.models.t5.stack_layer_params` for a `scan_layers=True` model.
    """
    directory = pathlib.Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face T5 directory)")
    config = t5_config_from_hf(json.loads(config_file.read_text()), source=str(config_file))

    abstract = jax.eval_shape(
        lambda: T5Encoder(config).init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    )
    wanted_paths = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]
    names = {}
    for key_path, leaf in wanted_paths:
        our_path = tuple(k.key for k in key_path)
        names[our_path] = (*_hf_name(our_path), leaf.shape)
    wanted = set(_EMBEDDING_NAMES)
    for hf_name, _, _ in names.values():
        wanted.update([hf_name] if isinstance(hf_name, str) else hf_name)

    files = _weight_files(directory)
    tensors, origin = {}, {}
    for file in files:
        read = _read_safetensors if file.suffix == ".safetensors" else _read_torch
        found = read(file, wanted - tensors.keys())
        tensors.update(found)
        origin.update(dict.fromkeys(found, file))

    params = {}
    for our_path, (hf_name, transpose, shape) in names.items():
        candidates = [hf_name] if isinstance(hf_name, str) else list(hf_name)
        name = next((c for c in candidates if c in tensors), None)
        if name is None:
            raise ValueError(
                f"{', '.join(map(str, files))}: missing tensor {' or '.join(map(repr, candidates))} for {'/'.join(our_path)} "
                f"(config.json: num_layers={config.num_layers}, feed_forward_proj={config.feed_forward_proj!r})"
            )
        value = tensors[name].T if transpose else tensors[name]
        if value.shape != shape:
            raise ValueError(
                f"{origin[name]}: tensor {name!r} has shape {tensors[name].shape}; config.json implies "
                f"{shape[::-1] if transpose else shape} for {'/'.join(our_path)}"
            )
        node = params
        for key in our_path[:-1]:
            node = node.setdefault(key, {})
        node[our_path[-1]] = np.ascontiguousarray(value)
    return config, params
