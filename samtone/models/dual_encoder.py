"""Dual encoders over T5.1.1 towers: SDE, ADE and ADE-SPL.

- sde:     one tower and one projection shared by queries and passages.
- ade:     a query tower and a passage tower, each with its own projection.
- ade_spl: two towers sharing one projection layer (the SamToNe paper's best asymmetric variant).

Each text is mean-pooled over its real tokens (id != 0), projected without bias and
L2-normalised in float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from samtone.models.t5 import T5Config, T5Encoder, stack_layer_params, unstack_layer_params

ARCHITECTURES = ("sde", "ade", "ade_spl")


def mean_pool(hidden, token_ids):
    """Average of hidden [B, L, E] over positions with token id != 0, in float32: [B, E]."""
    mask = (token_ids != 0).astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=-2)
    return total / jnp.maximum(jnp.sum(mask, axis=-2), 1.0)


def l2_normalize(x, eps: float = 1e-12):
    """x / ||x|| in float32; an all-zero row stays zero (and has finite gradients)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


class DualEncoder(nn.Module):
    """Two-tower retrieval model returning unit-norm [B, projection_dim] embeddings."""

    config: T5Config
    architecture: str = "ade_spl"
    projection_dim: int = 768

    def setup(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}")
        if self.architecture == "sde":
            self.encoder = T5Encoder(self.config)
        else:
            self.query_encoder = T5Encoder(self.config)
            self.passage_encoder = T5Encoder(self.config)
        if self.architecture == "ade":
            self.query_projection_layer = self._projection()
            self.passage_projection_layer = self._projection()
        else:
            self.projection_layer = self._projection()

    def _projection(self):
        return nn.Dense(
            self.projection_dim, use_bias=False, dtype=self.config.dtype, param_dtype=self.config.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"), ("embed", "projection")
            ),
        )

    def _tower(self, side: str):
        """(encoder, projection) that embeds the `side` ("query" or "passage") texts."""
        if self.architecture == "sde":
            return self.encoder, self.projection_layer
        encoder = self.query_encoder if side == "query" else self.passage_encoder
        if self.architecture == "ade":
            return encoder, (self.query_projection_layer if side == "query" else self.passage_projection_layer)
        return encoder, self.projection_layer

    def _encode(self, side, token_ids, deterministic):
        encoder, projection = self._tower(side)
        pooled = mean_pool(encoder(token_ids, deterministic=deterministic), token_ids)
        return l2_normalize(projection(pooled.astype(self.config.dtype)))

    def encode_queries(self, token_ids, *, deterministic: bool = True):
        """Query token ids [B, Lq] -> unit-norm embeddings [B, projection_dim] float32."""
        return self._encode("query", token_ids, deterministic)

    def encode_passages(self, token_ids, *, deterministic: bool = True):
        """Passage token ids [B, Lp] -> unit-norm embeddings [B, projection_dim] float32."""
        return self._encode("passage", token_ids, deterministic)

    def __call__(self, query_tokens, passage_tokens, negative_tokens=None, *, deterministic: bool = True):
        """Returns {"query": [B, D], "passage": [B, D]} and "negatives" [B, K, D] for [B, K, Lp]."""
        outputs = {
            "query": self.encode_queries(query_tokens, deterministic=deterministic),
            "passage": self.encode_passages(passage_tokens, deterministic=deterministic),
        }
        if negative_tokens is not None:
            batch, num_negatives, length = negative_tokens.shape
            negatives = self.encode_passages(negative_tokens.reshape(batch * num_negatives, length),
                                             deterministic=deterministic)
            outputs["negatives"] = negatives.reshape(batch, num_negatives, -1)
        return outputs


def init_from_encoder(dual_params, encoder_params):
    """Copies a pretrained `T5Encoder` tree into every tower of a dual-encoder tree.

    `dual_params` is the DualEncoder's params (optionally under "params", boxed or not);
    `encoder_params` a T5Encoder tree such as `load_hf_t5_encoder` returns, in either layer
    layout (it is restacked to match). Projections keep their initial values; leaves keep
    the dual tree's dtype and boxing.
    """
    if "params" in dual_params:
        return {**dual_params, "params": init_from_encoder(dual_params["params"], encoder_params)}
    encoder_params = nn.unbox(encoder_params)
    encoder_params = encoder_params.get("params", encoder_params)
    towers = [name for name in dual_params if name.endswith("encoder")]
    if not towers:
        raise ValueError(f"init_from_encoder: no '*encoder' tower in dual-encoder params {sorted(dual_params)}")
    result = dict(dual_params)
    for tower in towers:
        target = dual_params[tower]
        if "layers" in target and "layers" not in encoder_params:
            source = stack_layer_params(encoder_params, len([k for k in encoder_params if k.startswith("layers_")]))
        elif "layers" not in target and "layers" in encoder_params:
            source = unstack_layer_params(encoder_params)
        else:
            source = encoder_params
        result[tower] = _copy_into(target, source, tower)
    return result


def _copy_into(target, source, where: str):
    """`source` values in `target`'s structure, dtype and boxing; errors name the path."""
    if isinstance(target, nn.Partitioned):
        return target.replace_boxed(_copy_into(target.unbox(), source, where))
    if isinstance(target, dict):
        if not isinstance(source, dict) or set(source) != set(target):
            found = sorted(source) if isinstance(source, dict) else type(source).__name__
            raise ValueError(f"init_from_encoder: at {where} expected keys {sorted(target)}, found {found}")
        return {key: _copy_into(target[key], source[key], f"{where}/{key}") for key in target}
    if tuple(source.shape) != tuple(target.shape):
        raise ValueError(f"init_from_encoder: {where} has shape {tuple(target.shape)}; the encoder gives "
                         f"{tuple(source.shape)}")
    # astype keeps numpy on the host: a large checkpoint is placed (sharded) by the caller.
    return source.astype(target.dtype)
