"""samtone.tasks and samtone.data.seqio_source: seqio Tasks, the feature converter, the iterator.

Needs the optional seqio extra (seqio, tensorflow, tensorflow-datasets); skipped without it.
Nothing downloads: TFDS is mocked with hand-written examples and the SentencePiece model is
trained here. Tokens are compared with samtone.data.tokenizer.Tokenizer, the file pipeline's
tokeniser, so both sources give the same arrays for the same texts.
"""
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from samtone import tasks  # noqa: E402  pylint: disable=wrong-import-position
from samtone.data import seqio_source  # noqa: E402
from samtone.data.pipeline import stable_id  # noqa: E402
from samtone.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from samtone.train_config import CheckpointConfig, DataConfig  # noqa: E402

_SQUAD = [  # (question, context, answer, the sentence expected as passage)
    ("Who wrote Hamlet?",
     "Hamlet is a tragedy. It was written by William Shakespeare around 1600! It is long.",
     "William Shakespeare", "It was written by William Shakespeare around 1600!"),
    ("What is the capital of France?",
     "Paris is the capital of France. It lies on the Seine.",
     "Paris", "Paris is the capital of France."),
    ("Where does the Nile flow?",
     "The Nile is a river. It flows north into the Mediterranean Sea",
     "the Mediterranean Sea", "It flows north into the Mediterranean Sea"),
    ("Which army fought there?",
     "Troops came. The U.S. Army fought there in 1944. Peace followed.",
     "U.S. Army", "The U.S. Army fought there in 1944."),
]
# With the answer's start offset: (question, context, answer, answer_start, sentence).
SQUAD = [(q, c, a, c.index(a), s) for q, c, a, s in _SQUAD]
PAIRS = [(f"question number {i} about topic {i % 7}",
          f"passage {i} explains topic {i % 7} in some words",
          [f"negative {i} {j} about something else" for j in range(3)]) for i in range(40)]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    texts = [t for q, c, *_ in SQUAD for t in (q, c)]
    texts += [t for q, p, negatives in PAIRS for t in (q, p, *negatives)]
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return train_sentencepiece(texts * 3, prefix, 200, normalization_rule_name="identity")


@pytest.fixture(scope="module")
def tokenizer(spm_path):
    return Tokenizer(spm_path)


def _numpy(ds):
    return list(ds.as_numpy_iterator())


# --- preprocessors ------------------------------------------------------------------------


@pytest.mark.parametrize("question,context,answer,start,expected", SQUAD)
def test_answer_sentence(question, context, answer, start, expected):
    assert context[start:start + len(answer)] == answer
    sentence = tasks.answer_sentence(tf.constant(context), start, len(answer))
    assert sentence.numpy().decode() == expected


def test_answer_sentence_counts_code_points():
    context = "Café ouvert à Zürich. Le chef s'appelle Noël. Fin."
    start = context.index("Noël")
    sentence = tasks.answer_sentence(tf.constant(context), start, 4)
    assert sentence.numpy().decode() == "Le chef s'appelle Noël."


def test_evidence_paragraph_matches_whole_words_case_insensitively():
    documents = tf.constant(["Intro line.\n\nThe Parisian life is nice.\nNothing here.",
                             "Web result: PARIS (the city) is big.\nparis again"])
    answers = tf.constant(["Paris", "City of Light"])
    assert tasks.evidence_paragraph(documents, answers).numpy().decode() == (
        "Web result: PARIS (the city) is big.")
    assert tasks.evidence_paragraph(documents, tf.constant(["a+b (c)"])).numpy() == b""
    special = tf.constant(["The sum a+b (c) holds.\nother"])
    assert tasks.evidence_paragraph(special, tf.constant(["a+b (c)"])).numpy() == (
        b"The sum a+b (c) holds.")


def test_natural_questions_long_answer():
    example = {
        "question": {"text": "who is it"},
        "document": {"title": "Title", "tokens": {
            "token": ["<P>", "Alpha", "beta", "</P>", "<P>", "Gamma", "<b>", "delta", "</P>"],
            "is_html": [True, False, False, True, True, False, True, False, True]}},
        "annotations": {"long_answer": {"start_token": [-1, 4], "end_token": [-1, 9]}},
    }
    no_answer = {**example, "annotations": {"long_answer": {"start_token": [-1, -1],
                                                            "end_token": [-1, -1]}}}
    ds = tf.data.Dataset.from_tensors(example).concatenate(
        tf.data.Dataset.from_tensors(no_answer))
    pairs = _numpy(tasks.natural_questions_long_answer(ds))
    assert pairs == [{"query": b"who is it", "passage": b"Title Gamma delta"}]


