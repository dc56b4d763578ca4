"""Learning-rate schedules, T5 Adafactor against optax's reference, optimiser-state specs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from samtone import optimizers


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
