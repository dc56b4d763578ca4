"""Dual encoders over T5.1.1 towers: SDE, ADE and ADE-SPL.

- sde:     one tower and one projection shared by queries and passages.
- ade:     a query tower and a passage tower, each with its own projection.
- ade_spl: two towers sharing one projection layer (the SamToNe paper's best asymmetric variant).

Each text is mean-pooled over its real tokens (id != 0), projected without bias and
L2-normalised, pooling and projection in float32 whatever the activation dtype (at
temperature 0.01 the logits are 100 x cosine, so bfloat16's 3 digits would show).

A tower takes one text per row, or packed rows (`segment_ids`, as t5x packs encoder inputs):
text t is the tokens whose segment id is t + 1, pooled on its own, and the tower returns one
embedding per text in text order, equal to that of the text in a row of its own.
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


def segment_mean_pool(hidden, segment_ids, num_texts: int):
    """Per-text average of packed hidden [R, L, E], in float32: [num_texts, E].

    Text t is the positions with segment id t + 1 (0 = padding, dropped); a text with no
    tokens gets zeros.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
    flat_segments = segment_ids.reshape(-1)
    total = jax.ops.segment_sum(flat_hidden, flat_segments, num_segments=num_texts + 1)[1:]
    count = jax.ops.segment_sum(jnp.ones_like(flat_segments, jnp.float32), flat_segments,
                                num_segments=num_texts + 1)[1:]
    return total / jnp.maximum(count, 1.0)[:, None]


class DualEncoder(nn.Module):
    """Two-tower retrieval model returning unit-norm [B, projection_dim] embeddings."""

    config: T5Config
    architecture: str = "ade_spl"
    projection_dim: int = 768

    def setup(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {self.architecture!r}; "
                             f"valid: {', '.join(ARCHITECTURES)}")
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
        # float32 whatever config.dtype: the pooled vector is the embedding's only input.
        return nn.Dense(
            self.projection_dim, use_bias=False, dtype=jnp.float32,
            param_dtype=self.config.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                ("embed", "projection")
            ),
        )

    def _tower(self, side: str):
        """(encoder, projection) that embeds the `side` ("query" or "passage") texts."""
        if self.architecture == "sde":
            return self.encoder, self.projection_layer
        encoder = self.query_encoder if side == "query" else self.passage_encoder
        if self.architecture == "ade":
            return encoder, (self.query_projection_layer if side == "query"
                             else self.passage_projection_layer)
        return encoder, self.projection_layer

    def _encode(self, side, token_ids, segment_ids, num_texts, deterministic):
        encoder, projection = self._tower(side)
        hidden = encoder(token_ids, segment_ids=segment_ids, deterministic=deterministic)
        if segment_ids is None:
            pooled = mean_pool(hidden, token_ids)
        else:
            if num_texts is None:
                raise ValueError("packed token ids (segment_ids given) need num_texts, the "
                                 "number of texts packed into the rows")
            pooled = segment_mean_pool(hidden, segment_ids, num_texts)
        return l2_normalize(projection(pooled))

    def encode_queries(self, token_ids, *, segment_ids=None, num_texts: int | None = None,
                       deterministic: bool = True):
        """Query token ids [B, Lq] -> unit-norm embeddings [B, projection_dim] float32.

        Packed rows: `segment_ids` [R, Lq] and `num_texts` give [num_texts, projection_dim].
        """
        return self._encode("query", token_ids, segment_ids, num_texts, deterministic)

    def encode_passages(self, token_ids, *, segment_ids=None, num_texts: int | None = None,
                        deterministic: bool = True):
        """Passage token ids [B, Lp] -> unit-norm embeddings [B, projection_dim] float32.

        Packed rows: `segment_ids` [R, Lp] and `num_texts` give [num_texts, projection_dim].
        """
        return self._encode("passage", token_ids, segment_ids, num_texts, deterministic)

    def __call__(self, query_tokens, passage_tokens, negative_tokens=None, *,
                 query_segment_ids=None, passage_segment_ids=None,
                 num_examples: int | None = None, num_negatives: int = 0,
                 deterministic: bool = True):
        """Returns {"query": [B, D], "passage": [B, D]} and "negatives" [B, K, D].

        One text per row: query_tokens [B, Lq], passage_tokens [B, Lp], negative_tokens
        [B, K, Lp]. Packed (segment ids given): the B queries in query_tokens [Rq, Lq]; the B
        passages then the B * K negatives (example-major) in passage_tokens [Rp, Lp];
        `num_examples` = B and `num_negatives` = K say how many texts there are.

        Hard negatives go through the passage tower in the same call as the passages.
        """
        packed = query_segment_ids is not None
        if packed:
            if passage_segment_ids is None or num_examples is None:
                raise ValueError("packed batches need query_segment_ids, passage_segment_ids "
                                 "and num_examples")
            batch_size = num_examples
            passage_texts = passage_tokens
        else:
            batch_size = query_tokens.shape[0]
            passage_texts = passage_tokens
            if negative_tokens is not None:
                num_negatives = negative_tokens.shape[1]
                passage_texts = jnp.concatenate(
                    [passage_tokens, negative_tokens.reshape(-1, negative_tokens.shape[-1])])
        queries = self.encode_queries(query_tokens, segment_ids=query_segment_ids,
                                      num_texts=batch_size if packed else None,
                                      deterministic=deterministic)
        passages = self.encode_passages(
            passage_texts, segment_ids=passage_segment_ids,
            num_texts=batch_size * (1 + num_negatives) if packed else None,
            deterministic=deterministic)
        outputs = {"query": queries, "passage": passages[:batch_size]}
        if num_negatives:
            outputs["negatives"] = passages[batch_size:].reshape(batch_size, num_negatives, -1)
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
