"""Readers for training pairs on disk: JSONL, TSV, BEIR folders and plain sentence files.

Every reader returns a list of `Example`, each with the file and line it came from (`source`,
except for BEIR pairs). Bad input raises `DataError` naming the file, the 1-based line and the
field. With `on_bad_line="skip"` the line is skipped instead: the count per file is logged as a
warning and recorded in a `ReadStats` when one is passed as `stats=`.
Blank lines are not records and are ignored; any other line is either read or counted as
skipped, never dropped silently.

Formats, chosen by extension (or by being a directory):
- `.jsonl` / `.json`: one object per line with `query`, `passage` (aliases `positive`, `pos`),
  optional `negatives` (list of str; alias `hard_negatives`), `label` (number), `query_id`,
  `passage_id` (str or int).
- `.tsv`: `query \\t passage [\\t negative ...]`. A first line whose first column is `query` is
  a header; it may name the columns `query`, `passage`, `negative*` (any number, kept in
  order), `label`, `query_id`, `passage_id`, and every row then has exactly those columns.
- BEIR folder: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`),
  `qrels/<split>.tsv` (`query-id \\t corpus-id \\t score`, header line). Every qrel with
  score > 0 becomes `Example(query, title + " " + text, label=score, query_id, passage_id)`.
- `read_sentences`: any text file, one sentence per line, for SimCSE: `Example(s, s)`.

Paths are a path, a glob or a list of them; globs expand sorted. `gs://` paths go through
`tensorflow.io.gfile`, imported only for them.
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import json
import logging
import math
import os
from typing import Any, Callable, Container, Iterator, Sequence

from samtone.errors import ConfigError, DataError, MissingFileError

_LOG = logging.getLogger(__name__)

_PASSAGE_KEYS = ("passage", "positive", "pos")
_NEGATIVES_KEYS = ("negatives", "hard_negatives")
_TSV_COLUMNS = ("query", "passage", "label", "query_id", "passage_id")

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


@dataclasses.dataclass(frozen=True)
class Example:
    query: str
    passage: str
    negatives: tuple[str, ...] = ()
    label: float | None = None
    query_id: str | None = None
    passage_id: str | None = None
    # (file, line) it was read from, so that later checks (too few negatives) can name them;
    # None for examples made in code and BEIR pairs.
    source: tuple[str, int] | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass
class ReadStats:
    """Per file: examples read and bad lines skipped (non-zero only with on_bad_line="skip")."""

    examples: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total_examples(self) -> int:
        return sum(self.examples.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


# --- file system: local paths, or gs:// through tf.io.gfile -------------------------------


def _gfile():
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError(
            "reading gs:// paths needs tensorflow (for tf.io.gfile): pip install tensorflow, "
            "or copy the data to a local disk"
        ) from error
    return tf.io.gfile


def _is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def _open_binary(path: str):
    return _gfile().GFile(path, "rb") if _is_gcs(path) else open(path, "rb")


def _isdir(path: str) -> bool:
    return _gfile().isdir(path) if _is_gcs(path) else os.path.isdir(path)


def _exists(path: str) -> bool:
    return _gfile().exists(path) if _is_gcs(path) else os.path.exists(path)


def _glob(pattern: str) -> list[str]:
    return sorted(_gfile().glob(pattern) if _is_gcs(pattern) else globlib.glob(pattern))


def expand_paths(paths: PathOrPaths) -> list[str]:
    """A path, a glob or a list of them -> the list of paths, each glob expanded sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    expanded = []
    for path in map(os.fspath, paths):
        if any(c in path for c in "*?["):
            matches = _glob(path)
            if not matches:
                raise MissingFileError(f"no files match the pattern {path!r}")
            expanded.extend(matches)
        elif _exists(path):
            expanded.append(path)
        else:
            raise MissingFileError(f"no such file or directory: {path!r}")
    if not expanded:
        raise ConfigError("no data paths given")
    return expanded


