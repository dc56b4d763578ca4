"""The run folder (MODEL_DIR): its layout, its lock, and what may be written into it.

    MODEL_DIR/
      checkpoints/<step>/   orbax steps (samtone.checkpoints.manager)
      train/                TensorBoard events of training
      eval/<data>/          evaluation: TensorBoard events, <step>/metrics.json, samtone-eval's
                            default output
      config.gin            the Gin config the run started with (config.step<N>.gin: a resume
                            at step N with a different config)
      model.json, spm.model what serving rebuilds the model from (samtone.run_manifest)
      .lock                 held by the trainer writing the run (host and pid)

This module is the one place that names these paths. A training run holds the lock for its
whole life: a second trainer on the same folder is refused, naming the holder; the lock of a
process that died on this host is taken over with a warning. Commands that write outputs ask
`check_output` first, so that no output replaces, contains or lands inside the parts of a run
that hold its training (checkpoints, events, config, manifest).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
from typing import Iterable

from absl import logging
from etils import epath

from samtone import paths
from samtone.errors import ConfigError, OutputExistsError

CHECKPOINTS = "checkpoints"
TRAIN_EVENTS = "train"
EVAL = "eval"
CONFIG = "config.gin"
MANIFEST = "model.json"
VOCABULARY = "spm.model"
LOCK = ".lock"
# The parts of a run that hold its training: never written by another command.
_RUN_STATE = (CHECKPOINTS, TRAIN_EVENTS, CONFIG, MANIFEST, VOCABULARY, LOCK)


def absolute(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (~ expanded, relative to the current folder); URLs as given."""
    return epath.Path(paths.absolute_path(path))


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths of one run folder; `root` is absolute."""

    root: epath.Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        return cls(absolute(path))

    @property
    def checkpoints(self) -> epath.Path:
        return self.root / CHECKPOINTS

    @property
    def train_events(self) -> epath.Path:
        return self.root / TRAIN_EVENTS

    @property
    def eval(self) -> epath.Path:
        return self.root / EVAL

    def eval_output(self, data_name: str) -> epath.Path:
        """samtone-eval's default output folder for data named `data_name`."""
        return self.eval / data_name

    @property
    def config(self) -> epath.Path:
        return self.root / CONFIG

    def resumed_config(self, step: int) -> epath.Path:
        """Where a resume at `step` with a config unlike config.gin records its own."""
        return self.root / f"config.step{step}.gin"

    @property
    def manifest(self) -> epath.Path:
        return self.root / MANIFEST

    @property
    def vocabulary(self) -> epath.Path:
        return self.root / VOCABULARY

    @property
    def lock_file(self) -> epath.Path:
        return self.root / LOCK

    def is_run(self) -> bool:
        """Does the folder hold a run (a manifest or checkpoints)?"""
        return self.manifest.exists() or self.checkpoints.exists()

    def check_writable(self, flag: str = "MODEL_DIR") -> None:
        """Refuses a run folder that is a file, lies under a file or cannot be written; creates
        nothing. `flag` names the setting in the message."""
        text = os.fspath(self.root)
        if "://" in text:
            return
        if os.path.exists(text) and not os.path.isdir(text):
            raise ConfigError(f"{flag}={text} is a file, not a folder")
        existing = text
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(f"{flag}={text} lies under {existing}, which is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag}={text}: {existing} is not writable")


def _inside(path: epath.Path, folder: epath.Path) -> bool:
    """Is `path` `folder` or under it (as strings, both absolute)?"""
    path_text, folder_text = os.fspath(path).rstrip("/"), os.fspath(folder).rstrip("/")
    return path_text == folder_text or path_text.startswith(folder_text + "/")


def check_output(output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]],
                 *, flag: str = "--output") -> None:
    """Refuses an output that would replace or hold an input, or land in a run's state.

    Args:
      output: the file or folder a command writes (absolute or relative).
      inputs: (flag, path) of each input the command reads; a MODEL_DIR among them is a run
        folder whose checkpoints, events, config and manifest are protected too.
      flag: the output's flag, named in the message.

    Raises:
      OutputExistsError: `output` is an input, contains one, or lies in a run's state; this
        holds with --overwrite too.
    """
    target = absolute(output)
    for input_flag, path in inputs:
        if path is None:
            continue
        source = absolute(path)
        if _inside(source, target):
            what = "is" if os.fspath(source) == os.fspath(target) else "contains"
            raise OutputExistsError(f"{flag}={target} {what} the input {input_flag}={source}; "
                                    "a command never replaces its own input (choose another "
                                    f"{flag})")
        run = RunDir(source)
        if run.manifest.exists() or run.checkpoints.exists():
            for part in _RUN_STATE:
                if _inside(target, run.root / part):
                    raise OutputExistsError(
                        f"{flag}={target} lies in {run.root / part}, which holds the training "
                        f"of {input_flag}={source}; choose a folder outside it (e.g. "
                        f"{run.root / 'export'})")


class LockHeld(ConfigError):
    """Another live process holds the run's lock."""


@dataclasses.dataclass
class RunLock:
    """An exclusive lock on a run folder: `MODEL_DIR/.lock` holding the owner's host and pid.

        with RunLock(run):  # the folder must exist
            ...train...
    """

    run: RunDir
    held: bool = False

    def acquire(self) -> None:
        """Takes the lock (again: a no-op); LockHeld names a live holder."""
        path = os.fspath(self.run.lock_file)
        # Object stores have no O_EXCL; multi-host runs rely on the scheduler.
        if self.held or "://" in path:
            return
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
        for _ in range(2):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(path)
                if holder is not None and not _dead_here(holder):
                    raise LockHeld(
                        f"{self.run.root} is in use by another samtone-train (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}; lock {path}); wait for "
                        "it to end, or stop it first. If that process is gone, delete the "
                        "lock file") from None
                logging.warning("taking over %s of process %s on %s, which has ended", path,
                                (holder or {}).get("pid"), (holder or {}).get("host"))
                _remove(path)
                continue
            with os.fdopen(descriptor, "w") as f:
                f.write(mine + "\n")
            self.held = True
            return
        raise LockHeld(f"{self.run.root}: could not take the lock {path}")

    def release(self) -> None:
        if self.held:
            _remove(os.fspath(self.run.lock_file))
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_holder(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.loads(f.read() or "null")
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _dead_here(holder: dict) -> bool:
    """Is the holder a process of this host that no longer runs?"""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise
