"""samtone.analysis: summary numbers against their definitions on hand-made and random
vectors, the distances behind the histogram, non-empty PNGs, and samtone-analyze end to end."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from samtone import analysis
from samtone import inference
from samtone.data import smoke_path
from tiny_runs import REPO, train_tiny_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _unit(vectors):
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _reference_summary(queries, passages, pairs):
    """The module docstring's definitions, one pair at a time."""
    queries, passages = _unit(queries), _unit(passages)

    def mean_cosine_between_distinct(x):
        return np.mean([x[i] @ x[j] for i in range(len(x)) for j in range(len(x)) if i != j])

    def uniformity(x):
        return np.log(np.mean([np.exp(-2 * np.sum((a - b) ** 2))
                               for a, b in itertools.combinations(x, 2)]))

    return {
        "mean_query_query_cosine": mean_cosine_between_distinct(queries),
        "mean_passage_passage_cosine": mean_cosine_between_distinct(passages),
        "mean_query_passage_cosine": np.mean([q @ p for q in queries for p in passages]),
        "mean_positive_distance": np.mean([1 - queries[i] @ passages[j] for i, j in pairs]),
        "alignment": np.mean([np.sum((queries[i] - passages[j]) ** 2) for i, j in pairs]),
        "query_uniformity": uniformity(queries),
        "passage_uniformity": uniformity(passages),
    }


def test_summary_of_hand_made_vectors():
    # Queries on the axes, passages: one equal to query 0, one opposite to it (scaled: the
    # summary normalises). The pairs are (0, 0) and (1, 1).
    queries = [[1.0, 0.0], [0.0, 1.0]]
    passages = [[3.0, 0.0], [-2.0, 0.0]]
    summary = analysis.embedding_summary(queries, passages, [(0, 0), (1, 1)])
    assert summary == pytest.approx({
        "mean_query_query_cosine": 0.0,
        "mean_passage_passage_cosine": -1.0,
        "mean_query_passage_cosine": 0.0,  # (1 - 1 + 0 + 0) / 4
        "mean_positive_distance": 0.5,  # (0 + 1) / 2
        "alignment": 1.0,  # (0 + ||(0, 1) - (-1, 0)||^2 = 2) / 2
        "query_uniformity": -4.0,  # one pair at squared distance 2: log exp(-4)
        "passage_uniformity": -8.0,  # one pair at squared distance 4
    })


@pytest.mark.parametrize("block_rows", [3, 1024])
def test_summary_matches_the_definitions_on_random_vectors(monkeypatch, block_rows):
    monkeypatch.setattr(analysis, "BLOCK_ROWS", block_rows)  # several blocks, or one
    rng = np.random.default_rng(0)
    queries, passages = rng.normal(size=(9, 5)), rng.normal(size=(7, 5))
    pairs = [(0, 0), (1, 2), (2, 2), (8, 6), (3, 1)]
    summary = analysis.embedding_summary(queries, passages, pairs)
    assert summary == pytest.approx(_reference_summary(queries, passages, pairs), abs=1e-10)


def test_distances_of_hand_made_vectors(monkeypatch):
    monkeypatch.setattr(analysis, "BLOCK_ROWS", 2)
    degrees = lambda *angles: np.stack([np.cos(np.deg2rad(angles)), np.sin(np.deg2rad(angles))], 1)
    queries = degrees(0, 90, 100)
    passages = degrees(10, 60, 180)
    # Query 0's true passages are 1 (60 off) and 2 (180 off): the closer counts. Query 2 has none.
    distances = analysis.embedding_distances(queries, passages, [(0, 1), (0, 2), (1, 1)])
    cos = lambda angle: np.cos(np.deg2rad(angle))
    np.testing.assert_allclose(distances["query_top1_passage"],
                               1 - cos(np.array([10, 30, 40])))
    np.testing.assert_allclose(distances["query_true_passage"],
                               [1 - cos(60), 1 - cos(30), np.nan])
    np.testing.assert_allclose(distances["query_nearest_query"], 1 - cos(np.array([90, 10, 10])))
    np.testing.assert_allclose(distances["passage_nearest_passage"],
                               1 - cos(np.array([50, 50, 120])))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"pairs \[\(0, 5\)\] name queries or passages outside"):
        analysis.embedding_summary(np.eye(3), np.eye(3), [(0, 5)])
    with pytest.raises(ValueError, match="at least 2 queries"):
        analysis.embedding_summary(np.eye(3)[:1], np.eye(3), [(0, 0)])
    with pytest.raises(ValueError, match=r"passage_embeddings must be a non-empty \[N, D\]"):
        analysis.embedding_distances(np.eye(3), np.zeros((0, 3)), [])


