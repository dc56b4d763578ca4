"""Training checkpoints: the sharded train state and the data position, saved together by orbax.

Each checkpoint is one orbax step folder `<directory>/<step>/` holding two items:
`state` (the TrainState, written shard by shard from every process) and `data` (the batch
iterator's JSON state, so a resumed run reads exactly the batches an uninterrupted one would).
Saves are asynchronous and atomic: orbax writes into a temporary folder and renames it when
complete, so a save interrupted by a crash or preemption never hides the previous step.
Restores take abstract arrays carrying the *current* mesh's shardings, so a checkpoint written
on one mesh shape restores onto any other.

A newest step that cannot be restored (a file truncated or lost outside orbax) is moved aside
to `<step>.damaged` with a warning naming the error, and training resumes from the step before
it; the next save of that step then finds no folder in its way, and a rerun is clean.
Serving reads only the parameters (`read_params`), never the optimiser state.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from samtone import paths
from samtone.checkpoints import layout
from samtone.errors import ChangedConfigError, CheckpointError, MissingFileError

STATE = "state"
DATA = "data"
DAMAGED_SUFFIX = ".damaged"


def absolute_directory(directory: str | os.PathLike) -> epath.Path:
    """`directory` as an absolute path (orbax refuses relative ones); URLs (gs://) as given."""
    return epath.Path(paths.absolute_path(directory))


def make_checkpoint_manager(directory: str | epath.PathLike, *, keep: int | None = 3,
                            async_save: bool = True) -> ocp.CheckpointManager:
    """A manager over `directory` keeping the last `keep` checkpoints (None keeps all)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        # Leftovers of a save that never finished are deleted, never mistaken for a step.
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(absolute_directory(directory), options=options,
                                 item_names=(STATE, DATA))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any,
                    data_state: dict) -> None:
    """Starts saving `state` and `data_state` as `step`; returns once arrays are copied off."""
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 DATA: ocp.args.JsonSave(data_state)})
    manager.save(step, args=args, force=True)


def abstract_state(shapes: Any, shardings: Any) -> Any:
    """Shape/dtype leaves of `shapes` paired with `shardings`: the target of a restore."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        shapes, shardings)


def restore_checkpoint(manager: ocp.CheckpointManager, target: Any, *,
                       step: int | None = None, newest: int | None = None
                       ) -> tuple[Any, dict, int] | None:
    """Restores (state, data_state, step) onto `target`'s shardings; None if no checkpoint.

    Without `step`, the newest step (at most `newest`: the step all processes agreed on) that
    restores is used; each damaged newer step (a file truncated or lost) is moved aside
    (`<step>.damaged`) with a warning, so it is neither retried nor in the way of the save
    that will write that step again. A step saved in the other layer layout (scan_layers) is
    restacked (samtone.checkpoints.layout).

    Raises:
      ChangedConfigError: the step holds another model or optimiser than `target` (another
        shape, a leaf more or less): a changed config, not damage, so nothing is moved.
    """
    steps = [step] if step is not None else sorted(
        (s for s in manager.all_steps() if newest is None or s <= newest), reverse=True)
    damaged = []
    for candidate in steps:
        try:
            restored = _restore_step(manager, candidate, target)
        except ChangedConfigError:
            raise
        except Exception as error:  # pylint: disable=broad-except  (any damage: orbax, tensorstore)
            if step is not None:
                raise _damaged_error(manager.directory, candidate, error) from error
            moved = _move_aside(manager, candidate)
            logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); moved it to "
                            "%s and trying the step before it", candidate, manager.directory,
                            type(error).__name__, error, moved)
            damaged.append(candidate)
            continue
        return (*restored, candidate)
    if damaged:
        raise CheckpointError(f"no checkpoint in {manager.directory} could be restored: steps "
                              f"{damaged} are damaged (moved aside as <step>{DAMAGED_SUFFIX}); "
                              "delete MODEL_DIR/checkpoints to start again")
    return None


