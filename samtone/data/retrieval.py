"""Evaluation data: a corpus, queries and graded judgements (`RetrievalSet`), or graded pairs.

    data = read_retrieval_set("beir/scifact", split="test")   # a BEIR folder
    data = read_retrieval_set("heldout.jsonl")                # held-out pairs (training formats)

A BEIR folder gives its whole `corpus.jsonl` (title + " " + text), the queries its
`qrels/<split>.tsv` judges (in order of first judgement) and every judgement, grade 0
included. Nothing is skipped: a missing file or split, a qrel naming an unknown document or
query, an id used twice, a pair judged twice or a corpus line without `text` is a DataError
(or MissingFileError) naming the file, the line and the id.

Held-out pairs (JSONL, TSV, globs; samtone.data.files) give a corpus of their unique passages
and the unique queries, each relevant (grade 1) to every passage it is paired with. Their
ids are the files' `query_id` / `passage_id` when each text has exactly one id and each id one
text; otherwise generated (`q<n>`, `p<n>`, in order of first appearance).

`is_graded(examples)`: pairs with a label on every example and at least two distinct labels
are graded (STS / CoSENT data), evaluated by correlation (samtone.evaluate), not retrieval.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from samtone.data import files
from samtone.errors import ConfigError
from samtone.metrics import Qrels


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """Queries, a corpus and judgements; qrels index into the two lists."""

    name: str  # e.g. "scifact" (a folder's name) or "heldout" (a file's stem)
    query_ids: list[str]
    queries: list[str]
    passage_ids: list[str]
    passages: list[str]
    qrels: Qrels

    def __post_init__(self):
        if len(self.query_ids) != len(self.queries) or len(self.passage_ids) != len(
                self.passages):
            raise ValueError("RetrievalSet needs one id per query and one per passage")


def data_name(paths: files.PathOrPaths, split: str | None = None) -> str:
    """A short name for output folders: a BEIR folder's name (with `-<split>` unless the split
    is "test"), a file's name without extension, names joined by '+'."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    names = []
    for path in map(os.fspath, paths):
        base = os.path.basename(path.rstrip("/")) or "data"
        if os.path.isdir(path):
            names.append(base if split in (None, "test") else f"{base}-{split}")
        else:
            names.append(base.split(".")[0].replace("*", "all") or "data")
    return "+".join(names)


def beir_folder(paths: files.PathOrPaths) -> str | None:
    """The folder when `paths` is one folder (a path or a list of one), else None."""
    if not isinstance(paths, (str, os.PathLike)):
        if len(paths) != 1:
            return None
        (paths,) = paths
    return os.fspath(paths) if os.path.isdir(os.fspath(paths)) else None


def read_retrieval_set(paths: files.PathOrPaths, split: str = "test") -> RetrievalSet:
    """A BEIR folder (its `split`) or held-out pairs; see the module docstring."""
    folder = beir_folder(paths)
    if folder is not None:
        return read_beir(folder, split)
    expanded = files.expand_paths(paths)
    folders = [path for path in expanded if os.path.isdir(path)]
    if folders:
        raise ConfigError(f"{folders[0]} is a BEIR folder: give it alone, not with other data")
    return from_examples(files.read_examples(expanded), data_name(paths))


def read_beir(folder: str | os.PathLike, split: str = "test") -> RetrievalSet:
    """The whole corpus, the judged queries and the judgements of `qrels/<split>.tsv`."""
    corpus_path, queries_path, qrels_path = files.beir_files(folder, split)
    corpus = files.read_beir_texts(corpus_path)
    queries = files.read_beir_texts(queries_path)
    judgements = files.read_beir_qrels(qrels_path, queries, corpus)
    passage_ids = list(corpus)
    passage_index = {identifier: i for i, identifier in enumerate(passage_ids)}
    query_index: dict[str, int] = {}
    for query_id, _, _ in judgements:
        query_index.setdefault(query_id, len(query_index))
    qrels = Qrels(np.fromiter((query_index[q] for q, _, _ in judgements), np.int64),
                  np.fromiter((passage_index[p] for _, p, _ in judgements), np.int64),
                  np.fromiter((g for _, _, g in judgements), np.float64))
    return RetrievalSet(data_name(folder, split), list(query_index),
                        [queries[q] for q in query_index], passage_ids, list(corpus.values()),
                        qrels)


def from_examples(examples: Sequence[files.Example], name: str = "pairs") -> RetrievalSet:
    """Held-out pairs as a retrieval set: unique passages, unique queries, grade 1 pairs."""
    if not examples:
        raise ValueError("from_examples got no examples")
    queries = list(dict.fromkeys(e.query for e in examples))
    passages = list(dict.fromkeys(e.passage for e in examples))
    query_index = {text: i for i, text in enumerate(queries)}
    passage_index = {text: i for i, text in enumerate(passages)}
    pairs = np.array(sorted({(query_index[e.query], passage_index[e.passage])
                             for e in examples}), np.int64)
    return RetrievalSet(
        name, _ids(examples, "query", "query_id", queries, "q"), queries,
        _ids(examples, "passage", "passage_id", passages, "p"), passages,
        Qrels(pairs[:, 0], pairs[:, 1], np.ones(len(pairs))))


def _ids(examples: Sequence[files.Example], text_field: str, id_field: str,
         texts: list[str], prefix: str) -> list[str]:
    """The given ids if they name the texts one to one, else `<prefix><n>`."""
    given: dict[str, str] = {}
    for example in examples:
        identifier = getattr(example, id_field)
        if identifier is None or given.setdefault(getattr(example, text_field),
                                                  identifier) != identifier:
            return [f"{prefix}{n}" for n in range(len(texts))]
    ids = [given[text] for text in texts]
    return ids if len(set(ids)) == len(ids) else [f"{prefix}{n}" for n in range(len(texts))]


def is_graded(examples: Sequence[files.Example]) -> bool:
    """Every example labelled, with at least two distinct labels (STS / CoSENT pairs)."""
    labels = {e.label for e in examples}
    return bool(examples) and None not in labels and len(labels) > 1
