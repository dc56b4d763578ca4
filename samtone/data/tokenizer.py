"""SentencePiece tokenisation with T5's conventions, straight to padded int32 arrays.

T5 vocabularies reserve id 0 for padding, 1 for end-of-sequence and 2 for unknown pieces, and
have no beginning-of-sequence piece. Every sequence the model sees is

    pieces[:max_length - 1] + [EOS] + [PAD] * (max_length - 1 - len(pieces))

so EOS survives truncation and id 0 alone marks padding (the encoder masks it out).
Pure sentencepiece: no TensorFlow, no seqio.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Union

import numpy as np
import sentencepiece as spm

from samtone.errors import ConfigError, MissingFileError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# Characters kept per token of max_length before tokenising (see Tokenizer.encode); generous:
# SentencePiece pieces are at most 16 characters long.
MAX_CHARS_PER_TOKEN = 64

PathLike = Union[str, os.PathLike]


class Tokenizer:
    """Encodes batches of texts into `int32 [N, max_length]` arrays of T5 token ids."""

    def __init__(self, spm_model_path: PathLike, *, num_threads: int = -1):
        """Loads a SentencePiece model and checks it follows T5's id conventions.

        Args:
          spm_model_path: a SentencePiece `.model` file (e.g. T5's `spiece.model`).
          num_threads: threads for batch encoding; -1 lets sentencepiece use all cores.

        Raises:
          FileNotFoundError: the file does not exist.
          ValueError: the file is not a SentencePiece model, or its pad/EOS ids are not 0/1.
        """
        self.path = os.fspath(spm_model_path)
        if not os.path.isfile(self.path):
            raise MissingFileError(
                f"SentencePiece model not found: {self.path!r} (gin: VOCABULARY)")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(self.path)
        except (RuntimeError, OSError) as error:
            raise ConfigError(
                f"{self.path!r} is not a SentencePiece model (sentencepiece says: {error})"
            ) from error
        for name, found, expected in (
            ("pad", processor.pad_id(), PAD_ID),
            ("eos", processor.eos_id(), EOS_ID),
        ):
            if found != expected:
                raise ConfigError(
                    f"SentencePiece model {self.path!r} has {name}_id={found}; samtone expects "
                    f"T5's conventions pad_id={PAD_ID}, eos_id={EOS_ID} (unk_id={UNK_ID}, no BOS). "
                    "Train it with pad_id=0 eos_id=1 unk_id=2 bos_id=-1, e.g. via "
                    "samtone.data.tokenizer.train_sentencepiece."
                )
        self._processor = processor
        self._num_threads = num_threads

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the SentencePiece model (the model's embedding may be larger)."""
        return self._processor.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return self._processor.unk_id()

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        """Tokenises `texts` into `int32 [len(texts), max_length]`: pieces, EOS, then padding.

        Texts longer than `max_length - 1` pieces are truncated so that EOS is always present.
        Before tokenising, each text is cut to `MAX_CHARS_PER_TOKEN * max_length` characters:
        no piece is longer than 16 characters, so the kept pieces are the same, and a 200 MB
        line costs no more memory than a normal one.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("Tokenizer.encode takes a sequence of texts; "
                            "wrap a single text in a list")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
        max_chars = MAX_CHARS_PER_TOKEN * max_length
        texts = [text[:max_chars] for text in texts]
        token_ids = np.full((len(texts), max_length), PAD_ID, dtype=np.int32)
        if not texts:
            return token_ids
        pieces = self._processor.Encode(texts, out_type=int, num_threads=self._num_threads)
        for row, ids in enumerate(pieces):
            length = min(len(ids), max_length - 1)
            token_ids[row, :length] = ids[:length]
            token_ids[row, length] = EOS_ID
        return token_ids

    def decode(self, token_ids) -> str | list[str]:
        """Inverse of `encode`: a 1-D id sequence gives a string, a 2-D batch a list of strings.

        Decoding stops at the first EOS; padding is dropped.
        """
        token_ids = np.asarray(token_ids)
        if token_ids.ndim == 1:
            return self._processor.Decode(_strip(token_ids))
        if token_ids.ndim == 2:
            return self._processor.Decode([_strip(row) for row in token_ids])
        raise ValueError(f"decode takes a 1-D or 2-D array of ids, got shape {token_ids.shape}")


def _strip(ids: np.ndarray) -> list[int]:
    """Ids before the first EOS, without padding."""
    eos_positions = np.flatnonzero(ids == EOS_ID)
    if eos_positions.size:
        ids = ids[: eos_positions[0]]
    return [int(i) for i in ids if i != PAD_ID]


def train_sentencepiece(
    texts: PathLike | Iterable[str],
    model_prefix: PathLike,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    num_threads: int = 1,
    strict_vocab_size: bool = False,
    normalization_rule_name: str = "nmt_nfkc",
) -> str:
    """Trains a SentencePiece model with T5's ids (pad 0, EOS 1, unk 2, no BOS).

    Args:
      texts: a text file with one sentence per line, or an iterable of strings.
      model_prefix: writes `{model_prefix}.model` and `{model_prefix}.vocab`.
      vocab_size: number of pieces, special pieces included.
      model_type: "unigram" (T5's) or "bpe", "char", "word".
      character_coverage: fraction of characters covered by pieces; the rest map to unk.
      num_threads: training threads; 1 makes training reproducible.
      strict_vocab_size: if False, a corpus too small for `vocab_size` gives a smaller
        vocabulary instead of an error (handy for tiny vocabularies inside tests).
      normalization_rule_name: "nmt_nfkc" (T5's) or e.g. "identity", whose model file is
        ~240 KB smaller because it carries no Unicode normalisation table.

    Returns:
      The path of the `.model` file, ready for `Tokenizer`.
    """
    model_prefix = os.fspath(model_prefix)
    options = dict(
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        num_threads=num_threads,
        hard_vocab_limit=strict_vocab_size,
        normalization_rule_name=normalization_rule_name,
        minloglevel=2,
    )
    if isinstance(texts, (str, os.PathLike)):
        path = os.fspath(texts)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece training file not found: {path!r}")
        spm.SentencePieceTrainer.Train(input=path, **options)
    else:
        sentences = [text for text in texts if text]
        if not sentences:
            raise ValueError("train_sentencepiece got no non-empty texts")
        spm.SentencePieceTrainer.Train(sentence_iterator=iter(sentences), **options)
    return model_prefix + ".model"
