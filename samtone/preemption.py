"""Preemption notices (SIGTERM): stop after the current step, checkpoint, exit 143 to resume.

Multi-process jobs use JAX's preemption service (jax.distributed installs it, catches SIGTERM
and picks a step every process reaches); a single process sets a flag from a signal handler,
checked between steps.
"""
from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

# Exit status of a run stopped by a preemption notice after its checkpoint: 128 + SIGTERM, so
# schedulers that restart failed tasks (Kubernetes, SLURM --requeue) run it again to resume.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class PreemptionNotice:
    """Has a preemption notice (SIGTERM) arrived? All processes agree on the step."""

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
