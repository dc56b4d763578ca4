"""Learning-rate schedules, T5 Adafactor against optax's reference and per layer as t5x,
optimiser-state specs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from samtone import losses, optimizers, partitioning
from samtone import train_step as train_step_lib
from samtone.models import dual_encoder, t5


def params_and_grads(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (16, 24), "thin": (4, 24), "b": (24,), "stacked": (2, 16, 24)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.normal(size=s) * 10 ** rng.uniform(-3, 1), jnp.float32)
              for k, s in shapes.items()} for _ in range(3)]
    return params, grads


def run(optimizer, params, grads):
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# ---------------------------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize("schedule, warmup, expected", [
    # (step, rate / learning_rate) pairs.
    ("linear", 0, [(0, 1.0), (50, 0.5), (75, 0.25), (100, 0.0), (150, 0.0)]),
    ("linear", 20, [(0, 0.0), (10, 0.5), (20, 1.0), (60, 0.5), (100, 0.0), (120, 0.0)]),
    ("constant", 0, [(0, 1.0), (50, 1.0), (100, 1.0)]),
    ("constant", 10, [(0, 0.0), (5, 0.5), (10, 1.0), (100, 1.0)]),
    ("rsqrt", 10, [(0, 0.0), (5, 0.5), (10, 1.0), (40, 0.5), (90, 1 / 3)]),
    ("rsqrt", 0, [(0, 1.0), (1, 1.0), (4, 0.5), (100, 0.1)]),
])
def test_schedule_values(schedule, warmup, expected):
    rate = optimizers.learning_rate_schedule(learning_rate=2e-3, total_steps=100,
                                             warmup_steps=warmup, schedule=schedule)
    for step, fraction in expected:
        np.testing.assert_allclose(float(rate(step)), 2e-3 * fraction, rtol=1e-6, atol=1e-12,
                                   err_msg=f"step {step}")


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "cosine"}, "make_optimizer.schedule='cosine'"),
    ({"warmup_steps": 200}, "make_optimizer.warmup_steps=200"),
    ({"total_steps": 0}, "total_steps must be > 0"),
    ({"optimizer": "sgd"}, "make_optimizer.optimizer='sgd'"),
    ({"gradient_clip_norm": 0.0}, "gradient_clip_norm"),
    ({"weight_decay": 0.1}, "weight_decay is for optimizer='adamw'"),
])
def test_bad_settings_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optimizers.make_optimizer(**{"total_steps": 100, **kwargs})


# ---------------------------------------------------------------------------------------------
# Adafactor.


def test_adafactor_factors_2d_params_with_both_dims_at_least_the_threshold():
    params, _ = params_and_grads()
    state = optimizers.make_optimizer(total_steps=10, min_dim_size_to_factor=8).init(params)
    factored = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, optax.FactoredState)) if isinstance(s, optax.FactoredState))
    shapes = {field: jax.tree.map(jnp.shape, getattr(factored, field))
              for field in ("v_row", "v_col", "v")}
    # w [16, 24]: rows keep dim 0 (the mean is over the largest, 24), columns keep dim 1.
    assert (shapes["v_row"]["w"], shapes["v_col"]["w"], shapes["v"]["w"]) == ((16,), (24,), (1,))
    # stacked [2, 16, 24]: the two largest dims are factored, the leading one kept.
    assert (shapes["v_row"]["stacked"], shapes["v_col"]["stacked"]) == ((2, 16), (2, 24))
    # thin [4, 24]: 4 < 8, so a full second moment; b is 1-D.
    assert (shapes["v_row"]["thin"], shapes["v"]["thin"]) == ((1,), (4, 24))
    assert shapes["v"]["b"] == (24,)
    # With T5's threshold of 128 nothing here is factored.
    state = optimizers.make_optimizer(total_steps=10).init(params)
    assert all(jnp.shape(v) == jnp.shape(params[k]) for k, v in state[0].v.items())


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_adafactor_matches_optax_adafactor_with_t5_settings(schedule):
    params, grads = params_and_grads()
    rate = optimizers.learning_rate_schedule(learning_rate=1e-2, total_steps=4,
                                             schedule=schedule)
    ours, _ = run(optimizers.make_optimizer(learning_rate=1e-2, total_steps=4, schedule=schedule,
                                            min_dim_size_to_factor=8), params, grads)
    reference = optax.adafactor(learning_rate=rate, min_dim_size_to_factor=8, decay_rate=0.8,
                                clipping_threshold=1.0, multiply_by_parameter_scale=True,
                                momentum=None, factored=True, eps=1e-30)
    expected, _ = run(reference, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours,
                 expected)


def test_adafactor_first_step_by_hand():
    """Step 1: beta2 = 1 - 1^-0.8 = 0, so v = g^2 + 1e-30 and the update is g / |g| = sign(g);
    its RMS is 1 (no clipping); times lr and max(RMS(param), 1e-3)."""
    param = jnp.asarray([0.5, -2.0, 1e-5, 3.0], jnp.float32)
    grad = jnp.asarray([0.3, -1e-4, 5.0, -7.0], jnp.float32)
    optimizer = optimizers.make_optimizer(learning_rate=0.1, total_steps=10, schedule="constant")
    updates, _ = optimizer.update({"p": grad}, optimizer.init({"p": param}), {"p": param})
    param_rms = np.sqrt(np.mean(np.square(np.asarray(param))))
    np.testing.assert_allclose(updates["p"], -0.1 * param_rms * np.sign(grad), rtol=1e-6)


def test_gradient_clipping_comes_first():
    params, grads = params_and_grads()
    ours, _ = run(optimizers.make_optimizer(learning_rate=1e-2, total_steps=4, schedule="constant",
                                            gradient_clip_norm=0.5, optimizer="adamw"),
                  params, grads)
    expected, _ = run(optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)), params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours,
                 expected)
    unclipped, _ = run(optax.adam(1e-2), params, grads)
    assert not np.allclose(ours["w"], unclipped["w"], rtol=1e-6, atol=1e-7)


def test_adamw_decays_matrices_only():
    params, grads = params_and_grads()
    ours, _ = run(optimizers.make_optimizer(learning_rate=1e-2, total_steps=4, schedule="constant",
                                            optimizer="adamw", weight_decay=0.1), params, grads)
    mask = {k: v.ndim >= 2 for k, v in params.items()}
    expected, _ = run(optax.adamw(1e-2, weight_decay=0.1, mask=mask), params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours,
                 expected)


def test_current_learning_rate_is_the_rate_of_the_last_update():
    params, grads = params_and_grads()
    optimizer = optimizers.make_optimizer(learning_rate=1.0, total_steps=4, warmup_steps=2,
                                          gradient_clip_norm=1.0)
    state = optimizer.init(params)
    seen = [float(optimizers.current_learning_rate(state))]
    for g in grads:
        _, state = optimizer.update(g, state, params)
        seen.append(float(optimizers.current_learning_rate(state)))
    np.testing.assert_allclose(seen, [0.0, 0.0, 0.5, 1.0], atol=1e-7)
    assert np.isnan(float(optimizers.current_learning_rate(optax.sgd(0.1).init(params))))


# ---------------------------------------------------------------------------------------------
# Adafactor per layer: a 'layers' axis is a batch of separate weights (t5x's FactorDim.BATCH).


def numpy_adafactor_per_layer(params, grads, learning_rate):
    """Unfactored T5 Adafactor on a stacked [layers, ...] parameter, by hand, per layer."""
    params, v = np.asarray(params, np.float64), 0.0
    layer_rms = lambda x: np.sqrt(np.mean(np.square(x), axis=(1, 2), keepdims=True))  # noqa: E731
    for t, grad in enumerate(np.asarray(g, np.float64) for g in grads):
        beta2 = 1.0 - (t + 1.0) ** -0.8
        v = beta2 * v + (1.0 - beta2) * (grad * grad + 1e-30)
        update = grad / np.sqrt(v)
        update = update / np.maximum(1.0, layer_rms(update))  # clipping at block RMS 1
        params = params - learning_rate * np.maximum(layer_rms(params), 1e-3) * update
    return params


def test_clipping_and_parameter_scale_are_per_layer_by_hand():
    """Layer 0 has RMS ~1 and a gradient that jumps 1000x at step 2 (its update is clipped);
    layer 1 has RMS ~0.01 and a falling gradient. Per layer, each keeps its own scale; one
    RMS over the stack (optax's blocks) moves layer 1 by layer 0's scale."""
    rng = np.random.default_rng(3)
    params = rng.normal(size=(2, 16, 24)) * np.array([1.0, 0.01])[:, None, None]
    grads = [rng.normal(size=(2, 16, 24)) * np.array(scales)[:, None, None]
             for scales in ([1e-3, 1.0], [1.0, 1e-3], [1.0, 1e-3])]
    expected = numpy_adafactor_per_layer(params, grads, learning_rate=0.1)
    spec = {"stacked": P("layers", "embed", "mlp")}

    def train(optimizer):
        final, _ = run(optimizer, {"stacked": jnp.asarray(params, jnp.float32)},
                       [{"stacked": jnp.asarray(g, jnp.float32)} for g in grads])
        return np.asarray(final["stacked"])

    per_layer = train(optimizers.make_optimizer(learning_rate=0.1, total_steps=10,
                                                schedule="constant", logical_axes=spec))
    for i in range(2):  # float32 rounding is relative to each layer's own scale
        np.testing.assert_allclose(per_layer[i], expected[i], rtol=1e-5,
                                   atol=1e-6 * np.abs(expected[i]).max(), err_msg=f"layer {i}")
    # Without the axes (set_logical_axes not called), the stack is one block: layer 1 moves
    # many times further than by hand.
    whole = train(optimizers.make_optimizer(learning_rate=0.1, total_steps=10,
                                            schedule="constant"))
    moved = lambda final: np.abs(final[1] - params[1]).mean()  # noqa: E731
    assert moved(whole) > 10 * moved(expected)


def test_stacked_params_train_as_their_layers_one_by_one():
    """Factoring, clipping and scale of a [layers, ...] parameter equal those of each layer
    alone: the factored axes are the two largest weight axes ([3, 24] is not factored at
    all, though optax would factor it across layers), and the state stacks the layers'."""
    rng = np.random.default_rng(1)
    shapes = {"kernel": (3, 16, 24), "scale": (3, 24), "wide": (3, 40, 4)}
    specs = {"kernel": P("layers", "embed", "mlp"), "scale": P("layers", "embed"),
             "wide": P("layers", "vocab", "heads")}

    def layered(shape, low, high):  # each layer at its own scale, 10^low to 10^high
        scales = 10 ** rng.uniform(low, high, size=(shape[0],) + (1,) * (len(shape) - 1))
        return jnp.asarray(rng.normal(size=shape) * scales, jnp.float32)

    params = {k: layered(s, -2, 0) for k, s in shapes.items()}
    grads = [{k: layered(s, -3, 1) for k, s in shapes.items()} for _ in range(4)]
    make = functools.partial(optimizers.make_optimizer, learning_rate=1e-2, total_steps=10,
                             min_dim_size_to_factor=3)
    stacked, stacked_state = run(make(logical_axes=specs), params, grads)
    layer = lambda tree, i: {f"{k}_{i}": v[i] for k, v in tree.items()}  # noqa: E731
    merge = lambda trees: {k: v for tree in trees for k, v in tree.items()}  # noqa: E731
    one_by_one, state = run(make(), merge(layer(params, i) for i in range(3)),
                            [merge(layer(g, i) for i in range(3)) for g in grads])
    for name in shapes:
        for i in range(3):
            np.testing.assert_allclose(stacked[name][i], one_by_one[f"{name}_{i}"], rtol=1e-6,
                                       atol=1e-7, err_msg=f"{name}[{i}]")
            for field in ("v_row", "v_col", "v"):
                per_layer = getattr(state[0], field)[f"{name}_{i}"]
                whole = getattr(stacked_state[0], field)[name]
                np.testing.assert_allclose(whole if per_layer.shape == (1,) else whole[i],
                                           per_layer, rtol=1e-6, err_msg=f"{field} {name}[{i}]")
    assert stacked_state[0].v["scale"].shape == (3, 24)  # one weight axis: not factored
    assert stacked_state[0].v_row["wide"].shape == (3, 4)  # mean over vocab (40)


def test_a_model_with_layers_needs_an_optimizer_built_with_its_axes():
    """The optimiser is built once with the model's axes and never changed; a scanned model
    refuses one built without them (its statistics would mix the layers)."""
    scanned = {"w": P("layers", "embed")}
    optimizer = optimizers.make_optimizer(total_steps=10, logical_axes=scanned)
    optimizers.check_logical_axes(optimizer, scanned)  # built with them: fine
    for other in (optimizers.make_optimizer(total_steps=10),
                  optimizers.make_optimizer(total_steps=10, logical_axes={"w": P(None, "embed")})):
        with pytest.raises(ValueError, match="built without this model's logical axes"):
            optimizers.check_logical_axes(other, scanned)
    optimizers.check_logical_axes(optimizers.make_optimizer(total_steps=10),
                                  {"w": P(None, "embed")})  # no layers axis: nothing to mix
    optimizers.check_logical_axes(optax.adam(1e-3), scanned)  # not ours: not checked
    with pytest.raises(ValueError, match="logical_axes do not match the parameters"):
        optimizer.init({"v": jnp.zeros((2, 3))})


# Scanned and unrolled tiny dual encoders, several steps, from the same initial parameters.

NUM_LAYERS, BATCH_SIZE, LENGTH = 2, 8, 8
# At temperature 0.01 a random tiny model's softmax saturates, and tokens seen only by
# saturated queries get gradients of ~1e-10 whose rounding (scanned or not) Adafactor's
# normalisation turns into O(learning rate) differences; at 1 every gradient is well above it.
LOSS_FN = train_step_lib.make_loss_fn(functools.partial(losses.in_batch_softmax_loss,
                                                        temperature=1.0))


def tiny_batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 128, size=(2, BATCH_SIZE, LENGTH)).astype(np.int32)
    tokens[:, :, -1] = 1  # EOS
    tokens[:, ::2, -3:] = 0  # padding in half the rows
    return {"query_tokens": tokens[0], "passage_tokens": tokens[1],
            "query_ids": np.arange(BATCH_SIZE, dtype=np.int32),
            "passage_ids": np.arange(BATCH_SIZE, dtype=np.int32)}


