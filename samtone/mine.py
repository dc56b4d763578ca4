"""Hard-negative mining with a trained dual encoder, and the `samtone-mine` command line.

    samtone-mine --model_dir=runs/base --train_data=pairs.jsonl --output=pairs_hn.jsonl --k=4 \
        [--corpus=corpus.jsonl] [--margin=0.05]

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

Memory. Queries are scored in blocks, so at most `block_size x len(corpus)` scores exist at
once (default: blocks of ~2^26 scores, 256 MB), and `np.argpartition` picks each row's top k
in O(len(corpus)); the embeddings themselves (corpus x dimension float32) must fit in host
memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import numpy as np
from absl import logging

from samtone import evaluate
from samtone.data import files
from samtone.inference import Encoder
from samtone.normalize import l2_normalize

MAX_SCORES_IN_MEMORY = 1 << 26


def mine_hard_negatives(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                        positives: Sequence[set[int]], *, k: int, margin: float | None = None,
                        block_size: int | None = None) -> list[list[int]]:
    """For each query, the indices of its k hardest non-positive passages (see module doc).

    Args:
      query_embeddings: [Nq, D]; cosine similarity is used (rows are L2-normalised here).
      passage_embeddings: [Np, D], the corpus.
      positives: Nq sets of corpus indices, each query's known positives; never returned.
      k: negatives per query; fewer are returned when fewer candidates remain.
      margin: if set, drop candidates scoring above (weakest positive score - margin).
      block_size: queries scored at once (default: ~2^26 scores per block).

    Returns:
      Nq lists of corpus indices, highest score first.
    """
    queries = l2_normalize(np.asarray(query_embeddings, np.float32))
    passages = l2_normalize(np.asarray(passage_embeddings, np.float32))
    if queries.ndim != 2 or passages.ndim != 2 or queries.shape[1] != passages.shape[1]:
        raise ValueError(f"need [Nq, D] query and [Np, D] passage embeddings, got "
                         f"{queries.shape} and {passages.shape}")
    if len(positives) != len(queries):
        raise ValueError(f"got {len(positives)} positive sets for {len(queries)} queries")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if margin is not None and not np.isfinite(margin):
        raise ValueError(f"margin must be a finite number or None, got {margin}")
    num_passages = len(passages)
    for i, positive in enumerate(positives):
        bad = [p for p in positive if not 0 <= p < num_passages]
        if bad:
            raise ValueError(f"query {i} has positives {bad} outside the corpus of "
                             f"{num_passages} passages")
    if block_size is None:
        block_size = max(1, MAX_SCORES_IN_MEMORY // max(num_passages, 1))
    mined: list[list[int]] = []
    for start in range(0, len(queries), block_size):
        stop = min(start + block_size, len(queries))
        scores = queries[start:stop] @ passages.T
        mined.extend(_top_negatives(scores, positives[start:stop], k, margin))
    return mined


def _top_negatives(scores: np.ndarray, positives: Sequence[set[int]], k: int,
                   margin: float | None) -> list[list[int]]:
    """Top-k columns of each row of `scores` [b, Np] after masking; modifies `scores`."""
    rows = np.repeat(np.arange(len(positives)), [len(p) for p in positives])
    columns = np.fromiter((c for p in positives for c in sorted(p)), np.int64, len(rows))
    if margin is not None:
        weakest = np.full(len(positives), np.inf, np.float32)
        np.minimum.at(weakest, rows, scores[rows, columns])
        scores[scores > (weakest - np.float32(margin))[:, None]] = -np.inf
    scores[rows, columns] = -np.inf
    top = min(k, scores.shape[1])
    best = np.argpartition(-scores, top - 1, axis=1)[:, :top]
    best_scores = np.take_along_axis(scores, best, axis=1)
    # A tie with the k-th score may have left a lower index out: redo those rows exactly.
    kth = best_scores.min(axis=1)
    tied = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > top)
    for row in tied:
        candidates = np.flatnonzero(scores[row] >= kth[row])
        best[row] = candidates[np.lexsort((candidates, -scores[row, candidates]))][:top]
        best_scores[row] = scores[row, best[row]]
    order = np.lexsort((best, -best_scores), axis=1)
    best = np.take_along_axis(best, order, axis=1)
    best_scores = np.take_along_axis(best_scores, order, axis=1)
    return [row[np.isfinite(row_scores)].tolist() for row, row_scores in zip(best, best_scores)]


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
                       block_size: int | None = None,
                       encoders: Encoder | None = None) -> MiningStats:
    """Writes `train_data`'s examples to `output` (JSONL) with k mined `negatives` each.

    The corpus is the training passages plus `corpus`'s passages, deduplicated by text. A
    query's positives are every passage the training data pairs it with (by query text).
    Existing negatives are replaced. Examples left with fewer than k candidates are not
    written (counted in the result), so the file feeds `num_negatives=k` as is.
    """
    examples = files.read_examples(train_data)
    encoders = encoders or Encoder.load(model_dir, step=step, batch_size=batch_size)
    passages = _unique([e.passage for e in examples] + (read_corpus(corpus) if corpus else []))
    passage_index = {text: i for i, text in enumerate(passages)}
    queries = _unique([e.query for e in examples])
    query_index = {text: i for i, text in enumerate(queries)}
    positives: list[set[int]] = [set() for _ in queries]
    for example in examples:
        positives[query_index[example.query]].add(passage_index[example.passage])

    logging.info("encoding %d queries and %d passages", len(queries), len(passages))
    query_embeddings = evaluate.encode_texts(encoders.query_encoder, encoders.tokenizer,
                                             queries, encoders.query_length, batch_size)
    passage_embeddings = evaluate.encode_texts(encoders.passage_encoder, encoders.tokenizer,
                                               passages, encoders.passage_length, batch_size)
    mined = mine_hard_negatives(query_embeddings, passage_embeddings, positives, k=k,
                                margin=margin, block_size=block_size)
    complete = [e for e in examples if len(mined[query_index[e.query]]) >= k]
    if jax.process_index() == 0:  # every process mined the same; one writes
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            for example in complete:
                negatives = [passages[i] for i in mined[query_index[example.query]]]
                f.write(json.dumps(_record(example, negatives), ensure_ascii=False) + "\n")
    written = len(complete)
    stats = MiningStats(len(examples), written, len(examples) - written, len(passages))
    logging.info("wrote %d examples with %d negatives to %s (%d dropped: fewer than %d "
                 "candidates; corpus of %d passages)", written, k, output, stats.dropped, k,
                 len(passages))
    return stats


def _unique(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def _record(example: files.Example, negatives: list[str]) -> dict:
    record = {"query": example.query, "passage": example.passage, "negatives": negatives}
    for field in ("label", "query_id", "passage_id"):
        value = getattr(example, field)
        if value is not None:
            record[field] = value
    return record
