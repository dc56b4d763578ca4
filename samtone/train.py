"""The training loop: one jitted step inside a loop that owns all I/O.

The step (samtone.train_step) is `(state, batch) -> (state, metrics)`. Around it: this
process's slice of each global batch in, metrics to the host every `log_every` steps only
(samtone.summaries), orbax checkpoints every `CheckpointConfig.every_steps` steps (and
`every_minutes`) and on a preemption notice (samtone.preemption), retrieval metrics on
EVAL_DATA (a BEIR folder's full corpus or held-out pairs) every `EvalConfig.every_steps` steps
and at the end (samtone.train_eval). Calling it again
on the same model_dir resumes from the newest checkpoint, data position included, and reaches
the same final state as a run that was never interrupted. The command line is
samtone.cli.train.

Shapes. With length buckets or packing (samtone.data.packing) a step's shapes vary with its
batch: the one jitted step compiles once per shape and keeps each (jax.jit's cache; with
`compilation_cache_dir`, also on disk, so a rerun or a resume compiles nothing). Every process
derives the shapes from the global batch, so all agree. The next batch is copied to the
devices before the current step's metrics can be waited on, so the copy overlaps the step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import inspect
import os
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from samtone import grad_cache
from samtone import optimizers
from samtone import partitioning
from samtone import paths
from samtone import run_dir
from samtone import run_manifest
from samtone import train_step as train_step_lib
from samtone.checkpoints import manager as checkpoint_lib
from samtone.checkpoints import pretrained
from samtone.data import files
from samtone.data import packing
from samtone.data.tokenizer import Tokenizer
from samtone.errors import ChangedConfigError, CheckpointError, ConfigError, MissingFileError
from samtone.preemption import PreemptionNotice
from samtone.summaries import NonFiniteLossError, Progress, Summaries  # noqa: F401
from samtone.train_config import CheckpointConfig, DataConfig, EvalConfig, check_integer
from samtone.train_eval import TrainingEvaluator
from samtone.vocabulary import check_fits_embedding


@dataclasses.dataclass
class TrainResult:
    """What `train` ends with: the state, its step, the last evaluation, and why it stopped."""

    state: train_step_lib.TrainState
    step: int
    eval_metrics: dict[str, float]
    preempted: bool = False
    checkpoint: Any = None  # the newest checkpoint's folder
    seconds: float = 0.0  # wall time of this call, set-up and compilation included
    skipped_nonfinite: int = 0
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT) after a checkpoint


def train(
    *,
    model_dir: str,
    model: nn.Module,
    loss: Callable[..., Any],
    data: DataConfig,
    global_batch_size: int,
    num_train_steps: int,
    loss_inputs: Sequence[str] | None = None,
    optimizer_factory: Callable[..., optax.GradientTransformation] = optimizers.make_optimizer,
    mesh: Mesh | None = None,
    logical_axis_rules: str | Sequence[tuple[str, Any]] = "data",
    seed: int = 0,
    checkpoints: CheckpointConfig = CheckpointConfig(),
    evaluation: EvalConfig = EvalConfig(),
    log_every: int = 100,
    skip_nonfinite: bool = False,
    microbatches: int = 1,
    compilation_cache_dir: str | None = None,
    config_text: str | None = None,
) -> TrainResult:
    """Trains `model` with `loss` on `train_data` until `num_train_steps`; resumes if it can.

    Args:
      model_dir: checkpoints go to `<model_dir>/checkpoints`, TensorBoard summaries to
        `<model_dir>/train` and `<model_dir>/eval`.
      model: a samtone DualEncoder.
      loss: one of samtone.losses' functions, hyperparameters bound (by Gin or partial).
      data: what is trained on (samtone.train_config.DataConfig).
      global_batch_size: examples per step over all processes.
      num_train_steps: the step training ends at (also the optimiser schedule's length).
      loss_inputs: the batch fields the loss receives besides the two embeddings; default
        (None) the ones its signature names (samtone.train_step.taken_inputs); a list that
        leaves one of those out is refused.
      optimizer_factory: called with `total_steps=num_train_steps` and, if it takes them,
        the parameters' `logical_axes`, once the model's shapes are known; default Adafactor.
      mesh: default one data-parallel axis over all devices.
      logical_axis_rules: a rule table or its name in samtone.partitioning.
      seed: parameter initialisation and data order.
      checkpoints: when checkpoints are written and kept, and the pre-trained checkpoint a
        new run starts from (samtone.train_config.CheckpointConfig).
      evaluation: retrieval metrics during training (samtone.train_config.EvalConfig).
      log_every: steps between metric fetches, log lines and summaries.
      skip_nonfinite: skip updates whose loss or gradients are not finite instead of
        stopping with NonFiniteLossError.
      microbatches: N > 1 computes each step's loss and gradients over the whole batch in N
        cached-gradient sub-batches (samtone.grad_cache): the same step in less memory.
      compilation_cache_dir: JAX's persistent compilation cache (process-wide), so a rerun or
        a resume does not compile again; a relative path is under model_dir, None turns it
        off. gin/runs/train.gin sets 'compilation_cache' (MODEL_DIR/compilation_cache).
      config_text: the Gin config to record as `<model_dir>/config.gin` (samtone-train passes
        gin.config_str()); written only once every check has passed, and never over a
        resumed run's own (a different one goes to config.step<N>.gin).

    The run folder is locked while training (samtone.run_dir): a second trainer on it is
    refused. Resuming with another model (a changed shape or setting) is refused naming each
    change; a checkpoint in the other layer layout (scan_layers) is restacked.
    """
    started = time.monotonic()
    for name, value in (("global_batch_size", global_batch_size),
                        ("num_train_steps", num_train_steps), ("log_every", log_every)):
        check_integer(f"train.{name}", value)
    query_length, passage_length = data.query_length, data.passage_length
    run = run_dir.RunDir.at(model_dir)
    run.check_writable()
    # train_data may be a seqio task's name: left as given.
    evaluation = dataclasses.replace(evaluation, data=paths.absolute_paths(evaluation.data))
    vocabulary = paths.absolute_path(data.vocabulary)
    init_checkpoint = paths.absolute_path(checkpoints.init_checkpoint)
    lock = run_dir.RunLock(run)
    if jax.process_index() == 0 and run.root.exists():
        lock.acquire()  # before the run is read: no other trainer may be writing it
    try:
        # Everything is checked before anything is written: a start that fails leaves an
        # existing run byte-identical and creates no new MODEL_DIR.
        if evaluation.data:  # read at the end of training: checked at the start
            with _missing_file_names("EvalConfig.data"):
                files.expand_paths(evaluation.data)
        mesh = mesh if mesh is not None else partitioning.make_mesh()
        rules = (partitioning.logical_axis_rules(logical_axis_rules)
                 if isinstance(logical_axis_rules, str) else logical_axis_rules)
        loss_fn = train_step_lib.make_loss_fn(loss, loss_inputs)
        tokenizer = Tokenizer(vocabulary)
        _check_vocabulary(model, tokenizer)
        manifest = run_manifest.RunManifest.of(
            model, query_length=query_length, passage_length=passage_length,
            vocabulary=vocabulary, logical_axis_rules=logical_axis_rules,
            model_parallel=dict(mesh.shape).get("model", 1))
        saved_steps = checkpoint_lib.checkpoint_steps(run.checkpoints)
        if saved_steps:  # the recorded model first: its message names Gin settings
            _check_resumable(run, manifest, saved_steps[-1], num_train_steps)

        grad_cache.check_microbatches(microbatches, global_batch_size,
                                      partitioning.batch_shards(mesh, rules))
        rows = partitioning.process_batch_rows(mesh, rules, global_batch_size)
        with _missing_file_names("DataConfig.train_data"):
            iterator = data.batch_iterator_factory(
                data.train_data, tokenizer=tokenizer, global_batch_size=global_batch_size,
                query_length=query_length, passage_length=passage_length, seed=seed,
                local_rows=rows)
        _check_same_data(iterator, data.train_data)
        example_batch = _example_global_batch(iterator, global_batch_size)
        train_step_lib.check_packed_microbatches(example_batch, microbatches)  # before compiling
        # One trace of the model's init serves the optimiser, the shardings and the state.
        boxed_params = train_step_lib.abstract_params(model, example_batch, mesh, rules,
                                                      seed=seed)
        optimizer = _make_optimizer(optimizer_factory, num_train_steps,
                                    partitioning.logical_specs(boxed_params))
        if saved_steps:  # the checkpoint's own tree: another optimiser, or no model.json
            shapes, state_shardings = train_step_lib.train_state_shardings(
                model, optimizer, example_batch, mesh, rules, seed=seed,
                boxed_params=boxed_params)
            target = checkpoint_lib.abstract_state(shapes, state_shardings)
            checkpoint_lib.check_fits(run.checkpoints, saved_steps[-1], target)
        # Shardings depend on each array's rank only, so they serve every bucket's shapes.
        batch_shardings = partitioning.batch_shardings(
            {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example_batch.items()},
            mesh, rules)
        batch_shards = partitioning.batch_shards(mesh, rules)

        def to_devices(host_batch):
            if packing.is_packed(host_batch):  # every process holds the whole packed batch
                return _device_batch(packing.pad_rows(host_batch, batch_shards),
                                     batch_shardings)
            return _global_batch(host_batch, rows, global_batch_size, batch_shardings)

        if compilation_cache_dir:  # after the checks: state set-up compiles and is cached too
            _use_compilation_cache(run.root, compilation_cache_dir)
        if saved_steps:
            manager = checkpoint_lib.make_checkpoint_manager(run.checkpoints,
                                                             keep=checkpoints.keep)
            state = _resumed_state(manager, target, iterator)
        else:
            if init_checkpoint:
                pretrained.checkpoint_kind(init_checkpoint)  # a wrong path fails at once
            state, state_shardings = _fresh_state(model, optimizer, example_batch, mesh, rules,
                                                  seed, init_checkpoint, boxed_params)
            if jax.process_index() == 0:
                run.root.mkdir(parents=True, exist_ok=True)
                lock.acquire()
            manager = checkpoint_lib.make_checkpoint_manager(run.checkpoints,
                                                             keep=checkpoints.keep)
        step = int(jax.device_get(state.step))
        if jax.process_index() == 0:
            _record_run(run, manifest, config_text, step)
        return _train_loop(
            run, manager, state, state_shardings, iterator, to_devices, model, optimizer,
            loss_fn, batch_shardings, mesh, rules, tokenizer, started, step,
            num_train_steps=num_train_steps, global_batch_size=global_batch_size,
            query_length=query_length, passage_length=passage_length, evaluation=evaluation,
            checkpoints=checkpoints, log_every=log_every, skip_nonfinite=skip_nonfinite,
            microbatches=microbatches)
    finally:
        lock.release()


def _train_loop(run, manager, state, state_shardings, iterator, to_devices, model, optimizer,
                loss_fn, batch_shardings, mesh, rules, tokenizer, started, step, *,
                num_train_steps, global_batch_size, query_length, passage_length, evaluation,
                checkpoints, log_every, skip_nonfinite, microbatches) -> TrainResult:
    """Steps from `step` to `num_train_steps`: checkpoints, summaries, evaluation, stops."""
    train_step = train_step_lib.make_train_step(
        model, optimizer, loss_fn, state_shardings, batch_shardings, mesh, rules,
        skip_nonfinite=skip_nonfinite, microbatches=microbatches)
    evaluator = (TrainingEvaluator(model, state_shardings.params, mesh, rules, tokenizer,
                                   evaluation, query_length=query_length,
                                   passage_length=passage_length, model_dir=run.root)
                 if evaluation.data else None)
    summaries = Summaries(run.root)
    logging.info("training from step %d to %d, global batch %d, mesh %s, setup took %.1fs",
                 step, num_train_steps, global_batch_size, dict(mesh.shape),
                 time.monotonic() - started)

    progress = Progress(step, num_train_steps, global_batch_size, summaries)
    timed_saves = _TimedSaves(checkpoints.every_minutes)
    eval_metrics: dict[str, float] = {}
    preempted = False
    # SIGTERM is caught until the end, so a notice during the final evaluation or save lets
    # them finish instead of killing the process. Ctrl-C (SIGINT) stops like a notice during
    # the steps; once they are done (the last checkpoint saved) it interrupts at once.
    batches = _prefetch_to_devices(iterator, to_devices, num_train_steps - step)
    with PreemptionNotice() as preemption:
        try:
            while step < num_train_steps:
                global_batch, data_state = next(batches)
                state, metrics = train_step(state, global_batch)
                step += 1
                progress.add(step, metrics)
                preempted = preemption.reached(step)
                save = (preempted or step % checkpoints.every_steps == 0
                        or step == num_train_steps)
                log = step % log_every == 0
                if save or log or progress.first_step_pending:
                    # A non-finite loss raises here, before anything is checkpointed.
                    progress.flush(skip_nonfinite)
                save = save or (log and timed_saves.due())
                if save:
                    _save(manager, step, state, data_state)
                    timed_saves.saved()
                if preempted:
                    logging.warning("%s: checkpoint of step %d written; run the same command "
                                    "again to resume", preemption.reason, step)
                    break
                every = evaluation.every_steps
                if evaluator and every and step % every == 0 and step < num_train_steps:
                    progress.flush(skip_nonfinite)  # never evaluate non-finite parameters
                    eval_metrics = evaluator(state.params, step, summaries)
            preemption.steps_done()
            if evaluator and not preempted:
                eval_metrics = evaluator(state.params, step, summaries)
        finally:
            # Whatever stops the loop, a checkpoint being written is finished, not left half done.
            try:
                _finish_saves(manager, step)
            finally:
                newest = manager.latest_step()
                manager.close()
                summaries.close()
    return TrainResult(state=state, step=step, eval_metrics=eval_metrics, preempted=preempted,
                       interrupted=preemption.interrupted,
                       checkpoint=None if newest is None else manager.directory / str(newest),
                       seconds=time.monotonic() - started,
                       skipped_nonfinite=progress.skipped_nonfinite)


class _TimedSaves:
    """Is a checkpoint due by time (`CheckpointConfig.every_minutes`)? Process 0's clock
    decides for all, so every process saves the same step."""

    def __init__(self, every_minutes: float | None):
        self._interval = None if every_minutes is None else 60.0 * every_minutes
        self._last = time.monotonic()

    def due(self) -> bool:
        if self._interval is None:
            return False
        due = time.monotonic() - self._last >= self._interval
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def saved(self) -> None:
        self._last = time.monotonic()


def _save(manager, step: int, state, data_state) -> None:
    """Starts saving a checkpoint; an earlier save that failed for want of space is reported."""
    try:
        checkpoint_lib.save_checkpoint(manager, step, state, {"iterator": data_state})
    except Exception as error:  # pylint: disable=broad-except  (orbax wraps the OSError)
        _raise_if_out_of_space(error, manager, step)
        raise


def _finish_saves(manager, step: int) -> None:
    try:
        manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
        _raise_if_out_of_space(error, manager, step)
        raise


def _raise_if_out_of_space(error: BaseException, manager, step: int) -> None:
    """A save that ran out of disk becomes one message; the previous checkpoint is intact
    (orbax renames a step into place only when it is complete)."""
    seen = error
    while seen is not None:
        if (getattr(seen, "errno", None) == errno.ENOSPC
                or "No space left on device" in str(seen)):
            break
        seen = seen.__cause__ or seen.__context__
    else:
        return
    try:
        manager.wait_until_finished()  # an earlier save still in flight is listed once done
    except Exception:  # pylint: disable=broad-except  (the failed save itself)
        pass
    saved = [s for s in checkpoint_lib.checkpoint_steps(manager.directory) if s <= step]
    previous = (f"the previous checkpoint (step {saved[-1]}) is intact" if saved
                else "no earlier checkpoint exists")
    raise CheckpointError(f"no space left on the device holding {manager.directory} while "
                          f"saving the checkpoint of step {step}; {previous}. Free space and "
                          "run the same command again to resume") from error


def _make_optimizer(factory: Callable[..., optax.GradientTransformation], total_steps: int,
                    logical_axes) -> optax.GradientTransformation:
    """The optimiser, built once the model's logical axes are known (a factory that takes
    `logical_axes`, as make_optimizer does, gets them)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    axes = {"logical_axes": logical_axes} if "logical_axes" in parameters else {}
    try:
        return factory(total_steps=total_steps, **axes)
    except ConfigError:
        raise
    except ValueError as error:  # its message names the make_optimizer setting
        raise ConfigError(str(error)) from error


