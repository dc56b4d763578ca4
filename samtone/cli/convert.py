"""`samtone-convert`: a Hugging Face T5 folder or a T5X checkpoint as a samtone checkpoint
(samtone.checkpoints.convert).

    samtone-convert --from=/models/t5-v1_1-base --output=converted/base \
        [--architecture=sde|ade|ade_spl] [--vocabulary=spm.model] [--size=base] [--overwrite]
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from samtone import partitioning
from samtone.checkpoints import convert
from samtone.cli import common
from samtone.models import dual_encoder
from samtone.models import t5

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("from", None, "A Hugging Face T5 / T5.1.1 folder (config.json + "
                        "weights) or a T5X checkpoint folder (checkpoint_<step>/).",
                        required=True)
    flags.DEFINE_string("output", None, "Folder to write (local path).", required=True)
    flags.DEFINE_enum("architecture", "sde", list(dual_encoder.ARCHITECTURES),
                      "Dual-encoder architecture; every tower starts from the encoder.")
    flags.DEFINE_string("vocabulary", None, "SentencePiece model to copy (default: the Hugging "
                        "Face folder's spiece.model; a T5X checkpoint has none).")
    flags.DEFINE_enum("size", None, list(t5.T5_1_1_PRESETS), "T5.1.1 size the arrays must "
                      "match (default: read off the arrays, or config.json).")
    flags.DEFINE_integer("query_length", convert.DEFAULT_QUERY_LENGTH, "Query length in tokens "
                         "(EOS included) for Encoder.load and exports.", lower_bound=1)
    flags.DEFINE_integer("passage_length", convert.DEFAULT_PASSAGE_LENGTH, "Passage length in "
                         "tokens (EOS included).", lower_bound=1)
    flags.DEFINE_enum("logical_axis_rules", "data", ["data", "data_model", "fsdp",
                                                     "fsdp_model"],
                      "How the parameters are laid out over the devices when read (fsdp for "
                      "models larger than one device).")
    flags.DEFINE_integer("model_parallel", 1, "Devices per model copy for the *_model rules.",
                         lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "Replace the output folder if it exists and is not "
                      "empty (never --from or a folder holding it).")


def main(argv: Sequence[str]) -> None:
    del argv
    source, output = common.absolute_path(getattr(FLAGS, "from")), common.absolute_path(
        FLAGS.output)
    partitioning.logical_axis_rules(FLAGS.logical_axis_rules)  # refuses an unknown table
    manifest = convert.convert(
        source, output, architecture=FLAGS.architecture,
        vocabulary=common.absolute_path(FLAGS.vocabulary), size=FLAGS.size,
        query_length=FLAGS.query_length, passage_length=FLAGS.passage_length,
        logical_axis_rules=FLAGS.logical_axis_rules, model_parallel=FLAGS.model_parallel,
        overwrite=FLAGS.overwrite)
    origin = manifest.converted_from
    config = manifest.t5_config
    projection = ("its projection" if origin["projection"] == "checkpoint"
                  else "an identity projection")
    vocabulary = manifest.vocabulary or "none (pass --vocabulary to encode text)"
    print(f"samtone-convert: {origin['format']} checkpoint {source} (step {origin['step']})"
          f"\n  {manifest.architecture}, d_model={config.d_model}, {config.num_layers} layers, "
          f"{config.num_heads} heads, feed_forward_proj={config.feed_forward_proj}, "
          f"vocab_size={config.vocab_size}, {projection} ({manifest.projection_dim}-d)"
          f"\n  vocabulary: {vocabulary}"
          f"\nwritten to: {output} (model.json, checkpoints/{origin['step']})"
          f"\nnext: samtone.inference.Encoder.load({output!r}), "
          f"samtone-export --model_dir={output} --output=..., "
          f"or train from it: --gin.INIT_CHECKPOINT=\"'{output}'\"", flush=True)


def console_entry() -> None:
    define_flags()
    common.run(main)


if __name__ == "__main__":
    console_entry()
