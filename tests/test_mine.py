"""samtone.mine: mined negatives against a numpy brute force, the margin rule, the JSONL it
writes, and (end to end) samtone-train -> samtone-mine -> samtone-train with negatives."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from samtone import inference, mine
from samtone.data import files, pipeline, smoke_path
from samtone.data.tokenizer import Tokenizer
from compile_flags import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force(queries, passages, positives, k, margin=None):
    """Every score, then a full stable sort: the definition in samtone.mine's docstring."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    passages = passages / np.linalg.norm(passages, axis=1, keepdims=True)
    mined = []
    for query, positive in zip(queries, positives):
        scores = passages @ query
        threshold = np.inf
        if margin is not None and positive:
            threshold = min(scores[p] for p in positive) - margin
        candidates = [j for j in range(len(passages))
                      if j not in positive and scores[j] <= threshold]
        mined.append(sorted(candidates, key=lambda j: (-scores[j], j))[:k])
    return mined


def random_problem(seed, num_queries=13, num_passages=50, dim=8):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
    passages = rng.normal(size=(num_passages, dim)).astype(np.float32)
    positives = [set(rng.choice(num_passages, size=rng.integers(0, 4), replace=False).tolist())
                 for _ in range(num_queries)]
    return queries, passages, positives


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("k", [1, 5, 60])
@pytest.mark.parametrize("margin", [None, 0.0, 0.1, -0.05])
def test_matches_brute_force(chunk_size, k, margin):
    queries, passages, positives = random_problem(seed=k)
    mined = mine.mine_hard_negatives(queries, passages, positives, k=k, margin=margin,
                                     chunk_size=chunk_size)
    assert mined == brute_force(queries, passages, positives, k, margin)
    for negatives, positive in zip(mined, positives):
        assert not set(negatives) & positive
        assert len(negatives) == len(set(negatives))


def _unit(degrees):
    radians = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# The query points at 0 degrees, its positive at 20; corpus index i is at ANGLES[i] degrees.
ANGLES = [20, 5, 15, 25, 40, 60, 90]


@pytest.mark.parametrize("margin,expected", [
    (None, [1, 2, 3, 4, 5]),  # nearest first, the positive (index 0) excluded
    (0.0, [3, 4, 5, 6]),  # 5 and 15 degrees score above the positive: dropped
    (np.cos(np.deg2rad(20)) - np.cos(np.deg2rad(30)), [4, 5, 6]),  # and 25 (above cos 30)
    (np.cos(np.deg2rad(20)) - np.cos(np.deg2rad(10)), [2, 3, 4, 5, 6]),  # margin < 0: 15 in
])
def test_margin_drops_exactly_the_candidates_above_threshold(margin, expected):
    mined = mine.mine_hard_negatives(_unit([0]), _unit(ANGLES), [{0}], k=5, margin=margin)
    assert mined == [expected[:5]]


def test_ties_go_to_the_lower_index_and_short_lists_are_short():
    passages = np.array([[1, 0], [0, 1], [0, 1], [0, 1], [-1, 0]], np.float32)
    mined = mine.mine_hard_negatives(np.array([[1, 1]], np.float32), passages, [{0}], k=2)
    assert mined == [[1, 2]]  # 1, 2, 3 tie
    mined = mine.mine_hard_negatives(np.array([[1, 1]], np.float32), passages, [{0}], k=2,
                                     margin=0.0)  # 1, 2, 3 score 0.707 = the positive: kept
    assert mined == [[1, 2]]
    assert mine.mine_hard_negatives(passages[:1], passages[:2], [{0}], k=3) == [[1]]


