"""samtone.analysis: summary numbers against their definitions on hand-made and random
vectors, the distances behind the histogram, non-empty PNGs, and samtone-analyze end to end."""
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from samtone import analysis
from samtone.analysis import figures
from samtone.analysis import statistics
from samtone import inference
from samtone.data import smoke_path
from tiny_runs import REPO, train_tiny_run
from compile_flags import FAST_COMPILE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _unit(vectors):
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _reference_summary(queries, passages, pairs):
    """samtone.analysis.statistics' docstring definitions, one pair at a time."""
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
    summary = statistics.embedding_summary(queries, passages, [(0, 0), (1, 1)])
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
    monkeypatch.setattr(statistics, "BLOCK_ROWS", block_rows)  # several blocks, or one
    rng = np.random.default_rng(0)
    queries, passages = rng.normal(size=(9, 5)), rng.normal(size=(7, 5))
    pairs = [(0, 0), (1, 2), (2, 2), (8, 6), (3, 1)]
    summary = statistics.embedding_summary(queries, passages, pairs)
    assert summary == pytest.approx(_reference_summary(queries, passages, pairs), abs=1e-10)


def test_distances_of_hand_made_vectors(monkeypatch):
    monkeypatch.setattr(statistics, "BLOCK_ROWS", 2)

    def degrees(*angles):
        return np.stack([np.cos(np.deg2rad(angles)), np.sin(np.deg2rad(angles))], 1)

    queries = degrees(0, 90, 100)
    passages = degrees(10, 60, 180)
    # Query 0's true passages are 1 (60 off) and 2 (180 off): the closer counts. Query 2 has none.
    distances = statistics.embedding_distances(queries, passages, [(0, 1), (0, 2), (1, 1)])

    def cos(angle):
        return np.cos(np.deg2rad(angle))

    np.testing.assert_allclose(distances["query_top1_passage"],
                               1 - cos(np.array([10, 30, 40])))
    np.testing.assert_allclose(distances["query_true_passage"],
                               [1 - cos(60), 1 - cos(30), np.nan])
    np.testing.assert_allclose(distances["query_nearest_query"], 1 - cos(np.array([90, 10, 10])))
    np.testing.assert_allclose(distances["passage_nearest_passage"],
                               1 - cos(np.array([50, 50, 120])))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"pairs \[\(0, 5\)\] name queries or passages outside"):
        statistics.embedding_summary(np.eye(3), np.eye(3), [(0, 5)])
    with pytest.raises(ValueError, match="at least 2 queries"):
        statistics.embedding_summary(np.eye(3)[:1], np.eye(3), [(0, 0)])
    with pytest.raises(ValueError, match=r"passage_embeddings must be a non-empty \[N, D\]"):
        statistics.embedding_distances(np.eye(3), np.zeros((0, 3)), [])


def _clusters(seed=0, count=30, dim=16):
    """Queries near their passages, passages in two clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, dim)) * 3
    passages = centres[np.arange(count) % 2] + rng.normal(size=(count, dim))
    queries = passages + 0.3 * rng.normal(size=(count, dim))
    return queries, passages, [(i, i) for i in range(count)]


DPI = 150  # samtone.analysis.figures saves every figure at 150 dpi
# Figure sizes in inches, as samtone.analysis.figures draws them (t-SNE: 6 inches a panel).
DISTANCES_SIZE, SIMILARITIES_SIZE = (11.0, 7.5), (7.5, 4.8)


def TSNE_SIZE(runs):
    return (6.0 * runs + 0.5, 6.0)


def _colour_mask(image, colour):
    """Pixels drawn in exactly matplotlib's `colour` (the middle of lines and markers)."""
    from matplotlib.colors import to_rgb  # pylint: disable=import-outside-toplevel
    return np.all(np.abs(image[..., :3] - np.array(to_rgb(colour))) < 2 / 255, axis=-1)


def _assert_png(path, size, panels=(1, 1), colours=(), absent=()):
    """A decodable PNG of `size` inches at DPI, not blank, and in each of its rows x columns
    `panels` (equal parts of the image) at least a line's worth of pixels in every one of
    `colours`; none of `absent` anywhere."""
    from matplotlib import image as mpimg  # pylint: disable=import-outside-toplevel
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.shape[:2] == (round(size[1] * DPI), round(size[0] * DPI)), image.shape
    rgb = image[..., :3]
    distinct = len(np.unique((rgb * 255).round().astype(np.uint8).reshape(-1, 3), axis=0))
    assert distinct > 20, f"{path}: {distinct} distinct colours"  # text, lines, points
    assert np.mean(np.any(rgb < 0.9, axis=-1)) > 0.01  # more than a blank canvas
    rows, columns = panels
    height, width = image.shape[0] // rows, image.shape[1] // columns
    for row, column in itertools.product(range(rows), range(columns)):
        part = image[row * height:(row + 1) * height, column * width:(column + 1) * width]
        for colour in colours:
            assert _colour_mask(part, colour).sum() >= 50, (path, (row, column), colour)
    for colour in absent:
        assert _colour_mask(image, colour).sum() == 0, (path, colour)


