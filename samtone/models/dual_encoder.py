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

from samtone.models.t5 import T5Config, T5Encoder
from samtone.normalize import l2_normalize

ARCHITECTURES = ("sde", "ade", "ade_spl")


def mean_pool(hidden, token_ids):
    """Average of hidden [B, L, E] over positions with token id != 0, in float32: [B, E]."""
    mask = (token_ids != 0).astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=-2)
    return total / jnp.maximum(jnp.sum(mask, axis=-2), 1.0)


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


def tower_params(encoder_params: dict, architecture: str, projection: dict | None = None) -> dict:
    """A (partial) DualEncoder parameter tree with `encoder_params` in every encoder tower.

    The one way a pretrained encoder enters a dual encoder: ADE and ADE-SPL start with the same
    encoder in both towers (the arrays are shared until placed on devices); a given projection
    goes into every projection layer, otherwise the tree has none and the caller initialises
    it (samtone.train_step.init_train_state(init_params=...)).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    towers = ("encoder",) if architecture == "sde" else ("query_encoder", "passage_encoder")
    tree = {tower: encoder_params for tower in towers}
    if projection is not None:
        projections = (("query_projection_layer", "passage_projection_layer")
                       if architecture == "ade" else ("projection_layer",))
        tree.update({name: projection for name in projections})
    return tree
