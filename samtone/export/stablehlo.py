"""Format `jax`: the parameters as safetensors and `jax.export` StableHLO of both towers.

  params.safetensors       the parameters only (no optimiser state), in their training dtype,
                           one tensor per "/"-joined t5x name in the unscanned layout
                           (query_encoder/layers_0/attention/query/kernel, ...), so any
                           safetensors reader can load them
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

(`params` is the flat name -> array dict, as read.) samtone.inference.Encoder.load does this
and the tokenisation. Each module holds lowerings for cpu, cuda and tpu (`platforms`): JAX
lowers for all three on any machine, without the hardware; a platform whose lowering fails is
dropped with a warning, and the manifest's "platforms" lists those kept.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging

from samtone.errors import CheckpointError, ConfigError, MissingFileError
from samtone.export import params as params_lib
from samtone.models import dual_encoder

PARAMS_FILE = "params.safetensors"
ENCODER_METHODS = ("encode_queries", "encode_passages")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def encoder_file(method: str) -> str:
    """File name of the serialised StableHLO of `method` ("encode_queries", ...)."""
    return f"{method}.stablehlo"


def write_params(folder: str, flat: dict[str, np.ndarray]) -> None:
    """params.safetensors of the flat name -> array dict."""
    safetensors.numpy.save_file(flat, os.path.join(folder, PARAMS_FILE))


def write_files(folder: str, *, model: dual_encoder.DualEncoder, flat: dict[str, np.ndarray],
                query_length: int, passage_length: int,
                platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
    """Writes params.safetensors and both towers' StableHLO into `folder`; returns the
    manifest's format fields ({"platforms": those that lowered})."""
    check_platforms(platforms)
    write_params(folder, flat)
    lengths = {"encode_queries": query_length, "encode_passages": passage_length}
    for method in ENCODER_METHODS:
        exported = export_encoder(model, flat, method, lengths[method], platforms)
        platforms = exported.platforms  # what worked for the first tower
        with open(os.path.join(folder, encoder_file(method)), "wb") as f:
            f.write(exported.serialize())
    return {"platforms": list(platforms)}


def export_encoder(model: dual_encoder.DualEncoder, flat_params: dict[str, np.ndarray],
                   method: str, length: int, platforms: Sequence[str]) -> jax.export.Exported:
    """`jax.export` of (flat params, int32 [b, length]) -> `model.<method>`, b symbolic.

    Lowers for all `platforms` at once; if that fails, for each alone, and keeps those that
    work (a warning names the others).
    """
    check_platforms(platforms)

    def encode(params, token_ids):
        return model.apply({"params": params_lib.unflatten_params(params)}, token_ids,
                           method=method)

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


def check_platforms(platforms: Sequence[str]) -> None:
    unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
    if unknown or not platforms:
        # jax.export lowers for any name without complaint; the module would never run.
        raise ConfigError(f"--platforms must be some of {KNOWN_PLATFORMS}; got "
                          f"{list(platforms)} (unknown platforms {unknown})")


def read_encoders(folder: str | os.PathLike, device_params: dict) -> dict:
    """method -> jitted (int32 tokens [b, L]) -> embeddings, from the folder's StableHLO.

    Each module runs on the platforms it was exported for (the manifest's "platforms");
    calling it elsewhere fails with JAX's error naming both.
    """
    encoders = {}
    missing = [encoder_file(method) for method in ENCODER_METHODS
               if not os.path.isfile(os.path.join(os.fspath(folder), encoder_file(method)))]
    if missing:
        raise MissingFileError(f"{folder} is not a complete samtone-export folder: missing "
                               f"{', '.join(missing)}")
    for method in ENCODER_METHODS:
        path = os.path.join(os.fspath(folder), encoder_file(method))
        with open(path, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        call = jax.jit(exported.call)
        encoders[method] = lambda tokens, call=call: call(device_params, tokens)
    return encoders


def read_params(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat name -> array dict of the folder's params.safetensors."""
    path = os.path.join(os.fspath(folder), PARAMS_FILE)
    if not os.path.isfile(path):
        raise MissingFileError(f"{folder} is not a complete samtone-export folder: missing "
                               f"{PARAMS_FILE}")
    try:
        return safetensors.numpy.load_file(path)
    except Exception as error:  # pylint: disable=broad-except  (SafetensorError, OSError)
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or "
                              f"damaged?): {type(error).__name__}: {error}") from error
