"""The parameters every export format writes: unscanned, unboxed, checked against the model.

Exports use the per-layer layout (`layers_0`, `layers_1`, ...) whatever layout training
used, and "/"-joined t5x names where a format wants a flat dict
(`query_encoder/layers_0/attention/query/kernel`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from samtone import run_manifest
from samtone.models import dual_encoder
from samtone.models import t5


def serving_dual_encoder(model: dual_encoder.DualEncoder) -> dual_encoder.DualEncoder:
    """`model` with per-layer parameters (the exported layout) and no rematerialisation."""
    config = dataclasses.replace(model.config, scan_layers=False, remat_policy="none")
    return dual_encoder.DualEncoder(config, architecture=model.architecture,
                                    projection_dim=model.projection_dim)


def serving_params(params: Any) -> dict:
    """`params` (either layer layout, boxed or not, with or without a "params" key) as the
    plain per-layer tree."""
    params = t5.unstack_layer_params(nn.unbox(params))
    return params.get("params", params)


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """A nested parameter tree as {"a/b/kernel": host array}, one array fetched at a time."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {name: np.asarray(jax.device_get(value)) for name, value in flat.items()}


def unflatten_params(flat: dict[str, Any]) -> dict:
    """The nested tree of `flatten_params`' names."""
    return traverse_util.unflatten_dict(flat, sep="/")


def expected_shapes(model: dual_encoder.DualEncoder, query_length: int = 1,
                    passage_length: int = 1) -> dict[str, tuple[int, ...]]:
    """"/"-joined name -> shape of every parameter of `model` (its own layer layout)."""
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.PRNGKey(0), jnp.ones((1, query_length), jnp.int32),
        jnp.ones((1, passage_length), jnp.int32))["params"]))
    return {name: leaf.shape for name, leaf in
            traverse_util.flatten_dict(abstract, sep="/").items()}


def check_params(params: dict, model: dual_encoder.DualEncoder, *,
                 where: str = "the checkpoint") -> None:
    """Refuses the nested `params` unless they are exactly `model`'s (nothing is fetched)."""
    found = {name: tuple(np.shape(value))
             for name, value in traverse_util.flatten_dict(params, sep="/").items()}
    run_manifest.check_shapes(found, expected_shapes(model), where=where,
                              what=f"the {model.architecture} model of the manifest")
