"""The sharded train step: same numbers on every mesh, placement, init, non-finite handling.

The reference is the same step on a 1x1 mesh (one device). Every other mesh must give the
same loss, gradients, updated parameters and optimiser state to float32 tolerance, which
also shows the loss contrasts each query with the whole global batch: a per-device loss
would see 16 / 8 = 2 examples per shard and give a different value.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from samtone import losses, optimizers, partitioning
from samtone import train_step as train_step_lib
from samtone.data import packing, pipeline
from samtone.errors import ConfigError
from samtone.models import dual_encoder, t5

BATCH_SIZE, QUERY_LENGTH, PASSAGE_LENGTH, NUM_NEGATIVES = 16, 8, 16, 1
MESHES = [((8, 1), "data"), ((8, 1), "fsdp"), ((4, 2), "data_model"), ((2, 4), "fsdp_model")]


def tiny_model(**overrides):
    config = t5.t5_1_1_config("tiny", **{"dropout_rate": 0.0, **overrides})
    return dual_encoder.DualEncoder(config, "ade_spl", projection_dim=16)


def token_ids(rng, shape):
    """Random ids >= 2 with EOS (1) at a random length and 0-padding after it."""
    ids = rng.integers(2, 128, size=shape)
    lengths = rng.integers(2, shape[-1] + 1, size=shape[:-1])
    positions = np.arange(shape[-1])
    ids = np.where(positions == lengths[..., None] - 1, 1, ids)
    return np.where(positions < lengths[..., None], ids, 0).astype(np.int32)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    query_ids = np.arange(BATCH_SIZE, dtype=np.int32)
    query_ids[5] = query_ids[4]  # a query asked twice: false negatives get masked
    return {
        "query_tokens": token_ids(rng, (BATCH_SIZE, QUERY_LENGTH)),
        "passage_tokens": token_ids(rng, (BATCH_SIZE, PASSAGE_LENGTH)),
        "negative_tokens": token_ids(rng, (BATCH_SIZE, NUM_NEGATIVES, PASSAGE_LENGTH)),
        "query_ids": query_ids,
        "passage_ids": np.arange(100, 100 + BATCH_SIZE, dtype=np.int32),
    }


def recording(optimizer):
    """`optimizer` with the last gradients kept in its state, to compare them across meshes."""
    record = optax.GradientTransformation(
        init=lambda params: {"gradients": jax.tree.map(jnp.zeros_like, params)},
        update=lambda updates, state, params=None: (updates, {"gradients": updates}))
    return optax.chain(record, optimizer)


OPTIMIZER = recording(optimizers.make_optimizer(learning_rate=1e-2, total_steps=100,
                                                min_dim_size_to_factor=8))
# What samtone_loss takes (train_step.taken_inputs), as gin/losses/samtone_query.gin runs it.
SAMTONE_INPUTS = ("negatives", "query_ids", "passage_ids", "negative_ids")
# query same-tower, bidirectional
LOSS_FN = train_step_lib.make_loss_fn(losses.samtone_loss, SAMTONE_INPUTS)


@functools.lru_cache(maxsize=None)
def setup(mesh_shape, rules_name, model=None, loss_fn=LOSS_FN, skip_nonfinite=False,
          batch_keys=None):
    """(mesh, state shardings, batch shardings, jitted step), built once per combination."""
    model = model or tiny_model()
    devices = jax.devices()[:1] if mesh_shape == (1, 1) else None
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    rules = partitioning.logical_axis_rules(rules_name)
    batch = make_batch()
    if batch_keys:
        batch = {**batch, **{k: np.ones(BATCH_SIZE, np.float32) for k in batch_keys}}
    _, state_shardings = train_step_lib.train_state_shardings(model, OPTIMIZER, batch, mesh, rules)
    batch_shardings = partitioning.batch_shardings(batch, mesh, rules)
    step = train_step_lib.make_train_step(model, OPTIMIZER, loss_fn, state_shardings,
                                          batch_shardings, mesh, rules,
                                          skip_nonfinite=skip_nonfinite)
    return mesh, rules, state_shardings, batch_shardings, step


@functools.lru_cache(maxsize=None)
def reference():
    """(initial params, state after one step, metrics) on one device, all on the host."""
    mesh, rules, _, batch_shardings, step = setup((1, 1), "data")
    state, _ = train_step_lib.init_train_state(tiny_model(), OPTIMIZER, make_batch(), mesh, rules)
    initial_params = jax.device_get(state.params)
    state, metrics = step(state, jax.device_put(make_batch(), batch_shardings))
    return initial_params, jax.device_get(state), jax.device_get(metrics)


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6, leaf_atol=0.0, what=""):
    """Elementwise allclose; `leaf_atol` adds an absolute tolerance of that fraction of each
    leaf's largest magnitude."""
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(actual)[0]:
        want = np.asarray(flat_expected[path])
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        np.testing.assert_allclose(np.asarray(value), want, rtol=rtol,
                                   atol=atol + leaf_atol * scale,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


# ---------------------------------------------------------------------------------------------
# Same numbers on every mesh.


@pytest.mark.parametrize("mesh_shape, rules_name", MESHES)
@pytest.mark.slow
def test_sharded_step_matches_one_device(mesh_shape, rules_name):
    initial_params, expected_state, expected_metrics = reference()
    mesh, rules, state_shardings, batch_shardings, step = setup(mesh_shape, rules_name)
    state, _ = train_step_lib.init_train_state(tiny_model(), OPTIMIZER, make_batch(), mesh, rules,
                                               init_params=initial_params)
    state, metrics = step(state, jax.device_put(make_batch(), batch_shardings))
    metrics = jax.device_get(metrics)

    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
    for name in ("in_batch_accuracy", "learning_rate", "gradient_norm"):
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, err_msg=name)
    assert not metrics["nonfinite"] and int(state.step) == 1
    assert_trees_close(state.params, expected_state.params, what="param ")
    # Loosened for gradients and second moments: at temperature 0.01 the logits are 100 x the
    # cosines, so float32 rounding of a different summation order (~1e-7) becomes ~1e-5 of a
    # gradient's scale, and elements that are small differences of large terms (a -0.06
    # entry among entries of 4) miss rtol=1e-5 by itself. Measured: <= 5e-6 of the leaf's
    # largest entry on every mesh.
    assert_trees_close(state.opt_state[0]["gradients"], expected_state.opt_state[0]["gradients"],
                       leaf_atol=1e-5, what="gradient ")
    assert_trees_close(state.opt_state, expected_state.opt_state, leaf_atol=1e-5,
                       what="opt_state ")
    # The step keeps the state in its shardings (nothing is resharded between steps).
    for array, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(state_shardings)):
        assert array.sharding.is_equivalent_to(sharding, array.ndim)


