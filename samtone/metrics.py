"""Retrieval metrics of a run (each query's top-k list) against graded qrels, as trec_eval
computes them; and rank / linear correlations for graded (STS) pairs. Pure numpy, vectorised.

Inputs:
  run     int [Nq, K] corpus indices, row i the ranked list of query i, best first; -1 marks
          an empty slot (fewer than K results). `trec_order` puts a scored list in the order
          trec_eval reads it.
  qrels   `Qrels`: parallel arrays (query index, passage index, grade). A passage is relevant
          when its grade is > 0 (trec_eval's relevance level 1 for integer grades).

Conventions, those of trec_eval (and so of pytrec_eval and BEIR's published numbers):
  * The evaluated queries are those that appear in the qrels, whatever their grades: a query
    whose judgements are all 0, or none of whose relevant passages is retrieved, scores 0
    and counts in the mean.
  * A run is ranked by descending score; equal scores rank the larger document id first
    (trec_eval compares document ids with strcmp: "d2" before "d10" before "d1").
  * nDCG@k uses the linear gain (gain = grade) and the discount 1 / log2(rank + 1); the ideal
    ranking is that of every relevant passage in the qrels, retrieved or not.
  * MRR@k = 1 / rank of the first relevant passage within the top k, else 0.
  * Recall@k = relevant passages in the top k / relevant passages in the qrels (0 if none).

Only the top-k lists are needed, never the full score matrix, so a corpus of millions costs
O(Nq K) here (the search itself is samtone.search). `per_query_metrics` gives each query's
values, `bootstrap_intervals` a percentile bootstrap interval over queries of their means.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

# The report of samtone-eval and of evaluation during training, in this order.
RETRIEVAL_METRICS = ("P@1", "MRR@10", "NDCG@10", "Recall@1", "Recall@10", "Recall@100")
# The run depth those need: Recall@100 reads the top 100.
REQUIRED_DEPTH = 100


class Qrels(NamedTuple):
    """Relevance judgements as parallel arrays; one entry per judged (query, passage) pair."""

    queries: np.ndarray  # int64 [M] query index (a row of the run)
    passages: np.ndarray  # int64 [M] corpus index
    grades: np.ndarray  # float64 [M]; > 0 relevant

    @classmethod
    def from_dict(cls, qrels: Mapping[int, Mapping[int, float]]) -> Qrels:
        """From {query index: {passage index: grade}}."""
        triples = [(int(q), int(p), float(g)) for q, judged in qrels.items()
                   for p, g in judged.items()]
        queries, passages, grades = (np.array(column, dtype) for column, dtype in zip(
            zip(*triples) if triples else ((), (), ()), (np.int64, np.int64, np.float64)))
        return cls(queries, passages, grades)

    def evaluated_queries(self) -> np.ndarray:
        """The query indices that count in the means: every query with a judgement."""
        return np.unique(self.queries)


def trec_order(scores: np.ndarray, indices: np.ndarray, id_order: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each row of a scored top-k list re-sorted as trec_eval ranks it.

    Args:
      scores: float [Nq, K]; -inf where `indices` is -1.
      indices: int [Nq, K] corpus indices, -1 for an empty slot.
      id_order: int [N], each passage's position when the document ids are sorted
        ascending (`id_order(ids)`); breaks ties, the larger id first.

    Returns:
      (scores, indices) by descending score, ties by descending document id, empty last.
    """
    scores, indices = np.asarray(scores), np.asarray(indices, np.int64)
    missing = indices < 0
    tie_break = np.where(missing, -1, np.asarray(id_order)[np.where(missing, 0, indices)])
    # lexsort: the last key is the primary one. Empty slots go last whatever their score.
    order = np.lexsort((-tie_break, -scores.astype(np.float64), missing), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(indices, order, -1)


def id_order(ids: Sequence[str]) -> np.ndarray:
    """int64 [N]: the rank of each id among `ids` sorted ascending by code point (= strcmp on
    UTF-8 bytes, as trec_eval compares them)."""
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def run_grades(run: np.ndarray, qrels: Qrels) -> np.ndarray:
    """float64 [Nq, K]: the grade of each retrieved passage (0 if unjudged or empty)."""
    run = np.asarray(run, np.int64)
    if run.ndim != 2:
        raise ValueError(f"a run must be [num_queries, k] corpus indices, got shape {run.shape}")
    if not len(qrels.queries):
        return np.zeros(run.shape)
    width = max(int(qrels.passages.max()), int(run.max(initial=0))) + 1
    keys = qrels.queries * width + qrels.passages
    order = np.argsort(keys)
    sorted_keys, sorted_grades = keys[order], qrels.grades[order]
    duplicates = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(duplicates):
        key = sorted_keys[duplicates[0]]
        raise ValueError(f"qrels judge query {key // width} and passage {key % width} twice")
    run_keys = np.arange(len(run))[:, None] * width + run
    position = np.minimum(np.searchsorted(sorted_keys, run_keys), len(sorted_keys) - 1)
    found = (sorted_keys[position] == run_keys) & (run >= 0)
    return np.where(found, sorted_grades[position], 0.0)


def per_query_metrics(run: np.ndarray, qrels: Qrels,
                      names: Sequence[str] = RETRIEVAL_METRICS) -> dict[str, np.ndarray]:
    """Each metric of `names` for each evaluated query (ascending query index).

    Names: "P@k", "MRR@k", "NDCG@k", "Recall@k" for any k. The run must hold a row for every
    query the qrels name.
    """
    run = np.asarray(run, np.int64)
    queries = qrels.evaluated_queries()
    if len(queries) and (queries[0] < 0 or queries[-1] >= len(run)):
        bad = queries[(queries < 0) | (queries >= len(run))][0]
        raise ValueError(f"qrels name query {bad}, but the run has {len(run)} rows")
    if len(qrels.passages) and qrels.passages.min() < 0:
        raise ValueError(f"qrels name passage {qrels.passages.min()}")
    grades = run_grades(run, qrels)[queries]
    relevant = grades > 0
    positive = qrels.grades > 0
    num_relevant = np.bincount(qrels.queries[positive], minlength=len(run))[queries]
    result = {}
    for name in names:
        kind, k = _parse_name(name)
        top = relevant[:, :k]
        if kind == "P":
            value = top.sum(axis=1) / k
        elif kind == "MRR":
            first = np.argmax(top, axis=1)
            value = np.where(top.any(axis=1), 1.0 / (first + 1), 0.0)
        elif kind == "Recall":
            value = np.divide(top.sum(axis=1), num_relevant, out=np.zeros(len(queries)),
                              where=num_relevant > 0)
        else:  # NDCG
            gains = np.where(relevant, grades, 0.0)[:, :k]
            dcg = np.sum(gains / np.log2(np.arange(2, gains.shape[1] + 2)), axis=1)
            ideal = _ideal_dcg(qrels, k, len(run))[queries]
            value = np.divide(dcg, ideal, out=np.zeros(len(queries)), where=ideal > 0)
        result[name] = value
    return result


def retrieval_metrics(run: np.ndarray, qrels: Qrels,
                      names: Sequence[str] = RETRIEVAL_METRICS) -> dict[str, float]:
    """The mean over evaluated queries of each metric of `names` (nan if no query)."""
    return {name: float(np.mean(values)) if len(values) else float("nan")
            for name, values in per_query_metrics(run, qrels, names).items()}


# Confidence intervals of the means: a percentile bootstrap over queries.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_CONFIDENCE = 0.95


def bootstrap_intervals(per_query: Mapping[str, np.ndarray], *,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        confidence: float = BOOTSTRAP_CONFIDENCE
                        ) -> dict[str, tuple[float, float]]:
    """A percentile bootstrap interval of the mean of each metric over the queries.

    Resample b (b = 0 .. resamples-1, in order) draws n = len(values) query positions with
    replacement, `rng.integers(0, n, size=n)` of `rng = np.random.default_rng(seed)`; every
    metric is averaged over the same draw (the metrics of one query stay together). The
    interval is `np.percentile(means, [50 - 50c, 50 + 50c])` (numpy's default linear
    interpolation) of the `resamples` means, c = `confidence`. Deterministic for a seed;
    (nan, nan) without queries.
    """
    names = list(per_query)
    if not names:
        return {}
    values = np.stack([np.asarray(per_query[name], np.float64) for name in names])
    count = values.shape[1]
    if count == 0:
        return {name: (float("nan"), float("nan")) for name in names}
    rng = np.random.default_rng(seed)
    means = np.empty((len(names), resamples))
    for resample in range(resamples):  # one draw at a time: memory O(n), not O(resamples n)
        means[:, resample] = values[:, rng.integers(0, count, size=count)].mean(axis=1)
    tail = 50.0 * (1.0 - confidence)
    bounds = np.percentile(means, [tail, 100.0 - tail], axis=1)
    return {name: (float(bounds[0, i]), float(bounds[1, i])) for i, name in enumerate(names)}


def _parse_name(name: str) -> tuple[str, int]:
    kind, _, k = name.partition("@")
    if kind not in ("P", "MRR", "NDCG", "Recall") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"unknown metric {name!r}; expected P@k, MRR@k, NDCG@k or Recall@k")
    return kind, int(k)


