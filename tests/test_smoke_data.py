"""The shipped smoke dataset: present, well formed, a held-out split, reproducible, learnable."""
import collections
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

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


def test_a_built_wheel_ships_the_data_configs_and_every_module(tmp_path):
    """Under an editable install smoke_path finds the files in the checkout whatever setup.py
    says, so build a wheel (from a copy: the checkout stays clean) and read its file list."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    source.mkdir()
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy2(os.path.join(REPO_ROOT, name), source / name)
    for folder in ("samtone", "gin", "configs"):
        shutil.copytree(os.path.join(REPO_ROOT, folder), source / folder, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("samtone-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    smoke = [f"samtone/data/smoke/{n}" for n in ("train.jsonl", "eval.jsonl", "spm.model",
                                                  "README.md")]
    assert not set(smoke) - names, sorted(set(smoke) - names)
    assert sum(sizes[name] for name in smoke[:3]) < 1_000_000  # small enough to ship
    # Every Gin fragment and run config, wherever setup.py installs them (data_files under
    # <prefix>/share/samtone/, or package data inside samtone/): as gin/<kind>/<name>.gin and
    # configs/<name>.gin below one folder.
    resources = sorted(os.path.relpath(path, REPO_ROOT) for pattern in ("configs/*.gin",
                                                                        "gin/*/*.gin")
                       for path in glob.glob(os.path.join(REPO_ROOT, pattern)))
    assert len(resources) > 20 and "configs/smoke.gin" in resources
    roots = {name[:-len("configs/smoke.gin")] for name in names
             if name.endswith("/configs/smoke.gin")}
    assert len(roots) == 1, sorted(name for name in names if name.endswith(".gin"))
    (root,) = roots
    expected = {root + path for path in resources}
    assert not expected - names, sorted(expected - names)
    # packages: every module of samtone/.
    modules = {os.path.relpath(path, REPO_ROOT) for path in
               glob.glob(os.path.join(REPO_ROOT, "samtone", "**", "*.py"), recursive=True)}
    assert not modules - names, sorted(modules - names)


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
