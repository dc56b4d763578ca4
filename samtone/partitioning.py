"""Device mesh, logical-axis rule tables, and the shardings of pytrees.

Parameters and activations carry *logical* axis names ('embed', 'mlp', 'batch', ...). A rule
table maps each logical name to a mesh axis ('data', 'model') or to None (replicated), so the
parallelism strategy is a choice of table, not code (t5x `standard_logical_axis_rules`):

  "data"        pure data parallelism: the batch over 'data', everything else replicated.
  "data_model"  data + tensor parallelism: heads, joined_kv, mlp and vocab over 'model'.
  "fsdp"        fully sharded data parallelism: also 'embed' over 'data', so parameters and
                optimiser state are split across the data axis (ZeRO-3 style).
  "fsdp_model"  "data_model" and "fsdp" together.

Flax resolves rules in order, and a mesh axis is used at most once per array: an activation
('batch', 'length', 'embed') under FSDP puts 'batch' on 'data' and leaves 'embed' replicated.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, PartitionSpec

from samtone.errors import ConfigError

LogicalRules = tuple[tuple[str, Any], ...]

# Logical names that stay replicated in every table; listed so each table names every axis
# the model uses (an unknown name is an error, see `logical_shardings`).
_REPLICATED = (
    ("length", None),
    ("kv", None),
    ("relpos_buckets", None),
    ("layers", None),  # the stacked axis of scan_layers=True
    ("projection", None),
)

DATA_PARALLEL_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("joined_kv", None),
) + _REPLICATED

TENSOR_PARALLEL_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
) + _REPLICATED

# 'batch' comes before 'embed', so activations keep the batch on 'data' and weights, which
# have no batch axis, put 'embed' there instead.
FSDP_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", None),
    ("embed", "data"),
    ("mlp", None),
    ("heads", None),
    ("joined_kv", None),
) + _REPLICATED

FSDP_TENSOR_PARALLEL_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", "data"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
) + _REPLICATED

_RULES_BY_NAME = {
    "data": DATA_PARALLEL_RULES,
    "data_model": TENSOR_PARALLEL_RULES,
    "fsdp": FSDP_RULES,
    "fsdp_model": FSDP_TENSOR_PARALLEL_RULES,
}


def logical_axis_rules(name: str) -> LogicalRules:
    """The rule table called `name`: "data", "data_model", "fsdp" or "fsdp_model"."""
    if name not in _RULES_BY_NAME:
        raise ConfigError(f"logical_axis_rules.name={name!r} is not a rule table; valid names: "
                         f"{', '.join(repr(n) for n in _RULES_BY_NAME)}")
    return _RULES_BY_NAME[name]


def make_mesh(mesh_shape: Sequence[int] = (-1, 1), axis_names: Sequence[str] = ("data", "model"),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of `devices` (default: all) with `mesh_shape`; one entry may be -1 (the rest).

    The device order comes from `mesh_utils.create_device_mesh`, which keeps the 'model'
    axis (the last) on physically close devices on TPU and GPU.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = _resolve_mesh_shape(tuple(mesh_shape), len(devices))
    if len(shape) != len(axis_names):
        raise ConfigError(f"make_mesh.mesh_shape={tuple(mesh_shape)} has {len(shape)} axes but "
                         f"make_mesh.axis_names={tuple(axis_names)} names {len(axis_names)}")
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices,
                                                     allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as error:
        logging.warning("create_device_mesh(%s) failed (%s); using the devices in order",
                        shape, error)
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    # Auto axes: shardings come from the jit in/out shardings and the logical constraints.
    axis_types = (jax.sharding.AxisType.Auto,) * len(axis_names)
    return Mesh(device_array, tuple(axis_names), axis_types=axis_types)


def _resolve_mesh_shape(mesh_shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
    unknown = [i for i, size in enumerate(mesh_shape) if size == -1]
    if len(unknown) > 1 or any(size == 0 or size < -1 for size in mesh_shape):
        raise ConfigError(f"make_mesh.mesh_shape={mesh_shape}: sizes must be positive, with at "
                         "most one -1 (all remaining devices)")
    known = math.prod(size for size in mesh_shape if size != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(f"make_mesh.mesh_shape={mesh_shape}: {num_devices} devices do not "
                             f"split into groups of {known}")
        mesh_shape = tuple(num_devices // known if size == -1 else size for size in mesh_shape)
    if math.prod(mesh_shape) != num_devices:
        raise ConfigError(f"make_mesh.mesh_shape={mesh_shape} needs {math.prod(mesh_shape)} "
                         f"devices, found {num_devices}")
    return mesh_shape


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: LogicalRules):
    """Makes `nn.with_logical_constraint` inside a traced function see `mesh` and `rules`.

    Enter it inside the function given to `jax.jit` (it only sets the abstract mesh, which
    is allowed while tracing), so the compiled function does not depend on the caller's
    context.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def params_initializer(model: nn.Module, mesh: Mesh, rules: LogicalRules,
                       input_shapes: Sequence[tuple[int, ...]], rng: jax.Array) -> Any:
    """() -> `model`'s boxed parameters, initialised from `rng` under the rules.

    The inputs are int32 zeros of `input_shapes`. Trace it with `jax.eval_shape` for shapes
    and logical axes, or run it under `jax.jit(out_shardings=...)` so each device only ever
    holds its own shards.
    """
    def init():
        with axis_rules(mesh, rules):
            inputs = [jax.numpy.zeros(shape, jax.numpy.int32) for shape in input_shapes]
            return model.init({"params": rng}, *inputs)["params"]

    return init


