"""A dual encoder's embedding space, as in the SamToNe paper (section 4); `samtone-analyze`.

    samtone-analyze --model_dir=runs/samtone --data=pairs.jsonl --output=analysis \
        [--compare=runs/in_batch_softmax]

encodes the unique queries and passages of (query, passage) pairs and writes to the folder
  tsne.png          t-SNE of queries and passages together, lines joining true pairs (figure 1)
  distances.png     distances to the top-1, the true passage, the nearest other (figure 5)
  similarities.png  sim(q_i, q_j) and sim(q_i, p_j) for random pairs i != j (figure 6)
  summary.json      `statistics.embedding_summary` plus retrieval metrics (P@1, MRR@10,
                    NDCG@10, Recall@k against the pairs' passages).

With `--compare=OTHER_MODEL_DIR` every figure shows both runs (t-SNE side by side, the
histograms overlaid on shared bins), the legends naming each run and its step, and
summary.json holds the other run's numbers under "compare". --model_dir may also be a
samtone-export directory.

  statistics.py  the numbers: mean cosines, alignment, uniformity, distances, similarity
                 samples (numpy only)
  figures.py     the PNGs (matplotlib, scikit-learn's t-SNE: the "analysis" extra, imported
                 on first use)

This file runs them on a model's embeddings; figures reads statistics, statistics neither.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from samtone import evaluate
from samtone import inference
from samtone import output_folder
from samtone import run_dir
from samtone.analysis import figures
from samtone.analysis import statistics
from samtone.data import files
from samtone.data import retrieval
from samtone.errors import DataError

FIGURES = ("tsne.png", "distances.png", "similarities.png")
SUMMARY_FILE = "summary.json"
# Every embedding is compared with the others of its tower (nearest other query, uniformity,
# random distinct pairs), so each tower needs two.
MIN_QUERIES = MIN_PASSAGES = 2


def _tsne_sample(pairs: np.ndarray, num_queries: int, max_points: int, seed: int
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
                                      *(("--data", path) for path in data_paths)])
    output_folder.check_files(output_dir, outputs, overwrite)
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
        runs.append(figures.RunEmbeddings(f"{name} (step {encoders.step})", queries, passages,
                                          pairs))
        summaries.append({
            "model_dir": os.fspath(directory), "step": int(encoders.step),
            "num_queries": len(dataset.queries), "num_passages": len(dataset.passages),
            "num_pairs": len(pairs),
            **statistics.embedding_summary(queries, passages, pairs),
            **evaluate.rank_embeddings(queries, passages, dataset).metrics,
        })

    summary = dict(summaries[0])
    if compare:
        summary["compare"] = summaries[1]
    with output_folder.write_files_atomically(output_dir, outputs, overwrite) as folder:
        sample_queries, sample_passages, sample_pairs = _tsne_sample(
            pairs, len(dataset.queries), max_points, seed)
        figures.tsne_plot([figures.RunEmbeddings(run.name, run.queries[sample_queries],
                                                 run.passages[sample_passages], sample_pairs)
                           for run in runs],
                          os.path.join(folder, "tsne.png"), seed=seed)
        figures.distance_histograms(runs, os.path.join(folder, "distances.png"))
        figures.similarity_histogram(runs, os.path.join(folder, "similarities.png"),
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
