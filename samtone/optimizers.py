"""Optimisers and learning-rate schedules, and the shardings of their state.

The default is Adafactor as t5x trains T5 (`adafactor.py`): factored second moments, decay
rate 0.8 (beta2_t = 1 - (t + 1)^-0.8), update clipping at block RMS 1.0, no momentum, and
the step multiplied by the parameter's scale max(RMS(param), 1e-3). Like t5x's
`standard_logical_factor_rules`, a parameter's 'layers' axis (the stack of scan_layers=True)
is a batch of separate weights: the RMS, the clipping and the factoring are per layer, so a
scanned model trains as the unrolled one. So the optimiser is built once the model is known,
with the parameters' logical axis names (`make_optimizer(logical_axes=...)`, from
`train_step.param_logical_specs`; t5x's `set_param_axes`), and never changed after; a
scanned model refuses an optimiser built without them. AdamW is there for users who prefer it.
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
# Logical axes whose entries are separate weights, never averaged over (t5x's FactorDim.BATCH).
BATCH_AXES = ("layers",)
_NO_PARAMS = "Adafactor's update needs the parameters: optimizer.update(grads, state, params)"


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


class _LogicalAxes:
    """The parameters' logical axis names, shared by one optimiser's transformations."""

    def __init__(self, specs: Any = None):
        self.specs = specs

    def batch_axes(self, tree: Any) -> tuple[list, jax.tree_util.PyTreeDef]:
        """(each leaf's batch-axis positions, the treedef) of `tree` (params or updates)."""
        leaves, treedef = jax.tree.flatten(tree)
        if self.specs is None:
            return [()] * len(leaves), treedef
        try:
            specs = treedef.flatten_up_to(self.specs)
        except (ValueError, TypeError) as error:
            raise ValueError(f"make_optimizer: logical_axes do not match the parameters' tree: "
                             f"{error}") from error
        return [_batch_axes(_full_names(spec, leaf)) for spec, leaf in zip(specs, leaves)], treedef


def _same_specs(a: Any, b: Any) -> bool:
    def flat(specs):
        leaves, treedef = jax.tree.flatten(
            specs, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))
        return treedef, [tuple(leaf) if leaf is not None else () for leaf in leaves]

    return flat(a) == flat(b)


class Optimizer(optax.GradientTransformationExtraArgs):
    """An optax transformation that also holds its parameters' logical axes (`logical_axes`);
    without them every axis counts as a weight axis (optax's behaviour)."""

    def __new__(cls, init, update, logical_axes: _LogicalAxes | None = None):
        self = super().__new__(cls, init, update)
        self.logical_axes = logical_axes if logical_axes is not None else _LogicalAxes()
        return self


def make_optimizer(*, learning_rate: float = 1e-3, total_steps: int, warmup_steps: int = 0,
                   schedule: str = "linear", gradient_clip_norm: float | None = None,
                   optimizer: str = "adafactor", min_dim_size_to_factor: int = 128,
                   weight_decay: float = 0.0, logical_axes: Any = None) -> Optimizer:
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
        A 'layers' axis is not a dimension of the weight.
      weight_decay: AdamW's decoupled weight decay, applied to matrices only.
      logical_axes: the parameters' logical PartitionSpecs (a tree like the parameters, as
        `train_step.param_logical_specs` gives); needed for a model with a 'layers' axis
        (scan_layers), whose layers are then separate weights. samtone.train passes them.

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
    axes = _LogicalAxes(logical_axes)
    if optimizer == "adafactor":
        if weight_decay:
            raise ValueError("make_optimizer.weight_decay is for optimizer='adamw'; T5's Adafactor "
                             "uses none")
        # optax.adafactor's chain and state, each step per layer; the rate comes last (scalings
        # commute).
        steps = [
            scale_by_factored_rms(axes, decay_rate=0.8,
                                  min_dim_size_to_factor=min_dim_size_to_factor, epsilon=1e-30),
            clip_by_block_rms(axes, 1.0),
            scale_by_param_block_rms(axes, min_scale=1e-3),
        ]
    else:
        steps = [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)]
        if weight_decay:
            steps.append(optax.add_decayed_weights(
                weight_decay, mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
    if gradient_clip_norm is not None:
        steps.insert(0, optax.clip_by_global_norm(gradient_clip_norm))
    chain = optax.chain(*steps, scale_by_rate)
    return Optimizer(chain.init, chain.update, axes)


def check_logical_axes(optimizer: optax.GradientTransformation, logical_axes: Any) -> None:
    """Refuses an optimiser from `make_optimizer` whose logical axes are not the model's when
    the model has a 'layers' axis (its statistics would mix the layers). Other optax
    transformations are not checked."""
    axes = getattr(optimizer, "logical_axes", None)
    if not isinstance(axes, _LogicalAxes) or not _has_batch_axis(logical_axes):
        return
    if axes.specs is None or not _same_specs(axes.specs, logical_axes):
        raise ValueError("the optimiser was built without this model's logical axes, and the "
                         "model has a 'layers' axis (scan_layers): build it with "
                         "make_optimizer(..., logical_axes=train_step.param_logical_specs(...))")


def _has_batch_axis(specs: Any) -> bool:
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))
    return any(name in BATCH_AXES for leaf in leaves if leaf is not None for name in leaf)