@pytest.mark.slow
def test_reference_step_is_a_real_update():
    initial_params, state, metrics = reference()
    assert np.isfinite(metrics["loss"]) and metrics["gradient_norm"] > 0
    np.testing.assert_allclose(metrics["learning_rate"], 1e-2, rtol=1e-6)  # schedule(0)
    kernel = ("query_encoder", "layers_0", "mlp", "wi_0", "kernel")
    before = functools.reduce(lambda tree, key: tree[key], kernel, initial_params)
    after = functools.reduce(lambda tree, key: tree[key], kernel, state.params)
    assert not np.allclose(before, after)


# ---------------------------------------------------------------------------------------------
# Placement.


def test_state_is_sharded_as_the_rules_say():
    mesh, rules, state_shardings, batch_shardings, step = setup((2, 4), "fsdp_model")
    state, shardings = train_step_lib.init_train_state(tiny_model(), OPTIMIZER, make_batch(), mesh,
                                                       rules, init_params=reference()[0])
    kernel = state.params["query_encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # [32, 64]
    assert kernel.sharding.spec == P("data", "model")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(16, 16)}
    # Adafactor's factored moments of that kernel: v_row [embed] keeps 'data', v_col [mlp]
    # keeps 'model'; the full-size v is a replicated (1,) placeholder.
    factored = state.opt_state[1][0]
    layer = ("query_encoder", "layers_0", "mlp", "wi_0", "kernel")
    pick = lambda tree: functools.reduce(lambda t, k: t[k], layer, tree)  # noqa: E731
    assert (pick(factored.v_row).shape, pick(factored.v_row).sharding.spec) == ((32,), P("data"))
    assert (pick(factored.v_col).shape, pick(factored.v_col).sharding.spec) == ((64,), P("model"))
    assert pick(factored.v).sharding.spec == P()
    scale = state.params["query_encoder"]["encoder_norm"]["scale"]
    assert pick(state.opt_state[0]["gradients"]).sharding.spec == P("data", "model")
    assert factored.v["query_encoder"]["encoder_norm"]["scale"].sharding.spec == scale.sharding.spec
    assert state.step.sharding.spec == P() and state.dropout_rng.sharding.spec == P()
    assert shardings == state_shardings


