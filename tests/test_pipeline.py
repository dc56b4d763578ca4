"""Batches: contents match the tokenizer, order depends only on (seed, epoch), resume is exact."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from samtone.data import packing
from samtone.data.files import Example
from samtone.data.pipeline import make_batch_iterator, stable_id
from samtone.data.tokenizer import Tokenizer, train_sentencepiece

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()
NUM_EXAMPLES, BATCH, K = 60, 8, 2  # 7 batches an epoch, 4 examples dropped
LQ, LP = 6, 12


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return Tokenizer(train_sentencepiece([sentence(rng, 12) for _ in range(300)], prefix, 64))


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(1)
    return [Example(f"{i} {sentence(rng, 4)}", sentence(rng, 15),
                    tuple(sentence(rng, 8) for _ in range(3))) for i in range(NUM_EXAMPLES)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"query": e.query, "passage": e.passage,
                                        "negatives": list(e.negatives)}) + "\n" for e in examples))
    return str(path)


def batches(data, tokenizer, n=None, **kwargs):
    settings = dict(tokenizer=tokenizer, global_batch_size=BATCH, query_length=LQ,
                    passage_length=LP, process_index=0, process_count=1, prefetch=0)
    iterator = make_batch_iterator(data, **{**settings, **kwargs})
    return iterator if n is None else [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_hold_the_tokenised_examples(data_file, examples, tokenizer):
    first, second = batches(data_file, tokenizer, 2, shuffle=False, num_negatives=K)
    assert {k: (v.shape, v.dtype) for k, v in first.items()} == {
        "query_tokens": ((BATCH, LQ), np.int32), "passage_tokens": ((BATCH, LP), np.int32),
        "negative_tokens": ((BATCH, K, LP), np.int32), "negative_ids": ((BATCH, K), np.int32),
        "query_ids": ((BATCH,), np.int32), "passage_ids": ((BATCH,), np.int32)}
    rows = examples[BATCH:2 * BATCH]  # no shuffle: file order
    np.testing.assert_array_equal(second["query_tokens"],
                                  tokenizer.encode([e.query for e in rows], LQ))
    np.testing.assert_array_equal(second["passage_tokens"],
                                  tokenizer.encode([e.passage for e in rows], LP))
    for k in range(K):
        np.testing.assert_array_equal(second["negative_tokens"][:, k],
                                      tokenizer.encode([e.negatives[k] for e in rows], LP))
    np.testing.assert_array_equal(second["query_ids"], [stable_id(e.query) for e in rows])
    np.testing.assert_array_equal(second["passage_ids"], [stable_id(e.passage) for e in rows])
    np.testing.assert_array_equal(second["negative_ids"],
                                  [[stable_id(n) for n in e.negatives[:K]] for e in rows])
    assert "labels" not in first


def test_a_negative_that_is_a_passage_gets_that_passages_id(tokenizer):
    examples = [Example("q1", "p1", negatives=("p2",), passage_id="doc-1"),
                Example("q2", "p2", negatives=("p3",), passage_id="doc-2"),
                Example("q3", "p1", negatives=("other",), passage_id="doc-1"),
                Example("q4", "p3", negatives=("p1",), passage_id="doc-3")]
    batch = next(make_batch_iterator(examples, tokenizer=tokenizer, global_batch_size=4,
                                     query_length=8, passage_length=8, num_negatives=1,
                                     shuffle=False, process_index=0, process_count=1))
    # Given passage ids are what the loss compares, so a negative equal to a passage's text
    # must carry that passage's id, not a hash of its text.
    np.testing.assert_array_equal(batch["negative_ids"][:, 0],
                                  [stable_id("doc-2"), stable_id("doc-3"), stable_id("other"),
                                   stable_id("doc-1")])
    np.testing.assert_array_equal(batch["passage_ids"],
                                  [stable_id(d) for d in ("doc-1", "doc-2", "doc-1", "doc-3")])


def grain_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch `epoch`'s order, straight from grain's index_shuffle."""
    from grain.experimental import index_shuffle  # pylint: disable=import-outside-toplevel
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return np.array([index_shuffle(i, n - 1, epoch_seed, 4) for i in range(n)])


