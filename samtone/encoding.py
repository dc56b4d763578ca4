"""Texts -> embeddings in batches of a few fixed shapes: length buckets, input order kept.

    embeddings = encode_texts(encode_fn, tokenizer, texts, max_length=256, batch_size=128)

`encode_fn` maps int32 token ids [batch_size, length] to embeddings [batch_size, D] (a tower
of a dual encoder, jitted). Padding every text to `max_length` wastes most of the compute
on short texts, so each text goes to the shortest *bucket* length that holds its tokens
(EOS included), the lengths training batches use (`data.packing.default_bucket_lengths`:
powers of two from 16 up to `max_length`, and `max_length` itself). A jitted tower then
compiles at most about log2(max_length / 16) + 1 times, whatever the texts. Padding does
not change an embedding: the encoder masks padding in attention, its position bias is
relative, and pooling averages real tokens only (tested equal to encoding at `max_length`).

Texts are taken a window of WINDOW_BATCHES batches at a time (bounding host memory for
corpora of millions), tokenised once at `max_length`, grouped by bucket, batched (the last
batch of a bucket filled up by repeating its first row) and put back in input order.
`encode_chunks` yields each window's embeddings as soon as they are ready, in input order,
so a corpus can stream into samtone.search.PassageIndex.from_chunks; `encode_texts` joins
them. A tqdm bar (rate and ETA) shows progress on large inputs.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import tqdm

from samtone.data.packing import default_bucket_lengths

EncodeFn = Callable[[np.ndarray], Any]

# Texts per window: WINDOW_BATCHES x batch_size. Large enough that the few partial batches
# of each window (one per bucket) waste little; small enough for host memory.
WINDOW_BATCHES = 256
# Inputs of at least this many batches get a progress bar by default (on a terminal).
PROGRESS_MIN_BATCHES = 8


def encode_chunks(encode_fn: EncodeFn, tokenizer: Any, texts: Sequence[str], max_length: int,
                  batch_size: int, *, buckets: bool = True, progress: bool | None = None,
                  unit: str = "text") -> Iterator[np.ndarray]:
    """float32 embeddings of consecutive windows of `texts`, in input order.

    Args:
      encode_fn: int32 [batch_size, length] -> [batch_size, D]; length is a bucket length
        (or always `max_length` with buckets=False).
      tokenizer: `.encode(texts, max_length)` -> int32 [n, max_length], 0 = padding.
      buckets: group texts into length buckets (see module doc); False pads all to
        `max_length` (for encoders of one fixed length, such as exported modules).
      progress: a tqdm bar; default (None) on a terminal, for inputs of several batches.
      unit: what the bar counts ("passage", "query").
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = default_bucket_lengths(max_length) if buckets else [max_length]
    window = batch_size * WINDOW_BATCHES
    if progress is None:  # tqdm's disable=None: only on a terminal
        big = len(texts) >= batch_size * PROGRESS_MIN_BATCHES and jax.process_index() == 0
        disable = None if big else True
    else:
        disable = not progress
    with tqdm.tqdm(total=len(texts), unit=unit, desc=f"encode {unit}s", disable=disable,
                   smoothing=0.1) as bar:
        for start in range(0, len(texts), window):
            yield _encode_window(encode_fn, tokenizer, texts[start:start + window], max_length,
                                 batch_size, lengths, bar)


def encode_texts(encode_fn: EncodeFn, tokenizer: Any, texts: Sequence[str], max_length: int,
                 batch_size: int, *, buckets: bool = True, progress: bool | None = None,
                 unit: str = "text") -> np.ndarray:
    """float32 [len(texts), D]: `encode_chunks` joined."""
    if isinstance(texts, str):
        raise TypeError(f"encode_texts takes a list of texts, got one string ({texts[:40]!r}); "
                        "wrap it in a list")
    if not len(texts):
        raise ValueError("encode_texts got no texts")
    return np.concatenate(list(encode_chunks(encode_fn, tokenizer, texts, max_length, batch_size,
                                             buckets=buckets, progress=progress, unit=unit)))


def _encode_window(encode_fn: EncodeFn, tokenizer: Any, texts: Sequence[str], max_length: int,
                   batch_size: int, lengths: list[int], bar: tqdm.tqdm) -> np.ndarray:
    tokens = np.asarray(tokenizer.encode(list(texts), max_length), np.int32)
    if tokens.shape != (len(texts), max_length):
        raise ValueError(f"tokenizer.encode returned shape {tokens.shape}, expected "
                         f"{(len(texts), max_length)}")
    # Real tokens (EOS included) end at the last non-zero id; 0 is padding only.
    real = max_length - np.argmax(tokens[:, ::-1] != 0, axis=1)
    bucket = np.searchsorted(lengths, real)  # the shortest bucket holding the tokens
    order = np.argsort(bucket, kind="stable")  # texts sorted by bucket length
    batches = []  # (rows of `texts`, bucket length)
    for number, length in enumerate(lengths):
        rows = order[bucket[order] == number]
        batches.extend((rows[i:i + batch_size], length) for i in range(0, len(rows), batch_size))

    embeddings: np.ndarray | None = None
    in_flight = None  # fetch batch i - 1 after dispatching batch i, so they overlap

    def collect(rows, result):
        nonlocal embeddings
        values = np.asarray(result, np.float32)[:len(rows)]
        if embeddings is None:
            embeddings = np.empty((len(texts), values.shape[1]), np.float32)
        embeddings[rows] = values
        bar.update(len(rows))

    for rows, length in batches:
        batch = tokens[rows, :length]
        if len(rows) < batch_size:  # one shape per bucket: fill with real rows, dropped after
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - len(rows), 0)])
        result = encode_fn(batch)
        if in_flight is not None:
            collect(*in_flight)
        in_flight = (rows, result)
    collect(*in_flight)
    return embeddings