# ---------------------------------------------------------------------------------------------
# Adafactor's steps with batch axes: optax's, except that each statistic is per layer.


def _block_rms(x: jax.Array, batch_axes: tuple[int, ...]) -> jax.Array:
    """RMS of `x` over every axis but `batch_axes`, reduced axes kept with size 1."""
    axes = tuple(i for i in range(np.ndim(x)) if i not in batch_axes)
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def _factored_dims(shape: tuple, batch_axes: tuple[int, ...], min_dim_size_to_factor: int
                   ) -> tuple[int, int] | None:
    """(d1, d0): the second largest and the largest axis that is not a batch axis (ties keep
    the axis order, as optax's argsort), or None when the smaller is below the threshold."""
    by_size = sorted((i for i in range(len(shape)) if i not in batch_axes), key=lambda i: shape[i])
    if len(by_size) < 2 or shape[by_size[-2]] < min_dim_size_to_factor:
        return None
    return by_size[-2], by_size[-1]


def scale_by_factored_rms(logical_axes: _LogicalAxes, *, decay_rate: float,
                          min_dim_size_to_factor: int, epsilon: float
                          ) -> optax.GradientTransformation:
    """optax.scale_by_factored_rms (same state) with the factored axes chosen per layer.

    v_row averages g^2 + epsilon over d0, v_col over d1, both keeping the batch axes; the
    update is g / sqrt(v_row / mean_d1(v_row) * v_col), or g / sqrt(v) when not factored.
    """
    def init(params):
        batch_axes, treedef = logical_axes.batch_axes(params)
        rows, cols, fulls = [], [], []
        for param, batch in zip(treedef.flatten_up_to(params), batch_axes):
            shape, placeholder = tuple(np.shape(param)), jnp.zeros((1,), param.dtype)
            dims = _factored_dims(shape, batch, min_dim_size_to_factor)
            if dims is None:
                row, col, full = placeholder, placeholder, jnp.zeros(shape, param.dtype)
            else:
                d1, d0 = dims
                row = jnp.zeros(_without(shape, d0), param.dtype)
                col = jnp.zeros(_without(shape, d1), param.dtype)
                full = placeholder
            rows.append(row)
            cols.append(col)
            fulls.append(full)
        return optax.FactoredState(count=jnp.zeros([], jnp.int32), v_row=treedef.unflatten(rows),
                                   v_col=treedef.unflatten(cols), v=treedef.unflatten(fulls))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        batch_axes, treedef = logical_axes.batch_axes(params)
        decay = 1.0 - (state.count + 1).astype(jnp.float32) ** -decay_rate
        scaled, rows, cols, fulls = [], [], [], []
        for grad, v_row, v_col, v, param, batch in zip(
                treedef.flatten_up_to(updates), treedef.flatten_up_to(state.v_row),
                treedef.flatten_up_to(state.v_col), treedef.flatten_up_to(state.v),
                treedef.flatten_up_to(params), batch_axes):
            placeholder = jnp.zeros((1,), param.dtype)
            grad_sqr = jnp.square(grad) + epsilon
            dims = _factored_dims(tuple(np.shape(param)), batch, min_dim_size_to_factor)
            if dims is None:
                v = (decay * v + (1.0 - decay) * grad_sqr).astype(param.dtype)
                v_row, v_col, update = placeholder, placeholder, grad * v ** -0.5
            else:
                d1, d0 = dims
                v_row = (decay * v_row + (1.0 - decay) * grad_sqr.mean(d0)).astype(param.dtype)
                v_col = (decay * v_col + (1.0 - decay) * grad_sqr.mean(d1)).astype(param.dtype)
                row_mean = v_row.mean(d1 - 1 if d1 > d0 else d1, keepdims=True)
                update = (grad * jnp.expand_dims((v_row / row_mean) ** -0.5, d0)
                          * jnp.expand_dims(v_col ** -0.5, d1))
                v = placeholder
            scaled.append(update)
            rows.append(v_row)
            cols.append(v_col)
            fulls.append(v)
        state = optax.FactoredState(
            count=optax.safe_increment(state.count), v_row=treedef.unflatten(rows),
            v_col=treedef.unflatten(cols), v=treedef.unflatten(fulls))
        return treedef.unflatten(scaled), state

    return optax.GradientTransformation(init, update)