def test_order_is_the_seeded_permutation_of_each_epoch(data_file, examples, tokenizer):
    seed, per_epoch = 3, NUM_EXAMPLES // BATCH
    got = batches(data_file, tokenizer, 2 * per_epoch, seed=seed)
    query_id_of_row = np.array([stable_id(e.query) for e in examples])
    orders = [grain_order(seed, epoch, NUM_EXAMPLES) for epoch in range(2)]
    for epoch, order in enumerate(orders):
        np.testing.assert_array_equal(np.sort(order), np.arange(NUM_EXAMPLES))
        expected = query_id_of_row[order[:per_epoch * BATCH]]  # the remainder is dropped
        epoch_batches = got[epoch * per_epoch:(epoch + 1) * per_epoch]
        seen = np.concatenate([b["query_ids"] for b in epoch_batches])
        np.testing.assert_array_equal(seen, expected)
    assert not np.array_equal(orders[0], orders[1])


def test_a_state_saved_before_index_shuffle_resumes_on_its_permutation(data_file, examples,
                                                                        tokenizer):
    """States without "order" (earlier samtone) continue on default_rng's permutation."""
    seed, per_epoch = 4, NUM_EXAMPLES // BATCH
    resumed = make_batch_iterator(data_file, tokenizer=tokenizer, global_batch_size=BATCH,
                                  query_length=LQ, passage_length=LP, seed=seed, prefetch=0)
    state = resumed.get_state()
    del state["order"]
    state.update(epoch=1, batch_in_epoch=1)
    resumed.set_state(state)
    got = np.concatenate([next(resumed)["query_ids"] for _ in range(per_epoch - 1)])
    order = np.random.default_rng([seed, 1]).permutation(NUM_EXAMPLES)
    query_id_of_row = np.array([stable_id(e.query) for e in examples])
    np.testing.assert_array_equal(got, query_id_of_row[order[BATCH:per_epoch * BATCH]])
    assert resumed.get_state()["order"] == "permutation"  # and its checkpoints keep it


def test_same_seed_same_batches_other_seed_other_batches(data_file, tokenizer):
    n = 10  # crosses the epoch boundary
    assert_same(batches(data_file, tokenizer, n, seed=5), batches(data_file, tokenizer, n, seed=5))
    other = batches(data_file, tokenizer, n, seed=6)
    assert not np.array_equal(batches(data_file, tokenizer, 1, seed=5)[0]["query_ids"],
                              other[0]["query_ids"])


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("consumed", [3, 7, 9])  # 7 = exactly one epoch, 9 crosses into epoch 1
def test_resume_continues_exactly(data_file, tokenizer, prefetch, consumed):
    more = 8
    reference = batches(data_file, tokenizer, consumed + more, num_negatives=K, seed=2)
    interrupted = batches(data_file, tokenizer, num_negatives=K, seed=2, prefetch=prefetch)
    assert_same([next(interrupted) for _ in range(consumed)], reference[:consumed])
    state = json.loads(json.dumps(interrupted.get_state()))
    assert (state["epoch"], state["batch_in_epoch"]) == divmod(consumed, NUM_EXAMPLES // BATCH)
    interrupted.close()
    resumed = batches(data_file, tokenizer, num_negatives=K, seed=2, prefetch=prefetch)
    next(resumed)  # a resumed iterator may already have run; set_state rewinds it
    resumed.set_state(state)
    assert_same([next(resumed) for _ in range(more)], reference[consumed:])
    resumed.close()


def test_state_must_match_data_and_settings(data_file, examples, tokenizer):
    state = batches(data_file, tokenizer, seed=1).get_state()
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        batches(data_file, tokenizer, seed=2).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        batches(data_file, tokenizer, seed=1, global_batch_size=4).set_state(state)
    with pytest.raises(ValueError, match="data_fingerprint"):
        batches(examples[1:] + examples[:1], tokenizer, seed=1).set_state(state)
    with pytest.raises(ValueError, match="lacks"):
        batches(data_file, tokenizer, seed=1).set_state({"epoch": 0})


@pytest.mark.parametrize("prefetch", [0, 2])
def test_finite_epochs_stop(data_file, tokenizer, prefetch):
    iterator = batches(data_file, tokenizer, num_epochs=2, prefetch=prefetch)
    assert iterator.batches_per_epoch == NUM_EXAMPLES // BATCH
    assert len(list(iterator)) == 2 * iterator.batches_per_epoch
    with pytest.raises(StopIteration):
        next(iterator)
    state = iterator.get_state()
    assert (state["epoch"], state["batch_in_epoch"]) == (2, 0)
    again = batches(data_file, tokenizer, num_epochs=2, prefetch=prefetch)
    again.set_state(state)
    assert list(again) == []


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(data_file, tokenizer, process_count):
    n = 9
    global_batches = batches(data_file, tokenizer, n, num_negatives=K, seed=4)
    slices = [batches(data_file, tokenizer, n, num_negatives=K, seed=4, process_index=p,
                      process_count=process_count) for p in range(process_count)]
    for step, global_batch in enumerate(global_batches):
        for key, value in global_batch.items():
            joined = np.concatenate([slices[p][step][key] for p in range(process_count)])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} at step {step}")
    assert slices[0][0]["query_tokens"].shape[0] == BATCH // process_count