def test_random_init_is_sharded_and_equals_one_device_init():
    mesh = partitioning.make_mesh((2, 4))
    rules = partitioning.logical_axis_rules("fsdp_model")
    state, shardings = train_step_lib.init_train_state(tiny_model(), OPTIMIZER, make_batch(), mesh,
                                                       rules)
    embedding = state.params["passage_encoder"]["token_embedder"]["embedding"]  # [vocab, embed]
    assert {shard.data.shape for shard in embedding.addressable_shards} == {(32, 16)}
    # Partitionable threefry: the same numbers whatever the sharding.
    assert_trees_close(jax.device_get(state.params), reference()[0], rtol=0, atol=0)
    assert all(float(jnp.max(jnp.abs(v))) == 0 for v in jax.tree.leaves(state.opt_state[0]))


def test_init_params_fill_the_towers_and_restack_layers():
    """As train.py passes a pretrained encoder: the towers only, in the per-layer layout, to
    a scan_layers model; the projection comes from random init."""
    model = tiny_model(scan_layers=True, num_layers=2)
    per_layer = jax.eval_shape(functools.partial(tiny_model(num_layers=2).init, deterministic=True),
                               jax.random.PRNGKey(0), make_batch()["query_tokens"],
                               make_batch()["passage_tokens"])["params"]
    rng = np.random.default_rng(0)
    towers = {name: jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                                 nn.unbox(per_layer[name]))
              for name in ("query_encoder", "passage_encoder")}
    mesh = partitioning.make_mesh((4, 2))
    rules = partitioning.logical_axis_rules("data_model")
    state, shardings = train_step_lib.init_train_state(model, OPTIMIZER, make_batch(), mesh, rules,
                                                       init_params=towers)
    stacked = t5.stack_layer_params(towers["query_encoder"], 2)
    assert_trees_close(jax.device_get(state.params["query_encoder"]), stacked, rtol=0, atol=0)
    kernel = state.params["passage_encoder"]["layers"]["mlp"]["wo"]["kernel"]  # [layer, mlp, embed]
    assert kernel.shape == (2, 64, 32) and kernel.sharding.spec == P(None, "model", None)
    projection = state.params["projection_layer"]["kernel"]
    assert projection.shape == (32, 16) and np.all(np.isfinite(projection))
    with pytest.raises(ValueError, match="init_params: params/query_encoder has .*'mlp'"):
        train_step_lib.init_train_state(model, OPTIMIZER, make_batch(), mesh, rules,
                                        init_params={"query_encoder": {"mlp": {}}})
    bad = {"projection_layer": {"kernel": np.zeros((32, 8), np.float32)}}
    with pytest.raises(ValueError, match=r"\['projection_layer'\]\['kernel'\] has shape \(32, 8\)"):
        train_step_lib.init_train_state(model, OPTIMIZER, make_batch(), mesh, rules,
                                        init_params=bad)


# ---------------------------------------------------------------------------------------------
# Training behaviour.


