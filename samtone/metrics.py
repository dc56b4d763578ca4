"""Retrieval and rank-correlation metrics: pure numpy over a score matrix and qrels.

Inputs:
  scores  float [Nq, Np], higher = more similar (query i vs passage j).
  qrels   dict[int, dict[int, int]]: query index -> passage index -> graded relevance.
          A passage is relevant when its grade is > 0; grades <= 0 are the same as absent.

Conventions (kept identical across every function here):
  * Ranking: passages sorted by descending score; exact ties are broken by passage index,
    the lower index ranking first. Ranks start at 1.
  * Queries without any passage of relevance > 0 are skipped: they add nothing to the
    numerator or the denominator of the mean (ranx does the same for queries missing from
    its qrels under `make_comparable=True`; note ranx scores a query whose qrels hold only
    zero grades as 0, where we skip it). If no query remains, the result is nan.
  * nDCG uses trec_eval's (and ranx's "ndcg") linear gain, gain = rel, with the discount
    1 / log2(rank + 1); `gain="exponential"` gives 2^rel - 1 (ranx's "ndcg_burges").

Every metric only needs the rank of each relevant passage, which is computed exactly from
the scores row (rank = #higher scores + #equal scores at lower index + 1) without sorting
the whole corpus. `relevant_ranks` exposes that step so callers can score a large corpus in
blocks of queries and average afterwards (see samtone.evaluate.retrieval_metrics).
"""
from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

Qrels = Mapping[int, Mapping[int, int]]

_MAX_COMPARISONS = 1 << 24


class RelevantRanks(NamedTuple):
    """The ranks (1-based, ascending) of one query's relevant passages, with their grades."""

    ranks: np.ndarray  # int64 [R]
    grades: np.ndarray  # float64 [R], all > 0, aligned with ranks


