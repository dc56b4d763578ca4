"""samtone.data.prepare_task (samtone-prepare --task): a seqio Task prepared once trains on the
same tokens and ids as the Task itself, and resumes as a position (no batch skipped over).

Needs the optional seqio extra; skipped without it. The Task is built in memory over a
FunctionDataSource with a SentencePiece model trained here, as in tests/test_tasks.py.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from samtone import tasks  # noqa: E402  pylint: disable=wrong-import-position
from samtone.data import prepare, prepare_task, prepared  # noqa: E402
from samtone.data.pipeline import make_batch_iterator, stable_id  # noqa: E402
from samtone.data.tokenizer import train_sentencepiece  # noqa: E402
from samtone.errors import ConfigError  # noqa: E402
from test_pipeline import grain_order  # noqa: E402  (epoch e's order of the examples)
from test_prepared import CountingSource  # noqa: E402  (keeps the rows read)

NUM_EXAMPLES, BATCH, K, LQ, LP = 44, 8, 2, 6, 12  # short lengths: some texts are trimmed
SETTINGS = prepare.Settings(query_length=LQ, passage_length=LP, num_negatives=K)
PASSAGES = [f"passage {i} explains topic {i % 7} in quite a few more words" if i % 4 == 0
            else f"passage {i} on topic {i % 7}" for i in range(NUM_EXAMPLES + 4)]
# (query, passage, negatives): some negatives are other examples' passages; some empty
# queries, which the Task drops (so its cardinality is unknown and the examples are counted).
EXAMPLES = [(f"question {i} about topic {i % 7}" if i % 11 != 5 else "  ", PASSAGES[i],
             [PASSAGES[(i + 3) % len(PASSAGES)] if i % 3 == 0 else f"negative {i} {j} elsewhere"
              for j in range(3)]) for i in range(len(PASSAGES))]
KEPT = [example for example in EXAMPLES if example[0].strip()]


def _source(examples):
    def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
        return tf.data.Dataset.from_tensor_slices({
            "query": [q for q, _, _ in examples], "passage": [p for _, p, _ in examples],
            "negatives": [n for _, _, n in examples]})
    return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    texts = [t for q, p, negatives in EXAMPLES for t in (q, p, *negatives)]
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return train_sentencepiece(texts * 3, prefix, 120, normalization_rule_name="identity")


@pytest.fixture(scope="module")
def task(spm_path):
    name = tasks.add_retrieval_task("test_prepare_pairs", _source(EXAMPLES),
                                    vocabulary_path=spm_path, shuffle_buffer_size=64)
    return seqio.get_mixture_or_task(name)


@pytest.fixture(scope="module")
def folder(task, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("prepared") / "task")
    prepare_task.prepare_task(task.name, output, SETTINGS, shards=3, progress=False)
    return output


def folder_iterator(folder, spm_path, **kwargs):
    settings = dict(tokenizer=spm_path, global_batch_size=BATCH, query_length=LQ,
                    passage_length=LP, num_negatives=K, process_index=0, process_count=1,
                    prefetch=0)
    return make_batch_iterator(folder, **{**settings, **kwargs})


def test_folder_layout(folder, spm_path):
    with open(os.path.join(folder, prepared.MANIFEST), encoding="utf-8") as file:
        manifest = json.load(file)
    assert manifest["num_examples"] == len(KEPT) == NUM_EXAMPLES
    assert manifest["sources"] == ["seqio:test_prepare_pairs/train"]
    assert manifest["has_labels"] is False and manifest["skipped_lines"] == 0
    assert manifest["settings"]["vocabulary"] == spm_path
    assert [shard["records"] for shard in manifest["shards"]] == [14, 15, 15]
    lengths = np.load(os.path.join(folder, prepared.LENGTHS))
    assert lengths.shape == (NUM_EXAMPLES, 2) and lengths[:, 1].max() == LP  # some trimmed


def test_same_tokens_and_ids_as_the_task(folder, task, spm_path):
    """In order, batch by batch: the folder's batches are the Task's own (its iterator's)."""
    from_task = list(tasks.make_seqio_batch_iterator(
        task, "train", global_batch_size=BATCH, query_length=LQ, passage_length=LP,
        num_negatives=K, shuffle=False, num_epochs=1, process_index=0, process_count=1))
    from_folder = list(folder_iterator(folder, spm_path, shuffle=False, num_epochs=1,
                                       length_buckets=False))
    assert len(from_folder) == len(from_task) == NUM_EXAMPLES // BATCH
    for index, (ours, theirs) in enumerate(zip(from_folder, from_task)):
        assert set(ours) == set(theirs) | {"negative_ids"}
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=f"batch {index}: {key}")
        rows = KEPT[index * BATCH:(index + 1) * BATCH]
        np.testing.assert_array_equal(ours["passage_ids"], [stable_id(p) for _, p, _ in rows])
        np.testing.assert_array_equal(
            ours["negative_ids"], [[stable_id(n) for n in negatives[:K]]
                                   for _, _, negatives in rows])
        assert (ours["query_tokens"][:, -1] != 0).any()  # trimmed, EOS kept: as the Task
    # A negative that is another example's passage has that passage's id (the masking).
    assert from_folder[0]["negative_ids"][0, 0] == stable_id(PASSAGES[3])


