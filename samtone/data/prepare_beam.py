"""`samtone-prepare --runner=...`: the prepared folder of samtone.data.prepare, written by an
Apache Beam pipeline (DirectRunner here; Flink, Spark or Dataflow beyond one machine).

The folder is the one `prepare.prepare` writes for the same inputs: the same records in the
same shards, lengths.npy and prepared.json (fingerprint included). The driver only lists the
files, their sizes and each TSV file's header; everything per example runs in the workers:

1. Read: each work item is a byte range of a JSONL/TSV file (the lines that start in it) or a
   whole BEIR folder (its qrels need the corpus: one item). A worker parses and validates its
   lines as samtone.data.files does, with line numbers counted from the start of its range;
   bad lines are data, not exceptions: each item reports its line count, examples kept and
   skipped, its first bad line, its first example with too few hard negatives and its first
   example with / without a label.
2. Plan (`_plan`, one small element from all the reports): per file, the line offset of each
   item (lines of the items before it), so errors get their file:line; the first error in
   file order, exactly the one `prepare` raises; each item's first global row (examples kept
   by the items before it) and the shards' row ranges. Later steps read the plan as a side
   input and emit nothing when it holds an error; the driver raises it after the run.
3. Ids: a hard negative whose text is some example's passage gets the id of the first such
   example (pipeline.example_ids), a fact about the whole data: a join by text (the first row
   of each passage text, CombinePerKey(min), CoGroupByKey with the negatives) gives the
   negatives whose id is not the default stable_id(text).
4. Write: rows and those ids grouped by shard; one worker per shard sorts its rows, tokenises
   them (prepare.tokenize_rows), writes its ArrayRecord shard and leaves its lengths and
   fingerprint pieces (prepare.RecordDigests) in a small file.
5. The driver concatenates the lengths into lengths.npy, joins the fingerprint, writes
   prepared.json last, and the temporary folder becomes the output (write_atomically).

Workers write into the output's temporary sibling folder, so they must see the driver's file
system (DirectRunner; a cluster with a shared mount); gs:// outputs are not supported.
A shard is sorted and tokenised in one worker's memory: choose --shards accordingly.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import pickle
from typing import Any, Iterator, Sequence

import numpy as np

from samtone import output_folder
from samtone.data import files, prepare, prepared
from samtone.data.files import Example, ReadStats, expand_paths
from samtone.data.pipeline import check_labels, check_negatives, stable_id
from samtone.data.tokenizer import Tokenizer
from samtone.errors import ConfigError, DataError, MissingDependencyError

_LOG = logging.getLogger(__name__)
CHUNK_BYTES = 32 << 20  # bytes of a file per read work item, by default
_PLAN, _RESULT = ".plan.pickle", ".shard-{:05d}.result.pickle"

# An example as the later steps need it: query, passage, negatives[:K], query id, passage id,
# label.
_Row = tuple[str, str, tuple[str, ...], int, int, float | None]


def _beam():
    try:
        import apache_beam  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise MissingDependencyError("--runner needs Apache Beam: pip install "
                                     "'samtone[beam]'") from error
    return apache_beam


# --- work items and reading ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Item:
    """Bytes [start, end) of a file (the lines that start there), or a whole BEIR folder."""
    index: int  # the items' order is the files' order, then the bytes'
    file_index: int
    path: str
    kind: str  # "jsonl", "tsv", "beir" or "unknown"
    start: int = 0
    end: int = 0
    header_offset: int = -1  # TSV: byte offset of the first non-blank line
    header: tuple[str, ...] | None = None  # TSV: its columns if that line is a valid header


@dataclasses.dataclass
class _Report:
    """What reading an item found (module docstring, 1); lines count from the item's start."""
    item: _Item
    lines: int = 0
    kept: int = 0
    skipped: int = 0
    first_error: tuple | None = None  # _error_tuple of the first bad line
    negatives_error: tuple[int, Example] | None = None  # (index in item, example)
    first_labelled: int | None = None
    first_unlabelled: int | None = None


