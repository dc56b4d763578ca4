"""samtone.metrics against pytrec_eval (trec_eval itself: ties, grades, empty results), ranx
(tie-free runs), hand-computed values, and scipy (correlations)."""
import warnings

import numpy as np
import pytest
import scipy.stats

from samtone import metrics

pytrec_eval = pytest.importorskip("pytrec_eval")
ranx = pytest.importorskip("ranx")

NUM_PASSAGES = 60


def _random_case(seed, num_queries=40, k=25, ties=True):
    """A scored top-k run and graded qrels, with the cases trec_eval treats specially:
    query 0 judged with grade 0 only, query 1 with relevant passages none of which is
    retrieved, query 2 judged nowhere (not evaluated), several graded relevant passages
    per query, and (ties=True) many equal scores."""
    rng = np.random.default_rng(seed)
    # Ids whose string order differs from the index order ("p7" > "p10" > "p1"): ties then
    # depend on trec_eval's strcmp rule, not on the corpus index.
    ids = [f"p{n}" for n in rng.permutation(NUM_PASSAGES) * 7]
    if ties:
        all_scores = rng.integers(0, 6, size=(num_queries, NUM_PASSAGES)).astype(np.float32)
    else:
        all_scores = rng.normal(size=(num_queries, NUM_PASSAGES)).astype(np.float32)
    indices = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(all_scores, indices, axis=1)
    indices[5, 20:] = -1  # a short list
    scores[5, 20:] = -np.inf
    qrels = {0: {3: 0, 5: 0}, 1: {int(p): 2 for p in np.setdiff1d(np.arange(NUM_PASSAGES),
                                                                   indices[1])[:3]}}
    for query in range(3, num_queries):
        judged = rng.choice(NUM_PASSAGES, size=rng.integers(1, 8), replace=False)
        qrels[query] = {int(p): int(g) for p, g in zip(judged, rng.integers(0, 4, len(judged)))}
    scores, indices = metrics.trec_order(scores, indices, metrics.id_order(ids))
    return scores, indices, metrics.Qrels.from_dict(qrels), qrels, ids


def _as_dicts(scores, indices, qrels, ids):
    run = {f"q{q}": {ids[p]: float(s) for p, s in zip(indices[q], scores[q]) if p >= 0}
           for q in range(len(indices))}
    judged = {f"q{q}": {ids[p]: int(g) for p, g in passages.items()}
              for q, passages in qrels.items()}
    return run, judged


