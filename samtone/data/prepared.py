"""A prepared folder: tokenised examples in ArrayRecord shards, read row by row (samtone-prepare).

`samtone-prepare` (samtone.data.prepare) reads and tokenises the training files once; every
host of a run then reads only the records of its own rows of each global batch, holding
nothing per example (an index entry per chunk of 32 records, below).
`make_batch_iterator(FOLDER, ...)` gives exactly the batches it gives for the files themselves
(same order, tokens and ids), through `PreparedExamples`, which offers BatchIterator what
`TokenizedExamples` offers.

Files in a prepared folder:
- `shard-00000-of-00004.array_record`, ...: one record per example, in the examples' order
  (shard s holds examples [s*N/S, (s+1)*N/S)), in chunks of 32 records (group_size:32): the
  reader holds an index entry per chunk, not per record, so a host's memory stays nearly flat
  in N (benchmarks/first_batch.py: at 2M pairs 35 MiB above the imports, 88 MiB with one
  record per chunk), while reading one record decompresses its chunk of 32. A record is a
  msgpack map:
  `q`, `p`: the query's / passage's token ids as little-endian int32 bytes, EOS included and
  padding dropped; `n`: a list of K such byte strings (the hard negatives); `qi`, `pi`: the
  query / passage ids (int); `ni`: the K negative ids; `l`: the label (float) or None.
- `lengths.npy`: uint16 [N, 2], per example the tokens of its query and of the longest of its
  passage and hard negatives (EOS included); memory-mapped, so that every host finds the
  longest texts of any global batch (length buckets) without reading others' records.
- `prepared.json` (written last): example count, settings (query_length, passage_length,
  num_negatives, vocabulary path and sha256), shard files with their record counts, a
  histogram of the lengths, and `fingerprint`, a sha256 over the records in order, in blocks
  (samtone.data.prepare.RecordDigests: the same whatever the shards or the writer; also the
  data fingerprint of the iterator state: a run started on the files resumes on the files,
  one started on the folder on the folder).

A folder without prepared.json is an unfinished preparation, and refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import msgpack
import numpy as np

from samtone.errors import ConfigError, DataError, MissingDependencyError

MANIFEST = "prepared.json"
LENGTHS = "lengths.npy"
FORMAT = "samtone-prepared"
VERSION = 1
WRITER_OPTIONS = "group_size:32"  # module docstring: the index per chunk, not per record
_GROUP_SIZE_WARNING = "File %s was created with group size"  # grain's, for group_size != 1


class _DropGroupSizeWarning(logging.Filter):
    """Drops grain's error log that group sizes other than 1 read slowly: on these records
    32 keeps the index 32x smaller and the first batch no slower (benchmarks/first_batch.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_GROUP_SIZE_WARNING)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.array_record"


def encode_record(query: np.ndarray, passage: np.ndarray, negatives: np.ndarray,
                  query_id: int, passage_id: int, negative_ids: np.ndarray,
                  label: float | None) -> bytes:
    """One example's record (module docstring); token rows are padded int32 [L] arrays."""
    return msgpack.packb({
        "q": _unpadded(query), "p": _unpadded(passage),
        "n": [_unpadded(negative) for negative in negatives],
        "qi": int(query_id), "pi": int(passage_id), "ni": [int(i) for i in negative_ids],
        "l": None if label is None else float(label),
    })


