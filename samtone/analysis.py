"""A dual encoder's embedding space, as in the SamToNe paper (section 4); `samtone-analyze`.

    samtone-analyze --model_dir=runs/base --data=pairs.jsonl --output_dir=analysis/base

encodes the unique queries and passages of (query, passage) pairs and writes
  tsne.png         t-SNE of queries and passages together, lines joining true pairs: with
                   same-tower negatives the two towers' embeddings overlap, without they
                   drift into separate clusters;
  distances.png    histograms of each query's distance to its top-1 and to its true passage,
                   and of each query's (passage's) distance to its nearest other query
                   (passage);
  summary.json     `embedding_summary` below plus retrieval metrics (P@1, MRR, nDCG@10).

Distances are 1 - cosine. Pairs are (query index, passage index) into the two embedding
arrays. --model_dir may also be a samtone-export directory.

The numbers (`embedding_summary`), for unit-normalised queries q_i, passages p_j and true
pairs (i, j) in P:
  mean_query_query_cosine      mean over i != i' of q_i . q_i'
  mean_passage_passage_cosine  mean over j != j' of p_j . p_j'
  mean_query_passage_cosine    mean over all i, j of q_i . p_j
  mean_positive_distance       mean over P of 1 - q_i . p_j
  alignment                    mean over P of ||q_i - p_j||^2 (Wang & Isola 2020, alpha = 2;
                               for unit vectors 2 x mean_positive_distance)
  query_uniformity             log mean over i < i' of exp(-2 ||q_i - q_i'||^2) (t = 2);
  passage_uniformity           the same over passages. Lower is more uniform.

matplotlib and scikit-learn (the "analysis" extra) are needed for the plots only.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

from samtone import evaluate
from samtone import inference
from samtone.data import files
from samtone.normalize import l2_normalize

Pairs = Sequence[tuple[int, int]]
# Rows of a similarity matrix computed at once, bounding memory to BLOCK_ROWS x N floats.
BLOCK_ROWS = 1024


def _unit(embeddings: np.ndarray, name: str) -> np.ndarray:
    embeddings = np.asarray(embeddings, np.float64)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {embeddings.shape}")
    return l2_normalize(embeddings)


def _check_pairs(pairs: Pairs, num_queries: int, num_passages: int) -> np.ndarray:
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
    queries = _unit(query_embeddings, "query_embeddings")
    passages = _unit(passage_embeddings, "passage_embeddings")
    if queries.shape[1] != passages.shape[1]:
        raise ValueError(f"queries are {queries.shape[1]}-d but passages {passages.shape[1]}-d")
    if len(queries) < 2 or len(passages) < 2:
        raise ValueError("embedding_summary needs at least 2 queries and 2 passages, got "
                         f"{len(queries)} and {len(passages)}")
    pairs = _check_pairs(pairs, len(queries), len(passages))
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
    """Distances (1 - cosine) behind `top1_distance_histogram`:

      query_top1_passage       [Nq] each query to its highest-scoring passage
      query_true_passage       [Nq] each query to its closest true passage (NaN: none)
      query_nearest_query      [Nq] each query to its nearest other query
      passage_nearest_passage  [Np] each passage to its nearest other passage
    """
    queries = _unit(query_embeddings, "query_embeddings")
    passages = _unit(passage_embeddings, "passage_embeddings")
    pairs = _check_pairs(pairs, len(queries), len(passages))
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


# --- plots -----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas: no pyplot, no global backend switch."""
    # pylint: disable=import-outside-toplevel  (an optional dependency)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("samtone.analysis plots need matplotlib: pip install "
                          "'samtone[analysis]' (matplotlib, scikit-learn)") from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> None:
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(os.fspath(path), dpi=150, format="png")


