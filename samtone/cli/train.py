"""`samtone-train`: train (or resume) the run a Gin config describes.

    samtone-train --gin_file=configs/smoke.gin [--gin.NAME=VALUE ...]

Parses the Gin files and `--gin.NAME=VALUE` bindings (t5x's shorthand for `--gin_bindings`),
checks the run's key values before anything compiles, makes its paths absolute, joins a
multi-process job if configured, trains (samtone.train), and ends with a summary: the metrics,
the wall time, the newest checkpoint and the commands to run next. Running it again on the same
MODEL_DIR resumes.
"""
from __future__ import annotations

import datetime
import numbers
import shlex
import sys
from typing import Any, Callable, Sequence

import gin
import jax
from absl import flags
from absl import logging

from samtone.cli import common
from samtone.cli import gin_parsing
from samtone.cli import gin_registry
from samtone.errors import ConfigError, UserError
from samtone.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

DEFAULT_GIN_FILE = "configs/smoke.gin"
FLAGS = flags.FLAGS



def define_flags() -> None:
    flags.DEFINE_multi_string("gin_file", None, f"Gin config files (default {DEFAULT_GIN_FILE}); "
                              "later files override earlier ones.")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files; "
                              "--gin.NAME=VALUE is the same as --gin_bindings='NAME = VALUE'.")
    flags.DEFINE_list("gin_search_paths", [], "Extra folders where Gin files and their "
                      "includes are looked up (the current folder and samtone's own are always "
                      "searched).")

# Parameters holding paths: made absolute before the run starts, so config.gin, the manifest
# and the printed next steps work from any folder.
PATH_PARAMETERS = ("train.model_dir", "train.train_data", "train.eval_data",
                   "train.vocabulary", "train.init_checkpoint")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and value > 0 and value == value and value != float("inf"))


# (parameter, check, what it must be, may be None)
CHECKS: tuple[tuple[str, Callable[[Any], bool], str, bool], ...] = (
    ("train.global_batch_size", _positive_int, "a positive integer", False),
    ("train.num_train_steps", _positive_int, "a positive integer", False),
    ("train.query_length", lambda v: _positive_int(v) and v >= 2,
     "an integer >= 2 (a token and EOS)", False),
    ("train.passage_length", lambda v: _positive_int(v) and v >= 2,
     "an integer >= 2 (a token and EOS)", False),
    ("train.checkpoint_every", _positive_int, "a positive integer", False),
    ("train.log_every", _positive_int, "a positive integer", False),
    ("train.eval_every", _positive_int, "a positive integer or None", True),
    ("train.keep_checkpoints", _positive_int, "a positive integer or None", True),
    ("train.eval_batch_size", _positive_int, "a positive integer", False),
    ("make_optimizer.learning_rate", _positive_number, "a positive number", False),
    ("losses.samtone_loss.temperature", _positive_number, "a positive number", False),
    ("losses.in_batch_softmax_loss.temperature", _positive_number, "a positive number", False),
    ("losses.pair_loss.temperature", _positive_number, "a positive number", False),
)


def check_settings() -> None:
    """Type- and range-checks the run's key values; the message names the binding."""
    for name, check, expected, nullable in CHECKS:
        value = gin_parsing.setting(name, default=_Missing)
        if value is _Missing or (value is None and nullable):
            continue
        if not check(value):
            raise ConfigError(f"{gin_parsing.binding_source(name)} must be {expected}, got "
                              f"{value!r}")
    if gin_parsing.setting("train.model_dir", None) is None:
        raise ConfigError("no MODEL_DIR: set --gin.MODEL_DIR=\"'/path/to/run'\"")


class _Missing:  # pylint: disable=too-few-public-methods
    """Marks a parameter the config does not bind (its default applies)."""


