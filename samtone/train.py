"""The training loop and the `samtone-train` command line.

One jitted step from samtone.train_step, `(state, batch) -> (state, metrics)`, inside a loop
that owns all I/O: this process's slice of each global batch in, metrics to the host every
`log_every` steps only, orbax checkpoints every `checkpoint_every` steps and on a preemption
notice (SIGTERM), retrieval metrics on held-out pairs every `eval_every` steps and at the end.
Running the same command again on the same model_dir resumes from the newest checkpoint, data
position included, and reaches the same final state as a run that was never interrupted.

    samtone-train --gin_file=configs/smoke.gin --gin.MODEL_DIR="'/tmp/smoke'"
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from samtone import evaluate as evaluate_lib
from samtone import optimizers
from samtone import partitioning
from samtone import train_step as train_step_lib
from samtone.checkpoints import manager as checkpoint_lib
from samtone.data import files
from samtone.data import pipeline
from samtone.data.tokenizer import Tokenizer

# Exit status of a run stopped by a preemption notice after its checkpoint: 128 + SIGTERM, so
# schedulers that restart failed tasks (Kubernetes, SLURM --requeue) run it again to resume.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
FLAGS = flags.FLAGS


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised with the step so the run can be diagnosed."""


@dataclasses.dataclass
class TrainResult:
    """What `train` ends with: the state, its step, the last evaluation, and why it stopped."""

    state: train_step_lib.TrainState
    step: int
    eval_metrics: dict[str, float]
    preempted: bool = False


