"""Training progress: the log line every `log_every` steps and TensorBoard summaries.

Per-step metrics stay on the devices until `flush`, the loop's only host round trip, so the
step never waits for the host. A non-finite loss is found at the flush, which the loop runs
before every checkpoint and evaluation.
"""
from __future__ import annotations

import datetime
import os
import time

import jax
import numpy as np
from absl import logging

from samtone import run_dir
from samtone.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; raised with the step so the run can be diagnosed."""


class Summaries:
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


class Progress:
    """Keeps per-step metrics on device; fetches, logs and summarises them on `flush`."""

    def __init__(self, step: int, total_steps: int, global_batch_size: int,
                 summaries: Summaries):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.summaries = summaries
        self.pending: list[tuple[int, dict]] = []
        self.first_step_pending = True
        self.last_time = time.monotonic()
        self.last_step = step
        self.skipped_nonfinite = 0

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
        self.skipped_nonfinite += len(bad)
        if bad and not skip_nonfinite:
            step, metrics = bad[0]
            raise NonFiniteLossError(
                f"non-finite loss ({metrics['loss']}) "
                f"or gradient norm ({metrics['gradient_norm']}) "
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
        self.summaries.scalars(run_dir.TRAIN_EVENTS, steps[-1], means)


def format_metrics(metrics: dict[str, float]) -> str:
    """`P@1 0.9133 | MRR@10 0.9486 | ...` for logs."""
    return " | ".join(f"{name} {value:.4f}" for name, value in metrics.items())
