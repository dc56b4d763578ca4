"""No compute on padding: length buckets and packed rows of token arrays (numpy, host side).

Token arrays hold one text per row, left-aligned: pieces, EOS, then 0-padding (see
samtone.data.tokenizer), so a text's length is its count of non-zero ids.

Buckets. A batch padded to the configured maximum (64 / 256) is mostly padding on real data.
`bucket_length` gives the shortest of a few bucket lengths that holds the batch's longest text,
so the step computes on that length instead, and compiles at most once per bucket (jax.jit
caches each shape).

Packing (t5x's packing of encoder inputs). `pack` places the texts of a batch into rows of
fixed length, several short texts per row, by first-fit decreasing: the longest text first,
each into the first row with room. Text n gets segment id n + 1 on its tokens (0 marks
padding), so the encoder attends within segments and pools each text on its own (see
samtone.models.t5 and samtone.models.dual_encoder): every text's embedding is that of the text
in a row of its own. The row count is rounded up to a multiple of `row_multiple`, so that a
run sees a bounded number of shapes.

Both are pure functions of the batch's texts: which examples form a batch (the in-batch
negatives) is decided before, by the data order alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_BUCKET_LENGTH = 16
# Packed row counts are multiples of ceil(texts / ROW_COUNT_BUCKETS): at most this many row
# counts per tower (bounded compilations), at most 1 / ROW_COUNT_BUCKETS of the texts' worth
# of rows added as padding. On MS MARCO-like lengths at batch 512, 256 tokens, 1/16 left 12.7%
# of the passage rows' positions empty, 1/32 4.1% (with a few row counts per run either way).
ROW_COUNT_BUCKETS = 32
PACKED_KEYS = ("query_segment_ids", "passage_segment_ids")


def default_bucket_lengths(max_length: int, min_length: int = MIN_BUCKET_LENGTH) -> list[int]:
    """[min_length, 2 min_length, 4 min_length, ... < max_length] + [max_length]."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    lengths = []
    length = min_length
    while length < max_length:
        lengths.append(length)
        length *= 2
    return lengths + [max_length]


def bucket_lengths(buckets: bool | Sequence[int], max_length: int) -> list[int]:
    """The bucket lengths for texts of at most `max_length` tokens, ascending.

    `buckets`: True for `default_bucket_lengths`, False for `max_length` alone, or the lengths
    themselves (those above `max_length` are dropped; `max_length` is always one).
    """
    if buckets is True:
        return default_bucket_lengths(max_length)
    if buckets is False or buckets is None:
        return [max_length]
    lengths = sorted({int(b) for b in buckets})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"length buckets must be positive integers, got {list(buckets)}")
    return [b for b in lengths if b < max_length] + [max_length]


def text_lengths(tokens: np.ndarray) -> np.ndarray:
    """int32 [...]: the number of tokens (EOS included) of each text of `tokens` [..., L]."""
    return np.count_nonzero(tokens, axis=-1).astype(np.int32)


def bucket_length(longest: int, lengths: Sequence[int]) -> int:
    """The shortest of `lengths` (ascending) that holds `longest` tokens."""
    index = int(np.searchsorted(lengths, longest))
    if index == len(lengths):
        raise ValueError(f"a text of {longest} tokens is longer than the longest bucket "
                         f"{lengths[-1]}")
    return int(lengths[index])


def row_multiple(num_texts: int) -> int:
    """The multiple packed row counts are rounded up to for `num_texts` texts."""
    return max(1, -(-num_texts // ROW_COUNT_BUCKETS))


def first_fit_decreasing(lengths: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset) of each text: the longest text first, each into the first row with room.

    Deterministic (ties keep text order). Uses at most 11/9 of the optimal row count + 1.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.max() > row_length or lengths.min() < 1):
        raise ValueError(f"texts must have 1 to {row_length} tokens to be packed into rows of "
                         f"{row_length}, got lengths {lengths.min()} to {lengths.max()}")
    rows = np.zeros(len(lengths), np.int64)
    offsets = np.zeros(len(lengths), np.int64)
    used = np.zeros(len(lengths), np.int64)  # tokens taken in each row opened so far
    num_rows = 0
    for text in np.argsort(-lengths, kind="stable"):
        length = lengths[text]
        fits = used[:num_rows] <= row_length - length
        row = int(np.argmax(fits)) if num_rows and fits.any() else num_rows
        num_rows = max(num_rows, row + 1)
        rows[text], offsets[text] = row, used[row]
        used[row] += length
    return rows, offsets


def pack(tokens: np.ndarray, row_length: int | None = None, *, multiple: int | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Packs the texts of `tokens` [N, L] into rows: (tokens [R, row_length], segment ids).

    Text n's tokens keep their order and get segment id n + 1; padding is 0 in both arrays.
    R is the first-fit-decreasing row count rounded up to `multiple` (default
    `row_multiple(N)`); `row_length` defaults to L.
    """
    tokens = np.asarray(tokens)
    num_texts, max_length = tokens.shape
    row_length = max_length if row_length is None else row_length
    multiple = row_multiple(num_texts) if multiple is None else multiple
    lengths = text_lengths(tokens)
    rows, offsets = first_fit_decreasing(lengths, row_length)
    num_rows = int(rows.max()) + 1 if num_texts else 0
    num_rows = -(-num_rows // multiple) * multiple
    text_of_token = np.repeat(np.arange(num_texts), lengths)
    position = np.arange(len(text_of_token)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    packed = np.zeros((num_rows, row_length), tokens.dtype)
    segment_ids = np.zeros((num_rows, row_length), np.int32)
    destination = (rows[text_of_token], offsets[text_of_token] + position)
    packed[destination] = tokens[text_of_token, position]
    segment_ids[destination] = text_of_token + 1
    return packed, segment_ids


def unpack(packed: np.ndarray, segment_ids: np.ndarray, num_texts: int, max_length: int
           ) -> np.ndarray:
    """The inverse of `pack`: one text per row again, [num_texts, max_length]."""
    texts = np.zeros((num_texts, max_length), packed.dtype)
    row, column = np.nonzero(segment_ids)
    text = segment_ids[row, column] - 1
    order = np.lexsort((column, text))  # each text's tokens in row order
    text, row, column = text[order], row[order], column[order]
    position = np.arange(len(text)) - np.searchsorted(text, text)
    texts[text, position] = packed[row, column]
    return texts


def is_packed(batch: dict) -> bool:
    """Whether `batch` holds packed rows (segment ids) rather than one text per row."""
    return all(key in batch for key in PACKED_KEYS)


def pad_rows(batch: dict, multiple: int) -> dict:
    """A packed batch with its packed arrays padded with empty rows to a multiple of rows.

    Empty rows (token and segment ids 0) change no text's embedding; a mesh needs the rows
    to split evenly over its batch shards.
    """
    padded = dict(batch)
    for tower in ("query", "passage"):
        for key in (f"{tower}_tokens", f"{tower}_segment_ids"):
            value = batch[key]
            extra = -len(value) % multiple
            if extra:
                padded[key] = np.concatenate([value, np.zeros((extra, *value.shape[1:]),
                                                                value.dtype)])
    return padded
