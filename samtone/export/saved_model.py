"""Format `saved_model`: a TensorFlow SavedModel, strings in, embeddings out (extra `serving`).

    import tensorflow as tf
    import tensorflow_text  # registers the SentencePiece op the graph uses
    model = tf.saved_model.load("exports/base-tf")
    embeddings = model.signatures["embed_queries"](texts=tf.constant(["what is samtone?"]))
    embeddings = embeddings["embeddings"]            # float32 [1, projection_dim], unit norm

Signatures `embed_queries` and `embed_passages`: `texts` string [b] -> `embeddings` float32
[b, projection_dim], for any batch size b (TF Serving serves them as they are:
`saved_model_cli show --dir OUT --all` lists them). Inside the graph, as samtone's Tokenizer:
each text is cut to 64 * max_length characters, split into SentencePiece ids by
`tensorflow_text.SentencepieceTokenizer` over the run's model (stored in the graph), truncated
to max_length - 1 pieces, closed with EOS (1) and padded with 0 to max_length; then the tower
runs as StableHLO (`jax2tf` native serialisation, lowered for `platforms`) over the
parameters, which are the SavedModel's variables.

The folder also holds params.safetensors (as format `jax` writes it) so that
samtone.inference.Encoder.load reads it without TensorFlow; TF Serving ignores the file.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Sequence

import numpy as np

from samtone.data.tokenizer import EOS_ID, MAX_CHARS_PER_TOKEN, PAD_ID
from samtone.errors import MissingDependencyError
from samtone.export import params as params_lib
from samtone.export import stablehlo
from samtone.models import dual_encoder

SIGNATURES = {"embed_queries": "encode_queries", "embed_passages": "encode_passages"}
INPUT_NAME, OUTPUT_NAME = "texts", "embeddings"


def import_tensorflow():
    """(tensorflow, tensorflow_text, jax2tf), or an ImportError saying what to install."""
    try:
        # pylint: disable=import-outside-toplevel
        import tensorflow as tf
        import tensorflow_text
        from jax.experimental import jax2tf
    except ImportError as error:
        raise MissingDependencyError("--format=saved_model needs TensorFlow and "
                                     "tensorflow-text: pip install 'samtone[serving]' "
                                     f"({error})") from error
    return tf, tensorflow_text, jax2tf


def write_files(folder: str, *, model: dual_encoder.DualEncoder, params: dict,
                vocabulary_file: str, query_length: int, passage_length: int,
                platforms: Sequence[str] = stablehlo.DEFAULT_PLATFORMS) -> dict:
    """Writes the SavedModel (and params.safetensors) of `model` with `params` (the
    unscanned, unboxed tree) into the existing `folder`; returns the manifest's format
    fields."""
    stablehlo.check_platforms(platforms)
    tf, _, _ = import_tensorflow()
    stablehlo.write_params(folder, params_lib.flatten_params(params))
    with open(vocabulary_file, "rb") as f:
        vocabulary = f.read()
    with interrupts_kept():
        module = _serving_module(model, params, vocabulary,
                                 {"encode_queries": query_length,
                                  "encode_passages": passage_length}, tuple(platforms))
        tf.saved_model.save(module, folder, signatures={
            name: getattr(module, name) for name in SIGNATURES})
    output = f"float32 [b, {model.projection_dim}]"
    return {"platforms": list(platforms),
            "signatures": {name: {"inputs": {INPUT_NAME: "string [b]"},
                                  "outputs": {OUTPUT_NAME: output}} for name in SIGNATURES},
            "tensorflow_version": tf.__version__}


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Raises KeyboardInterrupt at the end of the block if Ctrl-C came during it.

    TensorFlow and jax2tf swallow a KeyboardInterrupt raised in some of their code: jax2tf's
    `_is_tfval` (a bare `except:` around `tf.constant`, run for every argument it converts)
    and the `__del__` of TF's function graphs (where Python itself drops any exception), so
    Ctrl-C during the export could leave it running to the end with exit status 0. Here
    SIGINT raises as usual and is also recorded, and raised again once TF returns.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield  # signals reach the main thread only; a caller's own handler stays in charge
        return
    interrupted = []

    def record_and_raise(signum, frame):
        interrupted.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, record_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        raise KeyboardInterrupt


def _serving_module(model: dual_encoder.DualEncoder, params: dict, vocabulary: bytes,
                    lengths: dict[str, int], platforms: tuple[str, ...]):
    """A tf.Module with the parameters as variables and one tf.function per signature."""
    tf, tensorflow_text, jax2tf = import_tensorflow()
    module = tf.Module()
    module.params = tf.nest.map_structure(
        lambda value: tf.Variable(np.asarray(value), trainable=False), params)
    module.tokenizer = tensorflow_text.SentencepieceTokenizer(model=vocabulary, out_type=tf.int32)

    def signature(method: str):
        length = lengths[method]
        tower = jax2tf.convert(
            lambda tower_params, token_ids: model.apply({"params": tower_params}, token_ids,
                                                        method=method),
            polymorphic_shapes=[None, "(b, _)"], with_gradient=False,
            native_serialization_platforms=platforms)

        def embed(texts):
            texts = tf.strings.substr(texts, 0, MAX_CHARS_PER_TOKEN * length, unit="UTF8_CHAR")
            pieces = module.tokenizer.tokenize(texts)[:, :length - 1]
            eos = tf.fill([tf.shape(texts)[0], 1], tf.constant(EOS_ID, tf.int32))
            token_ids = tf.concat([pieces, eos], axis=1).to_tensor(
                default_value=PAD_ID, shape=[None, length])
            return {OUTPUT_NAME: tower(module.params, token_ids)}

        # autograph would rewrite JAX's own Python while tracing: slow, and noisy.
        return tf.function(embed, autograph=False, input_signature=[
            tf.TensorSpec([None], tf.string, name=INPUT_NAME)])

    for name, method in SIGNATURES.items():
        setattr(module, name, signature(method))
    return module
