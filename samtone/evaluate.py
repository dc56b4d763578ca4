"""Evaluation of a dual encoder: encode texts, score, and report retrieval / STS metrics.

The encoder functions are any callables `int32 [B, L] -> [B, D]` (a jitted
`DualEncoder.encode_queries` bound to its params, say). Texts are tokenised and encoded in
batches of one fixed shape, so a jitted encoder compiles once per (batch_size, length).

Scoring a large corpus never builds the full [Nq, Np] matrix: queries are scored in blocks
of rows, each block reduced to the ranks of its relevant passages (samtone.metrics) before
the next, so memory stays at about `max_scores_in_memory` floats plus the embeddings.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from samtone import metrics
from samtone.normalize import l2_normalize

EncodeFn = Callable[[np.ndarray], Any]


def retrieval_metrics(
    query_embeddings: np.ndarray,
    passage_embeddings: np.ndarray,
    qrels: metrics.Qrels,
    *,
    k: int = 10,
    similarity: str = "cosine",
    max_scores_in_memory: int = 1 << 26,
) -> dict[str, float]:
    """p@1, MRR (uncut), nDCG@k and recall@k of ranking every passage for every query.

    Args:
      query_embeddings: [Nq, D]; row i is query index i in `qrels`.
      passage_embeddings: [Np, D]; row j is passage index j in `qrels`.
      qrels: query index -> passage index -> grade (> 0 relevant); see samtone.metrics for
        the conventions (ties by passage index, queries without relevant passages skipped).
      similarity: "cosine" (embeddings L2-normalised first) or "dot".
      max_scores_in_memory: bound on the elements of one block of the score matrix.

    Returns:
      {"p@1", "mrr", "ndcg@{k}", "recall@{k}"} as floats.
    """
    queries = np.asarray(query_embeddings, dtype=np.float32)
    passages = np.asarray(passage_embeddings, dtype=np.float32)
    if queries.ndim != 2 or passages.ndim != 2 or queries.shape[1] != passages.shape[1]:
        raise ValueError(
            f"need [Nq, D] query and [Np, D] passage embeddings, got {queries.shape} and {passages.shape}"
        )
    if similarity == "cosine":
        queries, passages = l2_normalize(queries), l2_normalize(passages)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    for query in qrels:
        if not 0 <= int(query) < len(queries):
            raise ValueError(f"qrels names query {query}, but there are {len(queries)} query embeddings")

    block = max(1, max_scores_in_memory // max(len(passages), 1))
    ranked = []
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        scores = queries[start:stop] @ passages.T
        ranked.extend(metrics.relevant_ranks(scores, qrels, range(start, stop)))
    return metrics.summarize(ranked, k=k)


def encode_texts(
    encode_fn: EncodeFn,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
) -> np.ndarray:
    """Embeddings [N, D] (float32) of `texts`, encoded `batch_size` at a time.

    `tokenizer.encode(texts, max_length)` gives int32 [n, max_length]. The last batch is
    filled up to `batch_size` by repeating its first row (real tokens, so pooling stays
    finite), and the extra rows are dropped from the result.
    """
    if not texts:
        raise ValueError("encode_texts got no texts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch_texts = list(texts[start:start + batch_size])
        tokens = np.asarray(tokenizer.encode(batch_texts, max_length), dtype=np.int32)
        if tokens.shape != (len(batch_texts), max_length):
            raise ValueError(
                f"tokenizer.encode returned shape {tokens.shape}, expected {(len(batch_texts), max_length)}"
            )
        filler = batch_size - len(batch_texts)
        if filler:
            tokens = np.concatenate([tokens, np.repeat(tokens[:1], filler, axis=0)])
        # Keep device results unconverted until the end so tokenising the next batch
        # overlaps with encoding this one (jax dispatches asynchronously).
        outputs.append((encode_fn(tokens), len(batch_texts)))
    return np.concatenate([np.asarray(out, dtype=np.float32)[:n] for out, n in outputs])


def _index(values: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Unique values in order of first appearance, and value -> position."""
    position: dict[str, int] = {}
    for value in values:
        position.setdefault(value, len(position))
    return list(position), position


def evaluate_examples(
    encode_queries: EncodeFn,
    encode_passages: EncodeFn,
    tokenizer: Any,
    examples: Sequence[Any],
    query_length: int,
    passage_length: int,
    batch_size: int = 64,
    *,
    k: int = 10,
) -> dict[str, float]:
    """Retrieval metrics of (query, passage) examples against the corpus of their passages.

    Examples are anything with `.query` and `.passage` strings (samtone.data.files.Example).
    The corpus is the unique passages; each distinct query is relevant (grade 1) to every
    passage it is paired with. Negatives and labels are ignored; see
    `evaluate_graded_examples` for labelled (STS-style) pairs.
    """
    if not examples:
        raise ValueError("evaluate_examples got no examples")
    query_texts, query_position = _index([example.query for example in examples])
    passage_texts, passage_position = _index([example.passage for example in examples])
    qrels: dict[int, dict[int, int]] = {}
    for example in examples:
        qrels.setdefault(query_position[example.query], {})[passage_position[example.passage]] = 1
    query_embeddings = encode_texts(encode_queries, tokenizer, query_texts, query_length, batch_size)
    passage_embeddings = encode_texts(encode_passages, tokenizer, passage_texts, passage_length, batch_size)
    return retrieval_metrics(query_embeddings, passage_embeddings, qrels, k=k)


def graded_metrics(
    a_embeddings: np.ndarray, b_embeddings: np.ndarray, labels: Sequence[float]
) -> dict[str, float]:
    """{"spearman": rank correlation of cosine(a_i, b_i) with labels_i} (STS / CoSENT data)."""
    a = l2_normalize(np.asarray(a_embeddings, dtype=np.float32))
    b = l2_normalize(np.asarray(b_embeddings, dtype=np.float32))
    labels = np.asarray(labels, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or labels.shape != (a.shape[0],):
        raise ValueError(
            f"need [N, D] embeddings and [N] labels, got {a.shape}, {b.shape} and {labels.shape}"
        )
    cosine = np.sum(a * b, axis=-1)
    return {"spearman": metrics.spearman(cosine, labels)}


def evaluate_graded_examples(
    encode_queries: EncodeFn,
    encode_passages: EncodeFn,
    tokenizer: Any,
    examples: Sequence[Any],
    query_length: int,
    passage_length: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """`graded_metrics` of examples with `.query`, `.passage` and a float `.label`."""
    if not examples:
        raise ValueError("evaluate_graded_examples got no examples")
    unlabelled = [i for i, example in enumerate(examples) if example.label is None]
    if unlabelled:
        raise ValueError(
            f"graded evaluation needs a label on every example; example {unlabelled[0]} "
            f"(query {examples[unlabelled[0]].query!r}) has none"
        )
    queries = encode_texts(encode_queries, tokenizer, [e.query for e in examples], query_length, batch_size)
    passages = encode_texts(encode_passages, tokenizer, [e.passage for e in examples], passage_length, batch_size)
    return graded_metrics(queries, passages, [e.label for e in examples])
