"""The one L2 normaliser of embeddings, shared by the model, the losses and evaluation.

    l2_normalize(x) = x / max(|x|, 1e-12)      along the last axis

This is torch.nn.functional.normalize's rule, which sentence-transformers' `Normalize` uses,
so exported models and the references the tests compare against normalise the same way. An
all-zero row (a text of padding only) stays zero, with finite gradients. jax arrays (and
tracers) are normalised in float32 with jax; numpy arrays in their float dtype with numpy, so
host-side evaluation never moves a corpus to a device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-12


def l2_normalize(x):
    """x / max(|x|, 1e-12) along the last axis (float32 for jax, float32/64 for numpy)."""
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        x = np.asarray(x)
        x = x.astype(x.dtype if x.dtype == np.float64 else np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPSILON)
    x = jnp.asarray(x, jnp.float32)
    squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, EPSILON**2))