def _error_tuple(error: Exception) -> tuple:
    """A picklable form of an error (DataError's own pickling loses its fields)."""
    if isinstance(error, DataError):
        return ("data", error.path, error.line, error.field, error.problem)
    return ("other", type(error), str(error))


def _exception(error: tuple, line_offset: int = 0) -> Exception:
    if error[0] == "data":
        _, path, line, field, problem = error
        return DataError(path, None if line is None else line + line_offset, field, problem)
    return error[1](error[2])


def _size(path: str) -> int:
    return files._gfile().stat(path).length if files._is_gcs(path) else os.path.getsize(path)


def _raw_lines(path: str, start: int, end: int) -> Iterator[tuple[int, int, bytes]]:
    """(1-based number from `start`, byte offset, bytes) of the lines starting in [start, end)."""
    with files._open_binary(path) as file:
        offset = start
        if start:
            file.seek(start - 1)
            offset += len(file.readline()) - 1  # the end of a line started before `start`
        number = 0
        while offset < end:
            raw = file.readline()
            if not raw:
                return
            number += 1
            yield number, offset, raw
            offset += len(raw)


def _lines(item: _Item) -> Iterator[tuple[int, int, str | DataError | None]]:
    """As files._numbered_lines, for the item's lines: text, a DataError, None when blank."""
    for number, offset, raw in _raw_lines(item.path, item.start, item.end):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            problem = f"is not valid UTF-8 ({error.reason} at byte {error.start})"
            yield number, offset, DataError(item.path, number, None, problem)
            continue
        text = text.rstrip("\r\n")
        if offset == 0:
            text = text.removeprefix("\ufeff")  # byte-order mark
        yield number, offset, text if text.strip() else None


def _tsv_header(path: str) -> tuple[int, tuple[str, ...] | None]:
    """(byte offset of the first non-blank line, its columns if it is a valid header)."""
    item = _Item(0, 0, path, "tsv", 0, _size(path))
    for number, offset, text in _lines(item):
        if text is None or isinstance(text, DataError):
            continue
        cells = text.split("\t")
        if cells[0].strip().lower() != "query":
            return offset, None
        try:
            return offset, tuple(files._tsv_header(path, number, cells))
        except DataError:
            return offset, None  # the item holding that line reports it
    return -1, None


def _items(paths: Sequence[str], chunk_bytes: int) -> list[_Item]:
    items: list[_Item] = []
    for file_index, path in enumerate(paths):
        def add(kind: str, start: int = 0, end: int = 0, **header: Any) -> None:
            items.append(_Item(len(items), file_index, path, kind, start, end, **header))
        if files._isdir(path):
            add("beir")
        elif path.endswith((".jsonl", ".json", ".tsv")):
            kind = "tsv" if path.endswith(".tsv") else "jsonl"
            header = {}
            if kind == "tsv":
                header_offset, columns = _tsv_header(path)
                header = dict(header_offset=header_offset, header=columns)
            size = _size(path)
            for start in range(0, max(size, 1), chunk_bytes):
                add(kind, start, min(start + chunk_bytes, size), **header)
        else:
            add("unknown")
    return items


def _parse(item: _Item, number: int, offset: int, text: str) -> Example | None:
    if item.kind == "jsonl":
        return files._parse_jsonl(item.path, number, text)
    cells = text.split("\t")
    if offset == item.header_offset and cells[0].strip().lower() == "query":
        files._tsv_header(item.path, number, cells)  # raises if bad
        return None
    return files._tsv_row(item.path, number, cells, list(item.header) if offset >
                          item.header_offset and item.header else None)


def _read(item: _Item, on_bad_line: str, split: str) -> tuple[_Report, list[Example]]:
    report, examples = _Report(item), []
    if item.kind in ("beir", "unknown"):
        try:
            stats = ReadStats()
            examples = files.read_examples(item.path, on_bad_line=on_bad_line, split=split,
                                           stats=stats)
            report.skipped = stats.total_skipped
        except Exception as error:  # pylint: disable=broad-except
            report.first_error = _error_tuple(error)
        report.kept = len(examples)
        return report, examples
    for number, offset, text in _lines(item):
        report.lines += 1
        if text is None:
            continue
        try:
            if isinstance(text, DataError):
                raise text
            example = _parse(item, number, offset, text)
        except DataError as error:
            report.first_error = report.first_error or _error_tuple(error)
            if on_bad_line == "error":
                break
            report.skipped += 1
            continue
        if example is not None:
            examples.append(example)
    report.kept = len(examples)
    return report, examples