def train(
    *,
    model_dir: str,
    model: nn.Module,
    loss: Callable[..., Any],
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
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    rules = (partitioning.logical_axis_rules(logical_axis_rules)
             if isinstance(logical_axis_rules, str) else logical_axis_rules)
    optimizer = optimizer_factory(total_steps=num_train_steps)
    tokenizer = Tokenizer(vocabulary)
    _check_vocabulary(model, tokenizer)

    iterator = batch_iterator_factory(
        train_data, tokenizer=tokenizer, global_batch_size=global_batch_size,
        query_length=query_length, passage_length=passage_length, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    example_batch = _example_global_batch(iterator)
    batch_shardings = partitioning.batch_shardings(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example_batch.items()},
        mesh, rules)

    manager = checkpoint_lib.make_checkpoint_manager(
        epath.Path(model_dir) / "checkpoints", keep=keep_checkpoints)
    state, state_shardings = _initial_state(
        model, optimizer, example_batch, mesh, rules, seed, manager, iterator, init_checkpoint)
    train_step = train_step_lib.make_train_step(
        model, optimizer, train_step_lib.make_loss_fn(loss), state_shardings, batch_shardings,
        mesh, rules, skip_nonfinite=skip_nonfinite)
    evaluator = (_Evaluator(model, state_shardings.params, mesh, rules, tokenizer, eval_data,
                            query_length, passage_length, eval_batch_size)
                 if eval_data else None)
    summaries = _Summaries(model_dir)
    step = int(jax.device_get(state.step))
    logging.info("training from step %d to %d, global batch %d, mesh %s, setup took %.1fs",
                 step, num_train_steps, global_batch_size, dict(mesh.shape),
                 time.monotonic() - started)

    progress = _Progress(step, num_train_steps, global_batch_size, summaries)
    eval_metrics: dict[str, float] = {}
    preempted = False
    # SIGTERM is caught until the end, so a notice during the final evaluation or save lets
    # them finish instead of killing the process.
    with _PreemptionNotice() as preemption:
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
                    eval_metrics = evaluator(state.params, step, summaries)
            if evaluator and not preempted:
                eval_metrics = evaluator(state.params, step, summaries)
        finally:
            # Whatever stops the loop, a checkpoint being written is finished, not left half done.
            manager.wait_until_finished()
            manager.close()
            summaries.close()
    return TrainResult(state=state, step=step, eval_metrics=eval_metrics, preempted=preempted)


def _check_vocabulary(model: nn.Module, tokenizer: Tokenizer) -> None:
    model_vocab = model.config.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(
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
        init_params = load_encoder_params(init_checkpoint, model)
        logging.info("encoders initialised from %s", init_checkpoint)
    return train_step_lib.init_train_state(model, optimizer, example_batch, mesh, rules,
                                           seed=seed, init_params=init_params)


def load_encoder_params(path: str, model: nn.Module) -> dict:
    """Pre-trained weights for `model`'s towers from a Hugging Face or T5X checkpoint.

    A folder with config.json is read as Hugging Face T5, anything else as T5X. A plain T5
    encoder goes into every encoder tower (ADE and ADE-SPL start with two copies) and the
    projection starts from random init, as in the paper; a t5x_retrieval dual encoder also
    brings its projection.
    """
    from samtone import checkpoints  # pylint: disable=import-outside-toplevel
    if (epath.Path(path) / "config.json").exists():
        config, encoder = checkpoints.load_hf_t5_encoder(path)
        _check_same_shape(config, model.config, path)
    else:
        t5x_params = checkpoints.load_t5x_checkpoint(path)
        if "projection_layer" in t5x_params.get("params", t5x_params):
            return checkpoints.t5x_dual_encoder_to_samtone(t5x_params, model.architecture)
        encoder = checkpoints.t5x_encoder_to_samtone(t5x_params)
    towers = ("encoder",) if model.architecture == "sde" else ("query_encoder", "passage_encoder")
    return {tower: encoder for tower in towers}


def _check_same_shape(found, expected, path) -> None:
    fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
              "feed_forward_proj")
    different = {f: (getattr(found, f), getattr(expected, f)) for f in fields
                 if getattr(found, f) != getattr(expected, f)}
    if different:
        details = ", ".join(f"{f}: checkpoint {a} vs config {b}" for f, (a, b) in different.items())
        raise ValueError(f"init checkpoint {path} does not match the configured model "
                         f"(gin: t5_1_1_config.*): {details}")


class _Progress:
    """Keeps per-step metrics on device; fetches, logs and summarises them on `flush`."""

    def __init__(self, step: int, total_steps: int, global_batch_size: int, summaries):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.summaries = summaries
        self.pending: list[tuple[int, dict]] = []
        self.first_step_pending = True
        self.last_time = time.monotonic()
        self.last_step = step

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, skip_nonfinite: bool) -> None:
        """Fetches the pending metrics (the only host round trip); raises on a non-finite loss."""
        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        fetched = jax.device_get([metrics for _, metrics in self.pending])
        self.pending = []
        bad = [(step, m) for step, m in zip(steps, fetched) if m["nonfinite"]]
        if bad and not skip_nonfinite:
            step, metrics = bad[0]
            raise NonFiniteLossError(
                f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['gradient_norm']}) "
                f"at step {step}: training stopped, no checkpoint written after it. Lower the "
                "learning rate, check the data, or set train.skip_nonfinite=True to skip such "
                "updates")
        now = time.monotonic()
        elapsed, done = now - self.last_time, steps[-1] - self.last_step
        self.last_time, self.last_step = now, steps[-1]
        if self.first_step_pending:
            logging.info("step %d took %.1fs (compilation included)", steps[-1], elapsed)
            self.first_step_pending = False
            return
        good = [m for m in fetched if not m["nonfinite"]]
        means = {name: float(np.mean([m[name] for m in good]))
                 for name in ("loss", "in_batch_accuracy", "gradient_norm")} if good else {}
        means["learning_rate"] = float(fetched[-1]["learning_rate"])
        means["examples_per_second"] = self.global_batch_size * done / elapsed
        means["skipped_nonfinite"] = float(len(bad))
        eta = datetime.timedelta(seconds=round(elapsed / done * (self.total_steps - steps[-1])))
        logging.info(
            "step %d/%d | loss %.4f | in-batch acc@1 %.3f | lr %.3g | %.1f examples/s | ETA %s%s",
            steps[-1], self.total_steps, means.get("loss", float("nan")),
            means.get("in_batch_accuracy", float("nan")), means["learning_rate"],
            means["examples_per_second"], eta,
            f" | skipped {len(bad)} non-finite updates" if bad else "")
        self.summaries.scalars("train", steps[-1], means)


