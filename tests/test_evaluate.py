"""samtone.evaluate on hand-made corpora whose metrics are known, with a fake tokenizer."""
import dataclasses

import jax
import numpy as np
import pytest
import scipy.stats

from samtone import evaluate, metrics

NUM_TOPICS = 6
LENGTH = 4


@dataclasses.dataclass(frozen=True)
class FakeExample:
    query: str
    passage: str
    label: float | None = None


class TopicTokenizer:
    """'topic3 ...' -> [3 + 2, 1, 0, 0]: one content token, EOS, padding."""

    def encode(self, texts, max_length):
        tokens = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            tokens[row, 0] = int(text.split()[0].removeprefix("topic")) + 2
            tokens[row, 1] = 1
        return tokens


def topic_of(tokens):
    return tokens[:, 0] - 2


def one_hot_encoder(tokens):
    return np.eye(NUM_TOPICS, dtype=np.float32)[topic_of(tokens)]


def shifted_encoder(tokens):
    """Passage of topic t -> e_{t+1} + 0.5 e_t: query t prefers passage t-1, then passage t."""
    topics = topic_of(tokens)
    eye = np.eye(NUM_TOPICS, dtype=np.float32)
    return eye[(topics + 1) % NUM_TOPICS] + 0.5 * eye[topics]


def _examples():
    return [FakeExample(f"topic{t} question", f"topic{t} answer") for t in range(NUM_TOPICS)]


@pytest.mark.parametrize("batch_size", [1, 4, 6, 10])
def test_perfect_encoder_scores_one(batch_size):
    result = evaluate.evaluate_examples(
        one_hot_encoder, one_hot_encoder, TopicTokenizer(), _examples(), LENGTH, LENGTH, batch_size=batch_size
    )
    assert result == {"p@1": 1.0, "mrr": 1.0, "ndcg@10": 1.0, "recall@10": 1.0}


def test_shifted_encoder_ranks_every_answer_second():
    result = evaluate.evaluate_examples(
        one_hot_encoder, shifted_encoder, TopicTokenizer(), _examples(), LENGTH, LENGTH, batch_size=4
    )
    assert result == pytest.approx(
        {"p@1": 0.0, "mrr": 0.5, "ndcg@10": 1 / np.log2(3), "recall@10": 1.0}
    )


def test_repeated_queries_and_passages_are_merged():
    # topic0's query is paired with topic0 and topic1 passages; topic1's passage appears twice.
    examples = [
        FakeExample("topic0 q", "topic0 p"),
        FakeExample("topic0 q", "topic1 p"),
        FakeExample("topic1 q", "topic1 p"),
        FakeExample("topic2 q", "topic2 p"),
    ]
    calls = []

    def recording_encoder(tokens):
        calls.append(tokens.shape)
        return one_hot_encoder(tokens)

    result = evaluate.evaluate_examples(
        recording_encoder, recording_encoder, TopicTokenizer(), examples, LENGTH, LENGTH, batch_size=2, k=1
    )
    assert calls == [(2, LENGTH)] * 4  # 3 unique queries + 3 unique passages, in batches of 2
    # topic0's query ranks its two passages 1st and 2nd (the 0-score tie with topic2's
    # passage goes to the lower index), so only half its relevant set is in the top 1.
    assert result == pytest.approx({"p@1": 1.0, "mrr": 1.0, "ndcg@1": 1.0, "recall@1": (0.5 + 1 + 1) / 3})


def test_encode_texts_pads_to_one_shape_and_trims():
    traces = []

    @jax.jit
    def encode(tokens):
        traces.append(tokens.shape)
        return jax.nn.one_hot(tokens[:, 0] - 2, NUM_TOPICS) * 2.0

    texts = [f"topic{t % NUM_TOPICS} x" for t in range(7)]
    embeddings = evaluate.encode_texts(encode, TopicTokenizer(), texts, LENGTH, batch_size=3)
    assert traces == [(3, LENGTH)]
    assert embeddings.dtype == np.float32
    np.testing.assert_array_equal(embeddings, 2.0 * one_hot_encoder(TopicTokenizer().encode(texts, LENGTH)))


def test_blocked_scoring_equals_full_matrix():
    rng = np.random.default_rng(0)
    queries, passages = rng.normal(size=(9, 5)), rng.normal(size=(13, 5))
    qrels = {q: {int(p): int(rng.integers(1, 3)) for p in rng.choice(13, 3, replace=False)} for q in range(9)}
    full = evaluate.retrieval_metrics(queries, passages, qrels, similarity="dot")
    blocked = evaluate.retrieval_metrics(queries, passages, qrels, similarity="dot", max_scores_in_memory=20)
    scores = queries @ passages.T
    assert blocked == pytest.approx(full)
    assert full["ndcg@10"] == pytest.approx(metrics.ndcg_at_k(scores, qrels))
    assert full["mrr"] == pytest.approx(metrics.mean_reciprocal_rank(scores, qrels))


def test_cosine_ignores_passage_norms_and_dot_does_not():
    queries = np.array([[1.0, 0.0]])
    passages = np.array([[1.0, 0.0], [3.0, 3.0]])  # passage 1 is longer, but at 45 degrees
    qrels = {0: {0: 1}}
    assert evaluate.retrieval_metrics(queries, passages, qrels)["p@1"] == 1.0
    assert evaluate.retrieval_metrics(queries, passages, qrels, similarity="dot")["p@1"] == 0.0


def test_graded_metrics_is_spearman_of_cosines():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    labels = rng.integers(0, 5, size=20).astype(float)
    cosines = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    expected = scipy.stats.spearmanr(cosines, labels).statistic
    assert evaluate.graded_metrics(a, b, labels)["spearman"] == pytest.approx(expected)


def test_evaluate_graded_examples_on_a_perfectly_ordered_set():
    # cosine(one_hot(0), shifted(t)) rises with the label: 0.5/n for t=0, 1/n for t=5, else 0.
    examples = [FakeExample("topic0 q", f"topic{t} p", label=float(label)) for t, label in [(1, 0), (0, 1), (5, 2)]]
    result = evaluate.evaluate_graded_examples(
        one_hot_encoder, shifted_encoder, TopicTokenizer(), examples, LENGTH, LENGTH, batch_size=2
    )
    assert result == {"spearman": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="example 0"):
        evaluate.evaluate_graded_examples(
            one_hot_encoder, one_hot_encoder, TopicTokenizer(), [FakeExample("topic0 q", "topic0 p")], LENGTH, LENGTH
        )


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="query 3"):
        evaluate.retrieval_metrics(np.ones((2, 4)), np.ones((3, 4)), {3: {0: 1}})
    with pytest.raises(ValueError, match=r"\(2, 4\) and \(3, 5\)"):
        evaluate.retrieval_metrics(np.ones((2, 4)), np.ones((3, 5)), {})