@contextlib.contextmanager
def _missing_file_names(parameter: str) -> Iterator[None]:
    """A MissingFileError raised inside names `parameter` (`error.parameter`), which the CLI
    turns into the Gin binding that set it."""
    try:
        yield
    except MissingFileError as error:
        error.parameter = parameter
        raise


def _check_resumable(run: run_dir.RunDir, manifest: run_manifest.RunManifest, newest: int,
                     num_train_steps: int) -> None:
    """Refuses a resume that would change the model, the vocabulary or go backwards."""
    if newest > num_train_steps:
        raise ConfigError(f"{run.checkpoints} holds step {newest}, beyond TRAIN_STEPS "
                          f"(train.num_train_steps) = {num_train_steps}; raise TRAIN_STEPS to "
                          "train on, or choose a new MODEL_DIR")
    if run.manifest.exists():
        differences = run_manifest.model_differences(run_manifest.read(run.root), manifest)
        if differences:
            raise ChangedConfigError(
                f"MODEL_DIR={run.root} holds a run of another model ({run.manifest}); resuming "
                "it with this config would lose its checkpoints. Changed: "
                + "; ".join(differences)
                + ". Set them back, or choose a new MODEL_DIR for the new model")
    if manifest.vocabulary and run_manifest.vocabulary_differs(run.root, manifest.vocabulary):
        raise ChangedConfigError(
            f"VOCABULARY (DataConfig.vocabulary) = {manifest.vocabulary} differs from the "
            f"vocabulary the run in {run.root} was trained with ({run.vocabulary}); use that "
            "one, or choose a new MODEL_DIR")