def test_loss_decreases_on_a_fixed_batch_and_the_step_compiles_once():
    mesh, rules, _, batch_shardings, step = setup((4, 2), "data_model")
    state, _ = train_step_lib.init_train_state(tiny_model(), OPTIMIZER, make_batch(), mesh, rules,
                                               init_params=reference()[0])
    batch = jax.device_put(make_batch(), batch_shardings)
    history = []
    with jax.transfer_guard("disallow"):  # no hidden host transfer in the step (big_vision)
        for _ in range(6):
            state, metrics = step(state, batch)
            history.append(metrics)  # kept on device until the end
    history = jax.device_get(history)
    loss = [m["loss"] for m in history]
    assert loss[-1] < 0.8 * loss[0], loss
    assert history[-1]["in_batch_accuracy"] >= history[0]["in_batch_accuracy"]
    np.testing.assert_allclose([m["learning_rate"] for m in history],
                               [1e-2 * (1 - i / 100) for i in range(6)], rtol=1e-5)
    assert int(state.step) == 6
    assert step._cache_size() == 1  # pylint: disable=protected-access


def nan_for_negative_labels(query, passage, labels):
    """A cheap loss that is NaN when the batch's first label is negative (log of it)."""
    return jnp.mean(jnp.sum(jnp.square(query - passage), axis=-1)) + jnp.log(labels[0])


def test_skip_nonfinite_leaves_params_and_opt_state_unchanged():
    loss_fn = train_step_lib.make_loss_fn(nan_for_negative_labels, ["labels"])
    mesh, rules, _, batch_shardings, step = setup((4, 2), "data_model", loss_fn=loss_fn,
                                                  skip_nonfinite=True, batch_keys=("labels",))
    state, _ = train_step_lib.init_train_state(tiny_model(), OPTIMIZER, make_batch(), mesh, rules,
                                               init_params=reference()[0])

    def batch_with_label(label):
        batch = {**make_batch(), "labels": np.full(BATCH_SIZE, label, np.float32)}
        return jax.device_put(batch, batch_shardings)

    state, metrics = step(state, batch_with_label(1.0))
    assert not bool(metrics["nonfinite"]) and np.isfinite(float(metrics["loss"]))
    before = jax.device_get(state)
    state, metrics = step(state, batch_with_label(-1.0))
    assert bool(metrics["nonfinite"]) and np.isnan(float(metrics["loss"]))
    after = jax.device_get(state)
    assert_trees_close(after.params, before.params, rtol=0, atol=0)
    # The moments stay; only the step counters advance (the schedule follows state.step).
    def moments(opt_state):
        return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                if getattr(path[-1], "name", None) != "count"]
    assert_trees_close(moments(after.opt_state), moments(before.opt_state), rtol=0, atol=0)
    assert int(after.step) == 2  # the step counter still advances (dropout keys differ)
    state, metrics = step(state, batch_with_label(1.0))
    assert not bool(metrics["nonfinite"])
    assert not np.allclose(jax.device_get(state.params)["projection_layer"]["kernel"],
                           before.params["projection_layer"]["kernel"])


@pytest.mark.parametrize("dropout_rate, uses_random_bits", [(0.0, False), (0.1, True)])
def test_dropout_is_on_only_when_configured(dropout_rate, uses_random_bits):
    model = tiny_model(dropout_rate=dropout_rate)
    mesh = partitioning.make_mesh((8, 1))
    abstract, _ = train_step_lib.train_state_shardings(model, OPTIMIZER, make_batch(), mesh,
                                                       partitioning.DATA_PARALLEL_RULES)
    step = functools.partial(train_step_lib.train_step, model=model, optimizer=OPTIMIZER,
                             loss_fn=LOSS_FN)
    jaxpr = str(jax.make_jaxpr(step)(abstract, make_batch()))
    assert ("random_bits" in jaxpr) == uses_random_bits
    assert "random_fold_in" in jaxpr  # the key of step i is fold_in(dropout_rng, i)


# ---------------------------------------------------------------------------------------------
# The loss adapter.


def embeddings(seed=0, negatives=True):
    rng = np.random.default_rng(seed)
    outputs = {"query": rng.normal(size=(6, 4)), "passage": rng.normal(size=(6, 4))}
    if negatives:
        outputs["negatives"] = rng.normal(size=(6, 2, 4))
    outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
    batch = {"query_ids": jnp.asarray([0, 1, 1, 2, 3, 4]), "passage_ids": jnp.arange(6),
             "labels": jnp.asarray([0.0, 1.0, 0.5, 0.2, 0.9, 0.3])}
    return outputs, batch


