"""The T5.1.1 encoder in Flax linen, with t5x parameter names and logical axis names.

T5.1.1 differs from the original T5 (1.0) by a gated-GELU feed-forward block, no parameter
sharing between embedding and classifier, and no dropout in pre-training; both use pre-norm
RMSNorm without bias or mean subtraction, unscaled attention logits (the 1/sqrt(d_kv) lives in
the query initialiser) and a bucketed relative position bias shared by all layers.

Packed rows (as t5x packs encoder inputs): with `segment_ids`, several texts share one row and
a token attends only to tokens of its own segment. The position bias depends on key - query
only, so within a segment it is the bias of the text alone: each text's hidden states equal
those of the text in a row of its own.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEED_FORWARD_PROJS = ("gated-gelu", "relu")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Encoder hyperparameters; field names follow Hugging Face's `T5Config`."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "relu" = T5 1.0 (mlp/wi), for old t5x checkpoints
    dtype: Any = jnp.float32  # activations
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"  # "none" | "full" | "dots" (jax.checkpoint_policies)
    scan_layers: bool = False

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r}; "
                f"expected one of {FEED_FORWARD_PROJS}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"T5Config.remat_policy={self.remat_policy!r}; "
                             f"expected one of {REMAT_POLICIES}")


T5_1_1_PRESETS: dict[str, T5Config] = {
    "tiny": T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "small": T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "large": T5Config(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "xl": T5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


def t5_1_1_config(size: str, **overrides) -> T5Config:
    """The published T5.1.1 encoder of `size`, with any field replaced by `overrides`."""
    if size not in T5_1_1_PRESETS:
        raise ValueError(f"Unknown T5.1.1 size {size!r}; valid sizes: {', '.join(T5_1_1_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"Unknown T5Config field(s) {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(T5_1_1_PRESETS[size], **overrides)


def _normal(stddev: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _dense(cfg: T5Config, name: str, features: int, stddev: float,
           axes: tuple[str, str]) -> nn.Dense:
    """Bias-free projection with T5's normal(stddev) init and logical axes (input, output)."""
    return nn.Dense(features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=_normal(stddev, axes), name=name)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of (key - query) for every pair: int32 [length, length].

    Half the buckets per direction are exact offsets, the rest log-spaced up to max_distance.
    Computed in float32 like Mesh TensorFlow and HF so bucket edges match pretrained models.
    """
    position = np.arange(length, dtype=np.int64)
    relative = position[None, :] - position[:, None]
    num_buckets //= 2
    buckets = (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
    max_exact = num_buckets // 2
    # max(., 1) avoids log(0); those small distances take the exact branch anyway.
    scaled = np.maximum(distance, 1).astype(np.float32) / max_exact
    log_ratio = np.log(scaled) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class RMSNorm(nn.Module):
    """Scale-only layer norm; the variance is computed in float32 whatever the activations."""

    config: T5Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
            cfg.param_dtype
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                                  + cfg.layer_norm_epsilon)
        return x32.astype(cfg.dtype) * jnp.asarray(scale, cfg.dtype)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar for each relative-position bucket: [1, heads, L, L] float32."""

    config: T5Config

    @nn.compact
    def __call__(self, length: int):
        cfg = self.config
        rel_embedding = self.param(
            "rel_embedding",
            _normal(cfg.d_model**-0.5, ("heads", "relpos_buckets")),  # HF's init
            (cfg.num_heads, cfg.relative_attention_num_buckets),
            cfg.param_dtype,
        )
        buckets = relative_position_buckets(
            length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        return jnp.take(rel_embedding.astype(jnp.float32), buckets, axis=1)[None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with the position bias added to unscaled logits."""

    config: T5Config

    @nn.compact
    def __call__(self, x, position_bias, mask_bias, deterministic: bool):
        """`mask_bias`: float32 broadcastable to [batch, heads, query, key], 0 where a query
        attends to a key and MASKED_LOGIT where it does not (`attention_mask_bias`)."""
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv

        def heads(y):
            y = y.reshape(*y.shape[:-1], cfg.num_heads, cfg.d_kv)
            return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

        # The query init carries T5's 1/sqrt(d_kv), so logits are used unscaled.
        query = heads(_dense(cfg, "query", inner, (cfg.d_model * cfg.d_kv) ** -0.5,
                             ("embed", "joined_kv"))(x))
        key = heads(_dense(cfg, "key", inner, cfg.d_model**-0.5, ("embed", "joined_kv"))(x))
        value = heads(_dense(cfg, "value", inner, cfg.d_model**-0.5, ("embed", "joined_kv"))(x))

        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
        logits = logits + position_bias + mask_bias
        weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
        weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)

        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        context = nn.with_logical_constraint(context, ("batch", "length", "heads", "kv"))
        context = context.reshape(*context.shape[:2], inner)
        return _dense(cfg, "out", cfg.d_model, inner**-0.5, ("joined_kv", "embed"))(context)


class Mlp(nn.Module):
    """Gated-GELU (T5.1.1: wi_0, wi_1) or ReLU (T5 1.0: wi) feed-forward block."""

    config: T5Config

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        if cfg.feed_forward_proj == "gated-gelu":
            gate = nn.gelu(_dense(cfg, "wi_0", cfg.d_ff, cfg.d_model**-0.5, ("embed", "mlp"))(x),
                           approximate=True)
            hidden = gate * _dense(cfg, "wi_1", cfg.d_ff, cfg.d_model**-0.5, ("embed", "mlp"))(x)
        else:
            hidden = nn.relu(_dense(cfg, "wi", cfg.d_ff, cfg.d_model**-0.5, ("embed", "mlp"))(x))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
        return _dense(cfg, "wo", cfg.d_model, cfg.d_ff**-0.5, ("mlp", "embed"))(hidden)


class EncoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, each with a dropped-out residual."""

    config: T5Config
    scanned: bool = False  # under nn.scan the layer must return (carry, per-step output)

    @nn.compact
    def __call__(self, hidden, position_bias, mask_bias, deterministic: bool):
        cfg = self.config
        x = RMSNorm(cfg, name="pre_attention_layer_norm")(hidden)
        x = SelfAttention(cfg, name="attention")(x, position_bias, mask_bias, deterministic)
        hidden = hidden + nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = RMSNorm(cfg, name="pre_mlp_layer_norm")(hidden)
        x = Mlp(cfg, name="mlp")(x, deterministic)
        hidden = hidden + nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        return (hidden, None) if self.scanned else hidden


def _layer_class(config: T5Config):
    if config.remat_policy == "none":
        return EncoderLayer
    policy = None if config.remat_policy == "full" else jax.checkpoint_policies.checkpoint_dots
    # static_argnums counts `self` as 0: `deterministic` is a Python bool.
    return nn.remat(EncoderLayer, policy=policy, static_argnums=(4,),
                    prevent_cse=not config.scan_layers)


def attention_mask(token_ids, segment_ids=None):
    """Which keys each query attends to, bool, broadcastable to [B, heads, L, L].

    One text per row: every real token (id != 0), [B, 1, 1, L]. Packed rows: the tokens of
    the query's own segment (segment id 0 = padding), [B, 1, L, L].
    """
    if segment_ids is None:
        return (token_ids != 0)[:, None, None, :]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_segment & (segment_ids != 0)[:, None, :])[:, None]


# Added to the logits of keys a query must not see. Finite, and half of float32's lowest so that
# adding a logit cannot overflow: an all-padding row stays finite (its softmax is uniform), and
# exp(MASKED_LOGIT - max) is exactly 0 in a row with any attended key.
MASKED_LOGIT = float(np.finfo(np.float32).min) / 2


def attention_mask_bias(token_ids, segment_ids=None):
    """`attention_mask` as float32 addends for the logits: 0 attended, MASKED_LOGIT not.

    Computed once per forward and added in every layer, as t5x does: an addition has a free
    backward pass, where a select on the logits costs a select in each layer's gradient too.
    """
    mask = attention_mask(token_ids, segment_ids)
    return jnp.where(mask, jnp.float32(0), jnp.float32(MASKED_LOGIT))


# Platforms where a sharded vocabulary is looked up by one-hot matmul (t5x does so on TPU).
# Not on CPU: there the extra collectives of 8 fake devices sharing 2 cores can stall XLA's
# rendezvous (seen as a 40 s termination timeout under load).
ONE_HOT_PLATFORMS = ("tpu",)


def _one_hot_lookup() -> bool:
    """Whether the current rules split 'vocab' over a mesh axis, on a one-hot platform."""
    return (nn.logical_to_mesh_axes(("vocab",))[0] is not None
            and jax.default_backend() in ONE_HOT_PLATFORMS)


class Embed(nn.Module):
    """Token embedding lookup, t5x's parameter `token_embedder/embedding` [vocab, embed].

    When the rules shard 'vocab' (tensor parallelism) on TPU, the lookup is a one-hot matmul,
    as t5x does: a gather from a table split over devices would first gather the table,
    while the matmul contracts the vocabulary where it lies (and its gradient is a matmul,
    not a scatter). Both give the same numbers.
    """

    config: T5Config

    @nn.compact
    def __call__(self, token_ids):
        cfg = self.config
        embedding = self.param("embedding", _normal(1.0, ("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
        embedding = jnp.asarray(embedding, cfg.dtype)
        if not _one_hot_lookup():
            return jnp.take(embedding, token_ids, axis=0)
        one_hot = jax.nn.one_hot(token_ids, cfg.vocab_size, dtype=cfg.dtype)
        one_hot = nn.with_logical_constraint(one_hot, ("batch", "length", "vocab"))
        # HIGHEST keeps float32 rows exact on TPU (the default rounds inputs to bfloat16).
        precision = jax.lax.Precision.HIGHEST if cfg.dtype == jnp.float32 else None
        return jnp.dot(one_hot, embedding, precision=precision)


class T5Encoder(nn.Module):
    """token ids [B, L] (0 = padding) -> final hidden states [B, L, d_model].

    `segment_ids` [B, L] (optional) packs several texts per row: tokens with equal non-zero
    ids form one text, 0 marks padding (see the module docstring).
    """

    config: T5Config

    @nn.compact
    def __call__(self, token_ids, *, segment_ids=None, deterministic: bool = True):
        cfg = self.config
        mask_bias = attention_mask_bias(token_ids, segment_ids)
        hidden = Embed(cfg, name="token_embedder")(token_ids)
        hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        # Computed once and shared by every layer, as in T5.
        position_bias = RelativePositionBias(cfg, name="relpos_bias")(token_ids.shape[-1])

        layer_class = _layer_class(cfg)
        if cfg.scan_layers:
            layers = nn.scan(
                layer_class,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, scanned=True, name="layers")
            hidden, _ = layers(hidden, position_bias, mask_bias, deterministic)
        else:
            for i in range(cfg.num_layers):
                hidden = layer_class(cfg, name=f"layers_{i}")(hidden, position_bias, mask_bias,
                                                              deterministic)

        hidden = RMSNorm(cfg, name="encoder_norm")(hidden)
        hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
        return nn.with_logical_constraint(hidden, ("batch", "length", "embed"))


# Converting between the per-layer (layers_{i}) and the scanned (layers, leading axis) layouts.
# Both helpers find the encoder level anywhere in a nested tree (a bare encoder tree,
# {'params': ...}, or a dual-encoder tree) and accept boxed (nn.Partitioned) or plain arrays;
# they return plain arrays, numpy where the input was numpy.


def _stack(arrays):
    if any(isinstance(a, jax.Array) for a in arrays):
        return jnp.stack(arrays)
    # numpy, or checkpoint arrays not read yet (samtone.checkpoints.lazy: they stack lazily)
    return np.stack(arrays)


def stack_layer_params(params, num_layers: int):
    """layers_0 .. layers_{n-1} -> layers with a leading [num_layers] axis."""
    params = nn.unbox(params)
    if not isinstance(params, dict):
        return params
    if "layers_0" not in params:
        return {k: stack_layer_params(v, num_layers) for k, v in params.items()}
    per_layer = [k for k in params if k.startswith("layers_")]
    expected = [f"layers_{i}" for i in range(num_layers)]
    if sorted(per_layer) != sorted(expected):
        raise ValueError(f"stack_layer_params: expected layers {expected}, "
                         f"found {sorted(per_layer)}")
    stacked = jax.tree.map(lambda *xs: _stack(xs), *[params[k] for k in expected])
    rest = {k: v for k, v in params.items() if k not in expected}
    return {**rest, "layers": stacked}


def unstack_layer_params(params):
    """layers with a leading [num_layers] axis -> layers_0 .. layers_{n-1}."""
    params = nn.unbox(params)
    if not isinstance(params, dict):
        return params
    if not isinstance(params.get("layers"), dict):
        return {k: unstack_layer_params(v) for k, v in params.items()}
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        rest[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return rest
