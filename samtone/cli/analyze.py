"""`samtone-analyze`: the paper's embedding-space figures and numbers (samtone.analysis).

    samtone-analyze --model_dir=runs/base --data=pairs.jsonl --output_dir=analysis/base
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from samtone import analysis
from samtone.cli import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "MODEL_DIR of a samtone-train run, or a "
                        "samtone-export directory.", required=True)
    flags.DEFINE_list("data", None, "(query, passage) pairs: JSONL/TSV/BEIR folder, globs.",
                      required=True)
    flags.DEFINE_string("output_dir", None, "Where tsne.png, distances.png and summary.json "
                        "go.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("batch_size", 128, "Texts encoded at once.", lower_bound=1)
    flags.DEFINE_integer("max_points", 2000, "Most queries + passages in the t-SNE plot.",
                         lower_bound=4)
    flags.DEFINE_integer("seed", 0, "Seeds the t-SNE and its sample.")


def main(argv: Sequence[str]) -> None:
    del argv
    output_dir = common.absolute_path(FLAGS.output_dir)
    summary = analysis.analyze(common.absolute_path(FLAGS.model_dir),
                               common.absolute_paths(FLAGS.data), output_dir, step=FLAGS.step,
                               batch_size=FLAGS.batch_size, max_points=FLAGS.max_points,
                               seed=FLAGS.seed)
    for name, value in summary.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"samtone-analyze: wrote tsne.png, distances.png, summary.json to {output_dir}",
          flush=True)


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
