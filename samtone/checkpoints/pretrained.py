"""Pre-trained encoder weights for a dual encoder's towers: `INIT_CHECKPOINT`.

A folder with `model.json` is a samtone checkpoint (a samtone-convert output, or another
run's MODEL_DIR: its newest checkpoint), a folder with `config.json` is read as Hugging Face
T5, a folder with a `checkpoint` file (or that file itself) as T5X. A plain T5 encoder goes
into every encoder tower (ADE and ADE-SPL start with two copies) and the projection starts
from random init, as in the paper; a t5x_retrieval dual encoder, or a samtone checkpoint with
a trained projection, also brings its projection. The result is a partial parameter tree for
`samtone.train_step.init_train_state(init_params=...)`. The leaves of a Hugging Face or T5X
checkpoint are not read here: they are `samtone.checkpoints.lazy.LazyArray`s, which
init_train_state reads slice by slice, each process only the shards its devices hold (a host
never holds the whole encoder).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from samtone import run_manifest
from samtone.checkpoints import hf
from samtone.checkpoints import t5x
from samtone.errors import CheckpointError, MissingFileError
from samtone.models import dual_encoder

_SHAPE_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "feed_forward_proj")


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"samtone", "hf" or "t5x": what `path` holds; a MissingFileError says what was looked for."""
    path = os.fspath(path)
    hf_config = os.path.join(path, "config.json")
    t5x_file = path if os.path.isfile(path) else os.path.join(path, t5x.CHECKPOINT_FILE)
    if os.path.isfile(os.path.join(path, run_manifest.MANIFEST_FILE)):
        return "samtone"
    if os.path.isfile(hf_config):
        return "hf"
    if "://" in path or os.path.isfile(t5x_file):
        return "t5x"
    found = "it does not exist" if not os.path.exists(path) else (
        f"it holds {sorted(os.listdir(path))[:8]}" if os.path.isdir(path) else "it is a file")
    raise MissingFileError(
        f"INIT_CHECKPOINT {path!r} is neither a Hugging Face T5 folder (looked for "
        f"{hf_config}) nor a T5X checkpoint (looked for {t5x_file}) nor a samtone checkpoint "
        f"(model.json); {found}")


def load_encoder_params(path: str | os.PathLike, model: dual_encoder.DualEncoder) -> dict:
    """Pre-trained weights for `model`'s towers from a samtone, Hugging Face or T5X checkpoint
    (Hugging Face and T5X arrays lazy: read when init_train_state places them)."""
    path = os.fspath(path)
    kind = checkpoint_kind(path)
    if kind == "samtone":
        return _samtone_params(path, model)
    if kind == "hf":
        config, encoder = hf.hf_t5_encoder_arrays(path)
        _check_same_shape(config, model.config, path)
        return dual_encoder.tower_params(encoder, model.architecture)
    t5x_params = t5x.open_t5x_checkpoint(path)
    if "projection_layer" in t5x_params.get("params", t5x_params):
        return t5x.t5x_dual_encoder_to_samtone(t5x_params, model.architecture)
    return dual_encoder.tower_params(t5x.t5x_encoder_to_samtone(t5x_params), model.architecture)


def _samtone_params(path: str, model: dual_encoder.DualEncoder) -> dict:
    """The towers (and a trained projection) of a samtone checkpoint's newest step."""
    run = run_manifest.read(path)
    _check_same_shape(run.t5_config, model.config, path)
    params, _, _, _ = run_manifest.read_params(path, run)
    projection_trained = (run.converted_from or {}).get("projection") != "identity"
    if run.architecture == model.architecture:
        encoders = {name: value for name, value in params.items() if name.endswith("encoder")}
        projections = {name: value for name, value in params.items()
                       if name.endswith("projection_layer")}
    elif run.architecture == "sde":
        encoders = dual_encoder.tower_params(params["encoder"], model.architecture)
        projections = {name: params["projection_layer"] for name in dual_encoder.tower_params(
            {}, model.architecture, projection={}) if name.endswith("projection_layer")}
    else:
        raise CheckpointError(
            f"INIT_CHECKPOINT {path} is an {run.architecture} model, which initialises only "
            f"an {run.architecture} model (an sde initialises any), but the configured model "
            f"is {model.architecture} (gin: dual_encoder.architecture)")
    if not projection_trained:
        return _distinct(encoders)
    for name, projection in projections.items():
        found, expected = tuple(projection["kernel"].shape), (model.config.d_model,
                                                             model.projection_dim)
        if found != expected:
            raise CheckpointError(
                f"INIT_CHECKPOINT {path}: {name}/kernel has shape {found}, the configured model "
                f"needs {expected} (gin: dual_encoder.projection_dim = {model.projection_dim})")
    return _distinct({**encoders, **projections})


def _distinct(tree: dict) -> dict:
    """`tree` with every device array appearing once: a tower sharing another's arrays gets
    copies (the train step donates its parameters, one buffer each)."""
    seen = set()

    def distinct(leaf):
        if id(leaf) in seen:
            return jnp.array(leaf, copy=True)
        seen.add(id(leaf))
        return leaf

    return jax.tree.map(distinct, tree)


def _check_same_shape(found, expected, path) -> None:
    different = {f: (getattr(found, f), getattr(expected, f)) for f in _SHAPE_FIELDS
                 if getattr(found, f) != getattr(expected, f)}
    if different:
        details = ", ".join(f"{f}: checkpoint {a} vs config {b}" for f, (a, b) in different.items())
        raise CheckpointError(f"init checkpoint {path} does not match the configured model "
                              f"(gin: t5_1_1_config.*): {details}")
