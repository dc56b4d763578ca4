"""Pretrained T5 encoder checkpoints written here from random arrays, in the formats
INIT_CHECKPOINT reads: a Hugging Face folder (config.json and one model.safetensors, or
several files with model.safetensors.index.json, in float32 or bfloat16) and a T5X checkpoint
(msgpack `checkpoint` file; layer norms inline, the rest in zarr folders of several chunks)."""
import json
import pathlib

import flax.serialization
import ml_dtypes
import numpy as np
import safetensors.numpy
import tensorstore
from flax import traverse_util

from samtone.checkpoints import hf
from samtone.models import t5


def random_encoder(config: t5.T5Config, seed: int = 0) -> dict:
    """An unscanned T5Encoder parameter tree of float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict({
        path: rng.standard_normal(shape, np.float32)
        for path, shape in hf.encoder_shapes(config).items()})


def write_hf(folder, config: t5.T5Config, params: dict, *, files: int = 1,
             dtype=np.float32) -> pathlib.Path:
    """A Hugging Face T5 folder of `params`, its tensors spread over `files` safetensors."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance",
              "dropout_rate", "layer_norm_epsilon", "feed_forward_proj")
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "t5", **{name: getattr(config, name) for name in fields}}))
    tensors = {name: value.astype(dtype) for name, value in hf.to_hf_state_dict(params).items()}
    if files == 1:
        safetensors.numpy.save_file(tensors, folder / "model.safetensors")
        return folder
    names = sorted(tensors)
    weight_map = {name: f"model-{i % files + 1:05d}-of-{files:05d}.safetensors"
                  for i, name in enumerate(names)}
    for file in set(weight_map.values()):
        safetensors.numpy.save_file(
            {name: tensors[name] for name in names if weight_map[name] == file}, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def as_stored(params: dict, dtype) -> dict:
    """`params` as read back after being stored in `dtype` (float32 again)."""
    return {key: as_stored(value, dtype) if isinstance(value, dict)
            else value.astype(dtype).astype(np.float32) for key, value in params.items()}


def write_t5x(folder, params: dict, *, dtype=np.float32) -> pathlib.Path:
    """A T5X checkpoint of an encoder (t5x names: the embedding beside `encoder/`)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = {key: value for key, value in params.items() if key != "token_embedder"}
    target = {"token_embedder": params["token_embedder"], "encoder": encoder}
    flat = traverse_util.flatten_dict(target)
    for key, array in flat.items():
        if key[-1] == "scale":  # small arrays: inline in the msgpack file, as t5x does
            flat[key] = array.astype(dtype)
            continue
        name = "target." + ".".join(key)
        metadata = {"shape": list(array.shape),
                    "chunks": [max(1, (size + 2) // 3) for size in array.shape],  # uneven edges
                    "dtype": "bfloat16" if dtype == ml_dtypes.bfloat16 else np.dtype(dtype).str,
                    "compressor": {"id": "gzip", "level": 1}}
        store = tensorstore.open({"driver": "zarr", "kvstore": {
            "driver": "file", "path": str(folder / name)}, "metadata": metadata},
            create=True, open=False).result()
        store.write(array.astype(dtype)).result()
        flat[key] = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": name},
                     "metadata": metadata}
    contents = {"version": 3, "optimizer": {"target": traverse_util.unflatten_dict(flat),
                                            "state": {"step": np.int32(1)}}}
    (folder / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(contents))
    return folder
