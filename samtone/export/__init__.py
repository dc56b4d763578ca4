"""Exporting a trained dual encoder for serving (the command line is samtone.cli.export).

    samtone-export --model_dir=runs/base --output=exports/base [--format=jax] [--step=N]

writes one folder in one of three formats:

  format                 module                    served by
  jax (default)          stablehlo.py              JAX: params.safetensors + jax.export
                                                   StableHLO of both towers (token ids in)
  sentence_transformers  sentence_transformers.py  SentenceTransformer(folder): encode_query /
                                                   encode_document (a Router for ade, ade_spl)
  saved_model            saved_model.py            TF Serving, tf.saved_model.load: signatures
                                                   embed_queries / embed_passages, strings in

Every folder also holds `samtone_export.json` (manifest.py: architecture, T5 config,
projection size, lengths, vocabulary checksum, step, source run) and the run's `spm.model`,
and `samtone.inference.Encoder.load(folder)` reads any of them. Only the parameters of the
checkpoint are read (never the optimiser state), laid out over the available devices by the
run's own rules, and always exported in the unscanned layout. A folder is written to a
temporary sibling and renamed into place (samtone.output_folder), so an interrupted export
leaves nothing that looks complete; an existing non-empty folder is replaced only with
`overwrite`, and never when it is or holds the run exported (samtone.run_dir.check_output).
Local paths only for the output; model_dir may be any path etils reads.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from absl import logging
from etils import epath

from samtone import output_folder
from samtone import run_dir
from samtone import run_manifest
from samtone.errors import ConfigError
from samtone.export import manifest as manifest_lib
from samtone.export import params as params_lib
from samtone.export import saved_model
from samtone.export import sentence_transformers
from samtone.export import stablehlo
from samtone.models import dual_encoder
from samtone.vocabulary import check_fits_embedding

FORMATS = manifest_lib.FORMATS
DEFAULT_PLATFORMS = stablehlo.DEFAULT_PLATFORMS


def export_model(model_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                 format: str = "jax", step: int | None = None,  # pylint: disable=redefined-builtin
                 overwrite: bool = False,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
    """Exports checkpoint `step` (default: the newest) of the run in `model_dir` (a
    samtone-train MODEL_DIR or a samtone-convert output) as `format`.

    The output may not be, hold or lie in the training state of `model_dir`, even with
    `overwrite` (which would delete the run).

    Returns:
      The manifest written (samtone_export.json).
    """
    _check_format(format)
    # Before reading anything; first, so that an output the run is in is named as such.
    run_dir.check_output(output_dir, [("--model_dir", model_dir)], flag="--output")
    output_folder.check_target(output_dir, overwrite)
    stablehlo.check_platforms(platforms)
    run = run_manifest.read(model_dir)
    _require_vocabulary(run.vocabulary)
    params, restored_step, _, _ = run_manifest.read_params(model_dir, run, step=step)
    logging.info("read the parameters of step %d of %s", restored_step, model_dir)
    return write_export(output_dir, format=format, model=run.model(), params=params,
                        vocabulary=run.vocabulary, query_length=run.query_length,
                        passage_length=run.passage_length, step=restored_step,
                        source={"model_dir": os.fspath(model_dir), "step": restored_step},
                        logical_axis_rules=run.logical_axis_rules,
                        model_parallel=run.model_parallel, overwrite=overwrite,
                        platforms=platforms)


def write_export(output_dir: str | os.PathLike, *, model: dual_encoder.DualEncoder, params: Any,
                 vocabulary: str | os.PathLike, query_length: int, passage_length: int,
                 step: int, format: str = "jax",  # pylint: disable=redefined-builtin
                 source: dict | None = None, logical_axis_rules: Any = "data",
                 model_parallel: int = 1, overwrite: bool = False,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
    """Writes `model` with `params` (either layer layout, boxed or not) as a `format` folder.

    Args:
      vocabulary: the run's SentencePiece model (any path etils reads).
      query_length, passage_length: the run's lengths in tokens, EOS included.
      source: where the parameters came from, for the manifest ({"model_dir", "step"}).
      logical_axis_rules, model_parallel: how Encoder.load lays the parameters out.
      platforms: what the jax and saved_model formats lower the towers for.

    Returns:
      The manifest written (samtone_export.json).
    """
    _check_format(format)
    output_folder.check_target(output_dir, overwrite)
    stablehlo.check_platforms(platforms)
    if min(query_length, passage_length) < 1:
        raise ConfigError(f"query_length and passage_length must be >= 1 (room for EOS); got "
                          f"{query_length} and {passage_length}")
    _require_vocabulary(vocabulary)
    serving_model = params_lib.serving_dual_encoder(model)
    params = params_lib.serving_params(params)
    params_lib.check_params(params, serving_model)
    run = run_manifest.RunManifest.of(
        serving_model, query_length=query_length, passage_length=passage_length,
        vocabulary=manifest_lib.VOCABULARY_FILE, logical_axis_rules=logical_axis_rules,
        model_parallel=model_parallel)

    with output_folder.write_atomically(output_dir, overwrite) as folder:
        vocabulary_file = os.path.join(folder, manifest_lib.VOCABULARY_FILE)
        with open(vocabulary_file, "wb") as f:
            f.write(epath.Path(vocabulary).read_bytes())
        pieces = check_fits_embedding(vocabulary_file, serving_model.config.vocab_size,
                                      name=f"vocabulary {vocabulary}")
        lengths = {"query_length": query_length, "passage_length": passage_length}
        if format == "jax":
            format_fields = stablehlo.write_files(
                folder, model=serving_model, flat=params_lib.flatten_params(params),
                platforms=platforms, **lengths)
        elif format == "sentence_transformers":
            format_fields = sentence_transformers.write_files(
                folder, model=serving_model, params=params, vocabulary_file=vocabulary_file,
                **lengths)
        else:
            format_fields = saved_model.write_files(
                folder, model=serving_model, params=params, vocabulary_file=vocabulary_file,
                platforms=platforms, **lengths)
        fields = manifest_lib.manifest_fields(
            format, run, step=step, vocabulary_file=vocabulary_file, vocabulary_pieces=pieces,
            source=source, **format_fields)
        manifest_lib.write(folder, fields)
        output_folder.match_file_modes(
            folder, like=os.path.join(folder, manifest_lib.MANIFEST_FILE))
    logging.info("exported step %d as %s to %s", step, format, output_dir)
    return fields


def read_export_params(export_dir: str | os.PathLike) -> tuple[manifest_lib.ExportManifest, dict]:
    """(manifest, the unscanned parameter tree as host arrays) of any export folder."""
    export_dir = os.fspath(export_dir)
    manifest = manifest_lib.read(export_dir)
    if manifest.format == "sentence_transformers":
        params = sentence_transformers.read_params(export_dir, manifest.run.architecture)
    else:
        params = params_lib.unflatten_params(stablehlo.read_params(export_dir))
    params_lib.check_params(params, manifest.run.model(), where=export_dir)
    return manifest, params


def _check_format(export_format: str) -> None:
    if export_format not in FORMATS:
        raise ConfigError(f"--format={export_format!r}; expected one of {', '.join(FORMATS)}")


def _require_vocabulary(vocabulary: Any) -> None:
    if not vocabulary:
        raise ConfigError("the model has no vocabulary (spm.model): it was converted without "
                          "one; run samtone-convert again with --vocabulary=SPM_MODEL")
