"""`samtone-eval`: a checkpoint against a full corpus (samtone.evaluate).

    samtone-eval --model_dir=runs/base --data=beir/scifact [--split=test] [--output=OUT] \
        [--step=N] [--batch_size=B] [--top_k=100] [--approximate] [--overwrite]

Writes OUT/metrics.json (P@1, MRR@10, NDCG@10, Recall@1/10/100 with 95% bootstrap intervals
over queries, counts, step, the data's fingerprint), OUT/run.trec and OUT/per_query.json (each
metric of each query, which samtone-compare tests) (default OUT: MODEL_DIR/eval/<data name>),
and prints the table, the encoding and search rates, and where the files went. Existing files
there are replaced only with --overwrite; the inputs (the run, the data) never. Flags are
checked before any work.
"""
from __future__ import annotations

import shlex
from typing import Sequence

from absl import flags

from samtone import evaluate
from samtone import output_folder
from samtone.cli import common
from samtone.data import retrieval
from samtone.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "MODEL_DIR of a samtone-train run (model.json and "
                        "checkpoints/), or a samtone-export directory.", required=True)
    flags.DEFINE_list("data", None, "A BEIR folder (corpus.jsonl, queries.jsonl, "
                      "qrels/<split>.tsv), or held-out pairs (JSONL/TSV, globs); graded pairs "
                      "(labels) give Spearman / Pearson.", required=True)
    flags.DEFINE_string("split", "test", "The qrels split of a BEIR folder (only).")
    flags.DEFINE_string("output", None, "Folder for metrics.json, run.trec and per_query.json "
                        "(default MODEL_DIR/eval/<data name>).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("batch_size", 128, "Texts encoded at once (a multiple of the "
                         "devices the batch is split over).", lower_bound=1)
    flags.DEFINE_integer("top_k", 100, "Passages per query written to run.trec (the metrics "
                         "always rank at least 100 deep, for Recall@100).", lower_bound=1)
    flags.DEFINE_bool("approximate", False, "Approximate top-k (jax.lax.approx_max_k) for "
                      "corpora of millions; exact otherwise.")
    flags.DEFINE_float("recall_target", 0.95, "--approximate: the recall it aims at.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_string("vocabulary", None, "The SentencePiece model the data was prepared "
                        "with, if any: refused unless it is the model's own.")
    flags.DEFINE_bool("overwrite", False, "Replace metrics.json, run.trec and per_query.json "
                      "if the output folder holds them (an earlier evaluation of the same data).")


def main(argv: Sequence[str]) -> None:
    del argv
    model_dir = common.absolute_path(FLAGS.model_dir)
    data = common.absolute_paths(FLAGS.data)
    check_data(data)
    report = evaluate.evaluate_model(
        model_dir, data, split=FLAGS.split, output_dir=common.absolute_path(FLAGS.output),
        step=FLAGS.step, batch_size=FLAGS.batch_size, top_k=FLAGS.top_k,
        approximate=FLAGS.approximate, recall_target=FLAGS.recall_target,
        vocabulary=common.absolute_path(FLAGS.vocabulary), overwrite=FLAGS.overwrite)
    print(closing_lines(report, model_dir), flush=True)


def check_data(data: list[str]) -> None:
    """--data exists, and --split, if given, has a BEIR folder to apply to."""
    output_folder.check_inputs_exist([("--data", data)])
    if FLAGS["split"].present and retrieval.beir_folder(data) is None:
        raise ConfigError(f"--split={FLAGS.split} applies only to a BEIR folder, but "
                          f"--data={','.join(data)} is not one (pairs files are evaluated "
                          "whole); drop --split")


def closing_lines(report: evaluate.EvalReport, model_dir: str) -> str:
    values, seconds = report.values, report.seconds
    data = ", ".join(values["data"]) + (f" ({values['split']})" if "split" in values else "")
    if "num_queries" in values:
        sizes = (f"{values['num_queries']} queries, {values['num_passages']} passages, "
                 f"{values['search']} top {values['top_k']}")
    else:
        sizes = f"{values['num_pairs']} graded pairs"
    lines = [f"samtone-eval: step {values['step']} of {model_dir} on {data}: {sizes}", "",
             evaluate.format_table({name: values[name] for name in report.metric_names},
                                   values.get("intervals")), ""]
    if "num_queries" in values:
        passages = _rate(values["num_passages"], seconds["encode_passages"], "passages")
        queries = _rate(values["num_queries"], seconds["encode_queries"], "queries")
        lines.append(f"encoding: {passages}; {queries} (compilation included)")
        lines.append(f"search:   {seconds['search']:.2f} s; metrics: {seconds['metrics']:.2f} s")
    else:
        texts = _rate(2 * values["num_pairs"], seconds["encode_pairs"], "texts")
        lines.append(f"encoding: {texts}")
    lines.append(f"written:  {', '.join(report.written)}")
    quoted = shlex.quote(model_dir)
    lines.append(f"next:     samtone-analyze --model_dir={quoted} --compare=OTHER_MODEL_DIR "
                 f"--data={shlex.quote(values['data'][0])} "
                 f"--output={shlex.quote(model_dir + '/analysis')}")
    if "num_queries" in values:
        lines.append(f"          samtone-compare --runs={shlex.quote(report.output_dir)},"
                     "OTHER_EVAL_FOLDER  (paired tests, extra analysis)")
    return "\n".join(lines)


def _rate(count: int, seconds: float, unit: str) -> str:
    return f"{count} {unit} in {seconds:.1f} s ({count / max(seconds, 1e-9):,.0f} {unit}/s)"


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