def make_paths_absolute() -> None:
    """Makes each path setting absolute (relative to the current folder) where it is defined.

    A parameter bound to a macro (`train.model_dir = %MODEL_DIR`) keeps that binding and the
    macro gets the absolute value, so the run's config.gin replays with a new
    `--gin.MODEL_DIR=...`; a parameter bound to a literal gets the absolute literal.
    """
    for name in PATH_PARAMETERS:
        try:
            value = gin.query_parameter(name)
        except ValueError:
            continue
        target = name
        while (isinstance(value, gin.config.ConfigurableReference)
               and value.selector == "gin.macro"):
            target = f"{value.scoped_selector.split('/')[0]}/gin.macro.value"
            value = gin.query_parameter(target)
        if isinstance(value, gin.config.ConfigurableReference):
            continue  # a function's result (e.g. smoke_path), absolute by itself
        absolute = common.absolute_paths(value)
        if absolute != value:
            gin.bind_parameter(target, absolute)


def summary(result, model_dir: str, total_steps: int) -> str:
    """The closing lines: metrics table, wall time, newest checkpoint, next commands."""
    lines = [f"samtone-train: step {result.step}/{total_steps} in "
             f"{datetime.timedelta(seconds=round(result.seconds))}"
             + (f" ({result.skipped_nonfinite} non-finite updates skipped)"
                if result.skipped_nonfinite else "")]
    if result.eval_metrics:
        lines.append("")
        lines.append(f"  {'metric':<12}{'value':>8}")
        lines.extend(f"  {name:<12}{value:>8.4f}"
                     for name, value in result.eval_metrics.items())
    lines.append("")
    lines.append(f"checkpoint: {result.checkpoint}")
    lines.append(f"run:        {model_dir} (model.json, config.gin, TensorBoard: tensorboard "
                 f"--logdir {shlex.quote(model_dir)})")
    eval_data = gin_parsing.setting("train.eval_data", None)
    data = eval_data if isinstance(eval_data, str) else "HELD_OUT.jsonl"
    split = gin_parsing.setting("train.eval_split", "test")
    quoted = shlex.quote(model_dir)
    lines.append("next:")
    lines.append(f"  evaluate: samtone-eval --model_dir={quoted} --data={shlex.quote(data)}"
                 + (" --split=" + shlex.quote(split) if split != "test" else ""))
    lines.append(f"  analyze:  samtone-analyze --model_dir={quoted} --data={shlex.quote(data)} "
                 f"--output_dir={shlex.quote(model_dir + '/analysis')}")
    lines.append(f"  export:   samtone-export --model_dir={quoted} "
                 f"--output={shlex.quote(model_dir + '/export')}")
    lines.append(f"  mine:     samtone-mine --model_dir={quoted} --train_data=TRAIN.jsonl "
                 "--output=mined.jsonl --k=4")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    """Parses and checks the config, joins a multi-process job if configured, trains."""
    del argv
    gin_parsing.parse(FLAGS.gin_file or [DEFAULT_GIN_FILE], FLAGS.gin_bindings,
                      FLAGS.gin_search_paths, finalize=False)
    check_settings()
    make_paths_absolute()
    gin.finalize()
    gin.get_configurable(gin_registry.initialize_distributed)()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # progress is logged once, by process 0
    model_dir = gin_parsing.setting("train.model_dir")
    try:
        result = gin.get_configurable("train")(config_text=gin.config_str())
    except UserError as error:
        parameter = getattr(error, "parameter", None)
        if parameter is None:
            raise
        raise UserError(f"{gin_parsing.binding_source(parameter)}: {error}") from error
    if result.interrupted:
        if jax.process_index() == 0:
            print(f"samtone-train: interrupted at step {result.step}; checkpoint "
                  f"{result.checkpoint} written, run the same command again to resume",
                  file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    if jax.process_index() == 0:
        print(summary(result, model_dir, gin_parsing.setting("train.num_train_steps")),
              flush=True)
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_CODE)


def console_entry() -> None:
    """`samtone-train` and `python -m samtone.cli.train`."""
    define_flags()
    common.run(main, gin_parsing.rewrite_gin_args(sys.argv))


if __name__ == "__main__":
    console_entry()