PYTREC = {"P@1": "P_1", "P@5": "P_5", "NDCG@10": "ndcg_cut_10", "NDCG@3": "ndcg_cut_3",
          "Recall@1": "recall_1", "Recall@10": "recall_10", "Recall@100": "recall_100"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_metrics_equal_trec_eval(seed):
    scores, indices, qrels, qrels_dict, ids = _random_case(seed)
    run, judged = _as_dicts(scores, indices, qrels_dict, ids)
    evaluator = pytrec_eval.RelevanceEvaluator(
        judged, {"P.1,5", "ndcg_cut.3,10", "recall.1,10,100", "recip_rank"})
    expected = evaluator.evaluate(run)
    names = [*PYTREC, "MRR@10", "MRR@3"]
    ours = metrics.per_query_metrics(indices, qrels, names)
    evaluated = [f"q{q}" for q in qrels.evaluated_queries()]
    assert sorted(evaluated) == sorted(expected)  # q2 is not judged: evaluated by neither
    for name, trec_name in PYTREC.items():
        np.testing.assert_allclose(ours[name], [expected[q][trec_name] for q in evaluated],
                                   atol=1e-12, err_msg=name)
    for k in (10, 3):  # MRR@k: trec_eval's recip_rank when the first hit is within the top k
        reciprocal = np.array([expected[q]["recip_rank"] for q in evaluated])
        np.testing.assert_allclose(ours[f"MRR@{k}"],
                                   np.where(reciprocal >= 1 / k - 1e-12, reciprocal, 0.0))
    # The special queries: grade-0 only and nothing relevant retrieved both score 0.
    for query in ("q0", "q1"):
        position = evaluated.index(query)
        assert all(ours[name][position] == 0 for name in names)
    means = metrics.retrieval_metrics(indices, qrels, names)
    assert means["NDCG@10"] == pytest.approx(
        np.mean([expected[q]["ndcg_cut_10"] for q in evaluated]), abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.slow
def test_means_equal_ranx_without_ties(seed):
    scores, indices, qrels, qrels_dict, ids = _random_case(seed, ties=False)
    run, judged = _as_dicts(scores, indices, qrels_dict, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba type-safety chatter inside ranx
        expected = ranx.evaluate(ranx.Qrels(judged), ranx.Run(run),
                                 ["precision@1", "mrr@10", "ndcg@10", "recall@10"],
                                 make_comparable=True)
    ours = metrics.retrieval_metrics(indices, qrels, ["P@1", "MRR@10", "NDCG@10", "Recall@10"])
    assert list(ours.values()) == pytest.approx(list(expected.values()), abs=1e-6)


def test_trec_order_breaks_ties_by_descending_id():
    ids = ["d1", "d2", "d10", "d3"]
    scores = np.array([[0.5, 0.9, 0.5, 0.5, -np.inf]], np.float32)
    indices = np.array([[0, 3, 1, 2, -1]])
    sorted_scores, sorted_indices = metrics.trec_order(scores, indices, metrics.id_order(ids))
    # 0.9 (d3), then the 0.5 ties by strcmp descending: d2, d10, d1; the empty slot last.
    np.testing.assert_array_equal(sorted_indices, [[3, 1, 2, 0, -1]])
    np.testing.assert_array_equal(sorted_scores, np.float32([[0.9, 0.5, 0.5, 0.5, -np.inf]]))


def test_hand_computed_values():
    run = np.array([[1, 2, 3, 0], [4, -1, -1, -1]])  # query 1 retrieved one passage
    qrels = metrics.Qrels.from_dict({0: {2: 3, 0: 1, 7: 2}, 1: {5: 1}})
    found = metrics.per_query_metrics(run, qrels, ["P@1", "MRR@10", "MRR@1", "NDCG@10",
                                                   "NDCG@3", "Recall@3", "Recall@100"])
    dcg = 3 / np.log2(3) + 1 / np.log2(5)
    idcg = 3 + 2 / np.log2(3) + 1 / np.log2(4)  # grades 3, 2, 1; passage 7 never retrieved
    expected = {"P@1": [0, 0], "MRR@10": [0.5, 0], "MRR@1": [0, 0],
                "NDCG@10": [dcg / idcg, 0], "NDCG@3": [(3 / np.log2(3)) / idcg, 0],
                "Recall@3": [1 / 3, 0], "Recall@100": [2 / 3, 0]}
    for name, values in expected.items():
        np.testing.assert_allclose(found[name], values, err_msg=name)


def test_a_query_without_judgements_is_not_evaluated():
    run = np.array([[0, 1], [1, 0]])
    assert metrics.retrieval_metrics(run, metrics.Qrels.from_dict({1: {1: 1}}))["P@1"] == 1.0
    assert np.isnan(metrics.retrieval_metrics(run, metrics.Qrels.from_dict({}))["P@1"])


@pytest.mark.parametrize("qrels, names, message", [
    ({5: {0: 1}}, ["P@1"], "query 5, but the run has 2 rows"),
    ({0: {0: 1}}, ["MAP@10"], "unknown metric 'MAP@10'"),
    ({0: {0: 1}}, ["P@0"], "unknown metric 'P@0'"),
])
def test_errors_name_the_problem(qrels, names, message):
    with pytest.raises(ValueError, match=message):
        metrics.retrieval_metrics(np.zeros((2, 3), np.int64), metrics.Qrels.from_dict(qrels),
                                  names)


def test_duplicate_judgements_are_refused():
    qrels = metrics.Qrels(np.array([0, 0]), np.array([4, 4]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="query 0 and passage 4 twice"):
        metrics.retrieval_metrics(np.zeros((1, 3), np.int64), qrels)


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, size=50).astype(float)  # many ties
    y = x + rng.normal(scale=2.0, size=50)
    y[::7] = 1.0  # ties on the other side too
    assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic,
                                                   abs=1e-12)
    assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic,
                                                  abs=1e-12)


def test_average_ranks_matches_scipy():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(metrics.average_ranks(values), scipy.stats.rankdata(values))


def test_correlation_of_a_constant_is_nan():
    assert np.isnan(metrics.spearman(np.ones(5), np.arange(5)))
    assert np.isnan(metrics.pearson(np.ones(5), np.arange(5)))