def test_similarity_samples_enumerate_every_distinct_pair_when_few():
    # Queries at 0, 10, ..., 50 degrees; example e's passage at 5 + 10e degrees. Examples 0
    # and 1 share query 0, so (0, 1) is one query twice for query_query, and (q0, p1) is a
    # true pair for query_passage: both skipped.
    def degrees(angles):
        return np.stack([np.cos(np.deg2rad(angles)), np.sin(np.deg2rad(angles))], 1)

    queries = degrees(np.arange(0, 60, 10))
    passages = degrees(np.arange(5, 70, 10))
    pairs = [(0, 0), (0, 1), (2, 2), (3, 3), (4, 4), (5, 5), (1, 6)]
    samples = statistics.similarity_samples(queries, passages, pairs, max_samples=10_000)
    true_pairs = set(pairs)
    expected_qq = [np.cos(np.deg2rad(10 * (a - c))) for a, _ in pairs for c, _ in pairs
                   if a != c]
    expected_qp = [np.cos(np.deg2rad(10 * a - (5 + 10 * d))) for a, _ in pairs for _, d in pairs
                   if (a, d) not in true_pairs]
    np.testing.assert_allclose(np.sort(samples["query_query"]), np.sort(expected_qq), atol=1e-12)
    np.testing.assert_allclose(np.sort(samples["query_passage"]), np.sort(expected_qp),
                               atol=1e-12)
    # Sampled: the same kind of values, i != j always, reproducible by seed.
    sampled = statistics.similarity_samples(queries, passages, pairs, max_samples=20, seed=3)
    assert len(sampled["query_query"]) <= 20 and len(sampled["query_passage"]) <= 20
    for kind, expected in (("query_query", expected_qq), ("query_passage", expected_qp)):
        assert np.isin(np.round(sampled[kind], 9), np.round(expected, 9)).all()
        np.testing.assert_array_equal(sampled[kind], statistics.similarity_samples(
            queries, passages, pairs, max_samples=20, seed=3)[kind])
    with pytest.raises(ValueError, match="at least 2 true pairs"):
        statistics.similarity_samples(queries, passages, [(0, 0)])


def test_orthogonal_towers_have_known_similarity_histograms():
    # q_i = e_i and p_i = e_{i+1}: every sim(q_i, q_j) is 0; sim(q_i, p_j) is 1 exactly when
    # j = i - 1, i.e. for 4 of the 5 x 4 ordered pairs (i = 1..4), else 0.
    eye = np.eye(6)
    samples = statistics.similarity_samples(eye[:5], eye[1:6], [(i, i) for i in range(5)])
    np.testing.assert_array_equal(samples["query_query"], np.zeros(20))
    assert np.sort(samples["query_passage"]).tolist() == [0.0] * 16 + [1.0] * 4


def test_shared_bins():
    edges = figures.shared_bins([np.linspace(-0.5, 0.5, 1000), np.array([0.9, np.nan])])
    assert edges[0] == -0.5 and edges[-1] == 0.9 and 10 < len(edges) - 1 <= 60
    assert len(figures.shared_bins([np.ones(5)])) == 11  # one value: a window around it


def _runs(count=30, dim=16):
    queries, passages, pairs = _clusters(count=count, dim=dim)
    other_queries, other_passages, _ = _clusters(seed=1, count=count, dim=dim)
    return [figures.RunEmbeddings("samtone (step 2)", queries, passages, np.array(pairs)),
            figures.RunEmbeddings("in-batch (step 2)", other_queries, other_passages,
                                   np.array(pairs))]