def _clusters(seed=0, count=30, dim=16):
    """Queries near their passages, passages in two clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, dim)) * 3
    passages = centres[np.arange(count) % 2] + rng.normal(size=(count, dim))
    queries = passages + 0.3 * rng.normal(size=(count, dim))
    return queries, passages, [(i, i) for i in range(count)]


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 10_000  # axes, points and a legend, not a blank canvas


def test_plots_are_written(tmp_path):
    queries, passages, pairs = _clusters()
    points = analysis.tsne_plot(queries, passages, tmp_path / "plots" / "tsne.png", pairs=pairs,
                                title="clusters")
    assert points.shape == (60, 2) and np.all(np.isfinite(points))
    _assert_png(tmp_path / "plots" / "tsne.png")
    distances = analysis.top1_distance_histogram(queries, passages, tmp_path / "distances.png",
                                                 pairs=pairs)
    _assert_png(tmp_path / "distances.png")
    np.testing.assert_allclose(distances["query_true_passage"],
                               1 - np.sum(_unit(queries) * _unit(passages), axis=1))


def test_missing_plotting_libraries_are_named(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in ("matplotlib", "sklearn"):
            monkeypatch.setitem(sys.modules, name, None)
    queries, passages, pairs = _clusters(count=4)
    with pytest.raises(ImportError, match=r"pip install 'samtone\[analysis\]'"):
        analysis.top1_distance_histogram(queries, passages, tmp_path / "d.png", pairs=pairs)
    with pytest.raises(ImportError, match=r"needs scikit-learn: pip install 'samtone\[analysis\]'"):
        analysis.tsne_plot(queries, passages, tmp_path / "t.png")


def test_command_line(tmp_path):
    run = train_tiny_run(tmp_path / "run")
    with open(smoke_path("eval.jsonl"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(lines))
    result = subprocess.run(
        [sys.executable, "-m", "samtone.cli.analyze", f"--model_dir={run}",
         f"--data={tmp_path / 'pairs.jsonl'}", f"--output_dir={tmp_path / 'out'}",
         "--batch_size=16", "--max_points=50"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "alignment:" in result.stdout and "wrote tsne.png" in result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["step"], summary["num_queries"], summary["num_pairs"]) == (2, 40, 40)
    # The numbers are those of the run's own embeddings, computed independently here.
    records = [json.loads(line) for line in lines]
    encoder = inference.Encoder.load(run, batch_size=8)
    queries = encoder.encode_queries([r["query"] for r in records])
    passages = encoder.encode_passages([r["passage"] for r in records])
    pairs = [(i, i) for i in range(len(records))]
    for name, value in _reference_summary(queries, passages, pairs).items():
        assert summary[name] == pytest.approx(value, abs=1e-4), name
    top1 = np.argmax(_unit(queries) @ _unit(passages).T, axis=1)
    assert summary["p@1"] == pytest.approx(np.mean(top1 == np.arange(len(records))))
    _assert_png(tmp_path / "out" / "tsne.png")
    _assert_png(tmp_path / "out" / "distances.png")