def _read_item(item: _Item, on_bad_line: str, split: str, num_negatives: int):
    """Beam step 1: the item's report (tagged "report") and its (item, index, row)s."""
    beam = _beam()
    report, examples = _read(item, on_bad_line, split)
    for i, example in enumerate(examples):
        if report.negatives_error is None and len(example.negatives) < num_negatives:
            report.negatives_error = (i, example)
        if example.label is None:
            report.first_unlabelled = i if report.first_unlabelled is None \
                else report.first_unlabelled
        elif report.first_labelled is None:
            report.first_labelled = i
    yield beam.pvalue.TaggedOutput("report", report)
    if report.first_error is not None and on_bad_line == "error":
        return
    for i, e in enumerate(examples):
        yield (item.index, i, (
            e.query, e.passage, e.negatives[:num_negatives],
            stable_id(e.query if e.query_id is None else e.query_id),
            stable_id(e.passage if e.passage_id is None else e.passage_id), e.label))


# --- the plan -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    error: tuple | None  # to raise (_exception) instead of writing anything
    row_offsets: dict[int, int]  # item index -> its first row
    bounds: list[int]  # shard s holds rows [bounds[s], bounds[s + 1])
    has_labels: bool
    skipped: int
    warnings: list[str]


def _plan(reports: list[_Report], *, paths: Sequence[str], on_bad_line: str,
          num_negatives: int, shards: int) -> _Plan:
    """Module docstring, 2: the first error `prepare` would raise, or where every row goes."""
    reports = sorted(reports, key=lambda report: report.item.index)
    line_offsets, row_offsets, warnings = {}, {}, []
    plan = _Plan(None, row_offsets, [0], False, 0, warnings)
    rows = 0
    for file_index, path in enumerate(paths):
        in_file = [r for r in reports if r.item.file_index == file_index]
        lines = kept = skipped = 0
        first_error = None
        for report in in_file:
            line_offsets[report.item.index], row_offsets[report.item.index] = lines, rows
            error = report.first_error
            if error is not None and first_error is None:
                first_error = _exception(error, lines)
            # BEIR folders and unknown formats: read_examples raised, whatever on_bad_line.
            if error is not None and (on_bad_line == "error"
                                      or report.item.kind in ("beir", "unknown")):
                plan.error = _error_tuple(_exception(error, lines))
                return plan
            lines, rows = lines + report.lines, rows + report.kept
            kept, skipped = kept + report.kept, skipped + report.skipped
        plan.skipped += skipped
        if in_file[0].item.kind in ("beir", "unknown"):
            continue  # read_examples did these checks
        if skipped:
            warnings.append(f"{path}: skipped {skipped} bad line(s), kept {kept} records; "
                            f"first: {first_error}")
        if not kept:
            plan.error = _error_tuple(DataError(
                path, None, None, f"has no usable lines: all {skipped} were bad (first: "
                f"{first_error})" if skipped else "holds no records (the file is empty)"))
            return plan
    if not rows:
        plan.error = _error_tuple(DataError(", ".join(paths), None, None, "holds no examples"))
        return plan
    for report in reports:
        if report.negatives_error is not None:
            index, example = report.negatives_error
            if example.source is not None:
                path, line = example.source
                example = dataclasses.replace(
                    example, source=(path, line + line_offsets[report.item.index]))
            try:
                check_negatives([example], num_negatives)
            except (ConfigError, DataError) as error:
                row = row_offsets[report.item.index] + index
                plan.error = (_error_tuple(error) if isinstance(error, DataError) else
                              ("other", ConfigError, str(error).replace(
                                  "example 0 ", f"example {row} ", 1)))
            return plan
    plan.has_labels = _first_row(reports, "first_labelled", row_offsets) == 0
    other = _first_row(reports, "first_unlabelled" if plan.has_labels else "first_labelled",
                       row_offsets)
    if other is not None:
        pair = [Example("q", "p", label=1.0 if plan.has_labels else None),
                Example("q", "p", label=None if plan.has_labels else 1.0)]
        try:
            check_labels(pair)
        except ValueError as error:
            plan.error = ("other", ValueError,
                          str(error).replace("example 1 ", f"example {other} ", 1))
        return plan
    plan.bounds = prepare.shard_bounds(rows, shards)
    return plan