def logical_specs(abstract_boxed_tree: Any) -> Any:
    """Each leaf's logical PartitionSpec (its `nn.Partitioned` names; P() when unboxed)."""
    return nn.get_partition_spec(abstract_boxed_tree)


def logical_shardings(specs: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings of a tree of logical PartitionSpecs, after checking the names are known."""
    _check_rules(specs, mesh, rules)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def tree_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings of a (boxed, usually abstract) tree such as `jax.eval_shape(model.init)`."""
    return logical_shardings(logical_specs(abstract_boxed_tree), mesh, rules)


def batch_shardings(batch_abstract: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Shardings of batch arrays: the leading axis is 'batch', the others replicated."""

    def spec(x):
        ndim = len(np.shape(x))
        return PartitionSpec("batch", *[None] * (ndim - 1)) if ndim else PartitionSpec()

    specs = jax.tree.map(spec, batch_abstract)
    return logical_shardings(specs, mesh, rules)


def batch_shards(mesh: Mesh, rules: LogicalRules) -> int:
    """Into how many pieces the rules split a batch's leading ('batch') axis on `mesh`."""
    spec = batch_shardings(jax.ShapeDtypeStruct((1,), np.int32), mesh, rules).spec[0]
    axes = () if spec is None else np.atleast_1d(spec).tolist()
    return math.prod(mesh.shape[axis] for axis in axes)


def check_batch_splits(global_batch_size: int, shards: int) -> None:
    """The global batch must split evenly over the `shards` data-parallel pieces of the mesh."""
    if global_batch_size % shards:
        raise ConfigError(
            f"BATCH_SIZE (train.global_batch_size) = {global_batch_size} does not split over "
            f"the {shards} data-parallel devices; use a multiple of {shards}")


def process_batch_rows(mesh: Mesh, rules: LogicalRules, global_batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, ascending.

    Processes holding the same rows (replicas along 'model', say, when that axis spans
    processes) get the same rows, so they read the same examples; the rows of all processes
    together are the whole batch. Refuses a batch the mesh cannot split evenly.
    """
    check_batch_splits(global_batch_size, batch_shards(mesh, rules))
    sharding = batch_shardings(jax.ShapeDtypeStruct((global_batch_size,), np.int32), mesh,
                               rules)
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return np.array(sorted(rows), np.int64)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _check_rules(specs: Any, mesh: Mesh, rules: LogicalRules) -> None:
    known = {logical for logical, _ in rules}
    for logical, mesh_axes in rules:
        for axis in (mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)):
            if axis is not None and axis not in mesh.axis_names:
                raise ValueError(f"logical axis rule ({logical!r}, {mesh_axes!r}) names mesh axis "
                                 f"{axis!r}, but the mesh has axes {mesh.axis_names}")
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]
    for path, spec in leaves:
        if not _is_spec(spec):
            continue
        for name in spec:
            if isinstance(name, str) and name not in known:
                raise ValueError(
                    f"{jax.tree_util.keystr(path) or 'array'} has logical axis {name!r}, which the "
                    f"logical axis rules do not mention (they name {sorted(known)}); add "
                    f"({name!r}, None) to replicate it or map it to a mesh axis")