def _ideal_dcg(qrels: Qrels, k: int, num_queries: int) -> np.ndarray:
    """float64 [num_queries]: the DCG@k of each query's relevant passages in grade order."""
    positive = qrels.grades > 0
    queries, grades = qrels.queries[positive], qrels.grades[positive]
    order = np.lexsort((-grades, queries))  # by query, then grade descending
    queries, grades = queries[order], grades[order]
    position = np.arange(len(queries)) - np.searchsorted(queries, queries, side="left")
    kept = position < k
    return np.bincount(queries[kept], weights=grades[kept] / np.log2(position[kept] + 2.0),
                       minlength=num_queries)


# --- correlation of graded pairs ---------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    new_run = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    starts = np.flatnonzero(new_run)
    run_of = np.cumsum(new_run) - 1
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = run_rank[run_of]
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r (nan if either side is constant or there are fewer than 2 values)."""
    x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"correlation needs equal lengths, got {x.shape[0]} and {y.shape[0]}")
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of average ranks (nan if either side is constant)."""
    x, y = np.ravel(x), np.ravel(y)
    if x.shape != y.shape:
        raise ValueError(f"correlation needs equal lengths, got {x.shape[0]} and {y.shape[0]}")
    return pearson(average_ranks(x), average_ranks(y))