def test_trivia_qa_evidence_paragraph():
    def example(question, wiki, search, value, aliases):
        return {"question": question, "entity_pages": {"wiki_context": wiki},
                "search_results": {"search_context": search},
                "answer": {"value": value, "aliases": aliases}}

    found = example("q1", ["Intro.\nNothing.", "Other page"], ["Web: the Eiffel Tower."],
                    "Eiffel Tower", ["La Tour Eiffel", "Tour Eiffel"])
    missing = example("q2", ["Intro.\nNothing.", "Other page"], ["Web: a tower."],
                      "Eiffel Tower", ["La Tour Eiffel", "Tour Eiffel"])
    ds = tf.data.Dataset.from_tensors(found).concatenate(tf.data.Dataset.from_tensors(missing))
    pairs = _numpy(tasks.drop_empty_texts(tasks.trivia_qa_evidence_paragraph(ds)))
    assert pairs == [{"query": b"q1", "passage": b"Web: the Eiffel Tower."}]


def test_gin_registers_a_task_with_the_run_vocabulary(spm_path):
    import gin  # pylint: disable=import-outside-toplevel
    from samtone.cli import gin_registry  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    gin.clear_config()
    try:
        gin.parse_config([
            "import samtone.tasks",
            "TRAIN_DATA = @tfds_task()",
            "tfds_task.dataset = 'trivia_qa'",
            f"tfds_task.vocabulary_path = '{spm_path}'",
        ])
        assert gin.query_parameter("%TRAIN_DATA").scoped_configurable_fn() == "samtone_trivia_qa"
        task = seqio.get_mixture_or_task("samtone_trivia_qa")
        assert task.output_features["passage"].vocabulary.sentencepiece_model_file == spm_path
        assert gin.get_configurable("make_seqio_batch_iterator")
    finally:
        gin.clear_config()
        tasks.register_tfds_tasks()


# --- TFDS task (mocked SQuAD) through the feature converter --------------------------------


def _mock_squad(self, *args, **kwargs):  # pylint: disable=unused-argument
    return tf.data.Dataset.from_tensor_slices({
        "id": [str(i) for i in range(len(SQUAD))],
        "title": ["t"] * len(SQUAD),
        "context": [c for _, c, *_ in SQUAD],
        "question": [q for q, *_ in SQUAD],
        "answers": {"text": [[a] for _, _, a, *_ in SQUAD],
                    "answer_start": np.array([[s] for *_, s, _ in SQUAD], np.int32)},
    })


@pytest.fixture
def mocked_tfds(monkeypatch):
    # Mock data has no split sizes; seqio asks for them only to decide on in-memory caching.
    monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples", lambda self, split: None)
    with tfds.testing.mock_data(as_dataset_fn=_mock_squad):
        yield


@pytest.mark.parametrize("passage_length", [64, 6])
def test_squad_task_gives_question_and_answer_sentence(mocked_tfds, spm_path, tokenizer,
                                                       passage_length):
    name = tasks.tfds_task("squad", spm_path)
    assert name == "samtone_squad"
    ds = seqio.get_dataset(name, {"query": 16, "passage": passage_length},
                           tasks.DualEncoderFeatureConverter(), shuffle=False)
    examples = _numpy(ds)
    assert len(examples) == len(SQUAD)
    questions = [q for q, *_ in SQUAD]
    sentences = [s for *_, s in SQUAD]
    query_tokens = np.stack([e["query_tokens"] for e in examples])
    passage_tokens = np.stack([e["passage_tokens"] for e in examples])
    assert query_tokens.dtype == passage_tokens.dtype == np.int32
    assert query_tokens.shape == (len(SQUAD), 16)
    assert passage_tokens.shape == (len(SQUAD), passage_length)
    # Exactly the file pipeline's arrays: pieces[:L-1], EOS, zero padding.
    np.testing.assert_array_equal(query_tokens, tokenizer.encode(questions, 16))
    np.testing.assert_array_equal(passage_tokens, tokenizer.encode(sentences, passage_length))
    assert tokenizer.decode(query_tokens) == questions
    if passage_length == 64:
        assert tokenizer.decode(passage_tokens) == sentences
        assert all(row[row != 0][-1] == 1 for row in passage_tokens)
    else:  # truncated: EOS kept as the last token
        assert (passage_tokens[:, -1] == 1).all()
    assert [e["query_ids"] for e in examples] == [stable_id(q) for q in questions]
    assert [e["passage_ids"] for e in examples] == [stable_id(s) for s in sentences]


