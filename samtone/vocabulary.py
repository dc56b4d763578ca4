"""Checks of a SentencePiece vocabulary: against the model's embedding, and against another one.

`check_fits_embedding` is what samtone-train, samtone-export and samtone-convert check before
they use a vocabulary with a model; `same_vocabulary` is what samtone-eval and the seqio input
pipeline check before they feed data tokenised with one vocabulary to a model trained on
another. Each command words its own error around them.
"""
from __future__ import annotations

import os
from typing import Union

from etils import epath

from samtone.data.tokenizer import Tokenizer
from samtone.errors import ConfigError

PathLike = Union[str, os.PathLike]


def check_fits_embedding(vocabulary: Tokenizer | PathLike, model_vocab_size: int, *,
                         name: str | None = None, embedding: str = "the model's embedding",
                         hint: str = "") -> int:
    """The number of pieces of `vocabulary`; a ConfigError if its ids run past the embedding.

    Args:
      vocabulary: a Tokenizer, or the SentencePiece model to load (a file that is not one is a
        ConfigError `{name}: {why}`).
      model_vocab_size: rows of the model's token embedding (T5Config.vocab_size).
      name: how the message names the vocabulary (default: `the vocabulary '<path>'`).
      embedding: how the message names the embedding.
      hint: said after the row count, e.g. where the model's vocab_size is set.

    Raises:
      ConfigError: `{name} has N pieces but {embedding} has M rows{hint}; token ids would run
        past the embedding`, or the vocabulary cannot be read.
      MissingFileError: the vocabulary file does not exist.
    """
    if isinstance(vocabulary, Tokenizer):
        tokenizer = vocabulary
    else:
        try:
            tokenizer = Tokenizer(vocabulary)
        except ValueError as error:
            raise ConfigError(f"{name or os.fspath(vocabulary)}: {error}") from error
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"{name or f'the vocabulary {tokenizer.path!r}'} has {tokenizer.vocab_size} pieces "
            f"but {embedding} has {model_vocab_size} rows{hint}; token ids would run past the "
            "embedding")
    return tokenizer.vocab_size


def same_vocabulary(a: PathLike, b: PathLike) -> bool:
    """Whether two SentencePiece models (any paths etils reads) are the same file or bytes."""
    path_a, path_b = epath.Path(a), epath.Path(b)
    return path_a == path_b or path_a.read_bytes() == path_b.read_bytes()