def check_fits(directory: str | os.PathLike, step: int, target: Any) -> None:
    """Refuses a step whose tree is another model's or optimiser's than `target`'s (in either
    layer layout), naming each differing leaf; reads the step's metadata only. A step whose
    metadata cannot be read is left to `restore_checkpoint`, which moves it aside."""
    directory = absolute_directory(directory)
    try:
        stored = _stored_leaves(directory, step)
    except Exception:  # pylint: disable=broad-except  (damage: restore_checkpoint's to handle)
        return
    _plan(directory, step, stored, layout.flatten(target)[0])


def _plan(directory, step: int, stored: dict, wanted: dict) -> layout.Plan:
    try:
        return layout.plan(stored, wanted)
    except layout.LayoutMismatch as error:
        raise ChangedConfigError(
            f"checkpoint step {step} in {directory} holds another model or optimiser "
            f"than the one configured: {error}") from error


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    """(state, data_state) of one step on `target`, restacked if it has the other layout."""
    stored = _stored_leaves(manager.directory, step)
    wanted, treedef = layout.flatten(target)
    plan = _plan(manager.directory, step, stored, wanted)
    if plan.identity:
        item = target
    else:  # read the stored layout, each leaf sharded like the configured leaf it becomes
        shardings = plan.stored_shardings({path: leaf.sharding for path, leaf in wanted.items()})
        dtypes = {source: wanted[path].dtype for path, recipe in plan.recipes.items()
                  for source in recipe.sources}
        item = _abstract_like(manager.directory, step, shardings, dtypes)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(item),
                                 DATA: ocp.args.JsonRestore()})
    restored = manager.restore(step, args=args)
    state = restored[STATE]
    if not plan.identity:
        built = plan.apply(layout.flatten(state)[0], wanted)
        state = jax.tree_util.tree_unflatten(treedef, [built[path] for path in wanted])
        logging.info("checkpoint step %d restacked to the configured layer layout", step)
    return state, restored[DATA]


def _stored_tree(directory: epath.Path, step: int) -> Any:
    """The stored state's metadata tree (leaves with .shape and .dtype)."""
    reader = _reader()
    try:
        metadata = reader.metadata(epath.Path(directory) / str(step)).item_metadata[STATE]
    finally:
        reader.close()
    return getattr(metadata, "tree", metadata)


def _stored_leaves(directory: epath.Path, step: int) -> dict:
    return layout.flatten(_stored_tree(directory, step))[0]


def _abstract_like(directory: epath.Path, step: int, shardings: dict, dtypes: dict) -> Any:
    """The stored tree as ShapeDtypeStructs on `shardings` (unread leaves: first device)."""
    tree = _stored_tree(directory, step)
    leaves, treedef = layout.flatten(tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(leaf.shape, dtypes.get(path, leaf.dtype),
                             sharding=shardings.get(path, device))
        for path, leaf in leaves.items()])


def _damaged_error(directory, step: int, error: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint step {step} in {directory} cannot be restored: "
                           f"{type(error).__name__}: {error}")


