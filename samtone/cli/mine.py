"""`samtone-mine`: hard negatives for a training file from a trained run (samtone.mine).

    samtone-mine --model_dir=runs/base --train_data=pairs.jsonl --output=pairs_hn.jsonl --k=4 \
        [--corpus=corpus.jsonl] [--margin=0.05] [--approximate] [--overwrite]

An existing --output is replaced only with --overwrite; an input (--train_data, --corpus, the
run) never. Flags are checked before any work; the file appears whole or not at all.
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from samtone import mine
from samtone import output_folder
from samtone.cli import common
from samtone.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "MODEL_DIR of a samtone-train run (model.json and "
                        "checkpoints/), or a samtone-export directory.", required=True)
    flags.DEFINE_list("train_data", None, "Training pairs (JSONL/TSV/BEIR folder, globs) to "
                      "mine negatives for.", required=True)
    flags.DEFINE_string("output", None, "JSONL file to write (not an input).", required=True)
    flags.DEFINE_integer("k", None, "Negatives per example.", required=True, lower_bound=1)
    flags.DEFINE_list("corpus", None, "Extra passages to mine from (.txt one per line, BEIR "
                      "corpus.jsonl, or training files); the training passages always count.")
    flags.DEFINE_float("margin", None, "Drop candidates scoring above the weakest positive's "
                       "score minus this (likely false negatives); >= 0; unset: no such "
                       "filter.")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
    flags.DEFINE_integer("batch_size", 128, "Texts encoded at once (a multiple of the data "
                         "axis).", lower_bound=1)
    flags.DEFINE_integer("chunk_size", None, "Queries scored at once, a multiple of the query "
                         "shards: samtone.search's chunk_size (default: ~2^26 scores per "
                         "device).", lower_bound=1)
    flags.DEFINE_bool("approximate", False, "Approximate top-k (jax.lax.approx_max_k) for "
                      "corpora of millions; exact otherwise.")
    flags.DEFINE_float("recall_target", 0.95, "--approximate: the recall it aims at.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")


def main(argv: Sequence[str]) -> None:
    del argv
    output = common.absolute_path(FLAGS.output)
    train_data, corpus = (common.absolute_paths(FLAGS.train_data),
                          common.absolute_paths(FLAGS.corpus))
    # The library lets a negative margin through candidates above the positive; from the
    # command line that is far more likely a typo than a wish for false negatives.
    if FLAGS.margin is not None and not 0 <= FLAGS.margin < float("inf"):
        raise ConfigError(f"--margin={FLAGS.margin}: must be a finite number >= 0 (a "
                          "candidate scoring above the weakest positive minus the margin is "
                          "dropped)")
    output_folder.check_inputs_exist([("--train_data", train_data), ("--corpus", corpus)])
    stats = mine.mine_training_file(
        common.absolute_path(FLAGS.model_dir), train_data, output, k=FLAGS.k,
        margin=FLAGS.margin, corpus=corpus, step=FLAGS.step, batch_size=FLAGS.batch_size,
        chunk_size=FLAGS.chunk_size, approximate=FLAGS.approximate,
        recall_target=FLAGS.recall_target, overwrite=FLAGS.overwrite)
    print(f"samtone-mine: {stats.written} of {stats.examples} examples with {FLAGS.k} negatives "
          f"each ({stats.dropped} dropped: too few candidates), corpus of {stats.corpus_size} "
          f"passages\nwritten to: {output}\nnext: samtone-train ... "
          f"--gin.TRAIN_DATA=\"'{output}'\" --gin.make_batch_iterator.num_negatives={FLAGS.k}",
          flush=True)


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