def test_process_defaults_and_divisibility(data_file, tokenizer):
    iterator = make_batch_iterator(data_file, tokenizer=tokenizer, global_batch_size=BATCH,
                                   query_length=LQ, passage_length=LP, prefetch=0)
    assert iterator.local_batch_size == BATCH  # jax.process_count() == 1 in tests
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        batches(data_file, tokenizer, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"BATCH_SIZE .* = 64 is larger than the \d+ examples"):
        batches(data_file, tokenizer, global_batch_size=64)


def test_ids_are_stable_across_python_processes():
    texts = ["what is jax", "ünïcode", "a" * 1000]
    code = ("import sys; from samtone.data.pipeline import stable_id; "
            f"print([stable_id(t) for t in {texts!r}])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": root}
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                   capture_output=True, text=True).stdout.strip())
    assert outputs == {str([stable_id(t) for t in texts])}
    assert all(0 <= stable_id(t) < 2**31 for t in texts)


def test_duplicates_and_given_ids(tokenizer):
    data = [Example("same query", "passage a", query_id=None, passage_id="doc-1"),
            Example("same query", "passage b", passage_id="doc-2"),
            Example("other query", "passage a again", passage_id="doc-1"),
            Example("query with id", "passage c", query_id="q9"),
            Example("query with id, reworded", "passage c", query_id="q9")] * 2
    batch, = batches(data, tokenizer, 1, shuffle=False, global_batch_size=len(data))
    query_ids, passage_ids = batch["query_ids"], batch["passage_ids"]
    assert query_ids[0] == query_ids[1] == stable_id("same query") != query_ids[2]
    assert query_ids[3] == query_ids[4] == stable_id("q9")
    assert passage_ids[0] == passage_ids[2] == stable_id("doc-1") != passage_ids[1]
    assert passage_ids[3] == passage_ids[4] == stable_id("passage c")
    np.testing.assert_array_equal(query_ids[:5], query_ids[5:])


def test_negatives_shortfall_names_the_example(examples, tokenizer):
    short = list(examples)
    short[17] = Example(short[17].query, short[17].passage, ("just one",))
    with pytest.raises(ValueError, match="example 17 .* has 1 negatives but num_negatives=2"):
        batches(short, tokenizer, num_negatives=K)


def test_labels(tmp_path, tokenizer):
    path = tmp_path / "sts.tsv"
    rows = "".join(f"s{i}\tt{i}\t{i / 10}\n" for i in range(8))
    path.write_text("query\tpassage\tlabel\n" + rows)
    batch, = batches(str(path), tokenizer, 1, shuffle=False)
    assert batch["labels"].dtype == np.float32
    np.testing.assert_allclose(batch["labels"], np.arange(8) / 10, rtol=1e-6)
    mixed = [Example("q", "p", label=1.0)] * 4 + [Example("q", "p")] * 4
    with pytest.raises(ValueError, match="example 0 has label but example 4 has none"):
        batches(mixed, tokenizer)


def test_simcse_pairs_each_sentence_with_itself(tmp_path, tokenizer):
    sentences = [f"sentence {WORDS[i]} {WORDS[-i]}" for i in range(BATCH)]
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(sentences) + "\n")
    batch, = batches(str(path), tokenizer.path, 1, simcse=True, shuffle=False)
    np.testing.assert_array_equal(batch["query_tokens"], tokenizer.encode(sentences, LQ))
    np.testing.assert_array_equal(batch["passage_tokens"], tokenizer.encode(sentences, LP))
    np.testing.assert_array_equal(batch["query_ids"], batch["passage_ids"])
    with pytest.raises(ValueError, match="simcse"):
        batches(str(path), tokenizer, simcse=True, num_negatives=1)


def test_prefetch_thread_ends_with_its_iterator(data_file, tokenizer):
    def prefetch_threads():
        return [t for t in threading.enumerate() if t.name == "samtone-prefetch"]

    before = len(prefetch_threads())
    iterator = batches(data_file, tokenizer, prefetch=2)  # repeats forever
    next(iterator)
    assert len(prefetch_threads()) == before + 1
    del iterator  # nothing else refers to it: the thread must stop rather than leak
    assert len(prefetch_threads()) == before


# ---------------------------------------------------------------------------------------------
# Shapes with no compute on padding: length buckets and packed rows.

