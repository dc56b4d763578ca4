"""`samtone-compare`: paired significance tests between samtone-eval outputs (samtone.compare).

    samtone-compare --runs=EVAL_A,EVAL_B[,...] [--baseline=EVAL_A] [--test=fisher|student]
        [--output=DIR] [--overwrite]
    samtone-compare --runs='ibs=EVAL_1,EVAL_2;samtone=EVAL_3,EVAL_4' --baseline=ibs

Each EVAL is a folder samtone-eval wrote (metrics.json, per_query.json), all of the same
queries, qrels, split and corpus (refused otherwise). A NAME=EVAL,EVAL group is one system
trained with several seeds: mean ± std over its seeds, tested with the per-query values of
all seeds pooled (seed i paired with the baseline's seed i). Prints one markdown table: P@1,
MRR@10, NDCG@10, Recall@10, Recall@100 of each system, its p-value against the baseline (the
first system unless --baseline) and * where p < 0.05 after Holm's correction. --output=DIR
also writes DIR/compare.json (values, p-values, the per-query values used) and
DIR/compare.md, replacing earlier ones only with --overwrite. Needs the extra `analysis`
(ranx).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from absl import flags

from samtone import compare
from samtone.cli import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    # A string, not a list: absl's lists split on ',', which also separates a group's seeds.
    flags.DEFINE_string("runs", None, "samtone-eval output folders, comma-separated (each a "
                        "system), or NAME=EVAL,EVAL groups separated by ';' (a system of "
                        "several seeds).", required=True)
    flags.DEFINE_string("baseline", None, "The system the others are tested against: a NAME "
                        "of --runs or a folder (default: the first).")
    flags.DEFINE_enum("test", "fisher", list(compare.TESTS), "The paired test: Fisher's "
                      "randomization test or Student's t-test (both ranx's).")
    flags.DEFINE_string("output", None, "Folder for compare.json and compare.md (default: "
                        "print only).")
    flags.DEFINE_bool("overwrite", False, "Replace compare.json and compare.md if --output "
                      "holds them.")


def main(argv: Sequence[str]) -> None:
    del argv
    systems = [dataclasses.replace(system, folders=common.absolute_paths(system.folders))
               for system in compare.parse_runs(FLAGS.runs, flag="--runs")]
    output = common.absolute_path(FLAGS.output)
    if output is not None:
        compare.check_output(output, systems, FLAGS.overwrite)  # before any work
    comparison = compare.compare_systems(systems, baseline=FLAGS.baseline, test=FLAGS.test)
    data = ", ".join(comparison["data"] or [])
    split = f" ({comparison['split']})" if comparison["split"] else ""
    lines = [f"samtone-compare: {len(systems)} systems on {data}{split}: "
             f"{comparison['num_queries']} queries", "", compare.format_markdown(comparison), ""]
    if output is not None:
        written = compare.write_comparison(output, comparison, FLAGS.overwrite)
        lines.append(f"written:  {', '.join(written)}")
    else:
        lines.append("(--output=DIR keeps the table and the per-query values: compare.md, "
                     "compare.json)")
    print("\n".join(lines), flush=True)


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