def test_resume_at_batch_10000_is_a_position(folder, spm_path):
    """10,000 batches in (epoch 2000 of 5 batches), the resume reads the next batch's
    records and nothing before: the Task's own iterator would re-read 10,000 batches."""
    resumed = folder_iterator(folder, spm_path, seed=4)
    state = resumed.get_state()
    state.update(epoch=10_000 // resumed.batches_per_epoch, batch_in_epoch=1)
    resumed._schedule.data.source = source = CountingSource(resumed._schedule.data.source)
    resumed.set_state(state)
    batches = [next(resumed) for _ in range(2)]
    order = grain_order(4, state["epoch"], NUM_EXAMPLES)
    assert source.rows == order[BATCH:3 * BATCH].tolist()
    want = [stable_id(KEPT[row][0]) for row in order[BATCH:3 * BATCH]]
    np.testing.assert_array_equal(np.concatenate([b["query_ids"] for b in batches]), want)


def test_vocabulary_must_be_the_tasks(task, spm_path, tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(open(spm_path, "rb").read())
    assert prepare_task.task_vocabulary(task, str(copy)) == str(copy)
    other = train_sentencepiece(["something else entirely"] * 20, tmp_path / "other", 30)
    with pytest.raises(ConfigError, match=f"--vocabulary={other} is not the SentencePiece "
                                          "model of --task=test_prepare_pairs"):
        prepare_task.task_vocabulary(task, other)


def test_unknown_task_and_split_are_named(task, tmp_path):
    with pytest.raises(ConfigError, match="--task=no_such_task: no seqio Task"):
        prepare_task.prepare_task("no_such_task", str(tmp_path / "a"), SETTINGS)
    with pytest.raises(ConfigError, match="--task_split=test: .* train, validation"):
        prepare_task.prepare_task(task.name, str(tmp_path / "b"), SETTINGS, split="test")


def command(*flags):
    result = subprocess.run([sys.executable, "-m", "samtone.cli.prepare", *flags],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    # One line, the last (TensorFlow's C++ start-up may log before it).
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.endswith(errors[0] + "\n"), result.stderr
    return errors[0]


def test_command_refuses_task_with_data_and_names_an_unknown_task(tmp_path):
    error = command("--task=samtone_squad", f"--data={tmp_path / 'pairs.jsonl'}",
                    f"--output={tmp_path / 'out'}")
    assert error.startswith("error: --task=samtone_squad and --data=")
    error = command("--task=no_such_task", f"--output={tmp_path / 'out'}")
    assert error.startswith("error: --task=no_such_task: no seqio Task of that name")
    assert not os.path.exists(tmp_path / "out")


def test_command_prepares_a_task_from_its_module(folder, spm_path, tmp_path):
    """--task_module registers the Task in the command's process; the folder is the same."""
    (tmp_path / "my_tasks.py").write_text(
        "from samtone import tasks\n"
        "from test_prepare_task import EXAMPLES, _source\n"
        f"tasks.add_retrieval_task('test_prepare_pairs', _source(EXAMPLES), "
        f"vocabulary_path={spm_path!r})\n")
    output = tmp_path / "out"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "samtone.cli.prepare", "--task=test_prepare_pairs",
         "--task_module=my_tasks", f"--output={output}", f"--query_length={LQ}",
         f"--passage_length={LP}", f"--num_negatives={K}", "--shards=3"],
        capture_output=True, text=True, timeout=120, check=False, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"--gin.TRAIN_DATA=\"'{output}'\"" in result.stdout
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as a, open(output / name, "rb") as b:
            assert a.read() == b.read(), name
