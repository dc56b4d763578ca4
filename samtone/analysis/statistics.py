"""The numbers of an embedding space (the SamToNe paper, section 4): numpy only, no plotting.

Distances are 1 - cosine. Pairs are (query index, passage index) into the two embedding
arrays; embeddings are L2-normalised first.

`embedding_summary`, for unit-normalised queries q_i, passages p_j and true pairs (i, j) in P:
  mean_query_query_cosine      mean over i != i' of q_i . q_i'
  mean_passage_passage_cosine  mean over j != j' of p_j . p_j'
  mean_query_passage_cosine    mean over all i, j of q_i . p_j
  mean_positive_distance       mean over P of 1 - q_i . p_j
  alignment                    mean over P of ||q_i - p_j||^2 (Wang & Isola 2020, alpha = 2;
                               for unit vectors 2 x mean_positive_distance)
  query_uniformity             log mean over i < i' of exp(-2 ||q_i - q_i'||^2) (t = 2);
  passage_uniformity           the same over passages. Lower is more uniform.

`similarity_samples` (figure 6), over the true pairs e = (a_e, b_e): for ordered pairs of
examples e != f, query_query = q_{a_e} . q_{a_f} (skipped when a_e = a_f, one query twice)
and query_passage = q_{a_e} . p_{b_f} (skipped when (a_e, b_f) is itself a true pair). All
ordered pairs when there are at most `max_samples`, else that many drawn at random.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from samtone.normalize import l2_normalize

Pairs = Sequence[tuple[int, int]]
# Rows of a similarity matrix computed at once, bounding memory to BLOCK_ROWS x N floats.
BLOCK_ROWS = 1024


def unit_embeddings(embeddings: np.ndarray, name: str) -> np.ndarray:
    """`embeddings` as float64 rows of norm 1; `name` says which in the error."""
    embeddings = np.asarray(embeddings, np.float64)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {embeddings.shape}")
    return l2_normalize(embeddings)


def check_pairs(pairs: Pairs, num_queries: int, num_passages: int) -> np.ndarray:
    """`pairs` as an int [P, 2] array, every index inside the embeddings."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    bad = [(int(q), int(p)) for q, p in pairs
           if not (0 <= q < num_queries and 0 <= p < num_passages)]
    if bad:
        raise ValueError(f"pairs {bad[:5]} name queries or passages outside the {num_queries} "
                         f"query and {num_passages} passage embeddings")
    return pairs


def _similarity_blocks(a: np.ndarray, b: np.ndarray, *, exclude_diagonal: bool
                       ) -> Iterable[np.ndarray]:
    """Blocks of rows of a @ b.T; the diagonal set to NaN if asked (a is b)."""
    for start in range(0, len(a), BLOCK_ROWS):
        block = a[start:start + BLOCK_ROWS] @ b.T
        if exclude_diagonal:
            rows = np.arange(len(block))
            block[rows, start + rows] = np.nan
        yield block


def _mean_cosine_between_distinct(unit: np.ndarray) -> float:
    """mean over i != j of u_i . u_j, from ||sum u||^2 = sum_ij u_i . u_j in O(N D)."""
    count = len(unit)
    total = unit.sum(axis=0)
    return float((total @ total - np.sum(unit * unit)) / (count * (count - 1)))


def _uniformity(unit: np.ndarray, t: float = 2.0) -> float:
    """log mean over i < j of exp(-t ||u_i - u_j||^2); pairs i != j count each twice, which
    leaves the mean unchanged."""
    # ||u_i - u_j||^2 = 2 - 2 u_i . u_j lies in [0, 4]: exp never underflows in float64.
    total = sum(np.nansum(np.exp(-t * (2.0 - 2.0 * block)))
                for block in _similarity_blocks(unit, unit, exclude_diagonal=True))
    return float(np.log(total / (len(unit) * (len(unit) - 1))))


