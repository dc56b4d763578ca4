"""Writes a prepared folder (samtone.data.prepared) from training files: `samtone-prepare`.

The files are read and validated as `make_batch_iterator` reads them (samtone.data.files:
file:line errors, on_bad_line), the ids computed as samtone.data.pipeline computes them, and
each text tokenised with the same truncation and EOS, in worker processes over chunks of
examples whose results are written in the examples' order. Everything goes to a temporary
sibling folder renamed into place at the end (samtone.output_folder.write_atomically), with
prepared.json written last. samtone.data.prepare_beam writes the same folder with Apache Beam
from the pieces shared here (`tokenize_rows`, `RecordDigests`, `manifest`), and
samtone.data.prepare_task from a seqio Task (`encode_rows`, `write_records`, `manifest`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import tqdm

from samtone import output_folder
from samtone.data import packing, prepared
from samtone.data.files import PathOrPaths, ReadStats, expand_paths, read_examples
from samtone.data.pipeline import check_labels, check_negatives, example_ids
from samtone.data.tokenizer import Tokenizer
from samtone.errors import ConfigError, DataError

CHUNK_SIZE = 1024  # examples per task of a worker process, by default
MAX_LENGTH = np.iinfo(np.uint16).max  # lengths.npy holds uint16
FINGERPRINT_BLOCK = 4096  # rows per block of the fingerprint (RecordDigests)

# One example as a worker gets it: query, passage, negatives, ids, label.
_Row = tuple[str, str, tuple[str, ...], int, int, list[int], float | None]
_worker_tokenizer: list[Tokenizer] = []  # set once per worker process by _start_worker


@dataclasses.dataclass(frozen=True)
class Settings:
    query_length: int = 64
    passage_length: int = 256
    num_negatives: int = 0


def _start_worker(vocabulary: str, num_threads: int) -> None:
    _worker_tokenizer.append(Tokenizer(vocabulary, num_threads=num_threads))


def tokenize_rows(rows: Sequence[_Row], settings: Settings,
                  tokenizer: Tokenizer) -> tuple[list[bytes], np.ndarray]:
    """(records, uint16 lengths [len(rows), 2]) of a chunk of examples."""
    k = settings.num_negatives
    queries = tokenizer.encode([row[0] for row in rows], settings.query_length)
    passages = tokenizer.encode([row[1] for row in rows], settings.passage_length)
    negatives = tokenizer.encode([text for row in rows for text in row[2]],
                                 settings.passage_length)
    negatives = negatives.reshape(len(rows), k, settings.passage_length)
    return encode_rows(queries, passages, negatives, [row[3] for row in rows],
                       [row[4] for row in rows], [row[5] for row in rows],
                       [row[6] for row in rows])


def encode_rows(queries: np.ndarray, passages: np.ndarray, negatives: np.ndarray,
                query_ids: Sequence[int], passage_ids: Sequence[int],
                negative_ids: Sequence[Sequence[int]],
                labels: Sequence[float | None]) -> tuple[list[bytes], np.ndarray]:
    """(records, uint16 lengths [n, 2]) of n tokenised examples: padded int32 token arrays
    queries [n, Lq], passages [n, Lp], negatives [n, K, Lp], and their ids and labels."""
    records = [prepared.encode_record(queries[i], passages[i], negatives[i], query_ids[i],
                                      passage_ids[i], np.asarray(negative_ids[i]), labels[i])
               for i in range(len(queries))]
    passage_lengths = packing.text_lengths(passages)
    if negatives.shape[1]:
        passage_lengths = np.maximum(passage_lengths, packing.text_lengths(negatives).max(1))
    lengths = np.stack([packing.text_lengths(queries), passage_lengths], axis=1)
    return records, lengths.astype(np.uint16)


def _tokenized_chunks(rows: Sequence[_Row], vocabulary: str, settings: Settings, workers: int,
                      chunk_size: int) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """Each chunk's records and lengths, in order; over `workers` processes if more than 1."""
    chunks = (list(rows[start:start + chunk_size]) for start in range(0, len(rows), chunk_size))
    if workers <= 1:
        _start_worker(vocabulary, -1)
        try:
            yield from (tokenize_rows(chunk, settings, _worker_tokenizer[-1])
                        for chunk in chunks)
        finally:
            _worker_tokenizer.pop()
        return
    # spawn: the workers start clean, whatever threads this process runs.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(vocabulary, 1)) as pool:
        yield from pool.imap(_Task(settings), chunks)


