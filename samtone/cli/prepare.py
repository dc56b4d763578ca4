"""`samtone-prepare`: tokenise training files once into a prepared folder for samtone-train.

    samtone-prepare --data=pairs.jsonl --vocabulary=spiece.model --output=prepared/pairs \
        [--query_length=64] [--passage_length=256] [--num_negatives=K] [--shards=N] \
        [--workers=N] [--on_bad_line=error|skip] [--overwrite]
    samtone-prepare ... --runner=DirectRunner|FlinkRunner|SparkRunner|DataflowRunner \
        [--beam_option=--direct_num_workers=4 ...]
    samtone-prepare --task=NAME [--task_split=train] [--task_module=samtone.tasks] \
        --output=prepared/task [--vocabulary=spiece.model] [--query_length=64] ...

Reads what TRAIN_DATA reads (JSONL, TSV, BEIR folders, globs), validates it the same way and
writes ArrayRecord shards of tokenised examples, lengths.npy and prepared.json
(samtone.data.prepared). Then `samtone-train ... --gin.TRAIN_DATA="'prepared/pairs'"`: each
host reads only its rows. The settings must be the run's (lengths, num_negatives, VOCABULARY).
An existing --output is replaced only with --overwrite; the folder appears whole or not at all.
With --runner the same folder is written by an Apache Beam pipeline on that runner
(samtone.data.prepare_beam; pip install 'samtone[beam]'), --beam_option passing Beam's own
flags; without it, by local worker processes.
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from samtone import output_folder
from samtone.cli import common
from samtone.data import prepare
from samtone.errors import ConfigError, MissingDependencyError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("data", None, "Training pairs: JSONL/TSV files, BEIR folders, globs "
                      "(what TRAIN_DATA reads). Either this or --task.")
    flags.DEFINE_string("task", None, "A registered seqio Task to read instead of --data "
                        "(pip install 'samtone[seqio]').")
    flags.DEFINE_string("task_split", "train", "The split of --task to read.")
    flags.DEFINE_list("task_module", ["samtone.tasks"], "Modules imported to register --task "
                      "(the Gin file's `import` lines of a run that trains on it).")
    flags.DEFINE_string("vocabulary", None, "SentencePiece model: the run's VOCABULARY (with "
                        "--task: the Task's own, by default; a local copy of it if given).")
    flags.DEFINE_string("output", None, "Folder to write (local path).", required=True)
    flags.DEFINE_integer("query_length", 64, "Query tokens, EOS included (the run's "
                         "make_batch_iterator.query_length).")
    flags.DEFINE_integer("passage_length", 256, "Passage tokens, EOS included (the run's "
                         "make_batch_iterator.passage_length).")
    flags.DEFINE_integer("num_negatives", 0, "Hard negatives kept per example (the run's "
                         "make_batch_iterator.num_negatives).", lower_bound=0)
    flags.DEFINE_integer("shards", 1, "ArrayRecord files to split the examples into.",
                         lower_bound=1)
    flags.DEFINE_integer("workers", None, "Tokenising processes (default: the CPU cores).",
                         lower_bound=1)
    flags.DEFINE_enum("on_bad_line", "error", ["error", "skip"], "A bad line stops with its "
                      "file:line (error) or is skipped and counted (skip).")
    flags.DEFINE_string("split", "train", "qrels/<split>.tsv read from BEIR folders.")
    flags.DEFINE_bool("overwrite", False, "Replace --output if it exists and is not empty.")
    flags.DEFINE_string("runner", None, "Write with an Apache Beam pipeline on this runner "
                        "(DirectRunner, FlinkRunner, SparkRunner, DataflowRunner, ...) instead "
                        "of local worker processes; needs pip install 'samtone[beam]'.")
    flags.DEFINE_multi_string("beam_option", [], "A Beam pipeline option for --runner, e.g. "
                              "--beam_option=--direct_num_workers=4 (repeatable).")


def main(argv: Sequence[str]) -> None:
    del argv
    output = common.absolute_path(FLAGS.output)
    settings = prepare.Settings(query_length=FLAGS.query_length,
                                passage_length=FLAGS.passage_length,
                                num_negatives=FLAGS.num_negatives)
    if FLAGS.task is not None:
        manifest, vocabulary = _prepare_task(output, settings)
    else:
        manifest, vocabulary = _prepare_files(output, settings)
    skipped = manifest["skipped_lines"]
    print(f"samtone-prepare: {manifest['num_examples']} examples in "
          f"{len(manifest['shards'])} shards" + (f" ({skipped} bad lines skipped)"
                                                 if skipped else "")
          + f"\nwritten to: {output}\nnext: samtone-train ... --gin.TRAIN_DATA=\"'{output}'\" "
          f"--gin.VOCABULARY=\"'{vocabulary}'\""
          + (" (the file pipeline's batch iterator, not make_seqio_batch_iterator)"
             if FLAGS.task is not None else ""), flush=True)


def _prepare_files(output: str, settings: prepare.Settings) -> tuple[dict, str]:
    for name in ("data", "vocabulary"):
        if FLAGS[name].value is None:
            raise ConfigError(f"--{name} is required (or --task for a seqio Task)")
    for name in ("task_split", "task_module"):
        if FLAGS[name].present:
            raise ConfigError(f"--{name} goes with --task")
    data, vocabulary = common.absolute_paths(FLAGS.data), common.absolute_path(FLAGS.vocabulary)
    output_folder.check_inputs_exist([("--data", data), ("--vocabulary", vocabulary)])
    output_folder.check_target(output, FLAGS.overwrite, flag="--output")
    if FLAGS.runner is None:
        if FLAGS.beam_option:
            raise ConfigError("--beam_option needs --runner (a Beam runner, e.g. DirectRunner)")
        manifest = prepare.prepare(data, vocabulary, output, settings, shards=FLAGS.shards,
                                   workers=FLAGS.workers, on_bad_line=FLAGS.on_bad_line,
                                   split=FLAGS.split, overwrite=FLAGS.overwrite)
    else:
        if FLAGS.workers is not None:
            raise ConfigError("--workers counts local processes; with --runner set the "
                              "runner's own, e.g. --beam_option=--direct_num_workers=4")
        # pylint: disable-next=import-outside-toplevel
        from samtone.data import prepare_beam  # imports apache_beam only when it runs
        manifest = prepare_beam.prepare_with_beam(
            data, vocabulary, output, settings, shards=FLAGS.shards, runner=FLAGS.runner,
            pipeline_options=FLAGS.beam_option, on_bad_line=FLAGS.on_bad_line,
            split=FLAGS.split, overwrite=FLAGS.overwrite)
    return manifest, vocabulary


def _prepare_task(output: str, settings: prepare.Settings) -> tuple[dict, str]:
    if FLAGS.data is not None:
        raise ConfigError(f"--task={FLAGS.task} and --data={','.join(FLAGS.data)}: give one "
                          "of them (a seqio Task, or training files)")
    for name in ("runner", "beam_option", "workers", "on_bad_line", "split"):
        if FLAGS[name].present:
            raise ConfigError(f"--{name} goes with --data; --task reads the Task with tf.data "
                              "(its split: --task_split)")
    vocabulary = None if FLAGS.vocabulary is None else common.absolute_path(FLAGS.vocabulary)
    if vocabulary is not None:
        output_folder.check_inputs_exist([("--vocabulary", vocabulary)])
    output_folder.check_target(output, FLAGS.overwrite, flag="--output")
    try:
        # pylint: disable-next=import-outside-toplevel
        from samtone.data import prepare_task  # imports seqio and TensorFlow
    except ImportError as error:
        if error.name not in ("seqio", "tensorflow"):
            raise
        raise MissingDependencyError(f"--task needs {error.name}: pip install "
                                     "'samtone[seqio]'") from error
    manifest = prepare_task.prepare_task(
        FLAGS.task, output, settings, split=FLAGS.task_split, vocabulary=vocabulary,
        shards=FLAGS.shards, task_modules=FLAGS.task_module, overwrite=FLAGS.overwrite)
    return manifest, manifest["settings"]["vocabulary"]


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