def tsne_coordinates(embeddings: np.ndarray, *, perplexity: float = 30.0, seed: int = 0
                     ) -> np.ndarray:
    """2-d t-SNE (cosine metric, PCA init) of [N, D] embeddings: [N, 2]."""
    try:
        from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError("samtone.analysis.tsne_plot needs scikit-learn: pip install "
                          "'samtone[analysis]' (matplotlib, scikit-learn)") from error
    embeddings = np.asarray(embeddings, np.float32)
    if len(embeddings) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(embeddings)}")
    # scikit-learn requires perplexity < N; a third of N keeps small sets meaningful.
    perplexity = min(perplexity, (len(embeddings) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                random_state=seed)
    return tsne.fit_transform(embeddings)


def tsne_plot(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
              path: str | os.PathLike, *, pairs: Pairs | None = None, title: str | None = None,
              perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """t-SNE of queries and passages together, saved as a PNG at `path`.

    Queries and passages get two colours; each (query, passage) index pair in `pairs` is
    joined by a thin line. Returns the [Nq + Np, 2] coordinates (queries first).
    """
    queries = _unit(query_embeddings, "query_embeddings")
    passages = _unit(passage_embeddings, "passage_embeddings")
    pairs = _check_pairs(pairs if pairs is not None else [], len(queries), len(passages))
    points = tsne_coordinates(np.concatenate([queries, passages]), perplexity=perplexity,
                              seed=seed)
    query_points, passage_points = points[:len(queries)], points[len(queries):]

    figure = _figure(6.5, 6.0)
    from matplotlib.collections import LineCollection  # pylint: disable=import-outside-toplevel
    axes = figure.subplots()
    if len(pairs):
        segments = np.stack([query_points[pairs[:, 0]], passage_points[pairs[:, 1]]], axis=1)
        axes.add_collection(LineCollection(segments, colors="0.6", linewidths=0.5, alpha=0.6,
                                           zorder=1, label="true pairs"))
    size = max(2.0, 30.0 / np.sqrt(len(points) / 100))
    axes.scatter(*query_points.T, s=size, c="tab:blue", label=f"queries ({len(queries)})",
                 zorder=2)
    axes.scatter(*passage_points.T, s=size, c="tab:orange",
                 label=f"passages ({len(passages)})", zorder=2)
    axes.set_title(title or "t-SNE of query and passage embeddings")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(loc="best", markerscale=2)
    _save(figure, path)
    return points


def top1_distance_histogram(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                            path: str | os.PathLike, *, pairs: Pairs, title: str | None = None,
                            bins: int = 50) -> dict[str, np.ndarray]:
    """Histograms of `embedding_distances` on shared bins, saved as a PNG at `path`.

    Returns the distances.
    """
    distances = embedding_distances(query_embeddings, passage_embeddings, pairs)
    labels = {
        "query_top1_passage": "query to top-1 passage",
        "query_true_passage": "query to true passage",
        "query_nearest_query": "query to nearest query",
        "passage_nearest_passage": "passage to nearest passage",
    }
    finite = {name: values[np.isfinite(values)] for name, values in distances.items()}
    everything = np.concatenate([values for values in finite.values()])
    high = max(float(everything.max()) if everything.size else 1.0, 1e-3)
    edges = np.linspace(min(0.0, float(everything.min()) if everything.size else 0.0), high,
                        bins + 1)
    figure = _figure(7.0, 4.5)
    axes = figure.subplots()
    for name, label in labels.items():
        if finite[name].size:
            axes.hist(finite[name], bins=edges, histtype="step", linewidth=1.5,
                      label=f"{label} (mean {finite[name].mean():.3f})")
    axes.set_xlabel("distance (1 - cosine)")
    axes.set_ylabel("count")
    axes.set_title(title or "Distances in the embedding space")
    axes.legend(loc="best")
    _save(figure, path)
    return distances


def _sample(pairs: np.ndarray, num_queries: int, max_points: int, seed: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query indices, passage indices, pairs in the sample's numbering): at most
    `max_points` queries and passages, queries sampled with their true passages."""
    rng = np.random.default_rng(seed)
    query_order = rng.permutation(num_queries)
    chosen_queries, chosen_passages = [], {}
    by_query: dict[int, list[int]] = {}
    for query, passage in pairs:
        by_query.setdefault(int(query), []).append(int(passage))
    for query in query_order:
        new = [p for p in by_query.get(int(query), []) if p not in chosen_passages]
        if len(chosen_queries) + len(chosen_passages) + 1 + len(new) > max_points:
            continue
        chosen_queries.append(int(query))
        for passage in new:
            chosen_passages[passage] = len(chosen_passages)
    query_position = {query: i for i, query in enumerate(chosen_queries)}
    local_pairs = np.array([(query_position[q], chosen_passages[p]) for q, p in pairs
                            if q in query_position], np.int64).reshape(-1, 2)
    return np.array(chosen_queries), np.array(list(chosen_passages)), local_pairs


def analyze(model_dir: str, data: str | Sequence[str], output_dir: str, *,
            step: int | None = None, batch_size: int = 128, max_points: int = 2000,
            seed: int = 0) -> dict:
    """Writes tsne.png, distances.png and summary.json for `data`'s pairs; returns the summary.

    The t-SNE plot shows at most `max_points` queries and passages (queries sampled, each
    with its passages); the histograms and numbers use every pair.
    """
    examples = files.read_examples(data)
    queries = list(dict.fromkeys(e.query for e in examples))
    passages = list(dict.fromkeys(e.passage for e in examples))
    query_index = {text: i for i, text in enumerate(queries)}
    passage_index = {text: i for i, text in enumerate(passages)}
    pairs = np.array(sorted({(query_index[e.query], passage_index[e.passage])
                             for e in examples}), np.int64)

    encoders = inference.Encoder.load(model_dir, step=step, batch_size=batch_size)
    query_embeddings = encoders.encode_queries(queries)
    passage_embeddings = encoders.encode_passages(passages)

    name = os.path.basename(os.path.normpath(model_dir))
    os.makedirs(output_dir, exist_ok=True)
    sample_queries, sample_passages, sample_pairs = _sample(pairs, len(queries), max_points,
                                                            seed)
    tsne_plot(query_embeddings[sample_queries], passage_embeddings[sample_passages],
              os.path.join(output_dir, "tsne.png"), pairs=sample_pairs, seed=seed,
              title=f"{name} (step {encoders.step}): t-SNE of queries and passages")
    top1_distance_histogram(query_embeddings, passage_embeddings,
                            os.path.join(output_dir, "distances.png"), pairs=pairs,
                            title=f"{name} (step {encoders.step}): distances")
    qrels: dict[int, dict[int, int]] = {}
    for query, passage in pairs:
        qrels.setdefault(int(query), {})[int(passage)] = 1
    summary = {
        "model_dir": os.fspath(model_dir), "step": int(encoders.step),
        "num_queries": len(queries), "num_passages": len(passages), "num_pairs": len(pairs),
        **embedding_summary(query_embeddings, passage_embeddings, pairs),
        **evaluate.retrieval_metrics(query_embeddings, passage_embeddings, qrels),
    }
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary
