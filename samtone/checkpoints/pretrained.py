"""Pre-trained encoder weights for a dual encoder's towers: `INIT_CHECKPOINT`.

A folder with `config.json` is read as Hugging Face T5, a folder with a `checkpoint` file (or
that file itself) as T5X. A plain T5 encoder goes into every encoder tower (ADE and ADE-SPL
start with two copies) and the projection starts from random init, as in the paper; a
t5x_retrieval dual encoder also brings its projection. The result is a partial parameter
tree for `samtone.train_step.init_train_state(init_params=...)`.
"""
from __future__ import annotations

import os

from samtone.checkpoints import hf
from samtone.checkpoints import t5x
from samtone.errors import CheckpointError, MissingFileError
from samtone.models import dual_encoder

_SHAPE_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "feed_forward_proj")


def load_encoder_params(path: str | os.PathLike, model: dual_encoder.DualEncoder) -> dict:
    """Pre-trained weights for `model`'s towers from a Hugging Face or T5X checkpoint."""
    path = os.fspath(path)
    hf_config = os.path.join(path, "config.json")
    t5x_file = path if os.path.isfile(path) else os.path.join(path, t5x.CHECKPOINT_FILE)
    if os.path.isfile(hf_config):
        config, encoder = hf.load_hf_t5_encoder(path)
        _check_same_shape(config, model.config, path)
        return dual_encoder.tower_params(encoder, model.architecture)
    if "://" in path or os.path.isfile(t5x_file):
        t5x_params = t5x.load_t5x_checkpoint(path)
        if "projection_layer" in t5x_params.get("params", t5x_params):
            return t5x.t5x_dual_encoder_to_samtone(t5x_params, model.architecture)
        return dual_encoder.tower_params(t5x.t5x_encoder_to_samtone(t5x_params),
                                         model.architecture)
    found = "it does not exist" if not os.path.exists(path) else (
        f"it holds {sorted(os.listdir(path))[:8]}" if os.path.isdir(path) else "it is a file")
    raise MissingFileError(
        f"INIT_CHECKPOINT {path!r} is neither a Hugging Face T5 folder (looked for "
        f"{hf_config}) nor a T5X checkpoint (looked for {t5x_file}); {found}")


def _check_same_shape(found, expected, path) -> None:
    different = {f: (getattr(found, f), getattr(expected, f)) for f in _SHAPE_FIELDS
                 if getattr(found, f) != getattr(expected, f)}
    if different:
        details = ", ".join(f"{f}: checkpoint {a} vs config {b}" for f, (a, b) in different.items())
        raise CheckpointError(f"init checkpoint {path} does not match the configured model "
                              f"(gin: t5_1_1_config.*): {details}")