def _first_row(reports: list[_Report], field: str, row_offsets: dict[int, int]) -> int | None:
    """The global row of the first example with `field` (first_labelled, first_unlabelled)."""
    for report in reports:
        index = getattr(report, field)
        if index is not None:
            return row_offsets[report.item.index] + index
    return None


# --- the pipeline -------------------------------------------------------------------------


def _place(element, plan: _Plan):
    """(item, index, row) -> (global row, row); nothing when the plan holds an error."""
    if plan.error is None:
        item, index, row = element
        yield plan.row_offsets[item] + index, row


def _shard_of(row: int, plan: _Plan) -> int:
    return bisect.bisect_right(plan.bounds, row) - 1


def _passage_key(element):
    row, (_, passage, _, _, passage_id, _) = element
    return passage, (row, passage_id)


def _negative_keys(element):
    row, (_, _, negatives, _, _, _) = element
    return ((text, (row, slot)) for slot, text in enumerate(negatives))


def _negative_ids(element):
    """(row, slot, id) of the negatives whose id is a passage's, not stable_id(text)."""
    text, groups = element
    passages = list(groups["passage"])
    if passages and passages[0][1] != stable_id(text):
        for row, slot in groups["negative"]:
            yield row, slot, passages[0][1]


_tokenizers: dict[str, Tokenizer] = {}  # per worker process, by vocabulary path


def _write_shard(element, plan: _Plan, folder: str, vocabulary: str,
                 settings: prepare.Settings) -> int:
    """Beam step 4 (module docstring): the shard's records, lengths and fingerprint pieces."""
    shard, groups = element
    tokenizer = _tokenizers.get(vocabulary) or _tokenizers.setdefault(
        vocabulary, Tokenizer(vocabulary))
    rows = sorted(groups["rows"])
    ids = {(row, slot): negative_id for row, slot, negative_id in groups["ids"]}
    first, count = plan.bounds[shard], plan.bounds[shard + 1] - plan.bounds[shard]
    if [row for row, _ in rows] != list(range(first, first + count)):
        raise RuntimeError(f"shard {shard} got rows other than [{first}, {first + count})")
    digests = prepare.RecordDigests(first, plan.bounds[-1])
    lengths = []
    writer = prepare.shard_writer(os.path.join(
        folder, prepared.shard_name(shard, len(plan.bounds) - 1)))
    for start in range(0, count, prepare.CHUNK_SIZE):
        chunk = [(query, passage, negatives, query_id, passage_id,
                  [ids.get((row, slot), stable_id(text)) for slot, text in enumerate(negatives)],
                  label)
                 for row, (query, passage, negatives, query_id, passage_id, label)
                 in rows[start:start + prepare.CHUNK_SIZE]]
        records, chunk_lengths = prepare.tokenize_rows(chunk, settings, tokenizer)
        for record in records:
            writer.write(record)
            digests.add(record)
        lengths.append(chunk_lengths)
    writer.close()
    _save({"lengths": np.concatenate(lengths), "pieces": digests.pieces()},
          os.path.join(folder, _RESULT.format(shard)))
    return shard


def _save(value: Any, path: str) -> None:
    with open(path, "wb") as file:
        pickle.dump(value, file)