def test_loss_fn_passes_the_declared_inputs():
    outputs, batch = embeddings()
    q, p = outputs["query"], outputs["passage"]
    ids = {"query_ids": batch["query_ids"], "passage_ids": batch["passage_ids"]}
    cases = [
        (losses.samtone_loss, SAMTONE_INPUTS,
         losses.samtone_loss(q, p, negatives=outputs["negatives"], **ids)),
        (functools.partial(losses.in_batch_softmax_loss, temperature=0.05), SAMTONE_INPUTS,
         losses.in_batch_softmax_loss(q, p, temperature=0.05, negatives=outputs["negatives"],
                                      **ids)),
        (losses.pair_loss, ("query_ids", "passage_ids"), losses.pair_loss(q, p, **ids)),
        (losses.cosent_loss, ("labels",), losses.cosent_loss(q, p, batch["labels"])),
        (lambda query, passage: jnp.sum(query * passage), (), jnp.sum(q * p)),
        # Unset: the inputs the signature names.
        (losses.samtone_loss, None,
         losses.samtone_loss(q, p, negatives=outputs["negatives"], **ids)),
        (losses.pair_loss, None, losses.pair_loss(q, p, **ids)),
        (losses.cosent_loss, None, losses.cosent_loss(q, p, batch["labels"])),
        # **kwargs takes whatever is declared.
        (lambda query, passage, **kw: losses.pair_loss(query, passage, **kw),
         ("query_ids", "passage_ids"), losses.pair_loss(q, p, **ids)),
    ]
    for loss, inputs, expected in cases:
        value = train_step_lib.make_loss_fn(loss, inputs)(outputs, batch)
        assert value.dtype == jnp.float32 and value.shape == ()
        np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=str(loss))
    # Ids change the value: the repeated query id masks a false negative.
    assert not np.isclose(train_step_lib.make_loss_fn(losses.samtone_loss, SAMTONE_INPUTS)(
        outputs, batch), losses.samtone_loss(q, p, negatives=outputs["negatives"]))


def test_loss_fn_passes_negative_ids_so_a_negative_that_is_a_positive_is_dropped():
    outputs, batch = embeddings()
    # Example 0's first hard negative is example 3's passage (id 3): dropped from query 3's row.
    batch["negative_ids"] = jnp.asarray([[3, 10], [11, 12], [13, 14], [15, 16], [17, 18], [19, 20]])
    # ... and query 3 matches its passage, so that duplicate is as strong as the positive.
    outputs["query"] = outputs["query"].at[3].set(outputs["passage"][3])
    outputs["negatives"] = outputs["negatives"].at[0, 0].set(outputs["passage"][3])
    q, p, n = outputs["query"], outputs["passage"], outputs["negatives"]
    ids = {"query_ids": batch["query_ids"], "passage_ids": batch["passage_ids"]}
    value = train_step_lib.make_loss_fn(losses.samtone_loss, SAMTONE_INPUTS)(outputs, batch)
    np.testing.assert_allclose(
        value, losses.samtone_loss(q, p, negatives=n, negative_ids=batch["negative_ids"], **ids),
        rtol=1e-6)
    assert not np.isclose(value, losses.samtone_loss(q, p, negatives=n, **ids))


def test_loss_fn_without_negatives_in_the_outputs_and_missing_labels():
    outputs, batch = embeddings(negatives=False)
    value = train_step_lib.make_loss_fn(losses.samtone_loss, SAMTONE_INPUTS)(outputs, batch)
    np.testing.assert_allclose(value, losses.samtone_loss(
        outputs["query"], outputs["passage"], query_ids=batch["query_ids"],
        passage_ids=batch["passage_ids"]), rtol=1e-6)
    del batch["labels"]
    with pytest.raises(ValueError, match="cosent_loss needs 'labels'"):
        train_step_lib.make_loss_fn(losses.cosent_loss, ["labels"])(outputs, batch)


def test_loss_fn_refuses_unknown_inputs():
    with pytest.raises(ValueError, match=r"train.loss_inputs: unknown inputs \['query_idz'\]"):
        train_step_lib.make_loss_fn(losses.samtone_loss, ["query_idz"])


def test_loss_fn_refuses_a_list_that_leaves_out_an_input_the_loss_takes():
    """A loss never silently misses an input its signature names (e.g. the ids that mask
    false negatives), nor is given one it does not take."""
    with pytest.raises(ValueError, match=r"leaves out \['query_ids', 'passage_ids', "
                                         r"'negative_ids'\]"):
        train_step_lib.make_loss_fn(losses.samtone_loss, ["negatives"])
    with pytest.raises(ValueError, match=r"does not take \['negatives'\]"):
        train_step_lib.make_loss_fn(losses.pair_loss, ["query_ids", "passage_ids", "negatives"])


# ---------------------------------------------------------------------------------------------
# What the recipes run: bfloat16 activations, dropout on a sharded mesh, scan + remat + dropout.


def _run_steps(model, mesh_shape, rules_name, steps, init_params=None):
    mesh, rules, _, batch_shardings, step = setup(mesh_shape, rules_name, model=model)
    state, _ = train_step_lib.init_train_state(model, OPTIMIZER, make_batch(), mesh, rules,
                                               init_params=init_params)
    history = []
    for seed in range(steps):
        state, metrics = step(state, jax.device_put(make_batch(seed), batch_shardings))
        history.append(metrics)
    return jax.device_get(state), jax.device_get(history)


