"""samtone.evaluate and samtone-eval: the run written to run.trec and scored by pytrec_eval
(trec_eval) gives the metrics samtone reports, ties and grades included, on one device and on
a sharded mesh; graded pairs; and end to end, a tiny run evaluated on a BEIR folder during
training and afterwards by `samtone-eval`, which agree."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.stats

from samtone import evaluate, inference, metrics, partitioning
from samtone.data import smoke_path
from samtone.data.files import Example
from samtone.data import retrieval
from samtone.errors import ConfigError
from tiny_runs import REPO, train_tiny_run
from compile_flags import FAST_COMPILE

pytrec_eval = pytest.importorskip("pytrec_eval")

NUM_TOPICS = 6
NUM_PASSAGES = 150  # passage j has topic j % 6


class TopicTokenizer:
    """'topic3 ...' -> [3 + 2, 1, 0, 0]: one content token, EOS, padding."""

    def encode(self, texts, max_length):
        tokens = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            tokens[row, 0] = int(text.split()[0].removeprefix("topic")) + 2
            tokens[row, 1] = 1
        return tokens


def one_hot(tokens):
    return np.eye(NUM_TOPICS, dtype=np.float32)[tokens[:, 0] - 2]


def shifted(tokens):
    """Topic t -> e_{t+1} + 0.5 e_t: query t prefers passage topic t-1, then topic t."""
    topics = tokens[:, 0] - 2
    eye = np.eye(NUM_TOPICS, dtype=np.float32)
    return eye[(topics + 1) % NUM_TOPICS] + 0.5 * eye[topics]


def topic_encoder(passage_encoder=one_hot):
    return inference.Encoder(one_hot, passage_encoder, TopicTokenizer(), 4, 4, step=7,
                             batch_size=4)


def tied_retrieval_set():
    """Every query ties with its topic's 25 passages (score 1) and the other 125 (score 0).

    Queries: 0 has graded relevant passages in its topic and one outside it; 1 has only
    grade-0 judgements; 2's relevant passage is a high-index passage of another topic, not
    in the top 100; 3..5 one relevant passage each.
    """
    queries = [f"topic{t} question {t}" for t in range(NUM_TOPICS)]
    passages = [f"topic{j % NUM_TOPICS} passage {j}" for j in range(NUM_PASSAGES)]
    ids = [f"doc{(j * 37) % NUM_PASSAGES}" for j in range(NUM_PASSAGES)]  # string order != j
    judged = {0: {0: 2, 6: 1, 60: 3, 1: 1}, 1: {1: 0}, 2: {149: 1},
              3: {3: 1}, 4: {100: 2}, 5: {5: 1, 11: 0}}
    return retrieval.RetrievalSet("tied", [f"q{q}" for q in range(NUM_TOPICS)], queries, ids,
                                  passages, metrics.Qrels.from_dict(judged)), judged


def pytrec_means(run_file, data, judged):
    with open(run_file, encoding="utf-8") as f:
        run = pytrec_eval.parse_run(f)
    qrels = {data.query_ids[q]: {data.passage_ids[p]: int(g) for p, g in passages.items()}
             for q, passages in judged.items()}
    per_query = pytrec_eval.RelevanceEvaluator(
        qrels, {"P.1", "recip_rank", "ndcg_cut.10", "recall.1,10,100"}).evaluate(run)

    def mean(name):
        return np.mean([values[name] for values in per_query.values()])

    reciprocal = np.array([values["recip_rank"] for values in per_query.values()])
    return {"P@1": mean("P_1"), "MRR@10": np.mean(np.where(reciprocal >= 0.1, reciprocal, 0)),
            "NDCG@10": mean("ndcg_cut_10"), "Recall@1": mean("recall_1"),
            "Recall@10": mean("recall_10"), "Recall@100": mean("recall_100")}, len(per_query)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2)])
def test_run_trec_scored_by_trec_eval_gives_the_reported_metrics(tmp_path, mesh_shape):
    data, judged = tied_retrieval_set()
    mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[:np.prod(mesh_shape)])
    result = evaluate.evaluate_retrieval(topic_encoder(), data, mesh=mesh, progress=False)
    evaluate.write_run(tmp_path / "run.trec", data, result)
    expected, evaluated = pytrec_means(tmp_path / "run.trec", data, judged)
    assert evaluated == result.num_queries == 6
    assert result.metrics == pytest.approx(expected, abs=1e-6)
    assert 0 < result.metrics["NDCG@10"] < 1 and result.metrics["Recall@100"] < 1
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert len(lines) == 6 * 100
    first = lines[0].split()
    assert first[:2] == ["q0", "Q0"] and first[3:] == ["1", "1", "samtone"]
    # The 25 ties at score 1 come in trec_eval's order: descending document id.
    tied = [line.split()[2] for line in lines[:25]]
    assert tied == sorted(tied, reverse=True)


def test_pairs_with_a_perfect_and_a_shifted_encoder():
    examples = [Example(f"topic{t} question", f"topic{t} answer") for t in range(6)]
    data = retrieval.from_examples(examples)
    perfect = evaluate.evaluate_retrieval(topic_encoder(), data, progress=False)
    assert perfect.metrics == dict.fromkeys(metrics.RETRIEVAL_METRICS, 1.0)
    assert (perfect.num_queries, perfect.num_passages) == (6, 6)
    second = evaluate.evaluate_retrieval(topic_encoder(shifted), data, progress=False)
    assert second.metrics == pytest.approx({
        "P@1": 0.0, "MRR@10": 0.5, "NDCG@10": 1 / np.log2(3), "Recall@1": 0.0,
        "Recall@10": 1.0, "Recall@100": 1.0})
    assert set(second.seconds) == {"encode_passages", "encode_queries", "search", "metrics"}


def test_a_shallow_top_k_keeps_that_many_results_and_the_full_depth_metrics():
    data, _ = tied_retrieval_set()
    deep = evaluate.evaluate_retrieval(topic_encoder(), data, top_k=100)
    shallow = evaluate.evaluate_retrieval(topic_encoder(), data, top_k=2)
    assert shallow.metrics == deep.metrics  # Recall@100 still reads the whole ranking
    np.testing.assert_array_equal(shallow.indices, deep.indices[:, :2])
    np.testing.assert_array_equal(shallow.scores, deep.scores[:, :2])


def test_index_keeps_the_rows_of_this_process():
    chunks = [np.arange(n, n + 3)[:, None] * np.ones((1, 2)) for n in range(0, 12, 3)]
    kept = list(evaluate._local_rows(chunks, [(2, 4), (7, 12)]))
    np.testing.assert_array_equal(np.concatenate(kept)[:, 0], [2, 3, 7, 8, 9, 10, 11])
    passages = np.random.default_rng(0).normal(size=(37, 8)).astype(np.float32)
    index = evaluate.build_index(np.array_split(passages, 5), 37,
                                 partitioning.make_mesh((8, 1)))
    np.testing.assert_allclose(np.asarray(index.embeddings)[:37],
                               passages / np.linalg.norm(passages, axis=1, keepdims=True),
                               rtol=1e-6)


def test_graded_metrics_are_spearman_and_pearson_of_cosines():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    labels = rng.integers(0, 5, size=20).astype(float)
    cosines = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert evaluate.graded_metrics(a, b, labels) == pytest.approx({
        "Spearman": scipy.stats.spearmanr(cosines, labels).statistic,
        "Pearson": scipy.stats.pearsonr(cosines, labels).statistic}, abs=1e-6)
    # cos(one_hot(0), shifted(t)): 0.5/n for t=0, 1/n for t=5, else 0: rises with the label.
    examples = [Example("topic0 q", f"topic{t} p", label=float(label))
                for t, label in [(1, 0), (0, 1), (5, 2)]]
    result = evaluate.evaluate_graded(topic_encoder(shifted), examples, progress=False)
    assert result["Spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="example 0"):
        evaluate.evaluate_graded(topic_encoder(), [Example("topic0 q", "topic0 p")])


def test_vocabulary_check_names_both(tmp_path):
    model_vocabulary = smoke_path("spm.model")
    copy = tmp_path / "copy.model"
    shutil.copy(model_vocabulary, copy)
    evaluate.check_vocabulary(model_vocabulary, copy, "--vocabulary")  # same bytes: fine
    other = tmp_path / "other.model"
    other.write_bytes(b"not the same model")
    with pytest.raises(ConfigError, match=f"--vocabulary: the data's vocabulary {other} is not "
                                          f"the model's vocabulary {model_vocabulary}"):
        evaluate.check_vocabulary(model_vocabulary, other, "--vocabulary")


# --- per-query values, bootstrap intervals, the data's fingerprint ---------------------------


def test_bootstrap_intervals_equal_an_independent_numpy_bootstrap():
    rng = np.random.default_rng(5)
    per_query = {"P@1": (rng.random(73) < 0.4).astype(float), "NDCG@10": rng.random(73)}
    intervals = metrics.bootstrap_intervals(per_query)
    # As documented: resample b draws default_rng(0).integers(0, n, size=n), b = 0..999.
    draws = np.random.default_rng(0)
    samples = [draws.integers(0, 73, size=73) for _ in range(1000)]
    for name, values in per_query.items():
        means = [values[sample].mean() for sample in samples]
        expected = np.percentile(means, [2.5, 97.5])
        assert intervals[name] == pytest.approx(tuple(expected), abs=1e-12), name
        low, high = intervals[name]
        assert low < values.mean() < high and high - low > 0.05
    assert metrics.bootstrap_intervals(per_query) == intervals  # deterministic
    assert metrics.bootstrap_intervals(per_query, seed=1) != intervals
    wider = metrics.bootstrap_intervals(per_query, confidence=0.99)["NDCG@10"]
    assert wider[0] < intervals["NDCG@10"][0] and wider[1] > intervals["NDCG@10"][1]
    constant = metrics.bootstrap_intervals({"P@1": np.ones(5)})
    assert constant == {"P@1": (1.0, 1.0)}


def test_per_query_values_are_those_the_means_average(tmp_path):
    data, judged = tied_retrieval_set()
    result = evaluate.evaluate_retrieval(topic_encoder(), data, progress=False)
    np.testing.assert_array_equal(result.evaluated_queries, sorted(judged))
    for name in metrics.RETRIEVAL_METRICS:
        assert np.mean(result.per_query[name]) == pytest.approx(result.metrics[name])
    # Query 1 has only grade-0 judgements: 0 everywhere; query 3 finds its passage.
    assert result.per_query["Recall@100"][1] == 0 and result.per_query["Recall@100"][3] == 1
    evaluate.write_per_query(tmp_path / "per_query.json", data, result)
    written = json.loads((tmp_path / "per_query.json").read_text())
    assert written["query_ids"] == [f"q{q}" for q in sorted(judged)]
    assert written["metrics"] == {name: pytest.approx(values.tolist())
                                  for name, values in result.per_query.items()}
    table = evaluate.format_table({"P@1": 0.41333}, {"P@1": (0.36, 0.47)})
    assert table.splitlines()[1] == "  P@1           0.4133  [0.3600, 0.4700]"


def test_data_fingerprint_follows_the_queries_and_qrels_only():
    data, judged = tied_retrieval_set()
    fingerprint = evaluate.data_fingerprint(data)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64
    same, _ = tied_retrieval_set()
    same.passages[0] = "another passage text"  # the corpus is not hashed
    assert evaluate.data_fingerprint(same) == fingerprint
    text = dataclasses.replace(data, queries=[*data.queries[:-1], "topic5 reworded"])
    grades = {**judged, 5: {5: 2, 11: 0}}
    regraded = dataclasses.replace(data, qrels=metrics.Qrels.from_dict(grades))
    ids = dataclasses.replace(data, query_ids=[f"x{q}" for q in range(NUM_TOPICS)])
    fewer = dataclasses.replace(data, qrels=metrics.Qrels.from_dict(
        {q: p for q, p in judged.items() if q != 4}))
    assert len({evaluate.data_fingerprint(d) for d in (data, text, regraded, ids, fewer)}) == 5


# --- end to end: training evaluates a BEIR folder; samtone-eval agrees ----------------------


def make_smoke_beir(folder, count=40):
    """The first `count` smoke eval pairs as a BEIR folder, with 30 distractor passages from
    the training set, unjudged queries, graded and zero judgements."""
    with open(smoke_path("eval.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(next(f)) for _ in range(count)]
    with open(smoke_path("train.jsonl"), encoding="utf-8") as f:
        distractors = [json.loads(next(f))["passage"] for _ in range(30)]
    passages = list(dict.fromkeys([p["passage"] for p in pairs] + distractors))
    os.makedirs(folder / "qrels")
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{j}", "title": "", "text": text}) + "\n"
        for j, text in enumerate(passages)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": p["query"]}) + "\n" for i, p in enumerate(pairs)))
    lines = ["query-id\tcorpus-id\tscore"]
    for i, pair in enumerate(pairs[:-5]):  # the last 5 queries are unjudged
        lines.append(f"q{i}\td{passages.index(pair['passage'])}\t{1 + i % 2}")
        if i % 7 == 0:
            lines.append(f"q{i}\td{len(passages) - 1 - i}\t{0 if i % 14 else 1}")
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _run(*args):
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run evaluated on a BEIR folder after each of its 2 steps."""
    folder = make_smoke_beir(tmp_path_factory.mktemp("data") / "smokebeir")
    run = train_tiny_run(tmp_path_factory.mktemp("run") / "run", f"--gin.EVAL_DATA='{folder}'",
                         "--gin.EvalConfig.every_steps=1")
    return run, folder


