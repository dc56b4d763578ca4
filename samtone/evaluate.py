"""Evaluation of a dual encoder against a full corpus: encode, search on the mesh, score a run.

    samtone-eval --model_dir=runs/base --data=beir/scifact        # samtone.cli.eval
    result = evaluate_retrieval(encoder, read_retrieval_set("beir/scifact"))

Retrieval (`evaluate_retrieval`): the corpus is encoded with the passage tower, window by
window in length buckets (samtone.encoding), and streamed into a PassageIndex sharded over
the device mesh (samtone.search), each process keeping only the rows its devices hold. Every
query is encoded with the query tower, and the index returns its top k passages by cosine
(exact `top_k`, or `approx_max_k` with a recall target). The top-k lists, put in the order
trec_eval reads them (ties by descending document id), are the run: `run.trec` holds them
and samtone.metrics scores them as trec_eval does (P@1, MRR@10, NDCG@10, Recall@1/10/100),
so `trec_eval` / pytrec_eval / ranx on run.trec and the qrels give the same numbers.

Graded pairs (`evaluate_graded`, STS / CoSENT data): Spearman and Pearson correlation of
cos(query tower(a_i), passage tower(b_i)) with the labels.

`evaluate_model` is what samtone-eval runs: the run's own Encoder (its manifest, never its
Gin config), the data, and `metrics.json` + `run.trec` + `per_query.json` in the output
folder. metrics.json also holds a 95% bootstrap interval over queries of each retrieval metric
(metrics.bootstrap_intervals) and the data's fingerprint (`data_fingerprint`: the evaluated
queries and the qrels), which samtone-compare (samtone.compare) checks before it pairs the
per-query values of two evaluations. Evaluation during training (samtone.train_eval) calls
`evaluate_retrieval` / `evaluate_graded` with the live parameters; samtone.analysis calls
`rank_embeddings`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from samtone import metrics
from samtone import output_folder
from samtone import run_dir
from samtone import search
from samtone.data import files
from samtone.data import retrieval
from samtone.data.retrieval import RetrievalSet
from samtone.errors import ConfigError
from samtone.inference import Encoder
from samtone.normalize import l2_normalize
from samtone.vocabulary import same_vocabulary

METRICS_FILE = "metrics.json"
RUN_FILE = "run.trec"
PER_QUERY_FILE = "per_query.json"  # each retrieval metric of each evaluated query
RUN_TAG = "samtone"  # the last column of run.trec
GRADED_METRICS = ("Spearman", "Pearson")


@dataclasses.dataclass
class RetrievalResult:
    """Metrics of a run, the run itself, and the time each stage took."""

    metrics: dict[str, float]  # metrics.RETRIEVAL_METRICS
    scores: np.ndarray  # float32 [Nq, k], each row in trec_eval's order; -inf: empty slot
    indices: np.ndarray  # int64 [Nq, k] corpus indices; -1: empty slot
    num_queries: int
    num_passages: int
    seconds: dict[str, float]  # encode_passages, encode_queries, search, metrics
    # Each metric of each evaluated query (those of the qrels, ascending query index).
    per_query: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    evaluated_queries: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.int64))  # their query indices

    def counts(self) -> dict[str, int]:
        return {"num_queries": self.num_queries, "num_passages": self.num_passages}


def evaluate_retrieval(encoder: Encoder, data: RetrievalSet, *, top_k: int = 100,
                       mesh: Mesh | None = None, approximate: bool = False,
                       recall_target: float = 0.95,
                       progress: bool | None = None) -> RetrievalResult:
    """Encodes `data`'s corpus and queries with `encoder` and scores its top-k run.

    Args:
      top_k: results per query kept in the run (`scores`, `indices`); the search goes at least
        metrics.REQUIRED_DEPTH deep (or the whole corpus) for the metrics.
      mesh: where the corpus lives; default all devices (partitioning.make_mesh()).
      approximate, recall_target: `jax.lax.approx_max_k` instead of exact top-k.
      progress: tqdm bars on encoding and search (default: on a terminal, large inputs).
    """
    depth = _search_depth(top_k, len(data.passages))
    seconds = {}
    started = time.perf_counter()
    index = build_index(encoder.passage_chunks(data.passages, progress=progress),
                        len(data.passages), mesh)
    index.embeddings.block_until_ready()
    seconds["encode_passages"] = time.perf_counter() - started
    started = time.perf_counter()
    queries = l2_normalize(encoder.encode_queries(data.queries, progress=progress))
    seconds["encode_queries"] = time.perf_counter() - started
    started = time.perf_counter()
    scores, indices = index.search(queries, depth, approximate=approximate,
                                   recall_target=recall_target, progress=progress)
    seconds["search"] = time.perf_counter() - started
    return _score_run(scores, indices, data, seconds, top_k)


def rank_embeddings(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                    data: RetrievalSet, *, top_k: int = 100,
                    mesh: Mesh | None = None) -> RetrievalResult:
    """`evaluate_retrieval` of embeddings already computed (rows = data's queries, passages)."""
    depth = _search_depth(top_k, len(passage_embeddings))
    started = time.perf_counter()
    index = search.PassageIndex.from_embeddings(l2_normalize(np.asarray(passage_embeddings)),
                                                mesh)
    scores, indices = index.search(l2_normalize(np.asarray(query_embeddings)), depth,
                                   progress=False)
    return _score_run(scores, indices, data, {"search": time.perf_counter() - started}, top_k)


def _search_depth(top_k: int, num_passages: int) -> int:
    """How deep to rank: `top_k`, but at least what the metrics read (Recall@100), and never
    more than the corpus."""
    if top_k < 1:
        raise ConfigError(f"top_k={top_k}; it must be >= 1")
    return min(max(top_k, metrics.REQUIRED_DEPTH), num_passages)


def _score_run(scores: np.ndarray, indices: np.ndarray, data: RetrievalSet,
               seconds: dict[str, float], top_k: int) -> RetrievalResult:
    """Metrics on the whole ranking; the run kept is its first `top_k` in trec_eval's order."""
    started = time.perf_counter()
    scores, indices = metrics.trec_order(scores, indices, metrics.id_order(data.passage_ids))
    per_query = metrics.per_query_metrics(indices, data.qrels)
    values = {name: float(np.mean(column)) if len(column) else float("nan")
              for name, column in per_query.items()}
    seconds["metrics"] = time.perf_counter() - started
    return RetrievalResult(values, scores[:, :top_k], indices[:, :top_k], len(data.queries),
                           len(data.passages), seconds, per_query,
                           data.qrels.evaluated_queries())


def build_index(chunks: Iterable[np.ndarray], num_passages: int,
                mesh: Mesh | None = None) -> search.PassageIndex:
    """A PassageIndex of unit-normalised passage embeddings arriving in corpus order.

    Every process sees every chunk (a sharded encoder's replicated output) and keeps the
    rows its own devices hold (`search.local_row_ranges`), so host memory stays at about
    one shard however large the corpus.
    """
    ranges = search.local_row_ranges(num_passages, mesh)
    normalised = (l2_normalize(chunk) for chunk in chunks)
    return search.PassageIndex.from_chunks(_local_rows(normalised, ranges), num_passages, mesh)


def _local_rows(chunks: Iterable[np.ndarray], ranges: Sequence[tuple[int, int]]
                ) -> Iterator[np.ndarray]:
    """The rows of consecutive `chunks` (corpus order) that fall in `ranges`, in order."""
    start = 0
    for chunk in chunks:
        stop = start + len(chunk)
        for first, last in ranges:
            low, high = max(first, start), min(last, stop)
            if low < high:
                yield chunk[low - start:high - start]
        start = stop


# --- graded pairs --------------------------------------------------------------------------


def graded_metrics(a_embeddings: np.ndarray, b_embeddings: np.ndarray,
                   labels: Sequence[float]) -> dict[str, float]:
    """Spearman and Pearson correlation of cosine(a_i, b_i) with labels_i."""
    a = l2_normalize(np.asarray(a_embeddings, np.float32))
    b = l2_normalize(np.asarray(b_embeddings, np.float32))
    labels = np.asarray(labels, np.float64)
    if a.shape != b.shape or a.ndim != 2 or labels.shape != (a.shape[0],):
        raise ValueError(f"need [N, D] embeddings and [N] labels, got {a.shape}, {b.shape} "
                         f"and {labels.shape}")
    cosine = np.sum(a * b, axis=-1)
    return {"Spearman": metrics.spearman(cosine, labels),
            "Pearson": metrics.pearson(cosine, labels)}


def evaluate_graded(encoder: Encoder, examples: Sequence[files.Example], *,
                    progress: bool | None = None) -> dict[str, float]:
    """`graded_metrics` of examples' (query, passage, label), each encoded by its tower."""
    if not examples:
        raise ValueError("evaluate_graded got no examples")
    unlabelled = [i for i, example in enumerate(examples) if example.label is None]
    if unlabelled:
        raise ValueError(f"graded evaluation needs a label on every example; example "
                         f"{unlabelled[0]} (query {examples[unlabelled[0]].query!r}) has none")
    queries = encoder.encode_queries([e.query for e in examples], progress=progress)
    passages = encoder.encode_passages([e.passage for e in examples], progress=progress)
    return graded_metrics(queries, passages, [e.label for e in examples])


# --- files ----------------------------------------------------------------------------------


def write_run(path: str | os.PathLike, data: RetrievalSet, result: RetrievalResult,
              tag: str = RUN_TAG) -> None:
    """run.trec: `qid Q0 docid rank score tag`, the top k of each query in trec_eval's order.

    Scores are written with 9 significant digits, which tell float32 values apart and keep
    equal ones equal, so trec_eval ranks (and ties) exactly as the metrics here did.
    """
    with _replacing(path) as temporary, temporary.open("w") as f:
        for query, (row_scores, row_indices) in enumerate(zip(result.scores, result.indices)):
            query_id = data.query_ids[query]
            f.write("".join(
                f"{query_id} Q0 {data.passage_ids[passage]} {rank} {score:.9g} {tag}\n"
                for rank, (passage, score) in enumerate(zip(row_indices.tolist(),
                                                            row_scores.tolist()), start=1)
                if passage >= 0))


def data_fingerprint(data: RetrievalSet) -> str:
    """sha256 of what the per-query metrics depend on besides the run: the evaluated queries
    (id and text, in query order) and the judgements (query id, passage id, grade, sorted).

    Two evaluations with the same fingerprint scored the same queries against the same qrels,
    so their per-query values pair up (samtone-compare checks it). The corpus is not hashed
    (millions of texts); metrics.json's num_passages stands for it.
    """
    evaluated = data.qrels.evaluated_queries().tolist()
    queries = [[data.query_ids[q], data.queries[q]] for q in evaluated]
    judgements = sorted([data.query_ids[q], data.passage_ids[p], float(g)]
                        for q, p, g in zip(data.qrels.queries.tolist(),
                                           data.qrels.passages.tolist(),
                                           data.qrels.grades.tolist()))
    text = json.dumps({"queries": queries, "qrels": judgements}, ensure_ascii=False,
                      separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_per_query(path: str | os.PathLike, data: RetrievalSet,
                    result: RetrievalResult) -> None:
    """per_query.json: `{"query_ids": [...], "metrics": {"P@1": [...], ...}}`, the value of
    each metric for each evaluated query, in the order of `query_ids` (the qrels' queries)."""
    values = {"query_ids": [data.query_ids[q] for q in result.evaluated_queries.tolist()],
              "metrics": {name: column.tolist() for name, column in result.per_query.items()}}
    with _replacing(path) as temporary:
        temporary.write_text(json.dumps(values) + "\n")


def write_metrics(path: str | os.PathLike, values: dict) -> None:
    """`values` as indented JSON, written whole or not at all."""
    with _replacing(path) as temporary:
        temporary.write_text(json.dumps(values, indent=2) + "\n")


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[epath.Path]:
    """A temporary sibling of `path` that replaces it when the block succeeds, and is deleted
    on any exception (Ctrl-C included)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp"
    try:
        yield temporary
        temporary.replace(path)
    finally:
        if temporary.exists():
            temporary.unlink()


def format_table(values: dict[str, float],
                 intervals: dict[str, Sequence[float]] | None = None) -> str:
    """Aligned columns, metric and value (and its interval, where given), for a command's
    closing lines."""
    intervals = intervals or {}
    header = f"  {'metric':<12}{'value':>8}"
    if intervals:
        header += f"  {metrics.BOOTSTRAP_CONFIDENCE:.0%} interval"
    lines = [header]
    for name, value in values.items():
        line = f"  {name:<12}{value:>8.4f}"
        if name in intervals:
            low, high = intervals[name]
            line += f"  [{low:.4f}, {high:.4f}]"
        lines.append(line)
    return "\n".join(lines)


# --- samtone-eval ---------------------------------------------------------------------------


def check_vocabulary(model_vocabulary: str | os.PathLike, data_vocabulary: str | os.PathLike,
                     source: str) -> None:
    """Refuses data tokenised with a SentencePiece model other than the checkpoint's.

    The same file, or a file of the same bytes, passes; anything else is a ConfigError
    naming both, since the model only reads the token ids of its own vocabulary.
    """
    model_path, data_path = epath.Path(model_vocabulary), epath.Path(data_vocabulary)
    if not data_path.exists():
        raise ConfigError(f"{source}: the vocabulary {os.fspath(data_path)} does not exist")
    if same_vocabulary(model_path, data_path):
        return
    raise ConfigError(f"{source}: the data's vocabulary {os.fspath(data_path)} is not the "
                      f"model's vocabulary {os.fspath(model_path)} (a different SentencePiece "
                      "model); the checkpoint only reads token ids of its own vocabulary, so "
                      "evaluate text data (it is tokenised with the model's) or data "
                      "prepared with that file")


@dataclasses.dataclass
class EvalReport:
    """What samtone-eval prints: the metrics.json values, where files went, stage timings."""

    values: dict  # metrics, counts, step, ...: the content of metrics.json
    metric_names: tuple[str, ...]
    output_dir: str
    written: list[str]
    seconds: dict[str, float]


def evaluate_model(model_dir: str, data: files.PathOrPaths, *, split: str = "test",
                   output_dir: str | None = None, step: int | None = None,
                   batch_size: int = 128, top_k: int = 100, approximate: bool = False,
                   recall_target: float = 0.95, vocabulary: str | None = None,
                   overwrite: bool = False, progress: bool | None = None,
                   mesh: Mesh | None = None) -> EvalReport:
    """Evaluates a run (or export) on a BEIR folder or held-out pairs; writes metrics.json and
    (retrieval) run.trec, the top `top_k` of each query, and per_query.json to `output_dir`
    (default MODEL_DIR/eval/<data name>).

    Existing metrics.json / run.trec / per_query.json there are replaced only with
    `overwrite`; an output that is or holds an input (the run, the data) is always refused.
    Both are checked before the model is loaded.
    """
    folder = retrieval.beir_folder(data)
    name = retrieval.data_name(folder, split) if folder else retrieval.data_name(data)
    output_dir = os.fspath(output_dir or run_dir.RunDir.at(model_dir).eval_output(name))
    _check_output(output_dir, model_dir, data, vocabulary, [METRICS_FILE], overwrite)
    if folder is not None:
        examples, dataset = None, retrieval.read_beir(folder, split)
    else:
        examples = files.read_examples(data)
        dataset = None if retrieval.is_graded(examples) else retrieval.from_examples(
            examples, name)
    outputs = [METRICS_FILE] if dataset is None else [RUN_FILE, PER_QUERY_FILE, METRICS_FILE]
    output_folder.check_files(output_dir, outputs, overwrite)  # before loading the model
    encoder = Encoder.load(model_dir, step=step, batch_size=batch_size)
    if vocabulary is not None:
        check_vocabulary(encoder.tokenizer.path, vocabulary, "--vocabulary")
    values: dict = {}
    if dataset is None:
        started = time.perf_counter()
        values.update(evaluate_graded(encoder, examples, progress=progress))
        seconds = {"encode_pairs": time.perf_counter() - started}
        values["num_pairs"], names = len(examples), GRADED_METRICS
    else:
        result = evaluate_retrieval(encoder, dataset, top_k=top_k, mesh=mesh,
                                    approximate=approximate, recall_target=recall_target,
                                    progress=progress)
        values.update(result.metrics)
        intervals = metrics.bootstrap_intervals(result.per_query)
        values["intervals"] = {name: list(bounds) for name, bounds in intervals.items()}
        values["bootstrap"] = {"confidence": metrics.BOOTSTRAP_CONFIDENCE,
                               "resamples": metrics.BOOTSTRAP_RESAMPLES,
                               "seed": metrics.BOOTSTRAP_SEED, "over": "queries",
                               "method": "percentile"}
        values.update(result.counts())
        seconds, names = result.seconds, metrics.RETRIEVAL_METRICS
        values.update(top_k=min(top_k, result.num_passages),
                      search=f"approximate (recall_target {recall_target})" if approximate
                      else "exact")
    values.update(step=int(encoder.step), model_dir=os.fspath(model_dir),
                  data=[os.fspath(p) for p in files.expand_paths(data)])
    if folder is not None:
        values["split"] = split
    if dataset is not None:
        values["data_fingerprint"] = data_fingerprint(dataset)
    if jax.process_index() == 0:
        # run.trec, per_query.json and metrics.json appear together (metrics.json last) or
        # not at all.
        with output_folder.write_files_atomically(output_dir, outputs, overwrite) as temporary:
            if dataset is not None:
                write_run(os.path.join(temporary, RUN_FILE), dataset, result)
                write_per_query(os.path.join(temporary, PER_QUERY_FILE), dataset, result)
            write_metrics(os.path.join(temporary, METRICS_FILE), values)
    written = [os.path.join(output_dir, output) for output in outputs]
    return EvalReport(values, names, output_dir, written, seconds)


def _check_output(output_dir: str, model_dir: str, data: files.PathOrPaths,
                  vocabulary: str | None, names: Sequence[str], overwrite: bool) -> None:
    """Refuses an output folder that is or holds an input, lies in the run's training state,
    is a file, or (without `overwrite`) already holds `names`."""
    data_paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    inputs = [("--model_dir", model_dir), *(("--data", path) for path in data_paths),
              ("--vocabulary", vocabulary)]
    run_dir.check_output(output_dir, inputs, flag="--output")
    output_folder.check_files(output_dir, names, overwrite)