@dataclasses.dataclass(frozen=True)
class _Task:
    settings: Settings

    def __call__(self, rows: list[_Row]) -> tuple[list[bytes], np.ndarray]:
        return tokenize_rows(rows, self.settings, _worker_tokenizer[-1])


def _histogram(lengths: np.ndarray, maximum: int) -> dict[str, int]:
    """Counts per default bucket length (samtone.data.packing): {"16": n, "32": n, ...}."""
    buckets = packing.default_bucket_lengths(maximum)
    counts = np.bincount(np.searchsorted(buckets, lengths), minlength=len(buckets))
    return {str(bucket): int(count) for bucket, count in zip(buckets, counts)}


class RecordDigests:
    """The records' part of the fingerprint, from row `first_row` of `num_rows` on.

    fingerprint = sha256 over the digests of the blocks of FINGERPRINT_BLOCK rows in order, a
    block's digest being sha256 over its records' sha256 digests. Writers of different row
    ranges (Beam's shards) each give `pieces()`: a whole block's digest, or the record digests
    of the part of a block they hold; `fingerprint` joins them into the one of the records in
    order, whatever the shard count.
    """

    def __init__(self, first_row: int, num_rows: int):
        self.row, self.num_rows = first_row, num_rows
        self._digests: list[bytes] = []  # of the current block's records
        self._pieces: list[tuple[int, int, bool, bytes]] = []

    def add(self, record: bytes) -> None:
        self._digests.append(hashlib.sha256(record).digest())
        self.row += 1
        if self.row % FINGERPRINT_BLOCK == 0 or self.row == self.num_rows:
            self._close_block()

    def _close_block(self) -> None:
        start = self.row - len(self._digests)
        block = start // FINGERPRINT_BLOCK
        whole = (start == block * FINGERPRINT_BLOCK
                 and self.row == min((block + 1) * FINGERPRINT_BLOCK, self.num_rows))
        digests = b"".join(self._digests)
        self._pieces.append((block, start, whole,
                             hashlib.sha256(digests).digest() if whole else digests))
        self._digests = []

    def pieces(self) -> list[tuple[int, int, bool, bytes]]:
        """(block, first row, whole, block digest if whole else its record digests)."""
        if self._digests:
            self._close_block()
        return self._pieces


def fingerprint(pieces: Iterable[tuple[int, int, bool, bytes]]) -> str:
    """The fingerprint (RecordDigests) of the records whose pieces these are."""
    blocks: dict[int, bytes] = {}
    parts: dict[int, list[tuple[int, bytes]]] = collections.defaultdict(list)
    for block, start, whole, data in pieces:
        if whole:
            blocks[block] = data
        else:
            parts[block].append((start, data))
    for block, found in parts.items():
        blocks[block] = hashlib.sha256(b"".join(data for _, data in sorted(found))).digest()
    digest = hashlib.sha256()
    for block in sorted(blocks):
        digest.update(blocks[block])
    return digest.hexdigest()