def test_training_writes_metrics_per_step_and_samtone_eval_agrees(trained, tmp_path):
    run, folder = trained
    data = retrieval.read_beir(folder)
    counts = (35, len(data.passages))
    step_metrics = {step: json.loads((run / "eval" / "smokebeir" / str(step) /
                                      "metrics.json").read_text()) for step in (1, 2)}
    for step, values in step_metrics.items():
        assert (values["step"], values["num_queries"], values["num_passages"]) == (step, *counts)
        assert set(metrics.RETRIEVAL_METRICS) <= set(values)
    assert list((run / "eval").glob("events.out.tfevents.*"))  # TensorBoard
    result = _run("samtone.cli.eval", f"--model_dir={run}", f"--data={folder}",
                  "--batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    output = run / "eval" / "smokebeir"
    reported = json.loads((output / "metrics.json").read_text())
    assert (reported["step"], reported["num_queries"], reported["num_passages"]) == (2, *counts)
    for name in metrics.RETRIEVAL_METRICS:  # the numbers training logged for this checkpoint
        assert reported[name] == pytest.approx(step_metrics[2][name], abs=1e-6), name
        assert f"  {name:<12}{reported[name]:>8.4f}" in result.stdout
    judged = {}
    for q, p, g in zip(*data.qrels):
        judged.setdefault(int(q), {})[int(p)] = g
    expected, evaluated = pytrec_means(output / "run.trec", data, judged)
    assert evaluated == 35
    assert {name: reported[name] for name in expected} == pytest.approx(expected, abs=1e-6)
    assert "passages/s" in result.stdout and "queries/s" in result.stdout
    assert (f"written:  {output / 'run.trec'}, {output / 'per_query.json'}, "
            f"{output / 'metrics.json'}") in result.stdout
    # Each value with its bootstrap interval; the per-query values it came from.
    per_query = json.loads((output / "per_query.json").read_text())
    assert len(per_query["query_ids"]) == 35
    for name in metrics.RETRIEVAL_METRICS:
        low, high = reported["intervals"][name]
        assert low <= reported[name] <= high
        assert np.mean(per_query["metrics"][name]) == pytest.approx(reported[name], abs=1e-9)
        assert (f"  {name:<12}{reported[name]:>8.4f}  [{low:.4f}, {high:.4f}]"
                in result.stdout)
    assert reported["intervals"] == {
        name: pytest.approx(list(bounds)) for name, bounds in metrics.bootstrap_intervals(
            {n: np.array(v) for n, v in per_query["metrics"].items()}).items()}
    assert reported["data_fingerprint"] == evaluate.data_fingerprint(data)
    assert reported["split"] == "test" and reported["data"] == [str(folder)]


@pytest.mark.slow
def test_samtone_compare_on_two_evaluated_checkpoints(trained, tmp_path):
    """samtone-eval of steps 1 and 2, then samtone-compare of the two folders."""
    run, folder = trained
    outputs = [tmp_path / f"step{step}" for step in (1, 2)]
    for step, output in zip((1, 2), outputs):
        result = _run("samtone.cli.eval", f"--model_dir={run}", f"--data={folder}",
                      f"--step={step}", f"--output={output}", "--batch_size=16")
        assert result.returncode == 0, result.stderr[-3000:]
    compared = _run("samtone.cli.compare", f"--runs={outputs[0]},{outputs[1]}",
                    "--test=student", f"--output={tmp_path / 'compare'}")
    assert compared.returncode == 0, compared.stderr[-3000:]
    saved = json.loads((tmp_path / "compare" / "compare.json").read_text())
    first, second = (json.loads((o / "per_query.json").read_text())["metrics"] for o in outputs)
    for name in ("P@1", "NDCG@10", "Recall@100"):
        cell = saved["systems"][str(outputs[1])]["metrics"][name]
        assert cell["mean"] == pytest.approx(
            json.loads((outputs[1] / "metrics.json").read_text())[name])
        if first[name] != second[name]:
            expected = scipy.stats.ttest_rel(first[name], second[name]).pvalue
            assert cell["p_value"] == pytest.approx(expected, abs=1e-6)
        else:
            assert cell["p_value"] == 1.0
    assert f"| {outputs[0]} (baseline) | 1 | " in compared.stdout


@pytest.mark.slow
def test_samtone_eval_on_pairs_and_graded_pairs(trained, tmp_path):
    run, _ = trained
    with open(smoke_path("eval.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(30)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    graded = tmp_path / "sts.jsonl"
    graded.write_text("".join(json.dumps({"query": r["query"], "passage": r["passage"],
                                          "label": float(i % 5)}) + "\n"
                              for i, r in enumerate(rows)))
    result = _run("samtone.cli.eval", f"--model_dir={run}", f"--data={pairs}",
                  f"--output={tmp_path / 'out'}", "--step=1", "--batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (values["step"], values["num_queries"], values["num_passages"]) == (1, 30, 30)
    assert len((tmp_path / "out" / "run.trec").read_text().splitlines()) == 30 * 30
    result = _run("samtone.cli.eval", f"--model_dir={run}", f"--data={graded}",
                  f"--output={tmp_path / 'sts'}", "--batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads((tmp_path / "sts" / "metrics.json").read_text())
    assert set(values) >= {"Spearman", "Pearson", "num_pairs", "step"}
    assert values["num_pairs"] == 30 and -1 <= values["Spearman"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--split=dev"], r"has no qrels/dev.tsv \(split='dev'; the splits there: test\)"),
    (["--vocabulary={vocabulary}"], "the data's vocabulary .*other.model is not the model's "
                                    "vocabulary .*/spm.model"),
])
@pytest.mark.slow
def test_user_errors_exit_2_with_one_line(trained, tmp_path, args, message):
    run, folder = trained
    (tmp_path / "other.model").write_bytes(b"another vocabulary")
    args = [arg.format(vocabulary=tmp_path / "other.model") for arg in args]
    # A folder of its own: the default output holds an earlier test's evaluation.
    result = _run("samtone.cli.eval", f"--model_dir={run}", f"--data={folder}",
                  f"--output={tmp_path / 'out'}", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert re.search(message, errors[0]), errors[0]
