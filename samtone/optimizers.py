"""Optimisers and learning-rate schedules, and the shardings of their state.

The default is Adafactor with the settings T5 was trained with (t5x `adafactor.py`):
factored second moments, decay rate 0.8 (beta2_t = 1 - (t + 1)^-0.8), update clipping at
block RMS 1.0, no momentum, and the step multiplied by the parameter's scale
max(RMS(param), 1e-3). AdamW is there for users who prefer it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

SCHEDULES = ("linear", "constant", "rsqrt")
OPTIMIZERS = ("adafactor", "adamw")


def learning_rate_schedule(*, learning_rate: float = 1e-3, total_steps: int, warmup_steps: int = 0,
                           schedule: str = "linear") -> optax.Schedule:
    """The learning rate at each step: a linear warmup from 0, then one of

      "linear"    decays linearly to 0 at `total_steps` (the SamToNe paper's fine-tuning),
      "constant"  stays at `learning_rate`,
      "rsqrt"     learning_rate * sqrt(max(warmup_steps, 1) / step) after warmup (T5's
                  inverse square root, scaled so that `learning_rate` is the peak).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"make_optimizer.schedule={schedule!r}; expected one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"make_optimizer.warmup_steps={warmup_steps} must be in [0, total_steps="
                         f"{total_steps}]")
    if learning_rate < 0:
        raise ValueError(f"make_optimizer.learning_rate={learning_rate} must be >= 0")

    def rate(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else jnp.float32(1.0)
        if schedule == "linear":
            decay_steps = max(total_steps - warmup_steps, 1)
            after = jnp.clip(1.0 - (step - warmup_steps) / decay_steps, 0.0, 1.0)
        elif schedule == "constant":
            after = jnp.float32(1.0)
        else:
            start = max(warmup_steps, 1)
            after = jnp.sqrt(start / jnp.maximum(step, start))
        return learning_rate * jnp.where(step < warmup_steps, warmup, after)

    return rate


def make_optimizer(*, learning_rate: float = 1e-3, total_steps: int, warmup_steps: int = 0,
                   schedule: str = "linear", gradient_clip_norm: float | None = None,
                   optimizer: str = "adafactor", min_dim_size_to_factor: int = 128,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """The optimiser for `total_steps` of training, learning rate schedule included.

    Args:
      learning_rate: peak learning rate.
      total_steps: length of the schedule (train.num_train_steps).
      warmup_steps: linear warmup from 0.
      schedule: "linear", "constant" or "rsqrt", see `learning_rate_schedule`.
      gradient_clip_norm: clip the gradients' global norm to this first (None: no clipping).
      optimizer: "adafactor" (T5 settings) or "adamw".
      min_dim_size_to_factor: Adafactor factors a weight's second moment when its two largest
        dimensions are at least this big (128 as in T5); smaller weights keep a full one.
      weight_decay: AdamW's decoupled weight decay, applied to matrices only.

    The current learning rate lives in the state; `current_learning_rate` reads it.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"make_optimizer.optimizer={optimizer!r}; expected one of {OPTIMIZERS}")
    if gradient_clip_norm is not None and gradient_clip_norm <= 0:
        raise ValueError(f"make_optimizer.gradient_clip_norm={gradient_clip_norm} must be > 0 "
                         "or None")
    rate = learning_rate_schedule(learning_rate=learning_rate, total_steps=total_steps,
                                  warmup_steps=warmup_steps, schedule=schedule)
    # scale_by_learning_rate flips the sign (descent); injected so the state holds the rate.
    scale_by_rate = optax.inject_hyperparams(optax.scale_by_learning_rate,
                                             static_args=("flip_sign",))(learning_rate=rate)
    if optimizer == "adafactor":
        if weight_decay:
            raise ValueError("make_optimizer.weight_decay is for optimizer='adamw'; T5's Adafactor "
                             "uses none")
        # optax.adafactor's chain, with the rate applied last (scalings commute).
        steps = [
            optax.scale_by_factored_rms(factored=True, decay_rate=0.8,
                                        min_dim_size_to_factor=min_dim_size_to_factor,
                                        epsilon=1e-30),
            optax.clip_by_block_rms(1.0),
            optax.scale_by_param_block_rms(min_scale=1e-3),
        ]
    else:
        steps = [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)]
        if weight_decay:
            steps.append(optax.add_decayed_weights(
                weight_decay, mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
    if gradient_clip_norm is not None:
        steps.insert(0, optax.clip_by_global_norm(gradient_clip_norm))
    return optax.chain(*steps, scale_by_rate)


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of the last update (or of step 0 before any), NaN if not recorded.

    Found under the name 'learning_rate' among the state's scalars, as `make_optimizer` and
    `optax.inject_hyperparams` store it.
    """
    found = optax.tree_utils.tree_get(
        opt_state, "learning_rate", default=None,
        filtering=lambda _, value: hasattr(value, "shape") and np.ndim(value) == 0)
    return jnp.float32(jnp.nan) if found is None else jnp.asarray(found, jnp.float32)


def opt_state_logical_specs(opt_state: Any, params: Any, param_specs: Any) -> Any:
    """Logical PartitionSpecs of an optimiser state, derived from the parameters' own.

    Every subtree shaped like `params` (Adam's moments, Adafactor's full second moments)
    takes each parameter's spec where the leaf has the parameter's shape. Adafactor's
    factored moments drop one axis: v_row = mean over the largest dimension d0, v_col = mean
    over the second largest d1 (optax's choice, recomputed here the same way), so they keep
    the parameter's names minus that axis' name. Everything else (counters, the learning
    rate, placeholders of shape (1,)) is replicated.

    Args:
      opt_state: the state or its `jax.eval_shape`.
      params: the (unboxed, possibly abstract) parameters it was initialised from.
      param_specs: the parameters' logical PartitionSpecs.
    """
    params_def = jax.tree.structure(params)
    param_leaves = params_def.flatten_up_to(params)
    spec_leaves = [_full_names(spec, param) for spec, param in
                   zip(params_def.flatten_up_to(param_specs), param_leaves)]

    def like_params(tree, spec_for):
        leaves = params_def.flatten_up_to(tree)
        return params_def.unflatten(
            [spec_for(leaf, param, names) for leaf, param, names in
             zip(leaves, param_leaves, spec_leaves)])

    def same_shape(leaf, param, names):
        return PartitionSpec(*names) if np.shape(leaf) == np.shape(param) else PartitionSpec()

    def visit(node):
        if isinstance(node, optax.FactoredState):
            return _factored_state_specs(node, params_def, param_leaves, spec_leaves)
        treedef = jax.tree.structure(node)
        if treedef.num_leaves == 0:  # None, EmptyState(), {}: nothing to place
            return node
        if jax.tree_util.treedef_is_leaf(treedef):
            return PartitionSpec()
        if treedef == params_def:
            return like_params(node, same_shape)
        # Recurse one level: the immediate children are the leaves of this flattening.
        children, one_level = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        return one_level.unflatten([visit(child) for child in children])

    return visit(opt_state)


def _full_names(spec: PartitionSpec, param) -> tuple:
    """The spec's names padded with None to the parameter's rank (P() for unboxed leaves)."""
    names = tuple(spec) if spec is not None else ()
    return names + (None,) * (np.ndim(param) - len(names))


def _factored_state_specs(state, params_def, param_leaves, spec_leaves) -> optax.FactoredState:
    rows, cols, fulls = [], [], []
    for param, names, v_row, v_col, v in zip(
            param_leaves, spec_leaves, params_def.flatten_up_to(state.v_row),
            params_def.flatten_up_to(state.v_col), params_def.flatten_up_to(state.v)):
        shape = tuple(np.shape(param))
        if tuple(np.shape(v)) == shape:  # not factored: v is the full second moment
            rows.append(PartitionSpec())
            cols.append(PartitionSpec())
            fulls.append(PartitionSpec(*names))
            continue
        sorted_dims = np.argsort(shape)  # exactly as optax._src.factorized._factored_dims
        d1, d0 = int(sorted_dims[-2]), int(sorted_dims[-1])
        rows.append(_without_axis(names, shape, d0, v_row, "v_row"))
        cols.append(_without_axis(names, shape, d1, v_col, "v_col"))
        fulls.append(PartitionSpec())
    return optax.FactoredState(count=PartitionSpec(), v_row=params_def.unflatten(rows),
                               v_col=params_def.unflatten(cols), v=params_def.unflatten(fulls))


def _without_axis(names: tuple, shape: tuple, axis: int, leaf, what: str) -> PartitionSpec:
    """The parameter's spec without `axis`, checked against the moment's actual shape."""
    expected = shape[:axis] + shape[axis + 1:]
    if tuple(np.shape(leaf)) != expected:
        raise ValueError(f"Adafactor {what} of a {shape} parameter has shape {np.shape(leaf)}, "
                         f"expected {expected}: optax changed how it factors")
    return PartitionSpec(*(names[:axis] + names[axis + 1:]))
