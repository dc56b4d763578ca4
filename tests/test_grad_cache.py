"""samtone.grad_cache: microbatched (cached-gradient) steps give the whole batch's loss and
gradients, with hard negatives, with dropout, on one device and on a sharded mesh, and keep
fewer activations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samtone import grad_cache, losses, optimizers, partitioning
from samtone import train_step as train_step_lib
from samtone.models import dual_encoder, t5

BATCH, QUERY_LENGTH, PASSAGE_LENGTH = 16, 8, 16
LOSS_FN = train_step_lib.make_loss_fn(
    functools.partial(losses.samtone_loss, temperature=0.1, passage_same_tower=True),
    ("negatives", "query_ids", "passage_ids", "negative_ids"))


def _model(dropout_rate=0.0):
    config = t5.t5_1_1_config("tiny", num_layers=2, dropout_rate=dropout_rate)
    return dual_encoder.DualEncoder(config, "ade_spl", projection_dim=16)


def _batch(seed=0, negatives=1):
    rng = np.random.default_rng(seed)

    def tokens(shape):
        ids = rng.integers(2, 128, size=shape)
        lengths = rng.integers(2, shape[-1] + 1, size=shape[:-1])
        positions = np.arange(shape[-1])
        ids = np.where(positions == lengths[..., None] - 1, 1, ids)
        return np.where(positions < lengths[..., None], ids, 0).astype(np.int32)

    query_ids = np.arange(BATCH, dtype=np.int32)
    query_ids[5] = query_ids[4]
    batch = {"query_tokens": tokens((BATCH, QUERY_LENGTH)),
             "passage_tokens": tokens((BATCH, PASSAGE_LENGTH)),
             "query_ids": query_ids, "passage_ids": np.arange(100, 100 + BATCH, dtype=np.int32)}
    if negatives:
        batch["negative_tokens"] = tokens((BATCH, negatives, PASSAGE_LENGTH))
        batch["negative_ids"] = rng.integers(100, 100 + BATCH, (BATCH, negatives)).astype(np.int32)
    return batch


def _mesh(shape):
    devices = jax.devices()[:1] if shape == (1, 1) else None
    return partitioning.make_mesh(shape, devices=devices)


@functools.lru_cache(maxsize=None)
def _params(mesh_shape, rules_name):
    """Parameters on the mesh (the same whatever the dropout rate), built once per mesh."""
    mesh, rules = _mesh(mesh_shape), partitioning.logical_axis_rules(rules_name)
    optimizer = optimizers.make_optimizer(total_steps=10)
    state, _ = train_step_lib.init_train_state(_model(), optimizer, _batch(), mesh, rules, seed=1)
    return state.params


def _gradients(model, mesh, rules, batch, microbatches, key):
    params = _params(tuple(mesh.devices.shape), _rules_name(rules))

    def compute(params, batch):
        with partitioning.axis_rules(mesh, rules):
            return train_step_lib.loss_and_gradients(model, LOSS_FN, params, batch, key,
                                                     microbatches)

    batch_shardings = partitioning.batch_shardings(batch, mesh, rules)
    (loss, outputs), grads = jax.jit(compute)(params, jax.device_put(batch, batch_shardings))
    return float(loss), jax.device_get(outputs), jax.device_get(grads)


def _rules_name(rules):
    return next(name for name in ("data", "data_model", "fsdp", "fsdp_model")
                if partitioning.logical_axis_rules(name) == rules)


def _assert_close(a, b, rtol=2e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = max(float(np.max(np.abs(y))), 1e-12)
        np.testing.assert_allclose(x / scale, y / scale, rtol=rtol, atol=atol)


def test_split_and_merge_are_inverse_and_strided():
    x = jnp.arange(12 * 3).reshape(12, 3)

    def split(x):
        with partitioning.axis_rules(_mesh((1, 1)), partitioning.logical_axis_rules("data")):
            return grad_cache.split(x, 4)

    parts = jax.jit(split)(x)
    assert parts.shape == (4, 3, 3)
    np.testing.assert_array_equal(parts[1], x[1::4])
    np.testing.assert_array_equal(grad_cache.merge(parts), x)


@pytest.mark.parametrize("mesh_shape,rules_name,microbatches",
                         [((1, 1), "data", 4), ((4, 2), "fsdp_model", 2)])
@pytest.mark.slow
def test_microbatches_give_the_plain_loss_and_gradients(mesh_shape, rules_name, microbatches):
    model, mesh = _model(), _mesh(mesh_shape)
    rules = partitioning.logical_axis_rules(rules_name)
    key = jax.random.PRNGKey(3)
    batch = _batch(negatives=2)
    plain = _gradients(model, mesh, rules, batch, 1, key)
    cached = _gradients(model, mesh, rules, batch, microbatches, key)
    assert cached[0] == pytest.approx(plain[0], rel=1e-5)
    _assert_close(cached[1], plain[1])  # the embeddings, in the batch's order
    _assert_close(cached[2], plain[2])


@pytest.mark.parametrize("mesh_shape,rules_name", [((8, 1), "data")])
@pytest.mark.slow
def test_with_dropout_both_passes_use_the_same_masks(mesh_shape, rules_name):
    """Against plain autodiff through the same sub-batch forward passes (same dropout keys)."""
    model, mesh = _model(dropout_rate=0.2), _mesh(mesh_shape)
    rules = partitioning.logical_axis_rules(rules_name)
    key, microbatches = jax.random.PRNGKey(5), 2
    batch = _batch()
    params = _params(mesh_shape, rules_name)
    forward = train_step_lib.forward_fn(model)

    def reference(params, batch):
        with partitioning.axis_rules(mesh, rules):
            def loss(params, key):
                inputs = {k: grad_cache.split(batch[k], microbatches)
                          for k in grad_cache.MODEL_INPUTS if k in batch}
                parts = [forward(params, jax.tree.map(lambda x, i=i: x[i], inputs),
                                 jax.random.fold_in(key, i)) for i in range(microbatches)]
                embeddings = jax.tree.map(lambda *p: grad_cache.merge(jnp.stack(p)), *parts)
                return LOSS_FN(embeddings, batch)
            # Also the loss under other dropout masks: dropout must really be on.
            return jax.value_and_grad(loss)(params, key), loss(params, jax.random.PRNGKey(6))

    batch_on_mesh = jax.device_put(batch, partitioning.batch_shardings(batch, mesh, rules))
    (expected_loss, expected_grads), other_masks_loss = jax.device_get(
        jax.jit(reference)(params, batch_on_mesh))
    loss, _, grads = _gradients(model, mesh, rules, batch, microbatches, key)
    assert loss == pytest.approx(float(expected_loss), rel=1e-5)
    _assert_close(grads, expected_grads)
    assert abs(float(other_masks_loss) - loss) > 1e-4


@pytest.mark.slow
def test_microbatches_hold_fewer_activations():
    """Compiled temporaries of a 64-example step: 8 cached sub-batches need far less."""
    model, mesh = _model(), _mesh((1, 1))
    rules = partitioning.logical_axis_rules("data")
    optimizer = optimizers.make_optimizer(total_steps=10)
    batch = {k: np.zeros((64, *v.shape[1:]), v.dtype) for k, v in _batch().items()}
    abstract, shardings = train_step_lib.train_state_shardings(model, optimizer, batch, mesh,
                                                               rules)
    batch_shardings = partitioning.batch_shardings(batch, mesh, rules)

    def temporaries(microbatches):
        step = train_step_lib.make_train_step(model, optimizer, LOSS_FN, shardings,
                                              batch_shardings, mesh, rules,
                                              microbatches=microbatches)
        compiled = step.lower(abstract, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(8) < 0.5 * temporaries(1)
