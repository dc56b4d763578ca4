"""The paper's embedding-space figures (section 4) as PNGs, one run or several side by side.

  tsne_plot             t-SNE of queries and passages together, lines joining true pairs:
                        with same-tower negatives the two towers' embeddings overlap, without
                        they drift into separate clusters (figure 1); a panel per run
  distance_histograms   each query's distance to its top-1 and to its true passage, each
                        query's (passage's) distance to its nearest other query (passage)
                        (figure 5); the runs overlaid on shared bins
  similarity_histogram  sim(q_i, q_j) and sim(q_i, p_j) for random pairs i != j (figure 6):
                        SamToNe pushes same-tower similarities down to where the cross-tower
                        ones are

The numbers drawn come from samtone.analysis.statistics. matplotlib and scikit-learn (the
"analysis" extra) are imported on first use, so the numbers need neither.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from samtone.analysis import statistics

TSNE_THREADED_POINTS = 5000


@dataclasses.dataclass
class RunEmbeddings:
    """One model's embeddings of the analysed pairs; `name` labels it in the figures."""

    name: str
    queries: np.ndarray  # [Nq, D]
    passages: np.ndarray  # [Np, D]
    pairs: np.ndarray  # [P, 2] (query index, passage index)


RUN_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple")


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


def shared_bins(samples: Sequence[np.ndarray], *, max_bins: int = 60,
                min_bins: int = 10) -> np.ndarray:
    """Bin edges for every sample at once: numpy's "auto" rule (Freedman-Diaconis / Sturges)
    on the pooled values, kept between `min_bins` and `max_bins` bins over their range."""
    pooled = np.concatenate([np.ravel(s)[np.isfinite(np.ravel(s))] for s in samples])
    if not pooled.size:
        return np.linspace(0.0, 1.0, min_bins + 1)
    low, high = float(pooled.min()), float(pooled.max())
    if high - low < 1e-6:  # one value: a narrow window around it
        low, high = low - 0.05, high + 0.05
    count = len(np.histogram_bin_edges(pooled, bins="auto", range=(low, high))) - 1
    return np.linspace(low, high, int(np.clip(count, min_bins, max_bins)) + 1)


