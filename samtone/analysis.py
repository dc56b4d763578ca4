"""A dual encoder's embedding space, as in the SamToNe paper (section 4); `samtone-analyze`.

    samtone-analyze --model_dir=runs/samtone --data=pairs.jsonl --output_dir=analysis \
        [--compare=runs/in_batch_softmax]

encodes the unique queries and passages of (query, passage) pairs and writes
  tsne.png          t-SNE of queries and passages together, lines joining true pairs: with
                    same-tower negatives the two towers' embeddings overlap, without they
                    drift into separate clusters (the paper's figure 1);
  distances.png     histograms of each query's distance to its top-1 and to its true passage,
                    of each query's (passage's) distance to its nearest other query (passage)
                    (figure 5);
  similarities.png  histograms of sim(q_i, q_j) and sim(q_i, p_j) for random pairs i != j
                    (figure 6): SamToNe pushes same-tower similarities down to where the
                    cross-tower ones are;
  summary.json      `embedding_summary` below plus retrieval metrics (P@1, MRR@10, NDCG@10,
                    Recall@k against the pairs' passages).

With `--compare=OTHER_MODEL_DIR` every figure shows both runs (t-SNE side by side, the
histograms overlaid on shared bins), the legends naming each run and its step, and
summary.json holds the other run's numbers under "compare".

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

`similarity_samples` (figure 6), over the true pairs e = (a_e, b_e): for ordered pairs of
examples e != f, query_query = q_{a_e} . q_{a_f} (skipped when a_e = a_f, one query twice)
and query_passage = q_{a_e} . p_{b_f} (skipped when (a_e, b_f) is itself a true pair). All
ordered pairs when there are at most `max_samples`, else that many drawn at random.

matplotlib and scikit-learn (the "analysis" extra) are needed for the plots only.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np

from samtone import evaluate
from samtone import inference
from samtone import output_folder
from samtone import run_dir
from samtone.data import files
from samtone.data import retrieval
from samtone.errors import DataError
from samtone.normalize import l2_normalize

Pairs = Sequence[tuple[int, int]]
# Rows of a similarity matrix computed at once, bounding memory to BLOCK_ROWS x N floats.
BLOCK_ROWS = 1024
TSNE_THREADED_POINTS = 5000


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


def similarity_samples(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                       pairs: Pairs, *, max_samples: int = 100_000, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """Cosines behind `similarity_histogram` (the paper's figure 6; module docstring):

      query_query    q_{a_e} . q_{a_f} for examples e != f with different queries
      query_passage  q_{a_e} . p_{b_f} for examples e != f, (a_e, b_f) not a true pair
    """
    queries = _unit(query_embeddings, "query_embeddings")
    passages = _unit(passage_embeddings, "passage_embeddings")
    pairs = np.unique(_check_pairs(pairs, len(queries), len(passages)), axis=0)
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


# --- plots -----------------------------------------------------------------------------------


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
        raise ImportError("samtone.analysis.tsne_plot needs scikit-learn: pip install "
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
        queries = _unit(run.queries, "query_embeddings")
        passages = _unit(run.passages, "passage_embeddings")
        pairs = _check_pairs(run.pairs, len(queries), len(passages))
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
    """`embedding_distances` of each run: one panel per kind, the runs overlaid on shared
    bins, saved as a PNG. Returns each run's distances."""
    distances = [embedding_distances(run.queries, run.passages, run.pairs) for run in runs]
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
    run's `similarity_samples`."""
    samples = [similarity_samples(run.queries, run.passages, run.pairs,
                                  max_samples=max_samples, seed=seed) for run in runs]
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


# --- samtone-analyze ---------------------------------------------------------------------------


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


def run_names(model_dirs: Sequence[str]) -> list[str]:
    """Each folder's name; with more path components where two names would be equal."""
    parts = [os.path.normpath(os.fspath(d)).split(os.sep) for d in model_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name} ({i + 1})" for i, name in enumerate(names)]


FIGURES = ("tsne.png", "distances.png", "similarities.png")
SUMMARY_FILE = "summary.json"
# Every embedding is compared with the others of its tower (nearest other query, uniformity,
# random distinct pairs), so each tower needs two.
MIN_QUERIES = MIN_PASSAGES = 2


def analyze(model_dir: str, data: str | Sequence[str], output_dir: str, *,
            compare: str | None = None, split: str = "test", step: int | None = None,
            batch_size: int = 128, max_points: int = 2000, max_samples: int = 100_000,
            seed: int = 0, overwrite: bool = False) -> dict:
    """Writes the FIGURES and summary.json for `data`'s pairs; returns the summary.

    `compare`: a second run (or export) drawn in every figure next to `model_dir`'s, its
    numbers under "compare" in the summary. The t-SNE plot shows at most `max_points`
    queries and passages (queries sampled, each with its passages); the histograms and
    numbers use every pair (figure 6: at most `max_samples` random pairs). A BEIR folder
    gives the pairs of its `split`.

    Before any model is loaded: existing figures or summary.json in `output_dir` are refused
    unless `overwrite`, an output that is or holds an input always, and so is data of fewer
    than 2 distinct queries or passages. The files appear together, summary.json last, or not
    at all.
    """
    outputs = [*FIGURES, SUMMARY_FILE]
    data_paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    run_dir.check_output(output_dir, [("--model_dir", model_dir), ("--compare", compare),
                                      *(("--data", path) for path in data_paths)],
                         flag="--output_dir")
    output_folder.check_files(output_dir, outputs, overwrite, flag="--output_dir")
    examples = files.read_examples(data, split=split)
    dataset = retrieval.from_examples(examples, retrieval.data_name(data, split))
    _check_enough(dataset, data_paths, len(examples))
    pairs = np.stack([dataset.qrels.queries, dataset.qrels.passages], axis=1)
    model_dirs = [model_dir] + ([compare] if compare else [])
    runs, summaries = [], []
    for name, directory in zip(run_names(model_dirs), model_dirs):
        encoders = inference.Encoder.load(directory, step=step if directory == model_dir
                                          else None, batch_size=batch_size)
        queries = encoders.encode_queries(dataset.queries)
        passages = encoders.encode_passages(dataset.passages)
        runs.append(RunEmbeddings(f"{name} (step {encoders.step})", queries, passages, pairs))
        summaries.append({
            "model_dir": os.fspath(directory), "step": int(encoders.step),
            "num_queries": len(dataset.queries), "num_passages": len(dataset.passages),
            "num_pairs": len(pairs),
            **embedding_summary(queries, passages, pairs),
            **evaluate.rank_embeddings(queries, passages, dataset).metrics,
        })

    summary = dict(summaries[0])
    if compare:
        summary["compare"] = summaries[1]
    with output_folder.write_files_atomically(output_dir, outputs, overwrite,
                                              flag="--output_dir") as folder:
        sample_queries, sample_passages, sample_pairs = _sample(pairs, len(dataset.queries),
                                                                max_points, seed)
        tsne_plot([RunEmbeddings(run.name, run.queries[sample_queries],
                                 run.passages[sample_passages], sample_pairs) for run in runs],
                  os.path.join(folder, "tsne.png"), seed=seed)
        distance_histograms(runs, os.path.join(folder, "distances.png"))
        similarity_histogram(runs, os.path.join(folder, "similarities.png"),
                             max_samples=max_samples, seed=seed)
        with open(os.path.join(folder, SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return summary


def _check_enough(dataset: retrieval.RetrievalSet, data_paths: Sequence[str],
                  num_examples: int) -> None:
    """Refuses data with fewer than MIN_QUERIES distinct queries or MIN_PASSAGES passages."""
    num_queries, num_passages = len(dataset.queries), len(dataset.passages)
    if num_queries < MIN_QUERIES or num_passages < MIN_PASSAGES:
        raise DataError(
            ",".join(map(os.fspath, data_paths)), None, None,
            f"{num_examples} pair{'s' if num_examples != 1 else ''} with {num_queries} "
            f"distinct quer{'ies' if num_queries != 1 else 'y'} and {num_passages} distinct "
            f"passage{'s' if num_passages != 1 else ''}; samtone-analyze needs at least 2 "
            f"pairs, with {MIN_QUERIES} different queries and {MIN_PASSAGES} different "
            "passages (it compares each embedding with the others of its tower)")