def _pipeline(beam, pipeline, items: list[_Item], *, folder: str, vocabulary: str,
              settings: prepare.Settings, shards: int, on_bad_line: str, split: str,
              paths: list[str]) -> None:
    k = settings.num_negatives
    read = (pipeline | "Items" >> beam.Create(items) | "Reshuffle" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(_read_item, on_bad_line, split, k).with_outputs(
                "report", main="rows"))
    plan = (read.report | "Reports" >> beam.combiners.ToList()
            | "Plan" >> beam.Map(_plan, paths=paths, on_bad_line=on_bad_line,
                                  num_negatives=k, shards=shards))
    plan | "SavePlan" >> beam.Map(_save, os.path.join(folder, _PLAN))
    plan_input = beam.pvalue.AsSingleton(plan)
    rows = read.rows | "Place" >> beam.FlatMap(_place, plan_input)
    if k:
        first_passages = (rows | "PassageKeys" >> beam.Map(_passage_key)
                          | "FirstPassage" >> beam.CombinePerKey(min))
        negatives = rows | "NegativeKeys" >> beam.FlatMap(_negative_keys)
        ids = ({"passage": first_passages, "negative": negatives}
               | "ByText" >> beam.CoGroupByKey() | "NegativeIds" >> beam.FlatMap(_negative_ids))
    else:
        ids = pipeline | "NoIds" >> beam.Create([])
    by_shard = {
        "rows": rows | "RowShard" >> beam.Map(lambda e, p: (_shard_of(e[0], p), e), plan_input),
        "ids": ids | "IdShard" >> beam.Map(lambda e, p: (_shard_of(e[0], p), e), plan_input)}
    _ = (by_shard | "ByShard" >> beam.CoGroupByKey()
         | "Write" >> beam.Map(_write_shard, plan_input, folder, vocabulary, settings))


def prepare_with_beam(data: files.PathOrPaths, vocabulary: str, output: str,
                      settings: prepare.Settings, *, shards: int = 1,
                      runner: str = "DirectRunner", pipeline_options: Sequence[str] = (),
                      on_bad_line: str = "error", split: str = "train",
                      overwrite: bool = False, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """`prepare.prepare`'s folder, written by a Beam pipeline on `runner` (module docstring).

    `pipeline_options` are Beam's own flags (`--project=...`, `--direct_num_workers=2`);
    `chunk_bytes` is the bytes of a file one worker reads at a time. Returns the manifest.
    """
    beam = _beam()
    prepare.check_settings(settings, shards)
    if on_bad_line not in ("error", "skip"):
        raise ConfigError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    output_folder.check_target(output, overwrite, flag="--output")
    tokenizer = Tokenizer(vocabulary)  # checks the model before the long run
    paths = expand_paths(data)
    items = _items(paths, chunk_bytes)
    options = beam.options.pipeline_options.PipelineOptions(list(pipeline_options))
    with output_folder.write_atomically(output, overwrite, flag="--output") as folder:
        with beam.Pipeline(runner=runner, options=options) as pipeline:
            _pipeline(beam, pipeline, items, folder=folder, vocabulary=tokenizer.path,
                      settings=settings, shards=shards, on_bad_line=on_bad_line,
                      split=split, paths=paths)
        plan = _load(os.path.join(folder, _PLAN))
        for warning in plan.warnings:
            _LOG.warning(warning)
        if plan.error is not None:
            raise _exception(plan.error)
        results = [_load(os.path.join(folder, _RESULT.format(shard)))
                   for shard in range(len(plan.bounds) - 1)]
        lengths = np.concatenate([result["lengths"] for result in results])
        np.save(os.path.join(folder, prepared.LENGTHS), lengths)
        content = prepare.manifest(
            num_examples=plan.bounds[-1], has_labels=plan.has_labels, settings=settings,
            vocabulary=tokenizer.path, sources=paths, skipped_lines=plan.skipped,
            bounds=plan.bounds, lengths=lengths,
            pieces=[piece for result in results for piece in result["pieces"]])
        prepare.write_manifest(folder, content)
    return content


def _load(path: str) -> Any:
    with open(path, "rb") as file:
        value = pickle.load(file)
    os.remove(path)
    return value