def tsne_coordinates(embeddings: np.ndarray, *, perplexity: float = 30.0, seed: int = 0
                     ) -> np.ndarray:
    """2-d t-SNE (cosine metric, PCA init) of [N, D] embeddings: [N, 2]."""
    try:
        # pylint: disable=import-outside-toplevel
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError as error:
        raise ImportError("samtone.analysis.figures.tsne_plot needs scikit-learn: pip install "
                          "'samtone[analysis]' (matplotlib, scikit-learn)") from error
    embeddings = np.asarray(embeddings, np.float32)
    if len(embeddings) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(embeddings)}")
    # scikit-learn requires perplexity < N; a third of N keeps small sets meaningful.
    perplexity = min(perplexity, (len(embeddings) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                random_state=seed)
    # OpenMP threads spinning next to XLA's own thread pool make a small t-SNE 10-50x
    # slower; below TSNE_THREADED_POINTS one thread is the fastest.
    with threadpool_limits(limits=1 if len(embeddings) < TSNE_THREADED_POINTS else None,
                           user_api="openmp"):
        return tsne.fit_transform(embeddings)


def tsne_plot(runs: Sequence[RunEmbeddings], path: str | os.PathLike, *,
              perplexity: float = 30.0, seed: int = 0) -> list[np.ndarray]:
    """t-SNE of each run's queries and passages together, one panel per run, as a PNG.

    Queries and passages get two colours; each true pair is joined by a thin line. Returns
    each run's [Nq + Np, 2] coordinates (queries first).
    """
    figure = _figure(6.0 * len(runs) + 0.5, 6.0)
    from matplotlib.collections import LineCollection  # pylint: disable=import-outside-toplevel
    panels = np.atleast_1d(figure.subplots(1, len(runs)))
    coordinates = []
    for axes, run in zip(panels, runs):
        queries = statistics.unit_embeddings(run.queries, "query_embeddings")
        passages = statistics.unit_embeddings(run.passages, "passage_embeddings")
        pairs = statistics.check_pairs(run.pairs, len(queries), len(passages))
        points = tsne_coordinates(np.concatenate([queries, passages]), perplexity=perplexity,
                                  seed=seed)
        query_points, passage_points = points[:len(queries)], points[len(queries):]
        if len(pairs):
            segments = np.stack([query_points[pairs[:, 0]], passage_points[pairs[:, 1]]], 1)
            axes.add_collection(LineCollection(segments, colors="0.6", linewidths=0.5,
                                               alpha=0.6, zorder=1, label="true pairs"))
        size = max(2.0, 30.0 / np.sqrt(len(points) / 100))
        axes.scatter(*query_points.T, s=size, c="tab:blue", label=f"queries ({len(queries)})",
                     zorder=2)
        axes.scatter(*passage_points.T, s=size, c="tab:orange",
                     label=f"passages ({len(passages)})", zorder=2)
        axes.set_title(run.name)
        axes.set_xlabel("t-SNE 1")
        axes.set_ylabel("t-SNE 2")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.legend(loc="best", markerscale=2)
        coordinates.append(points)
    figure.suptitle("t-SNE of query and passage embeddings (cosine)")
    _save(figure, path)
    return coordinates


DISTANCE_LABELS = {
    "query_top1_passage": "query to its top-1 passage",
    "query_true_passage": "query to its true passage",
    "query_nearest_query": "query to its nearest other query",
    "passage_nearest_passage": "passage to its nearest other passage",
}


def distance_histograms(runs: Sequence[RunEmbeddings], path: str | os.PathLike
                        ) -> list[dict[str, np.ndarray]]:
    """`statistics.embedding_distances` of each run: one panel per kind, the runs overlaid on
    shared bins, saved as a PNG. Returns each run's distances."""
    distances = [statistics.embedding_distances(run.queries, run.passages, run.pairs)
                 for run in runs]
    figure = _figure(11.0, 7.5)
    for axes, (kind, label) in zip(figure.subplots(2, 2).ravel(), DISTANCE_LABELS.items()):
        samples = [d[kind][np.isfinite(d[kind])] for d in distances]
        edges = shared_bins(samples)
        for run, values, colour in zip(runs, samples, RUN_COLOURS):
            if values.size:
                axes.hist(values, bins=edges, histtype="step", linewidth=1.5, color=colour,
                          label=f"{run.name}: mean {values.mean():.3f}")
        axes.set_title(label)
        axes.set_xlabel("distance (1 - cosine)")
        axes.set_ylabel("count")
        axes.legend(loc="best", fontsize="small")
    figure.suptitle("Distances in the embedding space")
    _save(figure, path)
    return distances


def similarity_histogram(runs: Sequence[RunEmbeddings], path: str | os.PathLike, *,
                         max_samples: int = 100_000, seed: int = 0
                         ) -> list[dict[str, np.ndarray]]:
    """The paper's figure 6: densities of sim(q_i, q_j) (solid) and sim(q_i, p_j) (dashed)
    for random i != j, one colour per run, on shared bins; saved as a PNG. Returns each
    run's `statistics.similarity_samples`."""
    samples = [statistics.similarity_samples(run.queries, run.passages, run.pairs,
                                             max_samples=max_samples, seed=seed)
               for run in runs]
    edges = shared_bins([values for sample in samples for values in sample.values()])
    figure = _figure(7.5, 4.8)
    axes = figure.subplots()
    for run, sample, colour in zip(runs, samples, RUN_COLOURS):
        for kind, style, label in (("query_query", "-", "sim(q_i, q_j)"),
                                   ("query_passage", "--", "sim(q_i, p_j)")):
            values = sample[kind]
            if values.size:
                axes.hist(values, bins=edges, density=True, histtype="step", linewidth=1.5,
                          linestyle=style, color=colour,
                          label=f"{run.name}: {label}, mean {values.mean():.3f}")
    axes.set_xlabel("cosine similarity")
    axes.set_ylabel("density")
    axes.set_title("Similarities of random distinct examples (i != j)")
    axes.legend(loc="best", fontsize="small")
    _save(figure, path)
    return samples