def _record_run(run: run_dir.RunDir, manifest: run_manifest.RunManifest,
                config_text: str | None, step: int) -> None:
    """model.json, spm.model and config.gin of a new run; a resume keeps the run's own and
    records a config unlike config.gin as config.step<N>.gin."""
    run_manifest.record(run.root, manifest)
    if config_text is None:
        return
    target = run.config if not run.config.exists() else run.resumed_config(step)
    if run.config.exists() and run.config.read_text() == config_text:
        return
    temporary = target.parent / f".{target.name}.tmp"
    temporary.write_text(config_text)
    temporary.replace(target)
    if target != run.config:
        logging.warning("the config differs from %s; recorded the one this resume at step %d "
                        "uses as %s", run.config, step, target)


def _check_vocabulary(model: nn.Module, tokenizer: Tokenizer) -> None:
    check_fits_embedding(tokenizer, model.config.vocab_size,
                         hint=" (gin: t5_1_1_config.vocab_size)")


def _use_compilation_cache(model_dir, path: str) -> None:
    """Points JAX's persistent compilation cache at `path` (relative: under model_dir)."""
    path = os.path.expanduser(path)
    path = path if "://" in path or os.path.isabs(path) else str(model_dir / path)
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
        compilation_cache.set_cache_dir(path)
        compilation_cache.reset_cache()  # a cache opened on another folder is dropped
    logging.info("persistent compilation cache: %s", path)


