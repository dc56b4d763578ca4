"""samtone.metrics against ranx (retrieval) and scipy (Spearman)."""
import warnings

import numpy as np
import pytest
import scipy.stats

from samtone import metrics

ranx = pytest.importorskip("ranx")


def _random_case(seed, num_queries=12, num_passages=40):
    """Continuous random scores (no exact ties) and graded qrels; queries 0 and 1 have none."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(num_queries, num_passages)).astype(np.float32)
    qrels = {0: {3: 0, 5: 0}}  # judged, but nothing relevant: skipped
    for query in range(2, num_queries):
        judged = rng.choice(num_passages, size=rng.integers(1, 6), replace=False)
        grades = rng.integers(0, 4, size=len(judged))
        grades[0] = rng.integers(1, 4)  # at least one relevant passage
        qrels[query] = {int(p): int(g) for p, g in zip(judged, grades)}
    return scores, qrels


def _ranx_mean(scores, qrels, metric):
    """ranx over the queries with a relevant passage (the ones samtone averages over)."""
    kept = [q for q, judged in qrels.items() if any(g > 0 for g in judged.values())]
    ranx_qrels = ranx.Qrels({f"q{q}": {f"d{p}": g for p, g in qrels[q].items()} for q in kept})
    ranx_run = ranx.Run({f"q{q}": {f"d{p}": float(s) for p, s in enumerate(scores[q])} for q in kept})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba type-safety chatter inside ranx
        return float(ranx.evaluate(ranx_qrels, ranx_run, metric))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "ranx_metric, ours",
    [
        ("precision@1", metrics.precision_at_1),
        ("mrr", metrics.mean_reciprocal_rank),
        ("mrr@5", lambda s, q: metrics.mean_reciprocal_rank(s, q, k=5)),
        ("ndcg@10", metrics.ndcg_at_k),
        ("ndcg@3", lambda s, q: metrics.ndcg_at_k(s, q, k=3)),
        ("ndcg_burges@10", lambda s, q: metrics.ndcg_at_k(s, q, gain="exponential")),
        ("recall@10", metrics.recall_at_k),
        ("recall@4", lambda s, q: metrics.recall_at_k(s, q, k=4)),
    ],
)
def test_retrieval_metrics_match_ranx(seed, ranx_metric, ours):
    scores, qrels = _random_case(seed)
    assert ours(scores, qrels) == pytest.approx(_ranx_mean(scores, qrels, ranx_metric), abs=1e-6)


def test_summarize_over_blocks_equals_whole_matrix():
    scores, qrels = _random_case(3)
    blocks = [
        metrics.relevant_ranks(scores[start:start + 5], qrels, range(start, min(start + 5, len(scores))))
        for start in range(0, len(scores), 5)
    ]
    summary = metrics.summarize([q for block in blocks for q in block])
    assert summary == pytest.approx({
        "p@1": metrics.precision_at_1(scores, qrels),
        "mrr": metrics.mean_reciprocal_rank(scores, qrels),
        "ndcg@10": metrics.ndcg_at_k(scores, qrels),
        "recall@10": metrics.recall_at_k(scores, qrels),
    })


def test_ties_break_by_lower_passage_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.5]])
    ranks = metrics.relevant_ranks(scores, {0: {3: 1, 0: 2, 2: 1}})[0]
    # Order: passage 1 (0.9), then the 0.5 ties by index: 0, 2, 3.
    np.testing.assert_array_equal(ranks.ranks, [2, 3, 4])
    np.testing.assert_array_equal(ranks.grades, [2, 1, 1])
    assert metrics.precision_at_1(scores, {0: {1: 1}}) == 1.0
    assert metrics.mean_reciprocal_rank(scores, {0: {2: 1}}) == pytest.approx(1 / 3)


def test_hand_computed_ndcg_and_recall():
    scores = np.array([[0.1, 0.4, 0.3, 0.2]])  # ranking: 1, 2, 3, 0
    qrels = {0: {2: 3, 0: 1}}  # ranks 2 and 4
    dcg = 3 / np.log2(3) + 1 / np.log2(5)
    idcg = 3 / np.log2(2) + 1 / np.log2(3)
    assert metrics.ndcg_at_k(scores, qrels) == pytest.approx(dcg / idcg)
    assert metrics.ndcg_at_k(scores, qrels, k=3) == pytest.approx((3 / np.log2(3)) / idcg)
    assert metrics.recall_at_k(scores, qrels, k=3) == 0.5
    assert metrics.mean_reciprocal_rank(scores, qrels, k=1) == 0.0


def test_queries_without_relevant_passages_are_skipped():
    scores = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert metrics.precision_at_1(scores, {0: {0: 1}, 1: {1: 0}}) == 1.0
    assert np.isnan(metrics.precision_at_1(scores, {}))


@pytest.mark.parametrize(
    "qrels, message",
    [({5: {0: 1}}, "query 5"), ({0: {7: 1}}, "passage 7")],
)
def test_bad_qrels_name_the_offender(qrels, message):
    with pytest.raises(ValueError, match=message):
        metrics.precision_at_1(np.zeros((2, 3)), qrels)


@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, size=50).astype(float)  # many ties
    y = x + rng.normal(scale=2.0, size=50)
    y[::7] = 1.0  # ties on the other side too
    expected = scipy.stats.spearmanr(x, y).statistic
    assert metrics.spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_average_ranks_matches_scipy():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(metrics.average_ranks(values), scipy.stats.rankdata(values))


def test_spearman_of_constant_is_nan():
    assert np.isnan(metrics.spearman(np.ones(5), np.arange(5)))