def train_tiny(scan_layers, remat_policy, mesh_shape, rules_name, init_params=None, steps=3):
    """(initial params, final state) on the host after `steps` Adafactor steps."""
    config = t5.t5_1_1_config("tiny", num_layers=NUM_LAYERS, dropout_rate=0.0,
                              scan_layers=scan_layers, remat_policy=remat_policy)
    model = dual_encoder.DualEncoder(config, "ade_spl", projection_dim=16)
    # min_dim_size_to_factor=2 factors every matrix, and would factor the [layers, embed]
    # norm scales across layers if 'layers' were a weight axis.
    devices = jax.devices()[:1] if mesh_shape == (1, 1) else None
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    rules = partitioning.logical_axis_rules(rules_name)
    optimizer = optimizers.make_optimizer(
        learning_rate=1e-2, total_steps=10, min_dim_size_to_factor=2,
        logical_axes=train_step_lib.param_logical_specs(model, tiny_batch(0), mesh, rules))
    state, shardings = train_step_lib.init_train_state(model, optimizer, tiny_batch(0), mesh, rules,
                                                       init_params=init_params)
    initial_params = jax.device_get(state.params)
    batch_shardings = partitioning.batch_shardings(tiny_batch(0), mesh, rules)
    step = train_step_lib.make_train_step(model, optimizer, LOSS_FN, shardings, batch_shardings,
                                          mesh, rules)
    for seed in range(steps):
        state, _ = step(state, jax.device_put(tiny_batch(seed), batch_shardings))
    return initial_params, jax.device_get(state)


