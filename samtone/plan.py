"""Will a configured run fit? The train step compiled ahead of time, and its cost in numbers.

`plan_train_step` lowers and compiles the real jitted train step for a mesh from abstract
shapes (nothing is allocated, so fake CPU devices stand in for a pod) and reports, per device:
the bytes of the parameters and of the optimiser state (from their shardings), the compiled
step's temporaries (XLA's memory analysis: activations, gradients, buffers), their total, and
the FLOPs of one step.

FLOPs are counted from the model, not taken from XLA's cost analysis, which counts the body of
a scanned loop once (for a 24-layer scanned XXL encoder that reads ~24x low). Per token of a
T5.1.1 layer (matmul FLOPs = 2 x multiply-adds; h = heads x d_kv, L = the text's length):

    attention projections q, k, v, o     2 * 4 d_model h
    scores QK^T and the weighted sum     2 * 2 L h
    gated-GELU MLP (wi_0, wi_1, wo)      2 * 3 d_model d_ff    (ReLU: 2 * 2 d_model d_ff)

plus the projection once per text. A training step is three forward passes' worth (forward,
and a backward twice as costly): `flops`, the "6 x parameters x tokens" of MFU. Full
rematerialisation runs the forward again, and so does each cached-gradient microbatch pass:
`executed_flops` counts those too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from samtone import grad_cache
from samtone import partitioning
from samtone import train_step as train_step_lib
from samtone.models import dual_encoder
from samtone.models import t5

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Per-device memory (bytes) and per-step FLOPs of a compiled train step."""

    devices: int
    mesh: dict
    params_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    temp_bytes: int
    total_bytes: int
    flops: float  # model FLOPs of one step (forward + backward), all devices together
    executed_flops: float  # with the recomputation of remat and of cached-gradient passes
    device_memory_bytes: int | None
    fits: bool | None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def encoder_forward_flops(config: t5.T5Config, length: int) -> float:
    """FLOPs of one text of `length` tokens through a T5.1.1 encoder (all layers)."""
    inner = config.num_heads * config.d_kv
    mlp_matrices = 3 if config.feed_forward_proj == "gated-gelu" else 2
    per_token = 2 * (4 * config.d_model * inner + 2 * length * inner
                     + mlp_matrices * config.d_model * config.d_ff)
    return float(config.num_layers * per_token * length)


def train_step_flops(model: dual_encoder.DualEncoder, batch_size: int, query_length: int,
                     passage_length: int, num_negatives: int = 0) -> float:
    """Model FLOPs of one training step: 3 x the forward pass of every text of the batch."""
    passages = batch_size * (1 + num_negatives)
    return texts_train_flops(model, [query_length] * batch_size, [passage_length] * passages)


def texts_train_flops(model: dual_encoder.DualEncoder, query_lengths, passage_lengths) -> float:
    """Model FLOPs of one training step on texts of these token counts (padding not counted).

    `passage_lengths` holds the passages and hard negatives; a text costs what a text of its
    length alone costs, however it is batched (padded, bucketed or packed).
    """
    config = model.config
    counts = {}
    for lengths in (query_lengths, passage_lengths):
        for length in np.asarray(lengths, np.int64).ravel().tolist():
            counts[length] = counts.get(length, 0) + 1
    num_texts = sum(counts.values())
    forward = (sum(n * encoder_forward_flops(config, length) for length, n in counts.items())
               + 2 * num_texts * config.d_model * model.projection_dim)
    return 3.0 * forward


def _sharded_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of abstract arrays laid out as `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shape = sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def plan_train_step(model: dual_encoder.DualEncoder, optimizer: optax.GradientTransformation,
                    loss_fn: Callable, mesh: Mesh, rules, example_batch: dict, *,
                    microbatches: int = 1, device_memory_bytes: int | None = None) -> StepPlan:
    """Compiles the train step for `mesh` from shapes only and measures it (module doc)."""
    batch = {name: jax.ShapeDtypeStruct(np.shape(value), value.dtype)
             for name, value in example_batch.items()}
    # Before any work: a batch the mesh cannot split is the user's mistake, not XLA's.
    grad_cache.check_microbatches(microbatches, batch["query_tokens"].shape[0],
                                  partitioning.batch_shards(mesh, rules))
    abstract, shardings = train_step_lib.train_state_shardings(model, optimizer, batch, mesh,
                                                               rules)
    batch_shardings = partitioning.batch_shardings(batch, mesh, rules)
    step = train_step_lib.make_train_step(model, optimizer, loss_fn, shardings, batch_shardings,
                                          mesh, rules, microbatches=microbatches)
    compiled = step.lower(abstract, batch).compile()
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    params = _sharded_bytes(abstract.params, shardings.params)
    opt_state = _sharded_bytes(abstract.opt_state, shardings.opt_state)
    batch_bytes = _sharded_bytes(batch, batch_shardings)
    total = params + opt_state + batch_bytes + temp
    size = batch["query_tokens"].shape[0]
    negatives = batch["negative_tokens"].shape[1] if "negative_tokens" in batch else 0
    flops = train_step_flops(model, size, batch["query_tokens"].shape[1],
                             batch["passage_tokens"].shape[1], negatives)
    recomputed = (model.config.remat_policy != "none") + (microbatches > 1)
    return StepPlan(
        devices=mesh.size, mesh=dict(mesh.shape), params_bytes=params,
        opt_state_bytes=opt_state, batch_bytes=batch_bytes, temp_bytes=temp, total_bytes=total,
        flops=flops, executed_flops=flops * (3 + recomputed) / 3,
        device_memory_bytes=device_memory_bytes,
        fits=None if device_memory_bytes is None else total <= device_memory_bytes)


def example_batch(batch_size: int, query_length: int, passage_length: int,
                  num_negatives: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract global batch the pipeline feeds (what the loss inputs may read)."""
    def spec(*shape, dtype=np.int32):
        return jax.ShapeDtypeStruct(shape, dtype)

    batch = {"query_tokens": spec(batch_size, query_length),
             "passage_tokens": spec(batch_size, passage_length),
             "query_ids": spec(batch_size), "passage_ids": spec(batch_size)}
    if num_negatives:
        batch["negative_tokens"] = spec(batch_size, num_negatives, passage_length)
        batch["negative_ids"] = spec(batch_size, num_negatives)
    return batch
