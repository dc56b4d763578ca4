"""Cached-gradient large batches (GradCache, Gao et al. 2021): the loss of the whole batch in
the memory of one sub-batch.

SamToNe needs every query and passage of the batch in one softmax, so a batch of 512 cannot
simply be split into gradient-accumulation steps. Instead, with N microbatches:

  1. embed each sub-batch with the current parameters, keeping no activations;
  2. compute the loss of the whole batch from those embeddings and its gradient with respect
     to every embedding (same-tower and hard negatives included);
  3. run each sub-batch's forward again, back-propagate its slice of the embedding gradient
     (a vector-Jacobian product), and sum the parameter gradients.

By the chain rule the result is the gradient of the whole-batch loss. Both passes run as
`lax.map` / `lax.scan` over the sub-batches, so XLA holds one sub-batch's activations at a
time; a Python loop inside one jit would let it keep them all. Sub-batch i takes the rows
i, i + N, i + 2N, ... so that every sub-batch stays spread over the data-parallel devices.
Sub-batch i draws its dropout masks from fold_in(key, i), identically in both passes; a run
with N microbatches therefore samples other masks than an unbatched run (both are valid).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from samtone import partitioning
from samtone.errors import ConfigError

# forward(params, sub_batch, dropout_key) -> {"query": [b, D], "passage": [b, D], ...}
Forward = Callable[[Any, dict, jax.Array], dict]
LossFn = Callable[[dict, dict], jax.Array]
MODEL_INPUTS = ("query_tokens", "passage_tokens", "negative_tokens")


def check_microbatches(microbatches: int, global_batch_size: int, batch_shards: int) -> None:
    """The batch must split evenly over the batch shards (the data-parallel devices), and with
    N > 1 into N sub-batches that each do too. Each failure names the setting at fault: the
    batch size for the first, train.microbatches for the second."""
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ConfigError(f"train.microbatches must be a positive integer, got {microbatches!r}")
    partitioning.check_batch_splits(global_batch_size, batch_shards)
    if global_batch_size % (microbatches * batch_shards):
        raise ConfigError(
            f"train.microbatches = {microbatches} does not split the global batch of "
            f"{global_batch_size} (BATCH_SIZE) into {microbatches} sub-batches of a multiple of "
            f"the {batch_shards} data-parallel devices; BATCH_SIZE must be a multiple of "
            f"{microbatches} x {batch_shards}")


def split(x: jax.Array, microbatches: int) -> jax.Array:
    """[B, ...] -> [N, B/N, ...]; sub-batch i holds rows i, i + N, i + 2N, ..."""
    strided = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(strided, (None, "batch") + (None,) * (x.ndim - 1))


def merge(x: jax.Array) -> jax.Array:
    """The inverse of `split`: [N, B/N, ...] -> [B, ...] in the original row order."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def loss_and_gradients(forward: Forward, loss_fn: LossFn, params: Any, batch: dict,
                       dropout_key: jax.Array, microbatches: int
                       ) -> tuple[tuple[jax.Array, dict], Any]:
    """((loss, embeddings), parameter gradients) of the whole batch, as the plain step gives."""
    inputs = {name: split(batch[name], microbatches) for name in MODEL_INPUTS if name in batch}
    indices = jnp.arange(microbatches)

    def embed(p, index, sub_batch):
        return forward(p, sub_batch, jax.random.fold_in(dropout_key, index))

    # 1. Embeddings of every sub-batch; no gradient is taken here, so nothing is kept.
    embedded = jax.lax.map(lambda args: embed(params, *args), (indices, inputs))
    embeddings = jax.tree.map(merge, embedded)
    # 2. The whole batch's loss and its gradient with respect to the embeddings.
    loss, embedding_grads = jax.value_and_grad(lambda e: loss_fn(e, batch))(embeddings)
    cotangents = jax.tree.map(lambda g: split(g, microbatches), embedding_grads)

    # 3. Each sub-batch's forward again, back-propagated with its slice of that gradient.
    def accumulate(total, args):
        index, sub_batch, cotangent = args
        _, vjp = jax.vjp(lambda p: embed(p, index, sub_batch), params)
        (grads,) = vjp(cotangent)
        return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, (indices, inputs, cotangents))
    return (loss, embeddings), grads
