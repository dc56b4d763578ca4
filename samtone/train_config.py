"""The groups of `samtone.train.train`'s settings: what it reads, when it checkpoints, what it
evaluates on. Gin configures each group (gin/runs/train.gin binds `train.data =
@DataConfig()`, ...), as t5x groups its DatasetConfig and CheckpointConfig; each value is
checked here, once, when the group is made, and a bad one raises a ConfigError naming its
setting (`error.parameter`, which samtone-train turns into the Gin binding that set it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from samtone.data import pipeline
from samtone.errors import ConfigError


def check_integer(name: str, value: Any, *, smallest: int = 1, may_be_none: bool = False) -> None:
    """`value` is an int >= `smallest` (or None if `may_be_none`); the error names `name`."""
    if value is None and may_be_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        expected = f"an integer >= {smallest}" if smallest > 1 else "a positive integer"
        raise _named_error(name, f"{name} must be {expected}"
                           + (" or None" if may_be_none else "") + f", got {value!r}")


def _named_error(parameter: str, message: str) -> ConfigError:
    error = ConfigError(message)
    error.parameter = parameter
    return error


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What is trained on.

    train_data: file(s) or glob(s) the batch iterator reads (TSV, JSONL, BEIR folder), or
      what `batch_iterator_factory` takes (a seqio Task's name).
    vocabulary: the SentencePiece model file.
    query_length, passage_length: token lengths, EOS included.
    batch_iterator_factory: samtone.data.pipeline.make_batch_iterator or a compatible one.
    """

    train_data: str | Sequence[str]
    vocabulary: str
    query_length: int = 64
    passage_length: int = 256
    batch_iterator_factory: Callable[..., Any] = pipeline.make_batch_iterator

    def __post_init__(self):
        for name in ("query_length", "passage_length"):  # a token and EOS
            check_integer(f"DataConfig.{name}", getattr(self, name), smallest=2)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and kept, and what a new run starts from.

    every_steps: steps between checkpoints (one is always written at the end and on a
      preemption notice).
    every_minutes: also a checkpoint once this many minutes have passed since the last one
      (checked every `train.log_every` steps, when the loop already waits for the devices),
      so a lost host costs minutes, not `every_steps` steps; None: by steps only.
    keep: how many recent checkpoints to keep (None: all).
    init_checkpoint: a Hugging Face T5 folder, a T5X checkpoint or a samtone run to start the
      encoders from; ignored when the run already holds a checkpoint to resume.
    """

    every_steps: int = 1000
    every_minutes: float | None = None
    keep: int | None = 3
    init_checkpoint: str | None = None

    def __post_init__(self):
        check_integer("CheckpointConfig.every_steps", self.every_steps)
        check_integer("CheckpointConfig.keep", self.keep, may_be_none=True)
        minutes = self.every_minutes
        if minutes is not None and (isinstance(minutes, bool)
                                    or not isinstance(minutes, (int, float)) or minutes <= 0):
            raise _named_error("CheckpointConfig.every_minutes",
                               "CheckpointConfig.every_minutes must be a positive number of "
                               f"minutes or None, got {minutes!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Retrieval metrics during training, scored as samtone-eval scores them.

    data: a BEIR folder (against its whole corpus), held-out pairs or graded pairs; None: no
      evaluation. Metrics go to TensorBoard and `<model_dir>/eval/<data name>/<step>/`.
    every_steps: also evaluate every this many steps (None: at the end only).
    batch_size: texts per encoding batch.
    split: the qrels split (`qrels/<split>.tsv`) when `data` is a BEIR folder.
    """

    data: str | Sequence[str] | None = None
    every_steps: int | None = None
    batch_size: int = 128
    split: str = "test"

    def __post_init__(self):
        check_integer("EvalConfig.every_steps", self.every_steps, may_be_none=True)
        check_integer("EvalConfig.batch_size", self.batch_size)