def assert_scanned_equals_unrolled(scanned, unrolled, what):
    """Each [layers, ...] leaf of `scanned`, split, equals the layers_{i} leaves of `unrolled`
    (a (1,) placeholder equals each layer's); every other leaf equals its namesake."""
    expected = dict(jax.tree_util.tree_flatten_with_path(unrolled)[0])
    stack = jax.tree_util.DictKey("layers")
    compared = set()
    for path, value in jax.tree_util.tree_flatten_with_path(scanned)[0]:
        pairs = [(path, value)]
        if stack in path:
            k = path.index(stack)
            pairs = [(path[:k] + (jax.tree_util.DictKey(f"layers_{i}"),) + path[k + 1:],
                      value if np.shape(value) == (1,) else value[i]) for i in range(NUM_LAYERS)]
        for unrolled_path, part in pairs:
            want = np.asarray(expected[unrolled_path])
            np.testing.assert_allclose(part, want, rtol=1e-5,
                                       atol=1e-6 + 1e-5 * float(np.max(np.abs(want))),
                                       err_msg=what + jax.tree_util.keystr(unrolled_path))
            compared.add(unrolled_path)
    assert compared == set(expected), what


@functools.lru_cache(maxsize=None)
def unrolled_on_one_device(remat_policy):
    return train_tiny(False, remat_policy, (1, 1), "data")