BUCKETS = [4, 8]  # query buckets 4, 6 (= LQ); passage buckets 4, 8, 12 (= LP)


@pytest.fixture(scope="module")
def varied_examples():
    """Batches (in file order) of short texts, then long ones, then mixed."""
    rng = np.random.default_rng(2)
    words = [(1, 2), (3, 6), (1, 6)]
    return [Example(sentence(rng, rng.integers(1, 3)),
                    sentence(rng, rng.integers(*words[(i // BATCH) % 3])),
                    tuple(sentence(rng, rng.integers(*words[(i // BATCH) % 3])) for _ in range(K)))
            for i in range(6 * BATCH)]


@pytest.mark.parametrize("process_count", [1, 2])
def test_length_buckets_cut_each_batch_to_its_global_longest_text(varied_examples, tokenizer,
                                                                  process_count):
    n = 6
    settings = dict(num_negatives=K, shuffle=False)
    plain = batches(varied_examples, tokenizer, n, length_buckets=False, **settings)
    slices = [batches(varied_examples, tokenizer, n, length_buckets=BUCKETS, process_index=p,
                      process_count=process_count, **settings) for p in range(process_count)]
    seen_lengths = set()
    for step, full in enumerate(plain):
        longest_query = (full["query_tokens"] != 0).sum(-1).max()
        longest_passage = max((full["passage_tokens"] != 0).sum(-1).max(),
                              (full["negative_tokens"] != 0).sum(-1).max())
        query_length = min(b for b in [4, LQ] if b >= longest_query)
        passage_length = min(b for b in [4, 8, LP] if b >= longest_passage)
        seen_lengths.add(passage_length)
        for key, length in (("query_tokens", query_length), ("passage_tokens", passage_length),
                            ("negative_tokens", passage_length)):
            # Every process cuts to the global batch's bucket, so all agree on the shapes.
            assert {s[step][key].shape[-1] for s in slices} == {length}, (step, key)
            joined = np.concatenate([s[step][key] for s in slices])
            np.testing.assert_array_equal(joined, full[key][..., :length])
            assert not full[key][..., length:].any()  # only padding was cut
        for key in ("query_ids", "passage_ids", "negative_ids"):
            np.testing.assert_array_equal(np.concatenate([s[step][key] for s in slices]),
                                          full[key])
    assert len(seen_lengths) > 1  # the data has batches of more than one bucket


def _unpacked(batch, num_negatives):
    """The plain global batch a packed one holds (samtone.data.packing.unpack)."""
    size = len(batch["query_ids"])
    passages = packing.unpack(batch["passage_tokens"], batch["passage_segment_ids"],
                              size * (1 + num_negatives), LP)
    plain = {"query_tokens": packing.unpack(batch["query_tokens"], batch["query_segment_ids"],
                                            size, LQ),
             "passage_tokens": passages[:size],
             "negative_tokens": passages[size:].reshape(size, num_negatives, LP)}
    plain.update({k: v for k, v in batch.items() if k.endswith("_ids") and "segment" not in k})
    return plain


@pytest.mark.parametrize("prefetch", [0, 2])
def test_packed_batches_are_the_global_batch_on_every_process_and_resume(varied_examples,
                                                                         tokenizer, prefetch):
    n, data = 9, varied_examples  # 6 batches an epoch: crosses into the second epoch
    plain = batches(data, tokenizer, n, num_negatives=K, seed=4, length_buckets=False)
    packed = [batches(data, tokenizer, num_negatives=K, seed=4, pack=True, process_index=p,
                      process_count=2, prefetch=prefetch) for p in range(2)]
    assert packed[0].global_batches and not batches(data, tokenizer).global_batches
    got = [[next(iterator) for _ in range(n)] for iterator in packed]
    assert_same(got[0], got[1])  # every process holds the same packed global batch
    for full, batch in zip(plain, got[0]):
        assert packing.is_packed(batch)
        assert_same([_unpacked(batch, K)], [full])
    # Several texts share a row: fewer rows than texts.
    assert sum(b["passage_tokens"].shape[0] for b in got[0]) < n * BATCH * (1 + K) / 2
    # Resume: a fresh iterator set to a saved state continues with the same packed batches.
    state = json.loads(json.dumps(packed[0].get_state()))
    resumed = batches(data, tokenizer, num_negatives=K, seed=4, pack=True, prefetch=prefetch)
    resumed.set_state(state)
    reference = batches(data, tokenizer, n + 3, num_negatives=K, seed=4, pack=True)
    assert_same([next(resumed) for _ in range(3)], reference[n:])
    for iterator in (*packed, resumed):
        iterator.close()
