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

from samtone.errors import CheckpointError, MissingFileError

STATE = "state"
DATA = "data"
DAMAGED_SUFFIX = ".damaged"


def absolute_directory(directory: str | os.PathLike) -> epath.Path:
    """`directory` as an absolute path (orbax refuses relative ones); URLs (gs://) as given."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(os.path.expanduser(text)))


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
    restores is used; each damaged newer step is moved aside (`<step>.damaged`) with a
    warning, so it is neither retried nor in the way of the save that will write that step
    again.
    """
    steps = [step] if step is not None else sorted(
        (s for s in manager.all_steps() if newest is None or s <= newest), reverse=True)
    damaged = []
    for candidate in steps:
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                     DATA: ocp.args.JsonRestore()})
        try:
            restored = manager.restore(candidate, args=args)
        except Exception as error:  # pylint: disable=broad-except  (any damage: orbax, tensorstore)
            if step is not None:
                raise _damaged_error(manager.directory, candidate, error) from error
            moved = _move_aside(manager, candidate)
            logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); moved it to "
                            "%s and trying the step before it", candidate, manager.directory,
                            type(error).__name__, error, moved)
            damaged.append(candidate)
            continue
        return restored[STATE], restored[DATA], candidate
    if damaged:
        raise CheckpointError(f"no checkpoint in {manager.directory} could be restored: steps "
                              f"{damaged} are damaged (moved aside as <step>{DAMAGED_SUFFIX}); "
                              "delete MODEL_DIR/checkpoints to start again")
    return None


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


def _restore_subtree(directory: epath.Path, step: int, select, shardings=None) -> Any:
    """The part `select(state)` of a step's state, on `shardings` (default: one local device)."""
    reader = _reader()
    try:
        metadata = reader.metadata(directory / str(step)).item_metadata[STATE]
        metadata = getattr(metadata, "tree", metadata)
        chosen = select(metadata)
        if shardings is None:
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
    return select(restored[STATE])


class _Key:
    """Selects state[key] and rebuilds {key: subtree}: a partial-restore item."""

    def __init__(self, key: str | None):
        self.key = key

    def __call__(self, tree):
        return tree if self.key is None else tree[self.key]

    def rebuild(self, subtree):
        return subtree if self.key is None else {self.key: subtree}


def read_params(directory: str | os.PathLike, *, step: int | None = None,
                shardings: Any = None) -> tuple[Any, int]:
    """(parameters, step) of a checkpoint: nothing else is read (no optimiser state).

    `shardings` (a tree like the parameters) lays them out over a mesh, so a model larger than
    one device loads; default: one local device. `step=None`: the newest.
    """
    directory = absolute_directory(directory)
    step = _chosen_step(directory, step)
    return _restore_subtree(directory, step, _Key("params"), shardings), step


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
