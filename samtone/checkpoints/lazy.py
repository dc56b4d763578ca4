"""Checkpoint arrays read when asked, whole or one slice at a time.

A pretrained encoder is large (T5.1.1-XXL: ~19 GB in float32), and on a mesh that spans hosts
each host needs only the slices its devices hold. The importers (hf.py, t5x.py) therefore give
trees of `LazyArray`s: a shape, a dtype and `read(index)`, which reads the slice `index` (a
tuple of slices) of the array in samtone's layout. The conversion from the stored layout (a
transpose, the layer stacking of scan_layers) is composed into the read, so only the stored
bytes of that slice are read. `place` puts one on a sharding: each process reads only the
shards its own devices hold, one at a time.

`np.stack` of lazy arrays stays lazy and so does `x[i]`, so that
`samtone.models.t5.stack_layer_params` / `unstack_layer_params` apply to a lazy tree as they
are. `np.asarray(x)` reads the whole array; numpy functions other than np.stack, np.shape and
np.ndim raise TypeError rather than read it unnoticed.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import jax
import numpy as np

Index = tuple[slice, ...]  # one slice per axis, start and stop given, step 1


class LazyArray:
    """An array whose values are read when asked; subclasses define shape, dtype, `_read`."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The slice `index` of the array (all of it when None), as numpy."""
        return self._read(bounded(index, self.shape))

    def _read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    @property
    def T(self) -> LazyArray:  # pylint: disable=invalid-name  (numpy's name)
        return _Transposed(self)

    def __getitem__(self, layer: int) -> LazyArray:
        return _Layer(self, operator.index(layer))

    def __array__(self, dtype=None, copy=None):
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __array_function__(self, func, types, args, kwargs):
        if func is np.stack and not kwargs.get("axis") and len(args) == 1:
            return _Stacked(tuple(as_lazy(part) for part in args[0]))
        if func in (np.shape, np.ndim) and len(args) == 1:
            return self.shape if func is np.shape else self.ndim
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={np.dtype(self.dtype).name})"


def bounded(index: tuple[slice, ...] | None, shape: tuple[int, ...]) -> Index:
    """`index` padded to every axis, each slice with its start and stop; steps must be 1."""
    index = tuple(index or ())
    if len(index) > len(shape):
        raise IndexError(f"index {index} has more axes than shape {shape}")
    index += (slice(None),) * (len(shape) - len(index))
    bounded = []
    for axis, size in zip(index, shape):
        if not isinstance(axis, slice):
            raise TypeError(f"a lazy array is read by slices, got {axis!r}")
        start, stop, step = axis.indices(size)
        if step != 1:
            raise ValueError(f"a lazy array is read by contiguous slices, got step {step}")
        bounded.append(slice(start, max(start, stop)))
    return tuple(bounded)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Sliced(LazyArray):
    """A stored array: `read_slice(index)` reads the slice of it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read_slice: Callable[[Index], np.ndarray]

    def _read(self, index: Index) -> np.ndarray:
        return np.asarray(self.read_slice(index))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class InMemory(LazyArray):
    """An array already in host memory (stacked with stored ones)."""

    array: np.ndarray

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    def _read(self, index: Index) -> np.ndarray:
        return self.array[index]


def as_lazy(array) -> LazyArray:
    return array if isinstance(array, LazyArray) else InMemory(np.asarray(array))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Transposed(LazyArray):
    """`base` with its axes reversed (a Hugging Face Linear weight is [out, in])."""

    base: LazyArray

    @property
    def shape(self):
        return self.base.shape[::-1]

    @property
    def dtype(self):
        return self.base.dtype

    def _read(self, index: Index) -> np.ndarray:
        return self.base._read(index[::-1]).T  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Stacked(LazyArray):
    """`parts` stacked along a new leading axis (scan_layers' layer axis)."""

    parts: tuple[LazyArray, ...]

    def __post_init__(self):
        shapes = {part.shape for part in self.parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack arrays of shapes {sorted(shapes)}")

    @property
    def shape(self):
        return (len(self.parts), *self.parts[0].shape)

    @property
    def dtype(self):
        return np.result_type(*(part.dtype for part in self.parts))

    def _read(self, index: Index) -> np.ndarray:
        layers = range(index[0].start, index[0].stop)
        if not layers:
            return np.empty((0, *(axis.stop - axis.start for axis in index[1:])), self.dtype)
        return np.stack([self.parts[layer]._read(index[1:])  # pylint: disable=protected-access
                         for layer in layers]).astype(self.dtype, copy=False)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Layer(LazyArray):
    """`base[layer]`: one layer of a stacked array."""

    base: LazyArray
    layer: int

    def __post_init__(self):
        if not 0 <= self.layer < self.base.shape[0]:
            raise IndexError(f"layer {self.layer} of an array of shape {self.base.shape}")

    @property
    def shape(self):
        return self.base.shape[1:]

    @property
    def dtype(self):
        return self.base.dtype

    def _read(self, index: Index) -> np.ndarray:
        layer = slice(self.layer, self.layer + 1)
        return self.base._read((layer, *index))[0]  # pylint: disable=protected-access


def place(array: LazyArray, sharding: jax.sharding.Sharding, dtype=None) -> jax.Array:
    """`array` as a global jax.Array laid out as `sharding`, in `dtype` (default its own).

    Each process reads only the slices of its addressable shards, a slice that several of its
    devices hold (replicas) once, and holds one slice in host memory at a time.
    """
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    device_indices = sharding.addressable_devices_indices_map(array.shape)
    devices_by_slice: dict[tuple, tuple[Index, list]] = {}
    for device, index in device_indices.items():
        index = bounded(index, array.shape)
        key = tuple((axis.start, axis.stop) for axis in index)
        devices_by_slice.setdefault(key, (index, []))[1].append(device)
    shards = {}
    for index, devices in devices_by_slice.values():
        values = np.asarray(array.read(index), dtype)
        for device in devices:
            shards[device] = jax.device_put(values, device)
        jax.block_until_ready([shards[device] for device in devices])  # then `values` can go
        del values
    return jax.make_array_from_single_device_arrays(
        array.shape, sharding, [shards[device] for device in device_indices], dtype=dtype)
