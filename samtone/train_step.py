"""The train state, its sharded initialisation, and the one jitted train step.

    state, shardings = init_train_state(model, optimizer, example_batch, mesh, rules)
    train_step = make_train_step(model, optimizer, make_loss_fn(loss), shardings,
                                 batch_shardings, mesh, rules)
    state, metrics = train_step(state, batch)      # batch: global jax.Arrays

Shardings come from the parameters' logical axis names through the rule table, so data,
tensor and fully sharded data parallelism are the same code with a different table. The
batch is one global array, so the loss sees every query and passage of the global batch
(XLA gathers the embeddings for the similarity matrix); nothing here is per device.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from samtone import grad_cache
from samtone import losses
from samtone import optimizers
from samtone import partitioning
from samtone.checkpoints import lazy
from samtone.data import packing
from samtone.errors import ConfigError
from samtone.models import t5

LossFn = Callable[[dict, dict], jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree (checkpointed as is)."""

    step: jax.Array  # int32 scalar: steps taken, skipped non-finite ones included
    params: Any  # unboxed parameter tree (what model.apply takes under "params")
    opt_state: Any
    dropout_rng: jax.Array  # uint32[2] base key; step i uses fold_in(dropout_rng, i)


# ---------------------------------------------------------------------------------------------
# Initialisation.


def _abstract_batch(example_batch: dict) -> dict:
    return {name: jax.ShapeDtypeStruct(np.shape(value), value.dtype)
            for name, value in example_batch.items()}


def _seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(params key, dropout key) of `seed`."""
    params_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    return params_rng, dropout_rng


def _init_fn(model: nn.Module, example_batch: dict, seed: int, mesh: Mesh, rules) -> Callable:
    """() -> boxed params of `model`, from `seed`; to be traced (eval_shape or jit)."""
    batch = _abstract_batch(example_batch)
    shapes = (batch["query_tokens"].shape, batch["passage_tokens"].shape)
    return partitioning.params_initializer(model, mesh, rules, shapes, _seed_keys(seed)[0])


def abstract_params(model: nn.Module, example_batch: dict, mesh: Mesh, rules, *,
                    seed: int = 0) -> Any:
    """The boxed parameters as ShapeDtypeStructs (logical axes kept), allocating nothing: one
    trace of the model's init, which the functions below take instead of tracing again."""
    return jax.eval_shape(_init_fn(model, example_batch, seed, mesh, rules))


def param_logical_specs(model: nn.Module, example_batch: dict, mesh: Mesh, rules, *,
                        seed: int = 0) -> Any:
    """The parameters' logical PartitionSpecs (what `make_optimizer(logical_axes=)` takes),
    allocating nothing."""
    return partitioning.logical_specs(abstract_params(model, example_batch, mesh, rules,
                                                      seed=seed))


