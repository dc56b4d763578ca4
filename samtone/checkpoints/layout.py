"""Matching a checkpoint's tree to the configured one: same, another layer layout, or another model.

T5 encoder layers are stored one subtree per layer (`layers_0` .. `layers_{n-1}`) or, with
`scan_layers`, as one subtree `layers` whose arrays have a leading [num_layers] axis. The two
are one model in two layouts, and so are their optimiser states (samtone's Adafactor treats
the layer axis as a batch axis), so a run saved in one resumes in the other: `plan` maps each
configured leaf to the stored leaves it is made of, and `Plan.apply` builds it, on the
configured sharding, without ever holding a whole tree on one device. Any other difference (a
shape, a missing or extra leaf) is a different model or optimiser: `plan` raises
LayoutMismatch naming each differing leaf, and the caller refuses to resume rather than call
the checkpoint damaged.

Trees are compared as flat {path: leaf}, a path being the tuple of its keys as strings
(dict keys, attribute names of dataclasses and named tuples, list indices), which is how orbax
stores a TrainState.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

Path = tuple[str, ...]
_LAYER = re.compile(r"^layers_(\d+)$")
SCANNED = "layers"


class LayoutMismatch(ValueError):
    """The stored tree is not the configured one in any layout; `differences` says how."""

    def __init__(self, differences: list[str]):
        self.differences = differences
        more = f" (and {len(differences) - 8} more)" if len(differences) > 8 else ""
        super().__init__("; ".join(differences[:8]) + more)


def _key(entry) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def flatten(tree: Any) -> tuple[dict[Path, Any], Any]:
    """({path: leaf}, treedef) of a pytree; paths as tuples of strings."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key(entry) for entry in path): leaf for path, leaf in leaves}, treedef


def name(path: Path) -> str:
    return "/".join(path)


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How one configured leaf is made: `kind` of the stored leaves `sources`."""

    kind: str  # "same" | "stack" (layers_i -> layers) | "index" (layers -> layers_i)
    sources: tuple[Path, ...]
    index: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Configured path -> recipe; `identity` when the stored tree is the configured one."""

    recipes: dict[Path, _Recipe]

    @property
    def identity(self) -> bool:
        return all(recipe.kind == "same" and recipe.sources == (path,)
                   for path, recipe in self.recipes.items())

    def stored_shardings(self, target_shardings: dict[Path, Any]) -> dict[Path, Any]:
        """A sharding for each stored leaf read, derived from its configured leaf's."""
        shardings = {}
        for path, recipe in self.recipes.items():
            sharding = target_shardings[path]
            if recipe.kind == "stack":
                for source in recipe.sources:
                    shardings[source] = _drop_leading_axis(sharding)
            elif recipe.kind == "index":
                shardings[recipe.sources[0]] = _add_leading_axis(sharding)
            else:
                shardings[recipe.sources[0]] = sharding
        return shardings

    def apply(self, stored: dict[Path, jax.Array], target: dict[Path, Any]) -> dict[Path, Any]:
        """The configured leaves from the stored arrays; `target` gives shapes and shardings."""
        built = {}
        for path, recipe in self.recipes.items():
            want = target[path]
            sharding = getattr(want, "sharding", None)
            arrays = [stored[source] for source in recipe.sources]
            if recipe.kind == "stack" and tuple(want.shape) != tuple(arrays[0].shape):
                built[path] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*arrays)
            elif recipe.kind == "index" and tuple(want.shape) != tuple(arrays[0].shape):
                built[path] = jax.jit(lambda x, i=recipe.index: x[i],
                                      out_shardings=sharding)(arrays[0])
            else:  # the same leaf, or a (1,) placeholder that has no layer axis
                built[path] = arrays[0]
        return built


def _drop_leading_axis(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _add_leading_axis(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *tuple(sharding.spec)))
    return sharding


def _shape(leaf) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def _per_layer_sources(path: Path, stored: dict[Path, Any]) -> list[Path]:
    """The stored `layers_i` paths a scanned `layers` path is stacked from (in order)."""
    position = path.index(SCANNED)
    sources = []
    while True:
        source = (*path[:position], f"layers_{len(sources)}", *path[position + 1:])
        if source not in stored:
            return sources
        sources.append(source)


def _scanned_source(path: Path) -> tuple[Path, int] | None:
    """(the stored `layers` path, i) a configured `layers_i` path is indexed from."""
    for position, key in enumerate(path):
        match = _LAYER.match(key)
        if match:
            return (*path[:position], SCANNED, *path[position + 1:]), int(match.group(1))
    return None


def _recipe(path: Path, want, stored: dict[Path, Any]) -> _Recipe | None:
    shape = _shape(want)
    if path in stored:
        return _Recipe("same", (path,)) if _shape(stored[path]) == shape else None
    if SCANNED in path:
        sources = _per_layer_sources(path, stored)
        if sources:
            per_layer = _shape(stored[sources[0]])
            if shape == (len(sources), *per_layer):
                return _Recipe("stack", tuple(sources))
            if shape == per_layer:  # an optimiser placeholder: the same in every layer
                return _Recipe("same", (sources[0],))
        return None
    scanned = _scanned_source(path)
    if scanned is not None and scanned[0] in stored:
        source, index = scanned
        stacked = _shape(stored[source])
        if stacked[1:] == shape and index < stacked[0]:
            return _Recipe("index", (source,), index)
        if stacked == shape:  # placeholder
            return _Recipe("same", (source,))
    return None


def plan(stored: dict[Path, Any], target: dict[Path, Any]) -> Plan:
    """How to build each `target` leaf from `stored` leaves (both {path: leaf with .shape}).

    Raises:
      LayoutMismatch: a target leaf no stored leaf makes, or a stored leaf no target uses.
    """
    recipes, differences = {}, []
    for path, want in target.items():
        recipe = _recipe(path, want, stored)
        if recipe is None:
            found = stored.get(path)
            differences.append(f"{name(path)} is missing (expected shape {_shape(want)})"
                               if found is None else
                               f"{name(path)} has shape {_shape(found)}, expected {_shape(want)}")
        else:
            recipes[path] = recipe
    used = {source for recipe in recipes.values() for source in recipe.sources}
    used |= set(target)  # a leaf of another shape is reported once, above
    used |= {source for path, recipe in recipes.items() if recipe.kind == "same"
             and SCANNED in path for source in _per_layer_sources(path, stored)}
    used |= {(*p[:i], SCANNED, *p[i + 1:]) for p in target for i, k in enumerate(p)
             if _LAYER.match(k)}
    differences += [f"{name(path)} (shape {_shape(leaf)}) is not in the configured tree"
                    for path, leaf in stored.items() if path not in used]
    if differences:
        raise LayoutMismatch(sorted(differences))
    return Plan(recipes)
