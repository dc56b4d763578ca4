"""`samtone-analyze`: the paper's embedding-space figures and numbers (samtone.analysis).

    samtone-analyze --model_dir=runs/samtone --data=pairs.jsonl --output=analysis \
        [--compare=runs/in_batch_softmax] [--overwrite]

Figures and summary.json already in --output are replaced only with --overwrite; the
inputs (the runs, the data) never. Flags are checked before any model is loaded.
"""
from __future__ import annotations

from typing import Sequence

from absl import flags
from etils import epath

from samtone import analysis
from samtone import output_folder
from samtone.cli import common
from samtone.data import files
from samtone.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "MODEL_DIR of a samtone-train run, or a "
                        "samtone-export directory.", required=True)
    flags.DEFINE_list("data", None, "(query, passage) pairs: JSONL/TSV/BEIR folder, globs.",
                      required=True)
    flags.DEFINE_string("output", None, "Folder for tsne.png, distances.png, similarities.png "
                        "and summary.json (not an input).", required=True)
    flags.DEFINE_string("compare", None, "A second run (or export) drawn in every figure next "
                        "to --model_dir's, e.g. in-batch softmax against SamToNe.")
    flags.DEFINE_string("split", "test", "The qrels split when --data is a BEIR folder "
                        "(only then).")
    flags.DEFINE_integer("max_samples", 100_000, "Most random pairs i != j in "
                         "similarities.png.", lower_bound=2)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("batch_size", 128, "Texts encoded at once.", lower_bound=1)
    flags.DEFINE_integer("max_points", 2000, "Most queries + passages in the t-SNE plot.",
                         lower_bound=4)
    flags.DEFINE_integer("seed", 0, "Seeds the t-SNE and its sample.")
    flags.DEFINE_bool("overwrite", False, "Replace the figures and summary.json if "
                      "--output holds them.")


def main(argv: Sequence[str]) -> None:
    del argv
    output = common.absolute_path(FLAGS.output)
    data = common.absolute_paths(FLAGS.data)
    check_data(data)
    summary = analysis.analyze(common.absolute_path(FLAGS.model_dir), data, output,
                               compare=common.absolute_path(FLAGS.compare), split=FLAGS.split,
                               step=FLAGS.step, batch_size=FLAGS.batch_size,
                               max_points=FLAGS.max_points, max_samples=FLAGS.max_samples,
                               seed=FLAGS.seed, overwrite=FLAGS.overwrite)
    columns = [summary] + ([summary["compare"]] if "compare" in summary else [])
    names = analysis.run_names([column["model_dir"] for column in columns])
    print(f"  {'':<30}" + "".join(f"{name[-16:]:>18}" for name in names))
    for key, value in summary.items():
        if key not in ("compare", "model_dir"):
            print(f"  {key:<30}" + "".join(_cell(column[key]) for column in columns))
    print(f"samtone-analyze: wrote {', '.join(analysis.FIGURES)}, {analysis.SUMMARY_FILE} to "
          f"{output}",
          flush=True)


def check_data(data: list[str]) -> None:
    """--data exists, and --split, if given, has a BEIR folder to apply to."""
    output_folder.check_inputs_exist([("--data", data)])
    folders = [path for path in files.expand_paths(data) if epath.Path(path).is_dir()]
    if FLAGS["split"].present and not folders:
        raise ConfigError(f"--split={FLAGS.split} applies only to a BEIR folder, but "
                          f"--data={','.join(data)} holds none (pairs files are read "
                          "whole); drop --split")


def _cell(value) -> str:
    return f"{value:>18.4f}" if isinstance(value, float) else f"{value!s:>18}"


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