def train_state_shardings(model: nn.Module, optimizer: optax.GradientTransformation,
                          example_batch: dict, mesh: Mesh, rules, *, seed: int = 0,
                          boxed_params: Any = None) -> tuple[TrainState, TrainState]:
    """(TrainState of ShapeDtypeStructs, TrainState of NamedShardings), allocating nothing.
    `boxed_params`: `abstract_params(...)` of the same arguments, if already traced."""
    boxed = (boxed_params if boxed_params is not None
             else abstract_params(model, example_batch, mesh, rules, seed=seed))
    param_specs = partitioning.logical_specs(boxed)
    params = nn.unbox(boxed)
    optimizers.check_logical_axes(optimizer, param_specs)  # Adafactor: per-layer statistics
    opt_state = jax.eval_shape(optimizer.init, params)
    specs = TrainState(
        step=PartitionSpec(), params=param_specs,
        opt_state=optimizers.opt_state_logical_specs(opt_state, params, param_specs),
        dropout_rng=PartitionSpec())
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_state,
                          dropout_rng=jax.eval_shape(lambda: _seed_keys(seed)[1]))
    return abstract, partitioning.logical_shardings(specs, mesh, rules)


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation,
                     example_batch: dict, mesh: Mesh, rules, *, seed: int = 0,
                     init_params: Any = None, boxed_params: Any = None
                     ) -> tuple[TrainState, TrainState]:
    """A fresh TrainState created directly in its shardings, and those shardings.

    Random initialisation runs under `jax.jit(out_shardings=...)`, so each device only ever
    holds its own shards. `init_params` (e.g. pretrained encoder towers) is a full or partial
    parameter tree, boxed or not, optionally under "params": its leaves are placed onto their
    shardings (`jax.device_put`; host arrays shard by shard; the lazy arrays of a pretrained
    checkpoint read slice by slice, each process reading only its devices' shards, and once
    for all the towers sharing it) and any parameter it lacks (e.g. the projection) is
    initialised randomly. T5 encoder layers are restacked if it has the other layer layout
    (layers_{i} vs scan_layers' layers).

    Args:
      model: the DualEncoder (any module taking (query_tokens, passage_tokens, *, deterministic)).
      optimizer: an optax transformation, e.g. `optimizers.make_optimizer(...)`.
      example_batch: a batch (arrays or ShapeDtypeStructs) with the global shapes.
      mesh, rules: the device mesh and logical axis rules.
      seed: seeds the parameters and the dropout key.
      boxed_params: `abstract_params(...)` of the same arguments, if already traced.
    """
    abstract, shardings = train_state_shardings(model, optimizer, example_batch, mesh, rules,
                                                seed=seed, boxed_params=boxed_params)
    init = _init_fn(model, example_batch, seed, mesh, rules)
    _, dropout_rng = _seed_keys(seed)
    if init_params is None:
        def init_state():
            params = nn.unbox(init())
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params), dropout_rng=dropout_rng)

        return jax.jit(init_state, out_shardings=shardings)(), shardings

    params = _place_params(init_params, abstract.params, shardings.params, init)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                       params=params, opt_state=opt_state,
                       dropout_rng=jax.device_put(dropout_rng, shardings.dropout_rng))
    return state, shardings


def _place_params(init_params, abstract_params, param_shardings, init) -> Any:
    """`init_params` on their shardings, the parameters it lacks randomly initialised."""
    given = nn.unbox(init_params)
    if isinstance(given, dict) and set(given) == {"params"}:
        given = given["params"]
    given = _align_layout(given, abstract_params, "params")
    abstract_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    given_by_path = dict(jax.tree_util.tree_flatten_with_path(given)[0])
    sharding_leaves = treedef.flatten_up_to(param_shardings)
    missing = [i for i, (path, _) in enumerate(abstract_leaves) if path not in given_by_path]
    if missing:
        def init_missing():
            leaves = jax.tree.leaves(nn.unbox(init()))
            return [leaves[i] for i in missing]

        # XLA drops the initialisers of the parameters that are not returned.
        random_values = jax.jit(init_missing, out_shardings=[sharding_leaves[i] for i in missing])()
    values = []
    random_iter = iter(random_values if missing else ())
    placed_by_id = {}  # ade's towers share each given array: read it once, then copy it
    for (path, leaf), sharding in zip(abstract_leaves, sharding_leaves):
        if path not in given_by_path:
            values.append(next(random_iter))
            continue
        value = given_by_path[path]
        if tuple(np.shape(value)) != tuple(leaf.shape):
            raise ValueError(f"init_params{jax.tree_util.keystr(path)} has shape "
                             f"{tuple(np.shape(value))}; the model's parameter has {leaf.shape}")
        placed = placed_by_id.get(id(value))
        if placed is not None and placed.sharding == sharding and placed.dtype == leaf.dtype:
            values.append(jnp.array(placed, copy=True))  # the step donates each buffer
            continue
        values.append(_place(value, leaf.dtype, sharding))
        placed_by_id[id(value)] = values[-1]
    return treedef.unflatten(values)