def _move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Renames `<step>` to `<step>.damaged` (process 0; all processes wait for it)."""
    source = epath.Path(manager.directory) / str(step)
    target = source.parent / f"{step}{DAMAGED_SUFFIX}"
    suffix = 1
    while target.exists():
        target = source.parent / f"{step}{DAMAGED_SUFFIX}.{suffix}"
        suffix += 1
    if jax.process_index() == 0 and source.exists():
        source.rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(f"samtone: moved aside checkpoint {step}")
    manager.reload()
    return target


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps saved under `directory`, oldest first ([] if there is none)."""
    directory = absolute_directory(directory)
    if not directory.exists():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def _reader() -> ocp.Checkpointer:
    """Reads one step folder's items; no CheckpointManager, so nothing is created or watched."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        **{STATE: ocp.PyTreeCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()}))


def _chosen_step(directory: epath.Path, step: int | None) -> int:
    steps = checkpoint_steps(directory)
    if not steps:
        raise MissingFileError(f"no checkpoint in {directory}: a samtone-train MODEL_DIR keeps "
                               "them in MODEL_DIR/checkpoints/<step>")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise MissingFileError(f"no checkpoint of step {step} in {directory}; it has steps "
                               f"{steps}")
    return step


def _restore_subtree(directory: epath.Path, step: int, select, shardings=None,
                     shapes=None) -> Any:
    """The part `select(state)` of a step's state, on `shardings` (default: one local device).

    With `shapes` (a tree of ShapeDtypeStructs like the wanted subtree, `shardings` alike), a
    subtree stored in the other layer layout is restacked to it (samtone.checkpoints.layout).
    """
    reader = _reader()
    try:
        chosen = select(_stored_tree(directory, step))
        plan, wanted, treedef = None, None, None
        if shapes is not None:
            wanted, treedef = layout.flatten(jax.tree.map(
                lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=sharding),
                shapes, shardings))
            try:
                plan = layout.plan(layout.flatten(chosen)[0], wanted)
            except layout.LayoutMismatch:
                plan = None  # the caller compares shapes and names the differences
        if plan is not None and not plan.identity:
            derived = plan.stored_shardings({path: leaf.sharding
                                             for path, leaf in wanted.items()})
            leaves, stored_def = layout.flatten(chosen)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_unflatten(
                stored_def, [derived.get(path, device) for path in leaves])
        elif shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, chosen)
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                              chosen, shardings)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        item = select.rebuild(target)
        restored = reader.restore(directory / str(step), args=ocp.args.Composite(
            **{STATE: ocp.args.PyTreeRestore(item=item, restore_args=select.rebuild(restore_args),
                                             partial_restore=True)}))
    except (MissingFileError, CheckpointError):
        raise
    except Exception as error:  # pylint: disable=broad-except
        raise _damaged_error(directory, step, error) from error
    finally:
        reader.close()
    subtree = select(restored[STATE])
    if plan is not None and not plan.identity:
        built = plan.apply(layout.flatten(subtree)[0], wanted)
        subtree = jax.tree_util.tree_unflatten(treedef, [built[path] for path in wanted])
    return subtree


class _Key:
    """Selects state[key] and rebuilds {key: subtree}: a partial-restore item."""

    def __init__(self, key: str | None):
        self.key = key

    def __call__(self, tree):
        return tree if self.key is None else tree[self.key]

    def rebuild(self, subtree):
        return subtree if self.key is None else {self.key: subtree}


def read_params(directory: str | os.PathLike, *, step: int | None = None,
                shardings: Any = None, shapes: Any = None) -> tuple[Any, int]:
    """(parameters, step) of a checkpoint: nothing else is read (no optimiser state).

    `shardings` (a tree like the parameters) lays them out over a mesh, so a model larger than
    one device loads; default: one local device. `step=None`: the newest. `shapes` (a tree
    of ShapeDtypeStructs like the parameters, with `shardings`) restacks parameters saved in
    the other layer layout (scan_layers) to it.
    """
    directory = absolute_directory(directory)
    step = _chosen_step(directory, step)
    return _restore_subtree(directory, step, _Key("params"), shardings, shapes), step


def read_checkpoint(directory: str | epath.PathLike, *, step: int | None = None
                    ) -> tuple[Any, dict, int]:
    """(state, data_state, step) of a checkpoint on one local device, whatever mesh wrote it.

    For inspecting a run (the state as nested dicts, optimiser included); training restores
    with `restore_checkpoint` onto the current mesh, serving with `read_params`.
    """
    directory = absolute_directory(directory)
    step = _chosen_step(directory, step)
    state = _restore_subtree(directory, step, _Key(None))
    reader = _reader()
    try:
        data = reader.restore(directory / str(step),
                              args=ocp.args.Composite(**{DATA: ocp.args.JsonRestore()}))
    finally:
        reader.close()
    return state, data[DATA], step