def relevant_ranks(
    scores: np.ndarray, qrels: Qrels, query_indices: Sequence[int] | None = None
) -> list[RelevantRanks]:
    """Ranks of the relevant passages of each query that has at least one.

    Args:
      scores: [Nq, Np] scores; row r belongs to query `query_indices[r]`.
      qrels: query index -> passage index -> grade (global indices).
      query_indices: the query index of each row; defaults to range(Nq). Lets a caller pass
        one block of rows of a larger score matrix.

    Returns:
      One RelevantRanks per row whose query has a relevant passage, in row order.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a [num_queries, num_passages] matrix, got shape {scores.shape}")
    num_rows, num_passages = scores.shape
    if query_indices is None:
        query_indices = range(num_rows)
        _check_query_indices(qrels, num_rows)
    elif len(query_indices) != num_rows:
        raise ValueError(f"{len(query_indices)} query_indices for {num_rows} score rows")
    passage_positions = np.arange(num_passages)
    # Relevant passages compared against the whole row at a time, bounding the temporary
    # [chunk, Np] comparison matrices to about _MAX_COMPARISONS elements.
    chunk = max(1, _MAX_COMPARISONS // max(num_passages, 1))
    result = []
    for row, query in enumerate(query_indices):
        judged = {p: g for p, g in qrels.get(int(query), {}).items() if g > 0}
        if not judged:
            continue
        passages = np.fromiter(judged.keys(), dtype=np.int64, count=len(judged))
        if passages.min() < 0 or passages.max() >= num_passages:
            bad = int(passages[(passages < 0) | (passages >= num_passages)][0])
            raise ValueError(
                f"qrels[{query}] names passage {bad}, but there are {num_passages} passages"
            )
        grades = np.fromiter(judged.values(), dtype=np.float64, count=len(judged))
        row_scores = scores[row]
        if np.isnan(row_scores).any():
            raise ValueError(f"scores for query {query} contain NaN")
        ranks = np.concatenate([
            _ranks_of(row_scores, passages[start:start + chunk], passage_positions)
            for start in range(0, len(passages), chunk)
        ])
        order = np.argsort(ranks, kind="stable")
        result.append(RelevantRanks(ranks[order].astype(np.int64), grades[order]))
    return result


def _ranks_of(row_scores: np.ndarray, passages: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """1-based ranks of `passages` in one row: higher scores first, ties by lower index."""
    own = row_scores[passages][:, None]
    higher = np.count_nonzero(row_scores[None, :] > own, axis=1)
    tied_before = np.count_nonzero((row_scores[None, :] == own) & (positions[None, :] < passages[:, None]), axis=1)
    return higher + tied_before + 1


def _check_query_indices(qrels: Qrels, num_queries: int) -> None:
    for query in qrels:
        if not 0 <= int(query) < num_queries:
            raise ValueError(f"qrels names query {query}, but scores has {num_queries} rows")


# Per-query metrics on one RelevantRanks. `k=None` means no cut-off.


def reciprocal_rank(query: RelevantRanks, k: int | None = None) -> float:
    best = int(query.ranks[0])
    return 1.0 / best if k is None or best <= k else 0.0


def recall(query: RelevantRanks, k: int) -> float:
    return float(np.count_nonzero(query.ranks <= k)) / len(query.ranks)


def ndcg(query: RelevantRanks, k: int, gain: str = "linear") -> float:
    gains = _gains(query.grades, gain)
    retrieved = query.ranks <= k
    dcg = np.sum(gains[retrieved] / np.log2(query.ranks[retrieved] + 1.0))
    ideal = np.sort(gains)[::-1][:k]
    idcg = np.sum(ideal / np.log2(np.arange(2, len(ideal) + 2)))
    return float(dcg / idcg)


def _gains(grades: np.ndarray, gain: str) -> np.ndarray:
    if gain == "linear":
        return grades
    if gain == "exponential":
        return np.exp2(grades) - 1.0
    raise ValueError(f"gain must be 'linear' or 'exponential', got {gain!r}")


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


# Averages over queries with a relevant passage.


def precision_at_1(scores: np.ndarray, qrels: Qrels) -> float:
    """Fraction of queries whose top-ranked passage is relevant."""
    return _mean(float(q.ranks[0] == 1) for q in relevant_ranks(scores, qrels))


def mean_reciprocal_rank(scores: np.ndarray, qrels: Qrels, k: int | None = None) -> float:
    """Mean of 1 / rank of the first relevant passage (0 if that rank exceeds k)."""
    return _mean(reciprocal_rank(q, k) for q in relevant_ranks(scores, qrels))


def ndcg_at_k(scores: np.ndarray, qrels: Qrels, k: int = 10, gain: str = "linear") -> float:
    """Mean nDCG@k: sum_{rank<=k} gain(rel) / log2(rank + 1), over the ideal ordering's value."""
    return _mean(ndcg(q, k, gain) for q in relevant_ranks(scores, qrels))


def recall_at_k(scores: np.ndarray, qrels: Qrels, k: int = 10) -> float:
    """Mean fraction of a query's relevant passages ranked in the top k."""
    return _mean(recall(q, k) for q in relevant_ranks(scores, qrels))


def summarize(queries: Sequence[RelevantRanks], k: int = 10) -> dict[str, float]:
    """The standard report over precomputed ranks: p@1, uncut MRR, nDCG@k, recall@k."""
    return {
        "p@1": _mean(float(q.ranks[0] == 1) for q in queries),
        "mrr": _mean(reciprocal_rank(q) for q in queries),
        f"ndcg@{k}": _mean(ndcg(q, k) for q in queries),
        f"recall@{k}": _mean(recall(q, k) for q in queries),
    }


# Rank correlation.


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run_of = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = run_rank[run_of]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of average ranks (nan if either side is constant)."""
    x, y = np.ravel(x), np.ravel(y)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.shape[0]} and {y.shape[0]}")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    return float(np.sum(rx * ry) / denominator) if denominator > 0 else float("nan")
