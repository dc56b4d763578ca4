"""`samtone-export`: a self-contained serving folder from a samtone-train run (samtone.export).

    samtone-export --model_dir=runs/base --export_dir=exports/base [--step=N] [--overwrite]
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from samtone import export
from samtone.cli import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "MODEL_DIR of a samtone-train run (model.json and "
                        "checkpoints/).", required=True)
    flags.DEFINE_string("export_dir", None, "Directory to write (local path).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_bool("overwrite", False, "Replace export_dir if it exists and is not empty.")
    flags.DEFINE_list("platforms", list(export.DEFAULT_PLATFORMS), "Platforms to lower the "
                      "StableHLO for (cpu, cuda, rocm, tpu).")


def main(argv: Sequence[str]) -> None:
    del argv
    model_dir, export_dir = common.absolute_path(FLAGS.model_dir), common.absolute_path(
        FLAGS.export_dir)
    config = export.export_model(model_dir, export_dir, step=FLAGS.step,
                                 overwrite=FLAGS.overwrite, platforms=FLAGS.platforms)
    print(f"samtone-export: step {config['step']} of {model_dir}, {config['architecture']}, "
          f"{config['projection_dim']}-d embeddings, platforms {', '.join(config['platforms'])}"
          f"\nwritten to: {export_dir}"
          f"\nnext: samtone.inference.Encoder.load({export_dir!r}).encode_queries([...])",
          flush=True)


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