class _Summaries:
    """TensorBoard event files under model_dir/{train,eval}, written by process 0 only."""

    def __init__(self, model_dir: str):
        self.model_dir = os.fspath(model_dir)
        self.writers = {}

    def scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
        if jax.process_index() != 0:
            return
        if kind not in self.writers:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
            self.writers[kind] = SummaryWriter(os.path.join(self.model_dir, kind))
        for name, value in values.items():
            # TensorBoard tag names allow no '@': p@1 -> p_at_1.
            self.writers[kind].add_scalar(name.replace("@", "_at_"), value, step)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class _Evaluator:
    """Encodes held-out queries and passages with the current params and ranks them."""

    def __init__(self, model, param_shardings, mesh, rules, tokenizer, eval_data, query_length,
                 passage_length, batch_size):
        self.examples = files.read_examples(eval_data)
        self.tokenizer = tokenizer
        self.query_length, self.passage_length = query_length, passage_length
        self.batch_size = batch_size
        self.token_sharding = token_sharding = partitioning.batch_shardings(
            jax.ShapeDtypeStruct((batch_size, 1), np.int32), mesh, rules)
        replicated = NamedSharding(mesh, PartitionSpec())

        def encoder(method):
            def encode(params, tokens):
                with partitioning.axis_rules(mesh, rules):
                    return model.apply({"params": params}, tokens, method=method)
            return jax.jit(encode, in_shardings=(param_shardings, token_sharding),
                           out_shardings=replicated)

        self.encode_queries = encoder("encode_queries")
        self.encode_passages = encoder("encode_passages")

    def __call__(self, params, step: int, summaries: _Summaries) -> dict[str, float]:
        def bind(encode):
            return lambda tokens: encode(params, jax.make_array_from_callback(
                tokens.shape, self.token_sharding, lambda index: tokens[index]))
        metrics = evaluate_lib.evaluate_examples(
            bind(self.encode_queries), bind(self.encode_passages), self.tokenizer,
            self.examples, self.query_length, self.passage_length, self.batch_size)
        logging.info("eval at step %d on %d pairs: %s", step, len(self.examples),
                     format_metrics(metrics))
        summaries.scalars("eval", step, metrics)
        return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """`P@1 0.9133 | MRR 0.9486 | ...` for logs and the final printed line."""
    return " | ".join(f"{name.upper()} {value:.4f}" for name, value in metrics.items())


class _PreemptionNotice:
    """Has a preemption notice (SIGTERM) arrived? All processes agree on the step.

    Multi-process jobs use JAX's preemption service (jax.distributed installs it, it catches
    SIGTERM and picks a step every process reaches); a single process sets a flag from a
    signal handler, checked between steps.
    """

    def __init__(self):
        self.received = False
        self.previous_handler = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
        return False

    def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
        logging.warning("SIGTERM received: stopping after this step with a checkpoint")
        self.received = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.received
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # preemption service disabled
            return False


# ----------------------------------------------------------------------------------------------
# Command line: absl flags as in t5x; `--gin.NAME=VALUE` is short for `--gin_bindings`.

DEFAULT_GIN_FILE = "configs/smoke.gin"


def _define_flags() -> None:
    # Defined on first use, not at import: `python -m samtone.train` loads this file twice
    # (as __main__ and, through gin_config, as samtone.train).
    if "gin_file" in FLAGS:
        return
    flags.DEFINE_multi_string("gin_file", None, f"Gin config files (default {DEFAULT_GIN_FILE}); "
                              "later files override earlier ones.")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files; "
                              "--gin.NAME=VALUE is the same as --gin_bindings='NAME = VALUE'.")
    flags.DEFINE_list("gin_search_paths", [], "Extra folders where Gin files and their includes "
                      "are looked up (the current folder and samtone's own are always searched).")


def main(argv: Sequence[str]) -> None:
    """Parses the Gin files and bindings, joins a multi-process job if configured, trains."""
    from samtone import gin_config  # pylint: disable=import-outside-toplevel (imports this)

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --gin_file and "
                             "--gin.NAME=VALUE")
    gin_config.parse(FLAGS.gin_file or [DEFAULT_GIN_FILE], FLAGS.gin_bindings,
                     FLAGS.gin_search_paths)
    gin.get_configurable("distributed")()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # progress is logged once, by process 0
    model_dir = _evaluated(gin.query_parameter("train.model_dir"))
    if jax.process_index() == 0:
        epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
        (epath.Path(model_dir) / "config.gin").write_text(gin.config_str())
    result = gin.get_configurable("train")()
    if result.eval_metrics and jax.process_index() == 0:
        print(f"eval at step {result.step}: {format_metrics(result.eval_metrics)}", flush=True)
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_CODE)


def _evaluated(value):
    """A queried Gin value with its `%MACRO` / `@fn()` references evaluated."""
    while isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
        value = value.scoped_configurable_fn()
    return value


def _quiet_libraries(record) -> bool:
    """Drops orbax's per-save INFO chatter from the log; its warnings and errors stay."""
    return record.levelno > 20 or "/orbax/" not in record.pathname


def console_entry() -> None:
    """`samtone-train` and `python -m samtone.train`."""
    from samtone import gin_config  # pylint: disable=import-outside-toplevel (imports this)
    _define_flags()
    logging.get_absl_handler().addFilter(_quiet_libraries)
    app.run(main, argv=gin_config.rewrite_gin_args(sys.argv))


if __name__ == "__main__":
    console_entry()