def _place(value, dtype, sharding: NamedSharding) -> jax.Array:
    """`value` as a global array laid out as `sharding`, each device given only its shard."""
    if isinstance(value, lazy.LazyArray):  # read now, each process only its devices' slices
        return lazy.place(value, sharding, dtype)
    if isinstance(value, jax.Array):
        return jax.device_put(value.astype(dtype), sharding)
    # A host array (every process holds all of it, as after reading a checkpoint): each
    # device's slice is copied from it, which also works when other processes own devices.
    value = np.asarray(value, dtype)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _align_layout(given, abstract, where: str, converted: dict | None = None):
    """`given` with T5 layer stacks converted to `abstract`'s layout; unknown keys are errors.

    An encoder shared by several towers (ade) is converted once, so that its leaves stay
    shared (`_place_params` reads a checkpoint's array once for all of them)."""
    converted = {} if converted is None else converted
    if not isinstance(abstract, dict):
        return given
    if not isinstance(given, dict):
        raise ValueError(f"init_params: {where} should be a dict with keys {sorted(abstract)}, "
                         f"found {type(given).__name__}")
    convert = None
    if "layers" in abstract and "layers_0" in given:
        convert = functools.partial(t5.stack_layer_params,
                                    num_layers=sum(k.startswith("layers_") for k in given))
    elif "layers_0" in abstract and "layers" in given:
        convert = t5.unstack_layer_params
    if convert is not None:
        leaves = tuple(map(id, jax.tree.leaves(given)))
        if leaves not in converted:
            converted[leaves] = convert(given)
        given = converted[leaves]
    unknown = sorted(set(given) - set(abstract))
    if unknown:
        raise ValueError(f"init_params: {where} has {unknown}, which the model does not; it has "
                         f"{sorted(abstract)}")
    return {key: _align_layout(value, abstract[key], f"{where}/{key}", converted)
            for key, value in given.items()}


# ---------------------------------------------------------------------------------------------
# The loss adapter.

# The batch fields a loss may receive besides the two [B, D] embeddings, and where they come
# from. A loss receives each of them its signature names (`taken_inputs`), so a loss never
# silently misses an input it was written to use; `train.loss_inputs`, if given, must list
# exactly those.
LOSS_INPUTS: dict[str, Callable[[dict, dict], Any]] = {
    "negatives": lambda outputs, batch: outputs.get("negatives"),
    "query_ids": lambda outputs, batch: batch.get("query_ids"),
    "passage_ids": lambda outputs, batch: batch.get("passage_ids"),
    "negative_ids": lambda outputs, batch: batch.get("negative_ids"),
    "labels": lambda outputs, batch: batch.get("labels"),
}
_FLOAT_INPUTS = ("negatives", "labels")


def _loss_name(loss: Callable) -> str:
    return getattr(loss, "__name__", getattr(getattr(loss, "func", None), "__name__",
                                             repr(loss)))


def taken_inputs(loss: Callable[..., Any]) -> tuple[str, ...] | None:
    """The LOSS_INPUTS a loss's signature names (through functools.partial and Gin); None
    for a loss that takes **kwargs (or has no signature to read): it may take any."""
    try:
        parameters = inspect.signature(loss).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return tuple(name for name in parameters if name in LOSS_INPUTS)


def _probe(loss: Callable, loss_name: str, inputs: Sequence[str]) -> None:
    """Calls the loss once on two tiny rows, so a bad hyperparameter (a temperature of 0) is
    reported now, before a run starts, not inside the first compiled step. Only the loss's
    own ConfigErrors count: anything else (a custom loss that needs negatives) waits for
    real data."""
    rows = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    probe = {"query_ids": jnp.arange(2), "passage_ids": jnp.arange(2),
             "labels": jnp.asarray([1.0, 0.0])}
    try:
        loss(rows, rows, **{name: probe[name] for name in inputs if name in probe})
    except ConfigError as error:
        raise ConfigError(f"train.loss ({loss_name}): {error}") from error
    except Exception:  # pylint: disable=broad-except
        pass