def _numbered_lines(path: str) -> Iterator[tuple[int, str | DataError]]:
    """(1-based line number, text without newline) per non-blank line; DataError for bad bytes."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problem = f"is not valid UTF-8 ({error.reason} at byte {error.start})"
                yield number, DataError(path, number, None, problem)
                continue
            text = text.rstrip("\r\n")
            if number == 1:
                text = text.removeprefix("\ufeff")  # byte-order mark
            if text.strip():
                yield number, text


class _Reader:
    """Turns lines into records under one bad-line policy, counting per file."""

    def __init__(self, on_bad_line: str, stats: ReadStats | None):
        if on_bad_line not in ("error", "skip"):
            raise ConfigError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
        self.on_bad_line = on_bad_line
        self.stats = stats if stats is not None else ReadStats()

    def records(self, path: str, parse: Callable[[str, int, str], Any]) -> Iterator[Any]:
        """Yields parse(path, line_number, text) per line; parse returns None for non-records."""
        kept = skipped = 0
        first_error = None
        for number, text in _numbered_lines(path):
            try:
                if isinstance(text, DataError):
                    raise text
                record = parse(path, number, text)
            except DataError as error:
                if self.on_bad_line == "error":
                    raise
                skipped += 1
                first_error = first_error or error
                continue
            if record is not None:
                kept += 1
                yield record
        self.stats.examples[path] = self.stats.examples.get(path, 0) + kept
        self.stats.skipped[path] = self.stats.skipped.get(path, 0) + skipped
        if skipped:
            _LOG.warning("%s: skipped %d bad line(s), kept %d records; first: %s",
                         path, skipped, kept, first_error)
        if not kept:
            # An empty file is a mistake (wrong path, failed download), never "train on nothing".
            raise DataError(path, None, None,
                            f"has no usable lines: all {skipped} were bad (first: {first_error})"
                            if skipped else "holds no records (the file is empty)")


# --- field checks ------------------------------------------------------------------------


def _text(value: Any, path: str, line: int, field: str) -> str:
    if value is None:
        raise DataError(path, line, field, "is missing")
    if not isinstance(value, str):
        raise DataError(path, line, field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, line, field, "is empty")
    return value


def _number(value: Any, path: str, line: int, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise DataError(path, line, field, f"must be a number, got {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise DataError(path, line, field, f"must be a number, got {value!r}")
    if not math.isfinite(number):
        raise DataError(path, line, field, f"must be a finite number, got {value!r}")
    return number


def _identifier(value: Any, path: str, line: int, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(path, line, field, f"must be a string or an integer, got {value!r}")
    if not str(value).strip():
        raise DataError(path, line, field, "is empty")
    return str(value)


def _first_key(record: dict, keys: Sequence[str]) -> tuple[str, Any]:
    for key in keys:
        if key in record:
            return key, record[key]
    return keys[0], None


# --- JSONL -------------------------------------------------------------------------------


def _json_object(path: str, line: int, text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        problem = f"invalid JSON ({error.msg} at column {error.colno})"
        raise DataError(path, line, None, problem) from None
    if not isinstance(record, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(record).__name__}")
    return record


def _parse_jsonl(path: str, line: int, text: str) -> Example:
    record = _json_object(path, line, text)
    passage_key, passage = _first_key(record, _PASSAGE_KEYS)
    negatives_key, negatives = _first_key(record, _NEGATIVES_KEYS)
    if negatives is None:
        negatives = []
    if not isinstance(negatives, list):
        problem = f"must be a list of strings, got {type(negatives).__name__}"
        raise DataError(path, line, negatives_key, problem)
    return Example(
        query=_text(record.get("query"), path, line, "query"),
        passage=_text(passage, path, line, passage_key),
        negatives=tuple(
            _text(negative, path, line, f"{negatives_key}[{i}]")
            for i, negative in enumerate(negatives)
        ),
        label=_number(record.get("label"), path, line, "label"),
        query_id=_identifier(record.get("query_id"), path, line, "query_id"),
        passage_id=_identifier(record.get("passage_id"), path, line, "passage_id"),
        source=(path, line),
    )


# --- TSV ---------------------------------------------------------------------------------


def _tsv_header(path: str, line: int, cells: list[str]) -> list[str]:
    names = [cell.strip().lower() for cell in cells]
    for name in names:
        if name not in _TSV_COLUMNS and not name.startswith("neg"):
            expected = ", ".join(_TSV_COLUMNS + ("negative*",))
            raise DataError(path, line, name, f"is not a known header column ({expected})")
    for required in ("query", "passage"):
        if required not in names:
            raise DataError(path, line, required, "is missing from the header")
    for name in names:
        if names.count(name) > 1 and not name.startswith("neg"):
            raise DataError(path, line, name, "appears twice in the header")
    return names


def _tsv_row(path: str, line: int, cells: list[str], header: list[str] | None) -> Example:
    if header is None:
        if len(cells) < 2:
            raise DataError(path, line, None, "expected at least 2 tab-separated columns "
                            f"(query, passage[, negatives...]), found {len(cells)}")
        header = ["query", "passage"] + ["negative"] * (len(cells) - 2)
    elif len(cells) != len(header):
        raise DataError(path, line, None, f"expected {len(header)} tab-separated columns "
                        f"as named by the header, found {len(cells)}")
    fields = dict(zip(header, cells))
    negatives = [cell for name, cell in zip(header, cells) if name.startswith("neg")]
    return Example(
        query=_text(fields["query"], path, line, "query"),
        passage=_text(fields["passage"], path, line, "passage"),
        negatives=tuple(
            _text(negative, path, line, f"negative {i + 1}") for i, negative in enumerate(negatives)
        ),
        label=_number(fields.get("label"), path, line, "label"),
        query_id=_identifier(fields.get("query_id"), path, line, "query_id"),
        passage_id=_identifier(fields.get("passage_id"), path, line, "passage_id"),
        source=(path, line),
    )


def _tsv_parser() -> Callable[[str, int, str], Example | None]:
    """A parser for one TSV file: remembers the header if its first line is one."""
    header: list[str] | None = None
    first = True

    def parse(path: str, line: int, text: str) -> Example | None:
        nonlocal header, first
        cells = text.split("\t")
        if first:
            first = False
            if cells[0].strip().lower() == "query":
                header = _tsv_header(path, line, cells)
                return None
        return _tsv_row(path, line, cells, header)

    return parse


# --- BEIR --------------------------------------------------------------------------------


def _beir_texts(reader: _Reader, path: str) -> dict[str, str]:
    """`_id` -> text (title + " " + text when there is a title) from a BEIR jsonl file.

    Every line needs an `_id` seen on no other line and a `text` field; an empty text is
    allowed when the title is not (a few BEIR corpora have title-only documents).
    """
    first_line: dict[str, int] = {}

    def parse(path: str, line: int, text: str) -> tuple[str, str]:
        record = _json_object(path, line, text)
        identifier = _identifier(record.get("_id"), path, line, "_id")
        if identifier is None:
            raise DataError(path, line, "_id", "is missing")
        if identifier in first_line:
            raise DataError(path, line, "_id", f"{identifier!r} repeats the id of line "
                            f"{first_line[identifier]}")
        title = record.get("title") or ""
        if not isinstance(title, str):
            raise DataError(path, line, "title", f"must be a string, got {type(title).__name__} "
                            f"(id {identifier!r})")
        body = record.get("text")
        if not (isinstance(body, str) and not body.strip() and title.strip()):
            try:
                body = _text(body, path, line, "text")
            except DataError as error:
                raise DataError(path, line, "text", f"{error.problem} (id {identifier!r})"
                                ) from None
        first_line[identifier] = line
        return identifier, f"{title.strip()} {body}".strip() if title.strip() else body

    return dict(reader.records(path, parse))


def beir_files(folder: str | os.PathLike, split: str) -> tuple[str, str, str]:
    """Paths of a BEIR folder's corpus.jsonl, queries.jsonl and qrels/<split>.tsv, each
    checked to exist (MissingFileError naming the file, and the splits there are)."""
    folder = os.fspath(folder).rstrip("/")
    corpus, queries = f"{folder}/corpus.jsonl", f"{folder}/queries.jsonl"
    qrels = f"{folder}/qrels/{split}.tsv"
    for path in (corpus, queries):
        if not _exists(path):
            raise MissingFileError(f"BEIR folder {folder!r} has no {os.path.basename(path)} "
                                   f"({path} not found)")
    if not _exists(qrels):
        found = sorted(os.path.basename(p)[:-len(".tsv")] for p in _glob(f"{folder}/qrels/*.tsv"))
        raise MissingFileError(
            f"BEIR folder {folder!r} has no qrels/{split}.tsv (split={split!r}; the splits "
            f"there: {', '.join(found) or 'none'})")
    return corpus, queries, qrels


def read_beir_qrels(path: str, query_ids: Container[str], corpus_ids: Container[str],
                    *, on_bad_line: str = "error", stats: ReadStats | None = None
                    ) -> list[tuple[str, str, float]]:
    """(query id, document id, score) of every line of a BEIR qrels file, 0 scores included.

    The header line is optional. An id that is not in `query_ids` / `corpus_ids`, a pair
    judged twice or a score that is not a number is a DataError naming the line and the id.
    """
    return list(_beir_qrels(_Reader(on_bad_line, stats), path, query_ids, corpus_ids))


def _beir_qrels(reader: _Reader, path: str, query_ids: Container[str],
                corpus_ids: Container[str]) -> Iterator[tuple[str, str, float]]:
    first_line: dict[tuple[str, str], int] = {}

    def parse(path: str, line: int, text: str) -> tuple[str, str, float] | None:
        cells = text.split("\t")
        if line == 1 and cells[0].strip().lower() in ("query-id", "query_id", "qid"):
            return None  # the header
        if len(cells) != 3:
            raise DataError(path, line, None, "expected 3 tab-separated columns "
                            f"(query-id, corpus-id, score), found {len(cells)}")
        query_id = _identifier(cells[0].strip(), path, line, "query-id")
        passage_id = _identifier(cells[1].strip(), path, line, "corpus-id")
        score = _number(cells[2], path, line, "score")
        if query_id not in query_ids:
            raise DataError(path, line, "query-id", f"{query_id!r} is not in queries.jsonl")
        if passage_id not in corpus_ids:
            raise DataError(path, line, "corpus-id", f"{passage_id!r} is not in corpus.jsonl")
        if (query_id, passage_id) in first_line:
            raise DataError(path, line, None, f"query {query_id!r} and document {passage_id!r} "
                            f"are judged again (first on line {first_line[query_id, passage_id]})")
        first_line[query_id, passage_id] = line
        return query_id, passage_id, score

    return reader.records(path, parse)


def _read_beir(reader: _Reader, folder: str, split: str) -> Iterator[Example]:
    corpus_path, queries_path, qrels_path = beir_files(folder, split)
    corpus = _beir_texts(reader, corpus_path)
    queries = _beir_texts(reader, queries_path)
    for query_id, passage_id, score in _beir_qrels(reader, qrels_path, queries, corpus):
        if score > 0:  # judged not relevant: no training pair
            yield Example(queries[query_id], corpus[passage_id], label=score,
                          query_id=query_id, passage_id=passage_id)


# --- entry points ------------------------------------------------------------------------


def read_examples(paths: PathOrPaths, *, on_bad_line: str = "error", split: str = "train",
                  stats: ReadStats | None = None) -> list[Example]:
    """Reads (query, passage[, negatives, label, ids]) examples from JSONL, TSV and BEIR folders.

    Args:
      paths: a path, a glob, or a list of them; globs expand sorted, files are read in order.
      on_bad_line: "error" raises `DataError` (file, line, field) at the first bad line; "skip"
        skips bad lines, logs a warning with the count per file and records it in `stats`.
      split: which `qrels/<split>.tsv` to read from BEIR folders.
      stats: optional `ReadStats`, filled with the examples read and lines skipped per file.
    """
    reader = _Reader(on_bad_line, stats)
    examples: list[Example] = []
    for path in expand_paths(paths):
        if _isdir(path):
            examples.extend(_read_beir(reader, path, split))
        elif path.endswith((".jsonl", ".json")):
            examples.extend(reader.records(path, _parse_jsonl))
        elif path.endswith(".tsv"):
            examples.extend(reader.records(path, _tsv_parser()))
        else:
            raise DataError(path, None, None, "unknown format; expected .jsonl, .json, .tsv or a "
                            "BEIR folder (read_sentences reads plain text)")
    return examples


def read_beir_texts(path: str | os.PathLike, *, on_bad_line: str = "error") -> dict[str, str]:
    """`_id` -> text of a BEIR `corpus.jsonl` or `queries.jsonl` (title + " " + text)."""
    return _beir_texts(_Reader(on_bad_line, None), os.fspath(path))


def read_sentences(paths: PathOrPaths, *, on_bad_line: str = "error",
                   stats: ReadStats | None = None) -> list[Example]:
    """One sentence per line (blank lines ignored) -> Example(s, s), for unsupervised SimCSE."""
    reader = _Reader(on_bad_line, stats)
    examples: list[Example] = []
    for path in expand_paths(paths):
        examples.extend(reader.records(
            path, lambda path, line, text: Example(text, text, source=(path, line))))
    return examples
