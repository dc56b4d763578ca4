"""Prepared folders (samtone-prepare): the same batches as the raw files, each host reading only
its rows' records, O(1) resume, and the folder refused when unfinished or prepared otherwise."""
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from samtone.data import prepare, prepared
from samtone.data.pipeline import make_batch_iterator
from samtone.data.tokenizer import Tokenizer, train_sentencepiece
from samtone.errors import ConfigError, DataError
from test_pipeline import assert_same, grain_order  # batches equal key by key; the order

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho".split()
NUM_EXAMPLES, BATCH, K, LQ, LP = 44, 8, 2, 8, 16  # 5 batches an epoch, 4 examples dropped
SETTINGS = prepare.Settings(query_length=LQ, passage_length=LP, num_negatives=K)


def sentence(rng, low, high):
    return " ".join(rng.choice(WORDS, size=rng.integers(low, high)))


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    rng = np.random.default_rng(0)
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return train_sentencepiece([sentence(rng, 4, 12) for _ in range(200)], prefix, 48)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Varied lengths (some truncated), labels, some passage ids, some negatives that are
    other examples' passages (their ids are those passages' ids)."""
    rng = np.random.default_rng(1)
    passages = [sentence(rng, 2, 24) for _ in range(NUM_EXAMPLES)]
    lines = []
    for i, passage in enumerate(passages):
        record = {"query": f"{i} {sentence(rng, 0, 10)}", "passage": passage,
                  "negatives": [passages[(i + 7) % NUM_EXAMPLES] if i % 3 == 0
                                else sentence(rng, 1, 20), sentence(rng, 1, 20), "extra"],
                  "label": float(i % 4)}
        if i % 5 == 0:
            record["passage_id"] = f"doc{i}"
        lines.append(json.dumps(record) + "\n")
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data_file, vocabulary):
    output = str(tmp_path_factory.mktemp("prepared") / "pairs")
    prepare.prepare(data_file, vocabulary, output, SETTINGS, shards=3, workers=1,
                    progress=False)
    return output


def iterator(data, vocabulary, **kwargs):
    settings = dict(tokenizer=vocabulary, global_batch_size=BATCH, query_length=LQ,
                    passage_length=LP, num_negatives=K, process_index=0, process_count=1,
                    prefetch=0)
    return make_batch_iterator(data, **{**settings, **kwargs})


def test_folder_layout(folder):
    manifest = json.load(open(os.path.join(folder, prepared.MANIFEST), encoding="utf-8"))
    assert manifest["num_examples"] == NUM_EXAMPLES
    assert [shard["records"] for shard in manifest["shards"]] == [14, 15, 15]
    assert sorted(os.listdir(folder)) == sorted(
        [prepared.MANIFEST, prepared.LENGTHS] + [s["file"] for s in manifest["shards"]])
    assert sum(manifest["lengths_histogram"]["query"].values()) == NUM_EXAMPLES
    lengths = np.load(os.path.join(folder, prepared.LENGTHS))
    assert lengths.dtype == np.uint16 and lengths.shape == (NUM_EXAMPLES, 2)
    assert lengths[:, 1].max() == LP  # some passages are truncated


@pytest.mark.parametrize("settings", [
    dict(seed=3),
    dict(shuffle=False, length_buckets=False),
    dict(seed=5, length_buckets=[4, 12]),
    dict(seed=7, pack=True),
], ids=["shuffle-buckets", "in-order", "own-buckets", "pack"])
def test_same_batches_as_the_files(folder, data_file, vocabulary, settings):
    raw = iterator(data_file, vocabulary, **settings)
    ready = iterator(folder, vocabulary, **settings)
    batches = [next(ready) for _ in range(7)]  # into the second epoch
    assert_same([next(raw) for _ in range(7)], batches)
    if settings.get("pack"):
        assert "passage_segment_ids" in batches[0]
    else:
        assert batches[0]["negative_tokens"].shape[:2] == (BATCH, K)


class CountingSource:
    """Wraps the data source, keeping the rows asked for."""

    def __init__(self, source):
        self.source, self.rows = source, []

    def __len__(self):
        return len(self.source)

    def __getitems__(self, rows):
        self.rows.extend(rows)
        return self.source.__getitems__(rows)


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [4, 5, 6, 7]], ids=["first-half", "second-half"])
def test_each_process_reads_only_its_rows(folder, data_file, vocabulary, rows):
    raw = iterator(data_file, vocabulary, seed=11, local_rows=rows, prefetch=2)
    ready = iterator(folder, vocabulary, seed=11, local_rows=rows, prefetch=2)
    source = ready._schedule.data.source = CountingSource(ready._schedule.data.source)
    batches = [next(ready) for _ in range(6)]
    ready.close()
    assert_same([next(raw) for _ in range(6)], batches)
    expected = []
    for epoch, batch in [(0, b) for b in range(5)] + [(1, 0)]:
        order = grain_order(11, epoch, NUM_EXAMPLES)
        expected.extend(order[batch * BATCH:(batch + 1) * BATCH][rows].tolist())
    # The prefetch thread may have read a batch or two ahead: of the same rows.
    assert source.rows[:len(expected)] == expected
    assert len(source.rows) <= len(expected) + 2 * len(rows)


def test_resume_is_a_position(folder, vocabulary):
    straight = iterator(folder, vocabulary, seed=2)
    batches = [next(straight) for _ in range(9)]
    state = iterator(folder, vocabulary, seed=2).get_state()
    state.update(epoch=1, batch_in_epoch=2)
    resumed = iterator(folder, vocabulary, seed=2)
    resumed._schedule.data.source = CountingSource(resumed._schedule.data.source)
    resumed.set_state(state)
    assert_same(batches[7:], [next(resumed) for _ in range(2)])
    assert len(resumed._schedule.data.source.rows) == 2 * BATCH  # nothing read to get there


@pytest.mark.parametrize("settings", [dict(seed=3), dict(seed=7, pack=True)],
                         ids=["buckets", "pack"])
def test_worker_processes_give_the_same_batches_and_resume(folder, data_file, vocabulary,
                                                          settings):
    """grain's worker processes (2) compute the batches the files give, in order, into the
    second epoch; a fresh iterator set to a saved state starts its workers there."""
    raw = iterator(data_file, vocabulary, **settings)
    expected = [next(raw) for _ in range(8)]
    workers = iterator(folder, vocabulary, worker_processes=2, prefetch=2, **settings)
    assert_same(expected[:3], [next(workers) for _ in range(3)])
    assert len([child for child in multiprocessing.active_children()
                if child.name.startswith("grain-process-prefetch")]) == 2
    state = workers.get_state()
    workers.close()
    resumed = iterator(folder, vocabulary, worker_processes=2, **settings)
    resumed.set_state(state)
    assert_same(expected[3:], [next(resumed) for _ in range(5)])
    resumed.close()


def test_worker_processes_need_a_prepared_folder(data_file, vocabulary):
    with pytest.raises(ConfigError, match=r"make_batch_iterator.worker_processes=2 needs a "
                                          r"prepared folder .* not .*train.jsonl"):
        iterator(data_file, vocabulary, worker_processes=2)
    with pytest.raises(ConfigError, match=r"make_batch_iterator.worker_processes must be an "
                                          r"integer >= 0, got -1"):
        iterator(data_file, vocabulary, worker_processes=-1)


def test_unfinished_folder_is_refused(folder, vocabulary, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(folder, unfinished)
    os.remove(unfinished / prepared.MANIFEST)
    with pytest.raises(DataError, match=f"{unfinished}.*no prepared.json"):
        iterator(str(unfinished), vocabulary)


@pytest.mark.parametrize("setting", ["query_length", "num_negatives", "vocabulary"])
def test_other_settings_are_refused(folder, vocabulary, tmp_path, setting):
    if setting == "vocabulary":
        rng = np.random.default_rng(5)
        other = train_sentencepiece([sentence(rng, 4, 12) for _ in range(200)],
                                    tmp_path / "other", 40)
        kwargs, message = dict(tokenizer=Tokenizer(other)), f"the vocabulary {vocabulary}"
    else:
        prepared_with = dict(query_length=LQ, num_negatives=K)[setting]
        kwargs, message = {setting: 1}, f"{setting}={prepared_with}"
    with pytest.raises(ConfigError, match=f"{folder} was prepared with {message}"):
        iterator(folder, vocabulary, **kwargs)


def fingerprint(folder):
    with open(os.path.join(folder, prepared.MANIFEST), encoding="utf-8") as file:
        return json.load(file)["fingerprint"]


def test_worker_processes_write_the_same_folder(folder, data_file, vocabulary, tmp_path):
    output = str(tmp_path / "pairs")
    prepare.prepare(data_file, vocabulary, output, SETTINGS, shards=3, workers=2,
                    chunk_size=5, progress=False)
    assert fingerprint(output) == fingerprint(folder)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(output, name),
                                                               "rb") as b:
            assert a.read() == b.read() or name == prepared.MANIFEST, name


def command(*flags, check_rc=0):
    result = subprocess.run([sys.executable, "-m", "samtone.cli.prepare", *flags],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == check_rc, result.stdout + result.stderr
    return result


def test_command_is_deterministic_and_refuses_to_overwrite(folder, data_file, vocabulary,
                                                           tmp_path):
    output = str(tmp_path / "pairs")
    flags = [f"--data={data_file}", f"--vocabulary={vocabulary}", f"--output={output}",
             f"--query_length={LQ}", f"--passage_length={LP}", f"--num_negatives={K}",
             "--shards=3", "--workers=1"]
    assert "next: samtone-train" in command(*flags).stdout
    assert fingerprint(output) == fingerprint(folder)
    refused = command(*flags, check_rc=2)
    assert refused.stderr.startswith("error: --output=") and "--overwrite" in refused.stderr
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []


def test_bad_line_is_named(vocabulary, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "a", "passage": "b"}\n\n{"query": "c"}\n')
    result = command(f"--data={data}", f"--vocabulary={vocabulary}",
                     f"--output={tmp_path / 'out'}", check_rc=2)
    assert f"error: {data}:3:" in result.stderr
    assert not os.path.exists(tmp_path / "out")
    manifest = prepare.prepare(str(data), vocabulary, str(tmp_path / "skipped"),
                               prepare.Settings(), on_bad_line="skip", workers=1,
                               progress=False)
    assert (manifest["num_examples"], manifest["skipped_lines"]) == (1, 1)
