"""Exporting a trained dual encoder for serving, and the `samtone-export` command line.

    samtone-export --model_dir=runs/base --export_dir=exports/base [--step=N] [--overwrite]

(the command line is samtone.cli.export) writes a self-contained directory:

  config.json              T5Config fields (of the unscanned layout below), architecture,
                           projection_dim, query_length, passage_length, step, platforms,
                           the samtone and jax versions
  params.safetensors       the parameters only (no optimiser state), in their training dtype,
                           one tensor per "/"-joined t5x name in the unscanned layout
                           (query_encoder/layers_0/attention/query/kernel, ...), so any
                           safetensors reader can load them
  spm.model                the SentencePiece vocabulary the run was trained with
  encode_queries.stablehlo, encode_passages.stablehlo
                           `jax.export` serialisations of the towers: (params, int32 token ids
                           [b, length]) -> float32 unit-norm embeddings [b, projection_dim], for
                           any batch size b; lengths are fixed (pad with 0 to them)

A server needs jax (with flatbuffers) and a safetensors reader, not samtone:

    import jax, safetensors.numpy
    params = safetensors.numpy.load_file("exports/base/params.safetensors")
    with open("exports/base/encode_queries.stablehlo", "rb") as f:
        encode_queries = jax.export.deserialize(bytearray(f.read()))
    embeddings = encode_queries.call(params, token_ids)   # token_ids int32 [b, query_length]

(`params` is the flat name -> array dict, as read.) samtone.inference.load_exported does this
and the tokenisation. Each module holds lowerings for cpu, cuda and tpu (`--platforms`): JAX
lowers for all three on any machine, without the hardware; a platform whose lowering fails is
dropped with a warning and config.json lists those kept.

The directory is written to a temporary sibling and renamed into place, so a reader never
sees half an export; an existing non-empty export_dir is replaced only with `overwrite`.
Local paths only for export_dir; model_dir may be any path etils understands (gs://...).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epath
from flax import traverse_util

import samtone
from samtone import inference
from samtone import run_manifest
from samtone.errors import CheckpointError, ConfigError, OutputExistsError
from samtone.checkpoints import manager as checkpoint_lib
from samtone.models import dual_encoder
from samtone.models import t5

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_model(model_dir: str | os.PathLike, export_dir: str | os.PathLike, *,
                 step: int | None = None, overwrite: bool = False,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
    """Exports checkpoint `step` (default: the newest) of the samtone-train run in `model_dir`.

    The model, lengths and vocabulary come from the run's manifest (`model.json`); only the
    parameters are read, on one device, whatever mesh wrote them.

    Returns:
      The config.json written.
    """
    _check_platforms(platforms)
    _check_target(export_dir, overwrite)
    run = run_manifest.read(model_dir)
    params, restored_step = checkpoint_lib.read_params(epath.Path(model_dir) / "checkpoints",
                                                       step=step)
    logging.info("read step %d of %s", restored_step, model_dir)
    return write_export(export_dir, model=run.model(), params=params,
                        vocabulary=run.vocabulary, query_length=run.query_length,
                        passage_length=run.passage_length, step=restored_step,
                        overwrite=overwrite, platforms=platforms)


def write_export(export_dir: str | os.PathLike, *, model: dual_encoder.DualEncoder, params: Any,
                 vocabulary: str | os.PathLike, query_length: int, passage_length: int,
                 step: int, overwrite: bool = False,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
    """Writes the export directory of `model` with `params` (either layer layout, boxed or not).

    Returns:
      The config.json written.
    """
    _check_platforms(platforms)
    _check_target(export_dir, overwrite)
    serving_model = serving_dual_encoder(model)
    flat = flatten_params(t5.unstack_layer_params(nn.unbox(params)))
    _check_params(flat, serving_model, query_length, passage_length)

    export_dir = os.path.abspath(os.fspath(export_dir))
    temporary = os.path.join(os.path.dirname(export_dir),
                             f".{os.path.basename(export_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(temporary)
    try:
        safetensors.numpy.save_file(flat, os.path.join(temporary, inference.PARAMS_FILE))
        with open(os.path.join(temporary, inference.VOCABULARY_FILE), "wb") as f:
            f.write(epath.Path(vocabulary).read_bytes())
        lengths = {"encode_queries": query_length, "encode_passages": passage_length}
        for method in inference.ENCODER_METHODS:
            exported = export_encoder(serving_model, flat, method, lengths[method], platforms)
            platforms = exported.platforms  # what worked for the first tower
            with open(os.path.join(temporary, inference.encoder_file(method)), "wb") as f:
                f.write(exported.serialize())
        config = {
            "format_version": inference.EXPORT_FORMAT_VERSION,
            "samtone_version": samtone.__version__,
            "jax_version": jax.__version__,
            "step": int(step),
            "architecture": serving_model.architecture,
            "projection_dim": serving_model.projection_dim,
            "query_length": int(query_length),
            "passage_length": int(passage_length),
            "t5_config": run_manifest.config_to_json(serving_model.config),
            "platforms": list(platforms),
        }
        config_path = os.path.join(temporary, inference.CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        # safetensors creates its file readable by the owner only; match the others.
        shutil.copymode(config_path, os.path.join(temporary, inference.PARAMS_FILE))
        _move_into_place(temporary, export_dir, overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logging.info("exported step %d to %s (platforms %s)", step, export_dir, ", ".join(platforms))
    return config


def serving_dual_encoder(model: dual_encoder.DualEncoder) -> dual_encoder.DualEncoder:
    """`model` with per-layer parameters (the exported layout) and no rematerialisation."""
    config = dataclasses.replace(model.config, scan_layers=False, remat_policy="none")
    return dual_encoder.DualEncoder(config, architecture=model.architecture,
                                    projection_dim=model.projection_dim)


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """A nested parameter tree as {"a/b/kernel": host array}."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    return {name: np.asarray(value) for name, value in flat.items()}