def _check_same_data(iterator, train_data) -> None:
    """Every process read the same data (the iterator state's fingerprint), else ConfigError on
    every process, naming those that differ from process 0: a host with another copy of
    TRAIN_DATA would train on batches no other host sees. (All raise, so none is left waiting
    in a collective for the others.)"""
    if jax.process_count() == 1 or not hasattr(iterator, "get_state"):
        return
    fingerprint = iterator.get_state().get("data_fingerprint")
    if fingerprint is None:
        return
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    mine = np.frombuffer(hashlib.sha256(str(fingerprint).encode()).digest(), np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
    others = [p for p in range(len(everyone)) if not np.array_equal(everyone[p], everyone[0])]
    if others:
        which = ", ".join(map(str, others))
        error = ConfigError(f"{train_data!r} differs between hosts: process"
                            f"{'es' if len(others) > 1 else ''} {which} read other data than "
                            f"process 0 (this is process {jax.process_index()}, data "
                            f"fingerprint {fingerprint}); give every host the same files or "
                            "prepared folder")
        error.parameter = "DataConfig.train_data"
        raise error


def _example_global_batch(iterator, global_batch_size: int) -> dict[str, np.ndarray]:
    """One batch with global shapes, read without moving the iterator."""
    position = iterator.get_state()
    local = next(iterator)
    iterator.set_state(position)
    if packing.is_packed(local):  # already the global batch
        return {k: np.zeros_like(v) for k, v in local.items()}
    return {k: np.zeros((global_batch_size, *v.shape[1:]), v.dtype) for k, v in local.items()}


def _prefetch_to_devices(iterator, to_devices: Callable[[dict], dict], steps: int
                         ) -> Iterator[tuple[dict, dict]]:
    """(batch on the devices, iterator state after it) for `steps` steps, one batch ahead.

    Batch n + 1 is read and its copy to the devices started before batch n is handed out, so
    the copy overlaps step n (dispatch is asynchronous) even when the loop then waits on step
    n's metrics. The state saved with a checkpoint is the one after the batch trained on.
    """
    ahead = None
    for _ in range(steps):
        try:
            host_batch = next(iterator)
        except StopIteration:  # a finite iterator: the loop's next() then stops as before
            break
        current = (to_devices(host_batch), iterator.get_state())
        if ahead is not None:
            yield ahead
        ahead = current
    if ahead is not None:
        yield ahead


def _global_batch(local_batch: dict[str, np.ndarray], rows: np.ndarray, global_batch_size: int,
                  shardings) -> dict[str, jax.Array]:
    """Arrays spanning the global batch, each device given its rows from this process's."""
    def assemble(name, value):
        def shard(index):
            wanted = np.arange(global_batch_size)[index[0]]
            return value[np.searchsorted(rows, wanted)][(slice(None), *index[1:])]

        return jax.make_array_from_callback((global_batch_size, *value.shape[1:]),
                                            shardings[name], shard)

    return {name: assemble(name, value) for name, value in local_batch.items()}


def _device_batch(host_batch: dict[str, np.ndarray], shardings) -> dict[str, jax.Array]:
    """Global arrays from a batch every process holds whole, each device given its slice."""
    return {name: jax.make_array_from_callback(value.shape, shardings[name],
                                               lambda index, value=value: value[index])
            for name, value in host_batch.items()}


def _resumed_state(manager, target, iterator):
    """The newest checkpoint that restores onto `target` (the current mesh's shardings); the
    iterator set to its position. Another model's checkpoint raises ChangedConfigError."""
    restored = checkpoint_lib.restore_checkpoint(manager, target,
                                                 newest=_agreed_latest_step(manager))
    if restored is None:
        raise CheckpointError(f"no checkpoint in {manager.directory} could be read")
    state, data_state, step = restored
    iterator.set_state(data_state["iterator"])
    logging.info("resumed from step %d of %s", step, manager.directory)
    return state


def _fresh_state(model, optimizer, example_batch, mesh, rules, seed, init_checkpoint,
                 boxed_params):
    """`init_checkpoint`'s encoders (projection random) or random initialisation."""
    init_params = None
    if init_checkpoint:
        init_params = pretrained.load_encoder_params(init_checkpoint, model)
        logging.info("encoders initialised from %s", init_checkpoint)
    return train_step_lib.init_train_state(model, optimizer, example_batch, mesh, rules,
                                           seed=seed, init_params=init_params,
                                           boxed_params=boxed_params)


def _agreed_latest_step(manager) -> int | None:
    """The newest step as process 0 sees it, so that every process restores the same one."""
    latest = manager.latest_step()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        latest = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if latest is None
                                                                   else latest)))
        latest = None if latest < 0 else latest
    return latest
