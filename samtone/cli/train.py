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
import shlex
import sys
from typing import Sequence

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
    gin_parsing.define_gin_flags(default_file=DEFAULT_GIN_FILE)

# Parameters holding paths: made absolute before the run starts, so config.gin, the manifest
# and the printed next steps work from any folder.
PATH_PARAMETERS = ("train.model_dir", "DataConfig.train_data", "EvalConfig.data",
                   "DataConfig.vocabulary", "CheckpointConfig.init_checkpoint")


def check_settings() -> None:
    """The one check the library cannot make: a run folder is named. Every value is checked
    where it is used (samtone.train, the losses, the optimiser)."""
    if gin_parsing.setting("train.model_dir", None) is None:
        raise ConfigError("no MODEL_DIR: set --gin.MODEL_DIR=\"'/path/to/run'\"")


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
    eval_data = gin_parsing.setting("EvalConfig.data", None)
    data = eval_data if isinstance(eval_data, str) else "HELD_OUT.jsonl"
    split = gin_parsing.setting("EvalConfig.split", "test")
    quoted = shlex.quote(model_dir)
    lines.append("next:")
    lines.append(f"  evaluate: samtone-eval --model_dir={quoted} --data={shlex.quote(data)}"
                 + (" --split=" + shlex.quote(split) if split != "test" else ""))
    lines.append(f"  analyze:  samtone-analyze --model_dir={quoted} --data={shlex.quote(data)} "
                 f"--output={shlex.quote(model_dir + '/analysis')}")
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
        source = gin_parsing.binding_source(parameter)  # e.g. BATCH_SIZE (train.global_...)
        message = str(error)
        raise UserError(message.replace(parameter, source, 1) if message.startswith(parameter)
                        else f"{source}: {message}") from error
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
