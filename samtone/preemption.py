"""Stop requests: a preemption notice (SIGTERM), a hang-up (SIGHUP) or Ctrl-C (SIGINT) stops
after the current step with a checkpoint. A preempted or hung-up run exits 143 so that
schedulers and launch/tpu_worker.sh rerun it to resume; Ctrl-C exits 130.

Multi-process jobs use JAX's preemption service (jax.distributed installs it, catches SIGTERM
and picks a step every process reaches); a SIGHUP there is re-sent to the process as SIGTERM, so
the service handles it the same way. A single process sets a flag from a signal handler,
checked between steps. A second Ctrl-C, or one after the last step (its checkpoint written),
interrupts at once.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

# Exit status of a run stopped by a preemption notice after its checkpoint: 128 + SIGTERM, so
# schedulers that restart failed tasks (Kubernetes, SLURM --requeue) run it again to resume.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# Exit status of a run stopped by Ctrl-C: 128 + SIGINT, as shells report it.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


class PreemptionNotice:
    """Has a stop been asked for (SIGTERM, or SIGINT in one process)? All processes agree on
    the step."""

    def __init__(self):
        self.received = False
        self.interrupted = False
        self.reason = "preemption notice"
        self._steps_done = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if jax.process_count() == 1:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            # A dropped ssh session sends SIGHUP, whose default would kill the run unsaved.
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_sighup)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
        logging.warning("SIGTERM received: stopping after this step with a checkpoint")
        self.received = True

    def _on_sighup(self, signum, frame):  # pylint: disable=unused-argument
        logging.warning("SIGHUP received (hang-up): stopping after a step with a checkpoint")
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, as a notice
            return
        self.received = True
        self.reason = "hang-up (SIGHUP)"

    def _on_sigint(self, signum, frame):  # pylint: disable=unused-argument
        if self.interrupted or self._steps_done or jax.process_count() > 1:
            raise KeyboardInterrupt
        logging.warning("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to "
                        "stop at once)")
        self.received = self.interrupted = True
        self.reason = "interrupted (Ctrl-C)"

    def steps_done(self) -> None:
        """The last step's checkpoint is written: Ctrl-C may now interrupt at once."""
        self._steps_done = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1 or self.interrupted:
            return self.received
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # preemption service disabled
            return False