def embedding_summary(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                      pairs: Pairs) -> dict[str, float]:
    """The numbers of the module docstring; embeddings are L2-normalised first."""
    queries = unit_embeddings(query_embeddings, "query_embeddings")
    passages = unit_embeddings(passage_embeddings, "passage_embeddings")
    if queries.shape[1] != passages.shape[1]:
        raise ValueError(f"queries are {queries.shape[1]}-d but passages {passages.shape[1]}-d")
    if len(queries) < 2 or len(passages) < 2:
        raise ValueError("embedding_summary needs at least 2 queries and 2 passages, got "
                         f"{len(queries)} and {len(passages)}")
    pairs = check_pairs(pairs, len(queries), len(passages))
    if not len(pairs):
        raise ValueError("embedding_summary needs at least one true (query, passage) pair")
    positive_cosine = np.sum(queries[pairs[:, 0]] * passages[pairs[:, 1]], axis=1)
    squared_distance = np.sum((queries[pairs[:, 0]] - passages[pairs[:, 1]]) ** 2, axis=1)
    return {
        "mean_query_query_cosine": _mean_cosine_between_distinct(queries),
        "mean_passage_passage_cosine": _mean_cosine_between_distinct(passages),
        "mean_query_passage_cosine": float(queries.sum(axis=0) @ passages.sum(axis=0)
                                           / (len(queries) * len(passages))),
        "mean_positive_distance": float(np.mean(1.0 - positive_cosine)),
        "alignment": float(np.mean(squared_distance)),
        "query_uniformity": _uniformity(queries),
        "passage_uniformity": _uniformity(passages),
    }


def embedding_distances(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                        pairs: Pairs) -> dict[str, np.ndarray]:
    """Distances (1 - cosine) behind `figures.distance_histograms`:

      query_top1_passage       [Nq] each query to its highest-scoring passage
      query_true_passage       [Nq] each query to its closest true passage (NaN: none)
      query_nearest_query      [Nq] each query to its nearest other query
      passage_nearest_passage  [Np] each passage to its nearest other passage
    """
    queries = unit_embeddings(query_embeddings, "query_embeddings")
    passages = unit_embeddings(passage_embeddings, "passage_embeddings")
    pairs = check_pairs(pairs, len(queries), len(passages))
    true_cosine = np.full(len(queries), -np.inf)
    np.maximum.at(true_cosine, pairs[:, 0], np.sum(queries[pairs[:, 0]] * passages[pairs[:, 1]],
                                                   axis=1))

    def nearest(a, b, exclude_diagonal):
        if exclude_diagonal and len(a) < 2:
            return np.full(len(a), np.nan)  # no other point
        blocks = _similarity_blocks(a, b, exclude_diagonal=exclude_diagonal)
        return 1.0 - np.concatenate([np.nanmax(block, axis=1) for block in blocks])

    return {
        "query_top1_passage": nearest(queries, passages, False),
        "query_true_passage": np.where(np.isfinite(true_cosine), 1.0 - true_cosine, np.nan),
        "query_nearest_query": nearest(queries, queries, True),
        "passage_nearest_passage": nearest(passages, passages, True),
    }


def similarity_samples(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                       pairs: Pairs, *, max_samples: int = 100_000, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """Cosines behind `figures.similarity_histogram` (figure 6; module docstring):

      query_query    q_{a_e} . q_{a_f} for examples e != f with different queries
      query_passage  q_{a_e} . p_{b_f} for examples e != f, (a_e, b_f) not a true pair
    """
    queries = unit_embeddings(query_embeddings, "query_embeddings")
    passages = unit_embeddings(passage_embeddings, "passage_embeddings")
    pairs = np.unique(check_pairs(pairs, len(queries), len(passages)), axis=0)
    count = len(pairs)
    if count < 2:
        raise ValueError(f"similarity_samples needs at least 2 true pairs, got {count}")
    if count * (count - 1) <= max_samples:  # every ordered pair e != f
        first, second = np.nonzero(~np.eye(count, dtype=bool))
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, count, max_samples)
        second = (first + rng.integers(1, count, max_samples)) % count  # never e itself
    query_e, query_f, passage_f = pairs[first, 0], pairs[second, 0], pairs[second, 1]
    true_keys = pairs[:, 0] * len(passages) + pairs[:, 1]  # sorted: pairs are unique-sorted
    cross_keys = query_e * len(passages) + passage_f
    position = np.minimum(np.searchsorted(true_keys, cross_keys), len(true_keys) - 1)
    cross = true_keys[position] != cross_keys
    same_query = query_e == query_f
    return {
        "query_query": np.sum(queries[query_e[~same_query]] * queries[query_f[~same_query]],
                              axis=1),
        "query_passage": np.sum(queries[query_e[cross]] * passages[passage_f[cross]], axis=1),
    }