def make_loss_fn(loss: Callable[..., jax.Array], inputs: Sequence[str] | None = None) -> LossFn:
    """Adapts a pure loss of (query, passage, **inputs) to (model outputs, batch) -> scalar.

    The loss receives, as keyword arguments, each field of LOSS_INPUTS its signature names
    (`inputs`, if given, must list exactly those: one left out is refused, never dropped). One
    the batch lacks is left out, so the loss's default applies (hard negatives exist only when
    the data has them); `labels` is required (CoSENT has no default for it).
    """
    taken = taken_inputs(loss)
    if inputs is None:
        inputs = tuple(LOSS_INPUTS) if taken is None else taken
    unknown = sorted(set(inputs) - set(LOSS_INPUTS))
    if unknown:
        raise ConfigError(f"train.loss_inputs: unknown inputs {unknown}; a loss can receive "
                          f"{sorted(LOSS_INPUTS)}")
    taken = tuple(inputs) if taken is None else taken
    left_out = [name for name in taken if name not in inputs]
    not_taken = [name for name in inputs if name not in taken]
    if left_out or not_taken:
        raise ConfigError(
            f"train.loss_inputs = {list(inputs)} does not match {_loss_name(loss)}, which takes "
            f"{list(taken)}" + (f": it leaves out {left_out}" if left_out else "")
            + (f": the loss does not take {not_taken}" if not_taken else "")
            + "; leave train.loss_inputs unset (the loss's signature says what it takes)")
    loss_name = _loss_name(loss)
    _probe(loss, loss_name, inputs)

    def loss_fn(outputs: dict, batch: dict) -> jax.Array:
        given = {}
        for name in inputs:
            value = LOSS_INPUTS[name](outputs, batch)
            if value is None:
                if name == "labels":
                    raise ConfigError(f"{loss_name} needs 'labels', which the batch does not "
                                      f"have (batch keys: {sorted(batch)}): give the data a "
                                      "`label` per example")
                continue
            given[name] = value.astype(jnp.float32) if name in _FLOAT_INPUTS else value
        query = outputs["query"].astype(jnp.float32)
        passage = outputs["passage"].astype(jnp.float32)
        return jnp.asarray(loss(query, passage, **given), jnp.float32)

    loss_fn.__name__ = f"loss_fn_of_{loss_name}"
    return loss_fn


# ---------------------------------------------------------------------------------------------
# The step.


def _uses_dropout(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "dropout_rate", 0.0) > 0


def _packing_inputs(batch: dict) -> dict:
    """The DualEncoder's packed-row arguments of a packed batch; {} for one text per row.

    The numbers of texts are static: B from `query_ids` [B], K from `negative_ids` [B, K].
    """
    if not packing.is_packed(batch):
        return {}
    if "query_ids" not in batch:
        raise ValueError(f"a packed batch needs query_ids [B] (it says how many examples are "
                         f"packed); batch keys: {sorted(batch)}")
    negative_ids = batch.get("negative_ids")
    return {"query_segment_ids": batch["query_segment_ids"],
            "passage_segment_ids": batch["passage_segment_ids"],
            "num_examples": batch["query_ids"].shape[0],
            "num_negatives": 0 if negative_ids is None else negative_ids.shape[1]}


def forward_fn(model: nn.Module) -> grad_cache.Forward:
    """(params, batch, dropout key) -> the model's embeddings of the batch's texts.

    Dropout is on (deterministic=False) when the model's config has dropout_rate > 0, as
    SimCSE needs. A packed batch (segment ids) gives the same embeddings as the plain one.
    """
    deterministic = not _uses_dropout(model)

    def forward(params, batch: dict, dropout_key: jax.Array) -> dict:
        return model.apply({"params": params}, batch["query_tokens"], batch["passage_tokens"],
                           batch.get("negative_tokens"), deterministic=deterministic,
                           rngs={"dropout": dropout_key}, **_packing_inputs(batch))

    return forward


