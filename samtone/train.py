"""The training loop: one jitted step inside a loop that owns all I/O.

The step (samtone.train_step) is `(state, batch) -> (state, metrics)`. Around it: this
process's slice of each global batch in, metrics to the host every `log_every` steps only
(samtone.summaries), orbax checkpoints every `checkpoint_every` steps and on a preemption
notice (samtone.preemption), retrieval metrics on held-out pairs every `eval_every` steps and
at the end (samtone.train_eval). Calling it again on the same model_dir resumes from the
newest checkpoint, data position included, and reaches the same final state as a run that was
never interrupted. The command line is samtone.cli.train.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from samtone import optimizers
from samtone import partitioning
from samtone import run_manifest
from samtone import train_step as train_step_lib
from samtone.checkpoints import manager as checkpoint_lib
from samtone.checkpoints import pretrained
from samtone.data import pipeline
from samtone.data.tokenizer import Tokenizer
from samtone.errors import ConfigError
from samtone.preemption import PreemptionNotice
from samtone.summaries import NonFiniteLossError, Progress, Summaries  # noqa: F401
from samtone.train_eval import TrainingEvaluator


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


def train(
    *,
    model_dir: str,
    model: nn.Module,
    loss: Callable[..., Any],
    loss_inputs: Sequence[str] = (),
    train_data: str | Sequence[str],
    vocabulary: str,
    global_batch_size: int,
    num_train_steps: int,
    query_length: int = 64,
    passage_length: int = 256,
    optimizer_factory: Callable[..., optax.GradientTransformation] = optimizers.make_optimizer,
    batch_iterator_factory: Callable[..., Any] = pipeline.make_batch_iterator,
    mesh: Mesh | None = None,
    logical_axis_rules: str | Sequence[tuple[str, Any]] = "data",
    init_checkpoint: str | None = None,
    seed: int = 0,
    eval_data: str | Sequence[str] | None = None,
    eval_every: int | None = None,
    eval_batch_size: int = 128,
    log_every: int = 100,
    checkpoint_every: int = 1000,
    keep_checkpoints: int | None = 3,
    skip_nonfinite: bool = False,
) -> TrainResult:
    """Trains `model` with `loss` on `train_data` until `num_train_steps`; resumes if it can.

    Args:
      model_dir: checkpoints go to `<model_dir>/checkpoints`, TensorBoard summaries to
        `<model_dir>/train` and `<model_dir>/eval`.
      model: a samtone DualEncoder.
      loss: one of samtone.losses' functions, hyperparameters bound (by Gin or partial).
      loss_inputs: the batch fields the loss receives besides the two embeddings, declared
        next to the loss in gin/losses/ (see samtone.train_step.LOSS_INPUTS).
      train_data: file(s) or glob(s) the batch iterator reads (TSV, JSONL, BEIR folder).
      vocabulary: the SentencePiece model file.
      global_batch_size: examples per step over all processes.
      num_train_steps: the step training ends at (also the optimiser schedule's length).
      optimizer_factory: called with `total_steps=num_train_steps`; default Adafactor.
      batch_iterator_factory: samtone.data.pipeline.make_batch_iterator or a compatible one.
      mesh: default one data-parallel axis over all devices.
      logical_axis_rules: a rule table or its name in samtone.partitioning.
      init_checkpoint: a Hugging Face T5 folder or a T5X checkpoint to start the encoders
        from; ignored when model_dir already holds a checkpoint to resume.
      eval_data: held-out (query, passage) pairs; P@1, MRR and NDCG@10 printed.
      eval_every: also evaluate every this many steps (None: at the end only).
      log_every: steps between metric fetches, log lines and summaries.
      checkpoint_every: steps between checkpoints (one is always written at the end).
      keep_checkpoints: how many recent checkpoints to keep (None: all).
      skip_nonfinite: skip updates whose loss or gradients are not finite instead of
        stopping with NonFiniteLossError.
    """
    started = time.monotonic()
    model_dir = checkpoint_lib.absolute_directory(model_dir)
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    rules = (partitioning.logical_axis_rules(logical_axis_rules)
             if isinstance(logical_axis_rules, str) else logical_axis_rules)
    loss_fn = train_step_lib.make_loss_fn(loss, loss_inputs)
    optimizer = optimizer_factory(total_steps=num_train_steps)
    tokenizer = Tokenizer(vocabulary)
    _check_vocabulary(model, tokenizer)
    if jax.process_index() == 0:
        run_manifest.write(model_dir, run_manifest.RunManifest.of(
            model, query_length=query_length, passage_length=passage_length,
            vocabulary=vocabulary, logical_axis_rules=logical_axis_rules,
            model_parallel=dict(mesh.shape).get("model", 1)))

    iterator = batch_iterator_factory(
        train_data, tokenizer=tokenizer, global_batch_size=global_batch_size,
        query_length=query_length, passage_length=passage_length, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    example_batch = _example_global_batch(iterator)
    batch_shardings = partitioning.batch_shardings(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example_batch.items()},
        mesh, rules)

    manager = checkpoint_lib.make_checkpoint_manager(model_dir / "checkpoints",
                                                     keep=keep_checkpoints)
    state, state_shardings = _initial_state(
        model, optimizer, example_batch, mesh, rules, seed, manager, iterator, init_checkpoint)
    train_step = train_step_lib.make_train_step(
        model, optimizer, loss_fn, state_shardings, batch_shardings, mesh, rules,
        skip_nonfinite=skip_nonfinite)
    evaluator = (TrainingEvaluator(model, state_shardings.params, mesh, rules, tokenizer,
                                   eval_data, query_length, passage_length, eval_batch_size)
                 if eval_data else None)
    summaries = Summaries(model_dir)
    step = int(jax.device_get(state.step))
    logging.info("training from step %d to %d, global batch %d, mesh %s, setup took %.1fs",
                 step, num_train_steps, global_batch_size, dict(mesh.shape),
                 time.monotonic() - started)

    progress = Progress(step, num_train_steps, global_batch_size, summaries)
    eval_metrics: dict[str, float] = {}
    preempted = False
    # SIGTERM is caught until the end, so a notice during the final evaluation or save lets
    # them finish instead of killing the process.
    with PreemptionNotice() as preemption:
        try:
            while step < num_train_steps:
                local_batch = next(iterator)
                state, metrics = train_step(state, _global_batch(local_batch, batch_shardings))
                step += 1
                progress.add(step, metrics)
                preempted = preemption.reached(step)
                save = preempted or step % checkpoint_every == 0 or step == num_train_steps
                if save or step % log_every == 0 or progress.first_step_pending:
                    # A non-finite loss raises here, before anything is checkpointed.
                    progress.flush(skip_nonfinite)
                if save:
                    checkpoint_lib.save_checkpoint(manager, step, state,
                                                   {"iterator": iterator.get_state()})
                if preempted:
                    logging.warning("preemption notice: checkpoint of step %d written; run "
                                    "the same command again to resume", step)
                    break
                if evaluator and eval_every and step % eval_every == 0 and step < num_train_steps:
                    progress.flush(skip_nonfinite)  # never evaluate non-finite parameters
                    eval_metrics = evaluator(state.params, step, summaries)
            if evaluator and not preempted:
                eval_metrics = evaluator(state.params, step, summaries)
        finally:
            # Whatever stops the loop, a checkpoint being written is finished, not left half done.
            manager.wait_until_finished()
            newest = manager.latest_step()
            manager.close()
            summaries.close()
    return TrainResult(state=state, step=step, eval_metrics=eval_metrics, preempted=preempted,
                       checkpoint=None if newest is None else manager.directory / str(newest),
                       seconds=time.monotonic() - started,
                       skipped_nonfinite=progress.skipped_nonfinite)


def _check_vocabulary(model: nn.Module, tokenizer: Tokenizer) -> None:
    model_vocab = model.config.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise ConfigError(
            f"the vocabulary {tokenizer.path!r} has {tokenizer.vocab_size} pieces but the model's "
            f"embedding has {model_vocab} rows (gin: t5_1_1_config.vocab_size); token ids would "
            "run past the embedding")


def _example_global_batch(iterator) -> dict[str, np.ndarray]:
    """One batch with global shapes, read without moving the iterator."""
    position = iterator.get_state()
    local = next(iterator)
    iterator.set_state(position)
    return {k: np.zeros((v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype)
            for k, v in local.items()}


def _global_batch(local_batch: dict[str, np.ndarray], shardings) -> dict[str, jax.Array]:
    """Assembles each process's slice into arrays spanning the global batch."""
    count = jax.process_count()
    return {
        name: jax.make_array_from_process_local_data(
            shardings[name], value, (value.shape[0] * count, *value.shape[1:]))
        for name, value in local_batch.items()
    }


def _initial_state(model, optimizer, example_batch, mesh, rules, seed, manager, iterator,
                   init_checkpoint):
    """The newest checkpoint in model_dir if any, else `init_checkpoint`, else random init."""
    if manager.latest_step() is not None:
        shapes, shardings = train_step_lib.train_state_shardings(
            model, optimizer, example_batch, mesh, rules, seed=seed)
        state, data_state, step = checkpoint_lib.restore_checkpoint(
            manager, checkpoint_lib.abstract_state(shapes, shardings))
        iterator.set_state(data_state["iterator"])
        logging.info("resumed from step %d of %s", step, manager.directory)
        return state, shardings
    init_params = None
    if init_checkpoint:
        init_params = pretrained.load_encoder_params(init_checkpoint, model)
        logging.info("encoders initialised from %s", init_checkpoint)
    return train_step_lib.init_train_state(model, optimizer, example_batch, mesh, rules,
                                           seed=seed, init_params=init_params)