def _unpadded(tokens: np.ndarray) -> bytes:
    return np.trim_zeros(tokens, "b").astype("<i4").tobytes()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_prepared(path: str | os.PathLike) -> bool:
    """A folder with prepared.json, or with shards or lengths.npy (then unfinished)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return MANIFEST in names or LENGTHS in names or any(
        name.endswith(".array_record") for name in names)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(folder, None, None, f"is not a complete prepared folder: it has no "
                        f"{MANIFEST} (samtone-prepare was interrupted or is still writing); "
                        "run samtone-prepare again")
    with open(path, encoding="utf-8") as file:
        manifest = json.load(file)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(path, None, None, f"is not a {FORMAT} manifest of version {VERSION}")
    return manifest


def check_settings(folder: str, manifest: dict, *, query_length: int, passage_length: int,
                   num_negatives: int, vocabulary: str | None) -> None:
    """Refuses a folder prepared with other lengths, hard negatives or vocabulary."""
    settings = manifest["settings"]
    for name, wanted, binding in (
            ("query_length", query_length, "QUERY_LENGTH"),
            ("passage_length", passage_length, "PASSAGE_LENGTH"),
            ("num_negatives", num_negatives, "make_batch_iterator.num_negatives")):
        if settings[name] != wanted:
            raise ConfigError(
                f"{folder} was prepared with {name}={settings[name]} but the run has "
                f"{binding} = {wanted}; rerun samtone-prepare with --{name}={wanted}, or set "
                f"{binding} = {settings[name]}")
    if vocabulary is not None:
        found = file_sha256(vocabulary)
        if found != settings["vocabulary_sha256"]:
            raise ConfigError(
                f"{folder} was prepared with the vocabulary {settings['vocabulary']} (sha256 "
                f"{settings['vocabulary_sha256'][:12]}...) but the run's VOCABULARY "
                f"{vocabulary} differs (sha256 {found[:12]}...); rerun samtone-prepare with "
                "--vocabulary set to the run's")


def _data_source(paths: list[str]):
    try:
        # pylint: disable-next=import-outside-toplevel
        from array_record.python.array_record_data_source import ArrayRecordDataSource
    except ImportError as error:
        raise MissingDependencyError("reading a prepared folder needs array-record: pip "
                                     "install array-record") from error
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropGroupSizeWarning) for f in absl_logger.filters):
        absl_logger.addFilter(_DropGroupSizeWarning())
    return ArrayRecordDataSource(paths)


class PreparedExamples:
    """The examples of a prepared folder, read by row: what BatchIterator needs of its data.

    `source` is the random-access data source (`source.__getitems__(rows)` -> records);
    `gather` reads the records of the rows it is given and nothing else.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.path.abspath(os.fspath(folder))
        self.manifest = read_manifest(self.folder)
        settings = self.manifest["settings"]
        self.query_length = int(settings["query_length"])
        self.passage_length = int(settings["passage_length"])
        self.num_negatives = int(settings["num_negatives"])
        self.has_labels = bool(self.manifest["has_labels"])
        self.lengths = np.load(os.path.join(self.folder, LENGTHS), mmap_mode="r")
        num_examples = int(self.manifest["num_examples"])
        if self.lengths.shape != (num_examples, 2):
            raise DataError(os.path.join(self.folder, LENGTHS), None, None,
                            f"has shape {self.lengths.shape}; {MANIFEST} says "
                            f"{num_examples} examples, so ({num_examples}, 2) was expected")
        self.source = _data_source([os.path.join(self.folder, shard["file"])
                                    for shard in self.manifest["shards"]])
        if len(self.source) != num_examples:
            raise DataError(self.folder, None, None, f"its shards hold {len(self.source)} "
                            f"records but {MANIFEST} says {num_examples}")

    def __getstate__(self) -> dict:
        # Pickled for grain's worker processes: the folder alone, not the lengths' copy.
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])  # pylint: disable=unnecessary-dunder-call

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def longest(self, rows: np.ndarray) -> tuple[int, int]:
        """(longest query, longest passage or hard negative) of the examples `rows`."""
        lengths = self.lengths[np.asarray(rows)]
        return int(lengths[:, 0].max()), int(lengths[:, 1].max())

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of the examples `rows`, as TokenizedExamples.gather gives it."""
        records = [msgpack.unpackb(record) for record in
                   self.source.__getitems__([int(row) for row in rows])]
        k = self.num_negatives
        batch = {
            "query_tokens": self._tokens([r["q"] for r in records], self.query_length),
            "passage_tokens": self._tokens([r["p"] for r in records], self.passage_length),
            "query_ids": np.array([r["qi"] for r in records], np.int32),
            "passage_ids": np.array([r["pi"] for r in records], np.int32),
        }
        if k:
            negatives = self._tokens([n for r in records for n in r["n"]], self.passage_length)
            batch["negative_tokens"] = negatives.reshape(len(records), k, self.passage_length)
            batch["negative_ids"] = np.array([r["ni"] for r in records], np.int32)
        if self.has_labels:
            batch["labels"] = np.array([r["l"] for r in records], np.float32)
        return batch

    @staticmethod
    def _tokens(texts: list[bytes], length: int) -> np.ndarray:
        """int32 [len(texts), length]: the unpadded token strings, left-aligned, 0-padded."""
        counts = np.array([len(text) // 4 for text in texts], np.int64)
        tokens = np.zeros((len(texts), length), np.int32)
        # Row-major order of the mask is the order of the concatenated tokens.
        tokens[np.arange(length) < counts[:, None]] = np.frombuffer(b"".join(texts), "<i4")
        return tokens


def open_prepared(folder: str | os.PathLike, *, tokenizer: Any, query_length: int,
                  passage_length: int, num_negatives: int) -> PreparedExamples:
    """The prepared folder's examples, refused unless prepared with the run's settings."""
    examples = PreparedExamples(folder)
    vocabulary = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else getattr(
        tokenizer, "path", None)
    check_settings(examples.folder, examples.manifest, query_length=query_length,
                   passage_length=passage_length, num_negatives=num_negatives,
                   vocabulary=None if vocabulary is None else os.fspath(vocabulary))
    return examples