def check_packed_microbatches(batch: dict, microbatches: int) -> None:
    """Packed rows hold texts of several examples, so they cannot be split into sub-batches."""
    if microbatches > 1 and packing.is_packed(batch):
        raise ConfigError(
            f"train.microbatches={microbatches} splits the batch by rows, but packed rows "
            "(make_batch_iterator.pack=True) hold texts of several examples: use one or the "
            "other (length buckets work with microbatches)")


def loss_and_gradients(model: nn.Module, loss_fn: LossFn, params, batch: dict, dropout_rng,
                       microbatches: int = 1) -> tuple[tuple[jax.Array, dict], Any]:
    """((loss, model outputs), gradients) on one global batch; call it inside jit.

    `microbatches` > 1 computes the same loss and gradients with cached embedding gradients
    (samtone.grad_cache), holding one sub-batch's activations at a time.
    """
    forward = forward_fn(model)
    if microbatches > 1:
        check_packed_microbatches(batch, microbatches)
        return grad_cache.loss_and_gradients(forward, loss_fn, params, batch, dropout_rng,
                                             microbatches)

    def compute_loss(params):
        outputs = forward(params, batch, dropout_rng)
        return loss_fn(outputs, batch), outputs

    return jax.value_and_grad(compute_loss, has_aux=True)(params)


def _keep_if_finite(finite: jax.Array, new_state: Any, old_state: Any) -> Any:
    """`old_state` where the update is not finite, except step counters (named `count`).

    The counters advance, so the learning-rate schedule stays in step with `state.step`.
    """
    def choose(path, new, old):
        is_counter = getattr(path[-1], "name", None) == "count" if path else False
        return new if is_counter else jnp.where(finite, new, old)

    return jax.tree_util.tree_map_with_path(choose, new_state, old_state)


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               optimizer: optax.GradientTransformation, loss_fn: LossFn,
               skip_nonfinite: bool = False, microbatches: int = 1
               ) -> tuple[TrainState, dict]:
    """One optimiser update on a global batch: (state, batch) -> (state, metrics).

    A non-finite loss or gradient norm sets metrics["nonfinite"]; with `skip_nonfinite`
    the parameters and optimiser moments then stay as they were, while the step and the
    optimiser's step counters advance (the learning rate follows `state.step`).
    """
    dropout_rng = jax.random.fold_in(state.dropout_rng, state.step)
    (loss, outputs), grads = loss_and_gradients(model, loss_fn, state.params, batch, dropout_rng,
                                                microbatches)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gradient_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gradient_norm)
    metrics = {
        "loss": loss,
        "in_batch_accuracy": losses.in_batch_accuracy(
            outputs["query"], outputs["passage"], batch.get("passage_ids")),
        "learning_rate": optimizers.current_learning_rate(opt_state),
        "gradient_norm": gradient_norm,
        "nonfinite": ~finite,
    }
    if skip_nonfinite:
        params = _keep_if_finite(finite, params, state.params)
        opt_state = _keep_if_finite(finite, opt_state, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, loss_fn: LossFn,
                    state_shardings: TrainState, batch_shardings: Any, mesh: Mesh, rules, *,
                    skip_nonfinite: bool = False, microbatches: int = 1
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step` jitted once with explicit shardings, the state donated.

    The returned function takes (state, batch) with the batch as global jax.Arrays laid out
    as `batch_shardings` (see `partitioning.batch_shardings`) and returns (state, metrics),
    metrics being replicated float32 scalars (and the bool "nonfinite"). `microbatches` > 1:
    cached-gradient sub-batches (samtone.grad_cache), same loss and gradients.
    """
    step = functools.partial(train_step, model=model, optimizer=optimizer, loss_fn=loss_fn,
                             skip_nonfinite=skip_nonfinite, microbatches=microbatches)

    def step_with_rules(state, batch):
        with partitioning.axis_rules(mesh, rules):
            return step(state, batch)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_with_rules, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