def unflatten_params(flat: dict[str, Any]) -> dict:
    """The nested tree of `flatten_params`' names."""
    return traverse_util.unflatten_dict(flat, sep="/")


def _check_params(flat: dict[str, np.ndarray], model: dual_encoder.DualEncoder,
                  query_length: int, passage_length: int) -> None:
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.PRNGKey(0), jnp.ones((1, query_length), jnp.int32),
        jnp.ones((1, passage_length), jnp.int32))["params"]))
    expected = {name: leaf.shape for name, leaf in
                traverse_util.flatten_dict(abstract, sep="/").items()}
    found = {name: value.shape for name, value in flat.items()}
    if expected != found:
        differences = sorted(
            f"{name}: model {expected.get(name)}, params {found.get(name)}"
            for name in set(expected) | set(found) if expected.get(name) != found.get(name))
        raise CheckpointError(f"the parameters do not fit the configured {model.architecture} model: "
                         + "; ".join(differences[:10]))


def export_encoder(model: dual_encoder.DualEncoder, flat_params: dict[str, np.ndarray],
                   method: str, length: int, platforms: Sequence[str]) -> jax.export.Exported:
    """`jax.export` of (flat params, int32 [b, length]) -> `model.<method>`, b symbolic.

    Lowers for all `platforms` at once; if that fails, for each alone, and keeps those that
    work (a warning names the others).
    """
    _check_platforms(platforms)
    def encode(params, token_ids):
        return model.apply({"params": unflatten_params(params)}, token_ids, method=method)

    params_spec = {name: jax.ShapeDtypeStruct(value.shape, value.dtype)
                   for name, value in flat_params.items()}
    (batch,) = jax.export.symbolic_shape("b")
    tokens_spec = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def lower(for_platforms):
        return jax.export.export(jax.jit(encode), platforms=tuple(for_platforms))(
            params_spec, tokens_spec)

    try:
        return lower(platforms)
    except Exception as error:  # pylint: disable=broad-except
        logging.warning("exporting %s for %s failed (%s); trying each platform", method,
                        ", ".join(platforms), error)
    working = []
    for platform in platforms:
        try:
            lower([platform])
            working.append(platform)
        except Exception as error:  # pylint: disable=broad-except
            logging.warning("cannot export %s for %s: %s", method, platform, error)
    if not working:
        raise RuntimeError(f"could not export {method} for any of the platforms {platforms}")
    return lower(working)


def _check_platforms(platforms: Sequence[str]) -> None:
    unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
    if unknown or not platforms:
        # jax.export lowers for any name without complaint; the module would never run.
        raise ConfigError(f"platforms must be some of {KNOWN_PLATFORMS}; got {list(platforms)} "
                         f"(unknown platforms {unknown})")


def _check_target(export_dir: str | os.PathLike, overwrite: bool) -> None:
    path = os.fspath(export_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"export_dir {path} is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise OutputExistsError(f"export_dir {path} exists and is not empty; choose another "
                              "directory or pass overwrite=True (--overwrite)")


def _move_into_place(temporary: str, export_dir: str, overwrite: bool) -> None:
    """Renames `temporary` to `export_dir`, replacing an empty (or, with overwrite, any) one."""
    _check_target(export_dir, overwrite)  # again: another writer may have come first
    if not os.path.exists(export_dir):
        os.rename(temporary, export_dir)
        return
    previous = f"{temporary}-previous"
    os.rename(export_dir, previous)
    os.rename(temporary, export_dir)
    shutil.rmtree(previous)