def test_squad_batches_from_the_iterator(mocked_tfds, spm_path, tokenizer):
    name = tasks.tfds_task("squad", spm_path)
    iterator = tasks.make_seqio_batch_iterator(
        name, "train", global_batch_size=4, query_length=16, passage_length=32, seed=1,
        shuffle=False, num_epochs=1, tokenizer=tokenizer, process_index=0, process_count=1)
    batch = next(iterator)
    assert set(batch) == {"query_tokens", "passage_tokens", "query_ids", "passage_ids"}
    np.testing.assert_array_equal(batch["passage_tokens"],
                                  tokenizer.encode([s for *_, s in SQUAD], 32))
    with pytest.raises(StopIteration):
        next(iterator)


def test_every_example_task_registers_without_reading_data():
    assert tasks.register_tfds_tasks() == [
        "samtone_squad", "samtone_natural_questions", "samtone_trivia_qa"]
    for dataset in ("squad", "natural_questions", "trivia_qa"):
        task = seqio.get_mixture_or_task(f"samtone_{dataset}")
        vocabulary = task.output_features["query"].vocabulary
        assert vocabulary.sentencepiece_model_file == tasks.DEFAULT_VOCABULARY_PATH
    with pytest.raises(ValueError, match="tfds_task.dataset must be one of"):
        tasks.tfds_task("squad2")


def test_generic_tfds_task(monkeypatch, spm_path, tokenizer):
    monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples", lambda self, split: None)
    with tfds.testing.mock_data(as_dataset_fn=_mock_squad):
        name = tasks.add_tfds_retrieval_task(
            "my_squad_titles", "squad/v1.1:3.0.0", query_feature="question",
            passage_feature="context", passage_id_feature="id", vocabulary_path=spm_path)
        ds = seqio.get_dataset(name, {"query": 16, "passage": 64},
                               tasks.DualEncoderFeatureConverter(), shuffle=False)
        examples = _numpy(ds)
    assert tokenizer.decode(np.stack([e["passage_tokens"] for e in examples])) == [
        c for _, c, *_ in SQUAD]
    assert [e["passage_ids"] for e in examples] == [stable_id(str(i)) for i in range(len(SQUAD))]


# --- the batch iterator on an in-memory Task ----------------------------------------------


def _pairs_source(pairs):
    def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
        return tf.data.Dataset.from_tensor_slices({
            "query": [q for q, _, _ in pairs], "passage": [p for _, p, _ in pairs],
            "negatives": [n for _, _, n in pairs]})
    return seqio.FunctionDataSource(dataset_fn, splits=["train"])


@pytest.fixture(scope="module")
def pairs_task(spm_path):
    return tasks.add_retrieval_task("test_pairs", _pairs_source(PAIRS), vocabulary_path=spm_path,
                                    shuffle_buffer_size=64)


def _iterator(task, **overrides):
    kwargs = dict(global_batch_size=8, query_length=12, passage_length=16, seed=3,
                  process_index=0, process_count=1)
    kwargs.update(overrides)
    return tasks.make_seqio_batch_iterator(task, "train", **kwargs)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_iterator_is_deterministic_and_seeded(pairs_task):
    first = _take(_iterator(pairs_task), 7)
    _assert_same_batches(first, _take(_iterator(pairs_task), 7))
    other_seed = _take(_iterator(pairs_task, seed=4), 7)
    assert any((a["query_ids"] != b["query_ids"]).any() for a, b in zip(first, other_seed))
    one_epoch = list(_iterator(pairs_task, num_epochs=1))  # default: forever
    assert len(one_epoch) == len(PAIRS) // 8
    assert sorted(np.concatenate([b["query_ids"] for b in one_epoch])) == sorted(
        stable_id(q) for q, _, _ in PAIRS)


def test_iterator_resumes_exactly(pairs_task):
    reference = _take(_iterator(pairs_task), 6)
    interrupted = _iterator(pairs_task)
    _take(interrupted, 3)
    state = interrupted.get_state()
    assert state["batches_consumed"] == 3
    resumed = _iterator(pairs_task)
    resumed.set_state(state)
    _assert_same_batches(reference[3:], _take(resumed, 3))


def test_peek_then_rewind_replays_the_batch(pairs_task):
    iterator = _iterator(pairs_task)
    start = iterator.get_state()
    peeked = next(iterator)
    iterator.set_state(start)  # train.py reads one batch for shapes, then rewinds
    _assert_same_batches([peeked], [next(iterator)])
    assert iterator.get_state()["batches_consumed"] == 1


def test_state_from_other_settings_is_refused(pairs_task):
    state = _iterator(pairs_task).get_state()
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        _iterator(pairs_task, seed=4).set_state(state)
    with pytest.raises(ValueError, match="process_count"):
        _iterator(pairs_task, process_index=1, process_count=2).set_state(state)


