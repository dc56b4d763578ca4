"""Hard-negative mining with a trained dual encoder, and the `samtone-mine` command line.

    samtone-mine --model_dir=runs/base --train_data=pairs.jsonl --output=pairs_hn.jsonl --k=4 \
        [--corpus=corpus.jsonl] [--margin=0.05] [--approximate]

writes the training examples again with `negatives`: for each query, the k corpus passages
its trained encoders rank highest among those that are not its positives. The output feeds
`make_batch_iterator(num_negatives=k)` (gin: `make_batch_iterator.num_negatives = 4`).

Definition. Scores are cosines. For query i with positive passages P_i (every passage the
training data pairs with the same query text) and the weakest positive score
s_i = min_{p in P_i} cos(q_i, p), the candidates are the corpus passages c not in P_i and,
when a margin m is given, with cos(q_i, c) <= s_i - m. Candidates scoring above that are
dropped as likely false negatives (unlabelled positives): a passage nearly as close as a
known answer often is one. The mined negatives are the k best candidates, best first, ties
by lower corpus index. m = 0 drops anything scoring above the weakest positive; m < 0 lets
candidates up to |m| above it through. Queries with no positives get no threshold.

Scale. The search is samtone.search's: the corpus embeddings live on the device mesh, sharded
by rows, and queries are scored in chunks with a running top k per block of rows, so neither
host nor device ever holds a [queries x corpus] score matrix. The corpus streams from the
encoder into the index window by window (each process keeping its devices' rows), so a
corpus of millions needs about one shard of host memory; `approximate` uses
`jax.lax.approx_max_k` with a recall target instead of exact top k.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from samtone import evaluate
from samtone import output_folder
from samtone import run_dir
from samtone import search
from samtone.data import files
from samtone.inference import Encoder
from samtone.normalize import l2_normalize


def mine_hard_negatives(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                        positives: Sequence[set[int]], *, k: int, margin: float | None = None,
                        chunk_size: int | None = None, mesh: Mesh | None = None,
                        approximate: bool = False,
                        recall_target: float = 0.95) -> list[list[int]]:
    """For each query, the indices of its k hardest non-positive passages (see module doc).

    Args:
      query_embeddings: [Nq, D]; cosine similarity is used (rows are L2-normalised here).
      passage_embeddings: [Np, D], the corpus.
      positives: Nq sets of corpus indices, each query's known positives; never returned.
      k: negatives per query; fewer are returned when fewer candidates remain.
      margin: if set, drop candidates scoring above (weakest positive score - margin).
      chunk_size: queries scored at once (default: samtone.search's chunk).
      mesh: the devices holding the corpus (default: all).
      approximate, recall_target: `jax.lax.approx_max_k` instead of exact top k.

    Returns:
      Nq lists of corpus indices, highest score first.
    """
    queries = l2_normalize(np.asarray(query_embeddings, np.float32))
    passages = l2_normalize(np.asarray(passage_embeddings, np.float32))
    if queries.ndim != 2 or passages.ndim != 2 or queries.shape[1] != passages.shape[1]:
        raise ValueError(f"need [Nq, D] query and [Np, D] passage embeddings, got "
                         f"{queries.shape} and {passages.shape}")
    _check_positives(positives, len(queries), len(passages))
    index = search.PassageIndex.from_embeddings(passages, mesh)
    return mine_index(index, queries, positives, passages, k=k, margin=margin,
                      chunk_size=chunk_size, approximate=approximate,
                      recall_target=recall_target)


def mine_index(index: search.PassageIndex, queries: np.ndarray,
               positives: Sequence[set[int]], positive_embeddings: np.ndarray, *, k: int,
               margin: float | None = None, chunk_size: int | None = None,
               approximate: bool = False, recall_target: float = 0.95,
               progress: bool | None = None) -> list[list[int]]:
    """`mine_hard_negatives` against a built index of unit-norm passages.

    `queries` are unit-norm; `positive_embeddings` holds at least the rows of every index
    in `positives` (the first rows of the corpus, say), unit-norm, for the margin rule.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if margin is not None and not np.isfinite(margin):
        raise ValueError(f"margin must be a finite number or None, got {margin}")
    if len(positives) != len(queries):
        raise ValueError(f"got {len(positives)} positive sets for {len(queries)} queries")
    ceilings = None
    if margin is not None:
        rows = np.repeat(np.arange(len(positives)), [len(p) for p in positives])
        columns = np.fromiter((c for p in positives for c in sorted(p)), np.int64, len(rows))
        weakest = np.full(len(positives), np.inf, np.float32)
        np.minimum.at(weakest, rows, np.sum(queries[rows] * positive_embeddings[columns], axis=1))
        ceilings = weakest - np.float32(margin)
    _, indices = index.search(queries, k, exclude=positives, max_scores=ceilings,
                              approximate=approximate, recall_target=recall_target,
                              chunk_size=chunk_size, progress=progress)
    return [row[row >= 0].tolist() for row in indices]


def _check_positives(positives: Sequence[set[int]], num_queries: int,
                     num_passages: int) -> None:
    if len(positives) != num_queries:
        raise ValueError(f"got {len(positives)} positive sets for {num_queries} queries")
    for i, positive in enumerate(positives):
        bad = [p for p in positive if not 0 <= p < num_passages]
        if bad:
            raise ValueError(f"query {i} has positives {bad} outside the corpus of "
                             f"{num_passages} passages")


# --- mining a training file with a trained checkpoint ------------------------------------


def read_corpus(paths: files.PathOrPaths) -> list[str]:
    """Passage texts: `.txt` one per line; BEIR `corpus.jsonl` (`_id`, `text`, `title`): title
    + " " + text; other JSONL/TSV training files: their passages and negatives."""
    texts: list[str] = []
    for path in files.expand_paths(paths):
        if path.endswith(".txt"):
            texts.extend(e.passage for e in files.read_sentences(path))
        elif path.endswith(".jsonl") and _is_beir_corpus(path):
            texts.extend(files.read_beir_texts(path).values())
        else:
            for example in files.read_examples(path):
                texts.extend((example.passage, *example.negatives))
    return texts


def _is_beir_corpus(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    record = json.loads(first)
    return isinstance(record, dict) and "text" in record and "passage" not in record


@dataclasses.dataclass
class MiningStats:
    examples: int  # training examples read
    written: int  # examples written with k negatives
    dropped: int  # examples with fewer than k candidates left (small corpus or margin)
    corpus_size: int


def mine_training_file(model_dir: str, train_data: files.PathOrPaths, output: str, *, k: int,
                       margin: float | None = None, corpus: files.PathOrPaths | None = None,
                       step: int | None = None, batch_size: int = 128,
                       chunk_size: int | None = None, encoders: Encoder | None = None,
                       mesh: Mesh | None = None, approximate: bool = False,
                       recall_target: float = 0.95, overwrite: bool = False,
                       progress: bool | None = None) -> MiningStats:
    """Writes `train_data`'s examples to `output` (JSONL) with k mined `negatives` each.

    The corpus is the training passages plus `corpus`'s passages, deduplicated by text. A
    query's positives are every passage the training data pairs it with (by query text).
    Existing negatives are replaced. Examples left with fewer than k candidates are not
    written (counted in the result), so the file feeds `num_negatives=k` as is.

    An existing `output` is replaced only with `overwrite`, and an output that is an input
    (the training data, the corpus, the run) never; both are checked before anything is
    read. The file is written to a temporary sibling and renamed into place, so an
    interrupted run leaves no partial file.
    """
    _check_output(output, model_dir, train_data, corpus, overwrite)
    examples = files.read_examples(train_data)
    encoders = encoders or Encoder.load(model_dir, step=step, batch_size=batch_size)
    training_passages = _unique([e.passage for e in examples])
    passages = _unique(training_passages + (read_corpus(corpus) if corpus else []))
    passage_index = {text: i for i, text in enumerate(passages)}
    queries = _unique([e.query for e in examples])
    query_index = {text: i for i, text in enumerate(queries)}
    positives: list[set[int]] = [set() for _ in queries]
    for example in examples:
        positives[query_index[example.query]].add(passage_index[example.passage])

    started = time.perf_counter()
    # The training passages come first in the corpus: keep their embeddings while they
    # stream past, for the margin rule's positive scores.
    kept: list[np.ndarray] = []
    chunks = encoders.passage_chunks(passages, progress=progress)
    if margin is not None:
        chunks = _keeping_first(chunks, len(training_passages), kept)
    index = evaluate.build_index(chunks, len(passages), mesh)
    index.embeddings.block_until_ready()
    encoded = time.perf_counter()
    query_embeddings = l2_normalize(encoders.encode_queries(queries, progress=progress))
    logging.info("encoded %d passages in %.1fs (%.0f passages/s) and %d queries in %.1fs "
                 "(%.0f queries/s)", len(passages), encoded - started,
                 len(passages) / max(encoded - started, 1e-9), len(queries),
                 time.perf_counter() - encoded,
                 len(queries) / max(time.perf_counter() - encoded, 1e-9))
    started = time.perf_counter()
    positive_embeddings = (l2_normalize(np.concatenate(kept)) if kept
                           else np.zeros((0, query_embeddings.shape[1]), np.float32))
    mined = mine_index(index, query_embeddings, positives, positive_embeddings, k=k,
                       margin=margin, chunk_size=chunk_size, approximate=approximate,
                       recall_target=recall_target, progress=progress)
    logging.info("searched %d queries in %.1fs", len(queries), time.perf_counter() - started)
    complete = [e for e in examples if len(mined[query_index[e.query]]) >= k]
    if jax.process_index() == 0:  # every process mined the same; one writes
        with output_folder.write_file_atomically(output, overwrite) as temporary, \
                open(temporary, "w", encoding="utf-8") as f:
            for example in complete:
                negatives = [passages[i] for i in mined[query_index[example.query]]]
                f.write(json.dumps(_record(example, negatives), ensure_ascii=False) + "\n")
    written = len(complete)
    stats = MiningStats(len(examples), written, len(examples) - written, len(passages))
    logging.info("wrote %d examples with %d negatives to %s (%d dropped: fewer than %d "
                 "candidates; corpus of %d passages)", written, k, output, stats.dropped, k,
                 len(passages))
    return stats


def _check_output(output: str, model_dir: str, train_data: files.PathOrPaths,
                  corpus: files.PathOrPaths | None, overwrite: bool) -> None:
    """Refuses an output that is or holds an input, or (without `overwrite`) exists."""
    def listed(paths):
        return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or ())

    inputs = [("--model_dir", model_dir),
              *(("--train_data", path) for path in listed(train_data)),
              *(("--corpus", path) for path in listed(corpus))]
    run_dir.check_output(output, inputs, flag="--output")
    output_folder.check_file(output, overwrite)


def _keeping_first(chunks: Iterable[np.ndarray], count: int,
                   kept: list[np.ndarray]) -> Iterator[np.ndarray]:
    """`chunks` unchanged, appending their first `count` rows to `kept` on the way."""
    seen = 0
    for chunk in chunks:
        if seen < count:
            kept.append(chunk[:count - seen])
        seen += len(chunk)
        yield chunk


def _unique(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def _record(example: files.Example, negatives: list[str]) -> dict:
    record = {"query": example.query, "passage": example.passage, "negatives": negatives}
    for field in ("label", "query_id", "passage_id"):
        value = getattr(example, field)
        if value is not None:
            record[field] = value
    return record