def clip_by_block_rms(logical_axes: _LogicalAxes, threshold: float
                      ) -> optax.GradientTransformation:
    """optax.clip_by_block_rms per layer: u / max(1, RMS(u) / threshold)."""
    def update(updates, state, params=None):
        del params
        batch_axes, treedef = logical_axes.batch_axes(updates)
        clipped = [u / jnp.maximum(1.0, _block_rms(u, batch) / threshold)
                   for u, batch in zip(treedef.flatten_up_to(updates), batch_axes)]
        return treedef.unflatten(clipped), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_param_block_rms(logical_axes: _LogicalAxes, min_scale: float
                             ) -> optax.GradientTransformation:
    """optax.scale_by_param_block_rms per layer: u * max(RMS(param), min_scale)."""
    def update(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        batch_axes, treedef = logical_axes.batch_axes(params)
        scaled = [u * jnp.maximum(_block_rms(p, batch), min_scale) for u, p, batch in zip(
            treedef.flatten_up_to(updates), treedef.flatten_up_to(params), batch_axes)]
        return treedef.unflatten(scaled), state

    return optax.GradientTransformation(optax.init_empty_state, update)


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
    factored moments drop one axis: v_row = mean over the largest non-batch dimension d0,
    v_col = mean over the second largest d1 (recomputed here as the optimiser chose them), so
    they keep the parameter's names minus that axis' name. Everything else (counters, the
    learning rate, placeholders of shape (1,)) is replicated.

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


def _batch_axes(names: tuple) -> tuple[int, ...]:
    return tuple(i for i, name in enumerate(names) if name in BATCH_AXES)


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
        d1, d0 = _factored_axes(names, shape, v_row, v_col)
        rows.append(PartitionSpec(*_without(names, d0)))
        cols.append(PartitionSpec(*_without(names, d1)))
        fulls.append(PartitionSpec())
    return optax.FactoredState(count=PartitionSpec(), v_row=params_def.unflatten(rows),
                               v_col=params_def.unflatten(cols), v=params_def.unflatten(fulls))


def _factored_axes(names: tuple, shape: tuple, v_row, v_col) -> tuple[int, int]:
    """(d1, d0) of a factored moment: as chosen for these logical axes, or as optax chooses
    (every axis a weight axis) for a state made without them; checked against the shapes."""
    for dims in (_factored_dims(shape, _batch_axes(names), 0), _factored_dims(shape, (), 0)):
        if dims and (np.shape(v_row), np.shape(v_col)) == (_without(shape, dims[1]),
                                                            _without(shape, dims[0])):
            return dims
    raise ValueError(f"Adafactor's v_row {np.shape(v_row)} and v_col {np.shape(v_col)} of a "
                     f"{shape} parameter {PartitionSpec(*names)} drop none of its two largest "
                     "axes: not a state of make_optimizer's Adafactor")


def _without(items: tuple, axis: int) -> tuple:
    return tuple(items[:axis]) + tuple(items[axis + 1:])