def test_processes_read_disjoint_shards(pairs_task):
    batches = [next(_iterator(pairs_task, process_index=p, process_count=2, shuffle=False,
                              num_epochs=1)) for p in range(2)]
    assert all(len(b["query_ids"]) == 4 for b in batches)
    expected = [[stable_id(PAIRS[i][0]) for i in range(p, 8, 2)] for p in range(2)]
    assert [list(b["query_ids"]) for b in batches] == expected


def test_negatives(pairs_task, tokenizer):
    batch = next(_iterator(pairs_task, num_negatives=2, shuffle=False))
    assert batch["negative_tokens"].shape == (8, 2, 16)
    assert batch["negative_tokens"].dtype == np.int32
    for row, (_, _, negatives) in zip(batch["negative_tokens"], PAIRS[:8]):
        np.testing.assert_array_equal(row, tokenizer.encode(negatives[:2], 16))
    too_many = _iterator(pairs_task, num_negatives=4, shuffle=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="fewer than num_negatives=4"):
        next(too_many)


def test_vocabulary_must_match_the_training_tokenizer(pairs_task, spm_path, tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(open(spm_path, "rb").read())
    _iterator(pairs_task, tokenizer=str(copy))  # same model, other path: fine
    other = train_sentencepiece(["something else entirely"] * 20, tmp_path / "other", 30)
    with pytest.raises(ValueError, match="different SentencePiece model"):
        _iterator(pairs_task, tokenizer=Tokenizer(other))


def test_converter_requires_eos(spm_path):
    vocabulary = tasks.vocabulary(spm_path)
    seqio.TaskRegistry.add(
        "test_no_eos", source=_pairs_source(PAIRS[:2]),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features=seqio_source.output_features(vocabulary), metric_fns=[])
    ds = seqio.get_dataset("test_no_eos", {"query": 12, "passage": 16},
                           tasks.DualEncoderFeatureConverter(), shuffle=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="does not end with EOS"):
        _numpy(ds)
    with pytest.raises(ValueError, match="packing"):
        tasks.DualEncoderFeatureConverter(pack=True)


# --- the training loop on a seqio Task ------------------------------------------------------


class RecordingIterator:
    """Passes a batch iterator through, keeping the query ids of each batch handed out."""

    def __init__(self, iterator, record):
        self.iterator, self.record = iterator, record

    def __next__(self):
        batch = next(self.iterator)
        self.record.append(batch["query_ids"])
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


@pytest.mark.slow
def test_train_loop_reads_a_task_and_resumes_it(pairs_task, spm_path, tmp_path):
    import functools  # pylint: disable=import-outside-toplevel

    import jax  # pylint: disable=import-outside-toplevel
    from samtone import losses, partitioning  # pylint: disable=import-outside-toplevel
    from samtone import train as train_lib  # pylint: disable=import-outside-toplevel
    from samtone.models import dual_encoder, t5  # pylint: disable=import-outside-toplevel

    model = dual_encoder.DualEncoder(t5.t5_1_1_config("tiny", vocab_size=256),
                                     architecture="ade_spl", projection_dim=16)
    seen = []

    def factory(*args, **kwargs):
        iterator = tasks.make_seqio_batch_iterator(*args, num_negatives=2, **kwargs)
        return RecordingIterator(iterator, seen)

    def run(steps):
        seen.clear()
        return train_lib.train(
            model_dir=str(tmp_path), model=model,
            data=DataConfig(train_data=pairs_task, vocabulary=spm_path, query_length=12,
                            passage_length=16, batch_iterator_factory=factory),
            loss=functools.partial(losses.samtone_loss, temperature=0.05),
            global_batch_size=8, num_train_steps=steps, log_every=100,
            checkpoints=CheckpointConfig(every_steps=2),
            # One device compiles fastest; the sharded paths have their own tests.
            mesh=partitioning.make_mesh(devices=jax.devices()[:1]))

    assert run(2).step == 2
    first_run = list(seen)
    assert run(4).step == 4  # restores step 2 and the data position
    second_run = list(seen)
    reference = _iterator(pairs_task, num_negatives=2, seed=0)  # train.seed's default
    expected = [b["query_ids"] for b in _take(reference, 4)]
    # Each run reads the first batch for shapes and rewinds, then one batch per step from
    # where the checkpoint left off.
    assert len(first_run) == len(second_run) == 3
    for got, want in zip(first_run + second_run, [expected[i] for i in (0, 0, 1, 0, 2, 3)]):
        np.testing.assert_array_equal(got, want)