def shard_bounds(num_examples: int, shards: int) -> list[int]:
    """Shard s holds rows [bounds[s], bounds[s + 1]); never more shards than examples."""
    shards = min(shards, num_examples)
    return [s * num_examples // shards for s in range(shards + 1)]


def manifest(*, num_examples: int, has_labels: bool, settings: Settings, vocabulary: str,
             sources: list[str], skipped_lines: int, bounds: list[int], lengths: np.ndarray,
             pieces: Iterable[tuple[int, int, bool, bytes]]) -> dict:
    """prepared.json's content (samtone.data.prepared)."""
    shards = len(bounds) - 1
    return {
        "format": prepared.FORMAT,
        "version": prepared.VERSION,
        "num_examples": num_examples,
        "has_labels": has_labels,
        "settings": {**dataclasses.asdict(settings), "vocabulary": vocabulary,
                     "vocabulary_sha256": prepared.file_sha256(vocabulary)},
        "sources": sources,
        "skipped_lines": skipped_lines,
        "shards": [{"file": prepared.shard_name(s, shards),
                    "records": bounds[s + 1] - bounds[s]} for s in range(shards)],
        "lengths_histogram": {
            "query": _histogram(lengths[:, 0], settings.query_length),
            "passage_and_negatives": _histogram(lengths[:, 1], settings.passage_length)},
        "fingerprint": fingerprint(pieces),
    }


def write_manifest(folder: str, content: dict) -> None:
    with open(os.path.join(folder, prepared.MANIFEST), "w", encoding="utf-8") as file:
        json.dump(content, file, indent=1)


def check_settings(settings: Settings, shards: int) -> None:
    for name in ("query_length", "passage_length"):
        value = getattr(settings, name)
        if not 1 <= value <= MAX_LENGTH:
            raise ConfigError(f"--{name}={value}: must be in [1, {MAX_LENGTH}]")
    if settings.num_negatives < 0:
        raise ConfigError(f"--num_negatives={settings.num_negatives}: must be >= 0")
    if shards < 1:
        raise ConfigError(f"--shards={shards}: must be >= 1")


def prepare(data: PathOrPaths, vocabulary: str, output: str, settings: Settings, *,
            shards: int = 1, workers: int | None = None, on_bad_line: str = "error",
            split: str = "train", overwrite: bool = False, progress: bool = True,
            chunk_size: int = CHUNK_SIZE) -> dict:
    """Reads, validates and tokenises `data` into the prepared folder `output`.

    `workers` processes (default: the CPU cores) tokenise `chunk_size` examples at a time;
    the folder is the same whatever their number. Returns the manifest written as
    `output`/prepared.json. Refuses an existing non-empty `output` unless `overwrite`
    (OutputExistsError), before reading anything.
    """
    check_settings(settings, shards)
    output_folder.check_target(output, overwrite, flag="--output")
    tokenizer = Tokenizer(vocabulary)  # checks the model before the long read
    stats = ReadStats()
    examples = read_examples(data, on_bad_line=on_bad_line, split=split, stats=stats)
    if not examples:
        raise DataError(", ".join(expand_paths(data)), None, None, "holds no examples")
    check_negatives(examples, settings.num_negatives)
    has_labels = check_labels(examples)
    query_ids, passage_ids, negative_ids = example_ids(examples, settings.num_negatives)
    k = settings.num_negatives
    rows = [(e.query, e.passage, e.negatives[:k], int(query_ids[i]), int(passage_ids[i]),
             negative_ids[i].tolist(), e.label) for i, e in enumerate(examples)]
    del examples
    n = len(rows)
    bounds = shard_bounds(n, shards)
    workers = max(1, min(os.cpu_count() or 1, -(-n // chunk_size))) if workers is None else workers
    with output_folder.write_atomically(output, overwrite, flag="--output") as folder:
        chunks = _tokenized_chunks(rows, tokenizer.path, settings, workers, chunk_size)
        lengths, pieces = write_records(folder, chunks, bounds, progress=progress)
        content = manifest(num_examples=n, has_labels=has_labels, settings=settings,
                           vocabulary=tokenizer.path, sources=expand_paths(data),
                           skipped_lines=stats.total_skipped, bounds=bounds, lengths=lengths,
                           pieces=pieces)
        del lengths
        write_manifest(folder, content)
    return content


def write_records(folder: str, chunks: Iterable[tuple[list[bytes], np.ndarray]],
                  bounds: list[int], *, progress: bool = True,
                  description: str = "samtone-prepare") -> tuple[np.ndarray, list]:
    """Writes the shards and lengths.npy of `folder` from (records, lengths) chunks in order.

    `bounds` (shard_bounds) fixes the example count N = bounds[-1] beforehand: lengths.npy is
    allocated for N rows. Returns (the lengths, memory-mapped, and the fingerprint's pieces).
    Raises RuntimeError if the chunks hold other than N records.
    """
    n, shards = bounds[-1], len(bounds) - 1
    lengths = np.lib.format.open_memmap(os.path.join(folder, prepared.LENGTHS), mode="w+",
                                        dtype=np.uint16, shape=(n, 2))
    digests = RecordDigests(0, n)
    writer, shard, row = None, -1, 0
    with tqdm.tqdm(total=n, unit="ex", desc=description, disable=not progress) as bar:
        for records, chunk_lengths in chunks:
            if row + len(records) > n:
                raise RuntimeError(f"more than the {n} examples counted were given to write")
            lengths[row:row + len(records)] = chunk_lengths
            for record in records:
                if row == bounds[shard + 1]:
                    if writer is not None:
                        writer.close()
                    shard += 1
                    writer = shard_writer(os.path.join(folder, prepared.shard_name(shard, shards)))
                writer.write(record)
                digests.add(record)
                row += 1
            bar.update(len(records))
    if row != n:
        raise RuntimeError(f"{row} examples were given to write, not the {n} counted")
    writer.close()
    lengths.flush()
    return lengths, digests.pieces()


def shard_writer(path: str):
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    return array_record_module.ArrayRecordWriter(path, prepared.WRITER_OPTIONS)