@pytest.mark.parametrize("mesh_shape, rules_name", [((1, 1), "data"), ((2, 4), "fsdp_model")])
@pytest.mark.parametrize("remat_policy", ["none", "full"])
@pytest.mark.slow
def test_scanned_layers_train_as_unrolled_ones(remat_policy, mesh_shape, rules_name):
    """The scanned model, on one device or sharded, against the unrolled one on one device."""
    initial, unrolled = unrolled_on_one_device(remat_policy)
    _, scanned = train_tiny(True, remat_policy, mesh_shape, rules_name,
                            init_params=t5.stack_layer_params(initial, NUM_LAYERS))
    assert scanned.params["query_encoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (2, 64, 32)
    assert_scanned_equals_unrolled(scanned.params, unrolled.params, "params")
    assert_scanned_equals_unrolled(scanned.opt_state, unrolled.opt_state, "opt_state")
    assert int(scanned.step) == int(unrolled.step) == 3


# ---------------------------------------------------------------------------------------------
# Optimiser-state specs.

PARAM_SPECS = {"w": P("embed", "mlp"), "thin": P("heads", "embed"), "b": P("embed"),
               "stacked": P("layers", "embed", "mlp")}


def test_adafactor_state_specs_drop_the_factored_axis():
    params, _ = params_and_grads()
    optimizer = optimizers.make_optimizer(total_steps=10, min_dim_size_to_factor=8,
                                          gradient_clip_norm=1.0)
    state = jax.eval_shape(optimizer.init, params)
    specs = optimizers.opt_state_logical_specs(state, params, PARAM_SPECS)
    assert jax.tree.structure(specs) == jax.tree.structure(state)  # one spec per state leaf
    factored = specs[1]  # after the global-norm clipping
    assert isinstance(factored, optax.FactoredState) and factored.count == P()
    # v_row of w [embed, mlp] averages over mlp (24 > 16) and keeps embed; v_col keeps mlp.
    assert (factored.v_row["w"], factored.v_col["w"]) == (P("embed"), P("mlp"))
    assert factored.v["w"] == P()
    assert factored.v_row["stacked"] == P("layers", "embed")
    assert factored.v_col["stacked"] == P("layers", "mlp")
    # Unfactored: the full second moment shards like its parameter, placeholders replicated.
    assert (factored.v["thin"], factored.v_row["thin"]) == (P("heads", "embed"), P())
    assert factored.v["b"] == P("embed")
    for leaf_spec, leaf in zip(jax.tree.leaves(specs), jax.tree.leaves(state)):
        assert len(leaf_spec) <= leaf.ndim  # a valid spec for each leaf's rank


def test_adamw_state_specs_follow_the_params():
    params, _ = params_and_grads()
    optimizer = optimizers.make_optimizer(total_steps=10, optimizer="adamw", weight_decay=0.1)
    state = jax.eval_shape(optimizer.init, params)
    specs = optimizers.opt_state_logical_specs(state, params, PARAM_SPECS)
    adam = specs[0]
    assert adam.mu == PARAM_SPECS and adam.nu == PARAM_SPECS and adam.count == P()
    scalars = [s for s, leaf in zip(jax.tree.leaves(specs), jax.tree.leaves(state))
               if leaf.ndim == 0]
    assert scalars and all(s == P() for s in scalars)
