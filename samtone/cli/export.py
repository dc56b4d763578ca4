"""`samtone-export`: a serving folder from a samtone-train run or a converted checkpoint.

    samtone-export --model_dir=runs/base --output=exports/base \
        [--format=jax|sentence_transformers|saved_model] [--step=N] [--overwrite]

samtone.export describes the formats.
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from samtone import export
from samtone.cli import common

FLAGS = flags.FLAGS

# How to use each format, printed after the export (OUT is the output folder).
_NEXT = {
    "jax": "samtone.inference.Encoder.load({out!r}).encode_queries([...])",
    "sentence_transformers": ("sentence_transformers.SentenceTransformer({out!r})"
                              ".encode_query([...])"),
    "saved_model": ("import tensorflow_text; tf.saved_model.load({out!r})"
                    ".signatures['embed_queries'](texts=tf.constant([...]))"),
}


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "MODEL_DIR of a samtone-train run or a "
                        "samtone-convert output (model.json and checkpoints/).", required=True)
    flags.DEFINE_string("output", None, "Folder to write (local path).", required=True)
    flags.DEFINE_enum("format", "jax", list(export.FORMATS),
                      "jax: safetensors + StableHLO; sentence_transformers: a folder "
                      "SentenceTransformer() loads; saved_model: a TF SavedModel (strings in).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_bool("overwrite", False, "Replace the output folder if it exists and is not "
                      "empty (never the run folder, its parent or its training state).")
    flags.DEFINE_list("platforms", list(export.DEFAULT_PLATFORMS), "Platforms the jax and "
                      "saved_model formats lower the towers for (cpu, cuda, rocm, tpu).")


def main(argv: Sequence[str]) -> None:
    del argv
    model_dir, output = common.absolute_path(FLAGS.model_dir), common.absolute_path(
        FLAGS.output)
    manifest = export.export_model(model_dir, output, format=FLAGS.format, step=FLAGS.step,
                                   overwrite=FLAGS.overwrite, platforms=FLAGS.platforms)
    platforms = (f", platforms {', '.join(manifest['platforms'])}" if "platforms" in manifest
                 else "")
    print(f"samtone-export: step {manifest['step']} of {model_dir} as {FLAGS.format}, "
          f"{manifest['architecture']}, {manifest['projection_dim']}-d embeddings{platforms}"
          f"\nwritten to: {output} (manifest: samtone_export.json)"
          f"\nnext: {_NEXT[FLAGS.format].format(out=output)}"
          + ("" if FLAGS.format == "jax" else
             f"\n      or samtone.inference.Encoder.load({output!r})"), flush=True)


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
