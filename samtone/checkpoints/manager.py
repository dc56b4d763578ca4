"""Training checkpoints: the sharded train state and the data position, saved together by orbax.

Each checkpoint is one orbax step folder `<directory>/<step>/` holding two items:
`state` (the TrainState, written shard by shard from every process) and `data` (the batch
iterator's JSON state, so a resumed run reads exactly the batches an uninterrupted one would).
Saves are asynchronous and atomic: orbax writes into a temporary folder and renames it when
complete, so a save interrupted by a crash or preemption never hides the previous step.
Restores take abstract arrays carrying the *current* mesh's shardings, so a checkpoint written
on one mesh shape restores onto any other.
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE = "state"
DATA = "data"


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
    return ocp.CheckpointManager(epath.Path(directory), options=options,
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
                       step: int | None = None) -> tuple[Any, dict, int] | None:
    """Restores (state, data_state, step) onto `target`'s shardings; None if no checkpoint.

    Without `step`, the newest step that restores is used: a damaged newest step (say, a
    copy truncated outside orbax) is reported and the one before it is tried.
    """
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    first_error = None
    for candidate in steps:
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                     DATA: ocp.args.JsonRestore()})
        try:
            restored = manager.restore(candidate, args=args)
        except Exception as error:  # pylint: disable=broad-except
            if step is not None:
                raise
            logging.error("checkpoint step %d in %s cannot be restored (%s: %s); trying the "
                          "previous one", candidate, manager.directory, type(error).__name__,
                          error)
            first_error = first_error or error
            continue
        return restored[STATE], restored[DATA], candidate
    if first_error is not None:
        raise RuntimeError(f"no checkpoint in {manager.directory} could be restored "
                           f"(steps tried: {steps})") from first_error
    return None


def read_checkpoint(directory: str | epath.PathLike, *, step: int | None = None
                    ) -> tuple[Any, dict, int]:
    """(state, data_state, step) of a checkpoint, on one local device, whatever mesh wrote it.

    For inspecting or exporting a run (state as nested dicts); training restores with
    `restore_checkpoint` onto the current mesh instead.
    """
    manager = ocp.CheckpointManager(
        epath.Path(directory), options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: ocp.JsonCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step)[STATE])
    restored = manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA], step