def test_errors_name_the_problem():
    queries, passages, positives = random_problem(seed=0)
    with pytest.raises(ValueError, match="outside the corpus of 50"):
        mine.mine_hard_negatives(queries, passages, [{50}] * len(queries), k=2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        mine.mine_hard_negatives(queries, passages, positives, k=0)
    with pytest.raises(ValueError, match="12 positive sets for 13 queries"):
        mine.mine_hard_negatives(queries, passages, positives[:-1], k=2)


# --- a training file through fixed embeddings ------------------------------------------------


class AngleTokenizer:
    """'a<degrees> ...' -> [degrees + 2, 1, 0, ...]."""

    def encode(self, texts, max_length):
        tokens = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            tokens[row, :2] = [int(text.split()[0][1:]) + 2, 1]
        return tokens


def angle_encoder(tokens):
    return _unit(tokens[:, 0] - 2).astype(np.float32)


def _fixed_encoders():
    return inference.Encoder(angle_encoder, angle_encoder, AngleTokenizer(), 4, 4, step=0)


def test_training_file_round_trip(tmp_path):
    train_file = tmp_path / "train.jsonl"
    rows = [
        {"query": "a0 first", "passage": "a20 answer one", "query_id": "q1", "label": 1.0},
        {"query": "a0 first", "passage": "a10 answer two", "query_id": "q1", "label": 1.0},
        {"query": "a100 second", "passage": "a110 its answer", "passage_id": 7},
        {"query": "a300 third", "passage": "a300 exact", "negatives": ["a1 old"]},
    ]
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("a30 extra\na95 near second\na200 far\n")
    output = tmp_path / "mined" / "out.jsonl"

    stats = mine.mine_training_file("unused", str(train_file), str(output), k=2,
                                    corpus=str(corpus_file), encoders=_fixed_encoders(),
                                    batch_size=3)
    assert (stats.examples, stats.written, stats.dropped, stats.corpus_size) == (4, 4, 0, 7)
    mined = files.read_examples(str(output))
    assert [(e.query, e.passage, e.label, e.query_id, e.passage_id) for e in mined] == [
        ("a0 first", "a20 answer one", 1.0, "q1", None),
        ("a0 first", "a10 answer two", 1.0, "q1", None),
        ("a100 second", "a110 its answer", None, None, "7"),
        ("a300 third", "a300 exact", None, None, None),
    ]
    # Angular distances decide. a0: both its answers (10, 20 degrees) are positives; then
    # 30 (30 off) and 300 (60 off). a100: 95 (5 off), 30 (70 off). a300: 10, then 20. The
    # old negative "a1 old" is replaced and is not part of the corpus.
    assert [e.negatives for e in mined] == [
        ("a30 extra", "a300 exact"), ("a30 extra", "a300 exact"),
        ("a95 near second", "a30 extra"), ("a10 answer two", "a20 answer one")]

    mine.mine_training_file("unused", str(train_file), str(output), k=2, margin=0.0,
                            corpus=str(corpus_file), encoders=_fixed_encoders(),
                            overwrite=True)
    # margin 0: a100's positive is 10 degrees off, so a95 (5 off) is a likely false
    # negative and dropped; nothing is closer than the weakest positive for a0 or a300.
    assert [e.negatives for e in files.read_examples(str(output))] == [
        ("a30 extra", "a300 exact"), ("a30 extra", "a300 exact"),
        ("a30 extra", "a20 answer one"), ("a10 answer two", "a20 answer one")]

    stats = mine.mine_training_file("unused", str(train_file), str(output), k=7,
                                    encoders=_fixed_encoders(), overwrite=True)
    assert (stats.written, stats.dropped) == (0, 4)  # 4 training passages: never 7 negatives


def test_read_corpus_formats(tmp_path):
    (tmp_path / "beir.jsonl").write_text(
        '{"_id": "1", "title": "T", "text": "body one"}\n{"_id": "2", "text": "body two"}\n')
    (tmp_path / "pairs.tsv").write_text("q\tp1\tn1\n")
    (tmp_path / "lines.txt").write_text("line one\n\nline two\n")
    assert mine.read_corpus([str(tmp_path / n) for n in ("beir.jsonl", "pairs.tsv", "lines.txt")]
                            ) == ["T body one", "body two", "p1", "n1", "line one", "line two"]


# --- end to end: train -> mine -> train with the mined negatives ----------------------------


def _run(*args):
    # One CPU device: compiles twice as fast as 8; the sharded paths have their own tests.
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train(model_dir, train_data, *bindings):
    return _run("-m", "samtone.cli.train", "--gin_file=configs/smoke.gin",
                f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_DATA='{train_data}'",
                "--gin.EVAL_DATA=None", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
                "--gin.QUERY_LENGTH=16", "--gin.PASSAGE_LENGTH=32", *bindings)


@pytest.mark.slow
def test_train_mine_train(tmp_path):
    with open(smoke_path("train.jsonl"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(48)]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(lines))
    _train(tmp_path / "run", train_file)

    output = tmp_path / "mined.jsonl"
    # --chunk_size=16: the 48 queries searched in 3 chunks, as samtone.search's chunk_size.
    result = _run("-m", "samtone.cli.mine", f"--model_dir={tmp_path / 'run'}",
                  f"--train_data={train_file}", f"--output={output}", "--k=3", "--batch_size=16",
                  "--chunk_size=16")
    assert "48 of 48 examples with 3 negatives" in result.stdout
    mined = files.read_examples(str(output))
    original = files.read_examples(str(train_file))
    assert [(e.query, e.passage) for e in mined] == [(e.query, e.passage) for e in original]
    passages = {e.passage for e in original}
    for example in mined:
        assert len(example.negatives) == 3 and example.passage not in example.negatives
        assert set(example.negatives) <= passages

    batch = next(pipeline.make_batch_iterator(
        str(output), tokenizer=Tokenizer(smoke_path("spm.model")), global_batch_size=8,
        query_length=16, passage_length=32, num_negatives=3, process_index=0, process_count=1))
    assert batch["negative_tokens"].shape == (8, 3, 32)
    _train(tmp_path / "run_negatives", output, "--gin.make_batch_iterator.num_negatives=3")
    assert os.path.isdir(tmp_path / "run_negatives" / "checkpoints" / "2")