def test_plots_are_written(tmp_path):
    runs = _runs()
    points = figures.tsne_plot(runs, tmp_path / "plots" / "tsne.png")
    assert len(points) == 2 and points[0].shape == (60, 2) and np.all(np.isfinite(points[1]))
    # Two panels, each with its run's queries and passages.
    _assert_png(tmp_path / "plots" / "tsne.png", TSNE_SIZE(2), panels=(1, 2),
                colours=("tab:blue", "tab:orange"))
    distances = figures.distance_histograms(runs, tmp_path / "distances.png")
    # Four panels, each with both runs' histograms (RUN_COLOURS: blue, then red).
    _assert_png(tmp_path / "distances.png", DISTANCES_SIZE, panels=(2, 2),
                colours=figures.RUN_COLOURS[:2], absent=figures.RUN_COLOURS[2:])
    for run, found in zip(runs, distances):
        np.testing.assert_allclose(found["query_true_passage"],
                                   1 - np.sum(_unit(run.queries) * _unit(run.passages), axis=1))
    samples = figures.similarity_histogram(runs[:1], tmp_path / "similarities.png")
    # One run: its colour and no other.
    _assert_png(tmp_path / "similarities.png", SIMILARITIES_SIZE,
                colours=figures.RUN_COLOURS[:1], absent=figures.RUN_COLOURS[1:])
    assert len(samples[0]["query_query"]) == 30 * 29


def test_missing_plotting_libraries_are_named(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in ("matplotlib", "sklearn"):
            monkeypatch.setitem(sys.modules, name, None)
    runs = _runs(count=4)
    with pytest.raises(ImportError, match=r"pip install 'samtone\[analysis\]'"):
        figures.distance_histograms(runs, tmp_path / "d.png")
    with pytest.raises(ImportError, match=r"pip install 'samtone\[analysis\]'"):
        figures.tsne_plot(runs, tmp_path / "t.png")


def test_run_names_tell_runs_apart():
    assert analysis.run_names(["/x/samtone", "/x/softmax"]) == ["samtone", "softmax"]
    assert analysis.run_names(["/a/run", "/b/run"]) == ["a/run", "b/run"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run") / "samtone")


@pytest.mark.slow
def test_command_line_compares_two_runs(run, tmp_path):
    other = tmp_path / "softmax"
    shutil.copytree(run, other)  # the machinery, not the model, is under test here
    with open(smoke_path("eval.jsonl"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(lines))
    result = subprocess.run(
        [sys.executable, "-m", "samtone.cli.analyze", f"--model_dir={run}",
         f"--compare={other}", "--step=1", f"--data={tmp_path / 'pairs.jsonl'}",
         f"--output={tmp_path / 'out'}", "--batch_size=16", "--max_points=50"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "alignment" in result.stdout and "similarities.png" in result.stdout
    assert "samtone" in result.stdout.splitlines()[0] and "softmax" in result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["step"], summary["num_queries"], summary["num_pairs"]) == (1, 40, 40)
    assert summary["compare"]["step"] == 2 and summary["compare"]["model_dir"] == str(other)
    # The numbers are those of the runs' own embeddings, computed independently here.
    records = [json.loads(line) for line in lines]
    for column, step in ((summary, 1), (summary["compare"], 2)):
        encoder = inference.Encoder.load(run, step=step, batch_size=8)
        queries = encoder.encode_queries([r["query"] for r in records])
        passages = encoder.encode_passages([r["passage"] for r in records])
        pairs = [(i, i) for i in range(len(records))]
        for name, value in _reference_summary(queries, passages, pairs).items():
            assert column[name] == pytest.approx(value, abs=1e-4), name
        top1 = np.argmax(_unit(queries) @ _unit(passages).T, axis=1)
        assert column["P@1"] == pytest.approx(np.mean(top1 == np.arange(len(records))))
    # Both runs in every figure: a t-SNE panel each, both colours in every histogram panel.
    _assert_png(tmp_path / "out" / "tsne.png", TSNE_SIZE(2), panels=(1, 2),
                colours=("tab:blue", "tab:orange"))
    _assert_png(tmp_path / "out" / "distances.png", DISTANCES_SIZE, panels=(2, 2),
                colours=figures.RUN_COLOURS[:2], absent=figures.RUN_COLOURS[2:])
    _assert_png(tmp_path / "out" / "similarities.png", SIMILARITIES_SIZE,
                colours=figures.RUN_COLOURS[:2], absent=figures.RUN_COLOURS[2:])
    assert sorted(analysis.FIGURES) == ["distances.png", "similarities.png", "tsne.png"]


def test_command_line_refuses_too_few_pairs_before_loading_a_model(tmp_path):
    """samtone-analyze's flags, checks and one-line error (exit 2), without a trained run: the
    data is read and refused before any model is looked for."""
    (tmp_path / "one.jsonl").write_text(json.dumps(
        {"query_id": "q", "query": "a", "passage_id": "p", "passage": "b"}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "samtone.cli.analyze", f"--model_dir={tmp_path / 'no_run'}",
         f"--data={tmp_path / 'one.jsonl'}", f"--output={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "needs at least 2 pairs" in result.stderr
    assert not (tmp_path / "out").exists()