@pytest.mark.slow
def test_bfloat16_step_runs_and_stays_close_to_float32():
    initial = reference()[0]
    full, full_metrics = _run_steps(tiny_model(), (1, 1), "data", 2, initial)
    half, half_metrics = _run_steps(tiny_model(dtype=jnp.bfloat16), (1, 1), "data", 2, initial)
    for a, b in zip(half_metrics, full_metrics):
        assert not a["nonfinite"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=0.02)
    # Parameters stay float32 and move as the float32 run's do, within bf16 rounding.
    kernel = lambda s: s.params["query_encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # noqa: E731
    assert kernel(half).dtype == np.float32
    moved_full = kernel(full) - initial["query_encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    moved_half = kernel(half) - initial["query_encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    cosine = (np.sum(moved_full * moved_half) / np.linalg.norm(moved_full)
              / np.linalg.norm(moved_half))
    assert cosine > 0.95


@pytest.mark.slow
def test_sharded_step_with_dropout_matches_one_device():
    model = tiny_model(dropout_rate=0.1)
    initial = reference()[0]
    one, one_metrics = _run_steps(model, (1, 1), "data", 1, initial)
    sharded, sharded_metrics = _run_steps(model, (2, 4), "fsdp_model", 1, initial)
    for a, b in zip(sharded_metrics, one_metrics):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert_trees_close(sharded.params, one.params, leaf_atol=1e-5, what="param ")
    # Dropout is on: the deterministic model gives another loss on the same batch.
    assert abs(one_metrics[0]["loss"] - reference()[2]["loss"]) > 1e-4


@pytest.mark.slow
def test_scan_remat_dropout_trains():
    model = tiny_model(dropout_rate=0.1, scan_layers=True, remat_policy="full")
    state, history = _run_steps(model, (1, 1), "data", 3)
    assert all(np.isfinite(m["loss"]) and not m["nonfinite"] for m in history)
    assert int(state.step) == 3 and history[-1]["gradient_norm"] > 0


def test_skipped_updates_keep_the_learning_rate_in_step():
    loss_fn = train_step_lib.make_loss_fn(nan_for_negative_labels, ["labels"])
    mesh, rules, _, batch_shardings, step = setup((1, 1), "data", loss_fn=loss_fn,
                                                  skip_nonfinite=True, batch_keys=("labels",))
    state, _ = train_step_lib.init_train_state(tiny_model(), OPTIMIZER, make_batch(), mesh, rules,
                                               init_params=reference()[0])
    rates = []
    for label in (1.0, -1.0, -1.0, 1.0):
        batch = {**make_batch(), "labels": np.full(BATCH_SIZE, label, np.float32)}
        state, metrics = step(state, jax.device_put(batch, batch_shardings))
        rates.append(float(metrics["learning_rate"]))
    # make_optimizer(learning_rate=1e-2, total_steps=100): linear decay, one step per update.
    np.testing.assert_allclose(rates, [1e-2 * (1 - k / 100) for k in range(4)], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# No compute on padding: bucketed and packed batches are the same step.


def padded_batch():
    """make_batch() with more padding: make_batch() is what length buckets cut it to."""
    batch = make_batch()
    padded = {key: np.pad(value, [(0, 0)] * (value.ndim - 1) + [(0, 8)]) if key.endswith("tokens")
              else value for key, value in batch.items()}
    cut = pipeline.cut_to_lengths(padded, QUERY_LENGTH, PASSAGE_LENGTH)
    assert all(np.array_equal(cut[key], batch[key]) for key in batch)
    return padded


@pytest.mark.parametrize("batching, mesh_shape, rules_name", [
    ("buckets", (1, 1), "data"), ("buckets", (8, 1), "data"),
    ("packed", (1, 1), "data"), ("packed", (8, 1), "data"), ("packed", (2, 4), "fsdp_model")])
@pytest.mark.slow
def test_bucketed_and_packed_batches_give_the_plain_step(batching, mesh_shape, rules_name):
    """Same loss, gradients, parameters and optimiser state as the plain one-device step."""
    initial_params, expected_state, expected_metrics = reference()
    devices = jax.devices()[:1] if mesh_shape == (1, 1) else None
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    rules = partitioning.logical_axis_rules(rules_name)
    if batching == "buckets":  # the reference ran on the bucket cut of this batch
        batch = padded_batch()
    else:  # empty rows pad the packed arrays to a multiple of the batch shards, as train does
        # Packed rows need negative_ids (K); none equals a passage id, so nothing is masked.
        negative_ids = 1000 + np.arange(BATCH_SIZE * NUM_NEGATIVES, dtype=np.int32)
        batch = {**make_batch(), "negative_ids": negative_ids.reshape(BATCH_SIZE, NUM_NEGATIVES)}
        batch = packing.pad_rows(pipeline.pack_batch(batch), partitioning.batch_shards(mesh, rules))
        assert batch["passage_tokens"].shape[0] < BATCH_SIZE * (1 + NUM_NEGATIVES)
    state, state_shardings = train_step_lib.init_train_state(
        tiny_model(), OPTIMIZER, make_batch(), mesh, rules, init_params=initial_params)
    batch_shardings = partitioning.batch_shardings(batch, mesh, rules)
    step = train_step_lib.make_train_step(tiny_model(), OPTIMIZER, LOSS_FN, state_shardings,
                                          batch_shardings, mesh, rules)
    state, metrics = step(state, jax.device_put(batch, batch_shardings))
    metrics = jax.device_get(metrics)
    for name in ("loss", "in_batch_accuracy", "gradient_norm"):
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, err_msg=name)
    # Tolerances as in test_sharded_step_matches_one_device (float32 summation order).
    assert_trees_close(state.opt_state[0]["gradients"], expected_state.opt_state[0]["gradients"],
                       leaf_atol=1e-5, what="gradient ")
    assert_trees_close(state.params, expected_state.params, what="param ")
    assert_trees_close(state.opt_state, expected_state.opt_state, leaf_atol=1e-5,
                       what="opt_state ")


def test_packed_batches_refuse_microbatches():
    with pytest.raises(ValueError, match="needs query_ids and negative_ids"):
        pipeline.pack_batch(make_batch())
    batch = pipeline.pack_batch({k: v for k, v in make_batch().items() if k != "negative_tokens"})
    params = reference()[0]
    with pytest.raises(ConfigError, match=r"microbatches=2 .*pack=True"):
        jax.eval_shape(lambda p: train_step_lib.loss_and_gradients(
            tiny_model(), LOSS_FN, p, batch, jax.random.key(0), microbatches=2), params)
