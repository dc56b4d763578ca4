"""The shipped smoke dataset: present, well formed, a held-out split, reproducible, learnable."""
import collections
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from samtone.data import Tokenizer, smoke_path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "make_smoke_data.py")
FIELDS = ("query_id", "query", "passage_id", "passage")


def _read(name):
    with open(smoke_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def train():
    return _read("train.jsonl")


@pytest.fixture(scope="module")
def eval_rows():
    return _read("eval.jsonl")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_smoke_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_files_are_installed_next_to_the_package():
    for name in ("train.jsonl", "eval.jsonl", "spm.model", "README.md"):
        assert os.path.isfile(smoke_path(name))
    total = sum(os.path.getsize(smoke_path(n)) for n in ("train.jsonl", "eval.jsonl", "spm.model"))
    assert total < 1_000_000


def test_smoke_path_names_what_is_missing():
    with pytest.raises(FileNotFoundError, match=r"'dev\.jsonl'.*Available: .*train\.jsonl"):
        smoke_path("dev.jsonl")


@pytest.mark.parametrize("name, count", [("train.jsonl", 2000), ("eval.jsonl", 300)])
def test_rows_parse_with_expected_counts(name, count):
    rows = _read(name)
    assert len(rows) == count
    for row in rows:
        assert set(row) == set(FIELDS)
        assert all(isinstance(row[field], str) and row[field].strip() for field in FIELDS)
    assert len({row["query_id"] for row in rows}) == count


def test_passage_ids_name_passages_one_to_one(train, eval_rows):
    passages = collections.defaultdict(set)
    for row in train + eval_rows:
        passages[row["passage_id"]].add(row["passage"])
    assert all(len(texts) == 1 for texts in passages.values())
    assert len({next(iter(texts)) for texts in passages.values()}) == len(passages)


def test_eval_is_held_out_questions_over_seen_passages(train, eval_rows):
    train_queries = {row["query"] for row in train}
    assert not train_queries & {row["query"] for row in eval_rows}
    # One passage per eval question: chance P@1 over the eval corpus is 1/300.
    assert len({row["passage_id"] for row in eval_rows}) == len(eval_rows)
    # Every eval passage was seen in training, paired with questions about its other facts.
    per_passage = collections.Counter(row["passage_id"] for row in train)
    assert all(per_passage[row["passage_id"]] >= 2 for row in eval_rows)


def test_vocabulary_is_t5_style_and_covers_the_text(train, eval_rows):
    tokenizer = Tokenizer(smoke_path("spm.model"))
    assert tokenizer.vocab_size == 1000
    rows = train + eval_rows
    queries = tokenizer.encode([row["query"] for row in rows], 32)
    passages = tokenizer.encode([row["passage"] for row in rows], 128)
    for token_ids in (queries, passages):
        assert not np.any(token_ids == tokenizer.unk_id)
        # The README's lengths truncate nothing: every row still ends with EOS then padding.
        assert np.all(token_ids[:, -1] == tokenizer.pad_id)
        assert np.all(np.sum(token_ids == tokenizer.eos_id, axis=1) == 1)


def test_script_regenerates_the_shipped_files_exactly(script, tmp_path):
    script.main(["--output_dir", str(tmp_path), "--skip_vocab"])
    for name in ("train.jsonl", "eval.jsonl"):
        with open(smoke_path(name), "rb") as shipped, open(tmp_path / name, "rb") as regenerated:
            assert shipped.read() == regenerated.read(), f"{name} differs from the script's output"


def test_task_is_neither_trivial_nor_impossible_for_tf_idf(script, train, eval_rows):
    pytest.importorskip("sklearn")
    baseline = script.tfidf_baseline(train, eval_rows)
    assert baseline["num_passages"] == 300
    # Lexical overlap alone gets part of the way (chance is 0.003); learning has room above.
    assert 0.3 < baseline["p@1"] < 0.8
    assert baseline["p@1"] < baseline["mrr"] < 0.9
