"""Length buckets and packed rows: what `pack` writes, checked text by text."""
import numpy as np
import pytest

from samtone.data import packing


def token_ids(lengths, max_length, seed=0):
    """int32 [len(lengths), max_length]: random ids >= 2, EOS (1) last, then 0-padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 100, size=(len(lengths), max_length))
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 1
        ids[row, n:] = 0
    return ids.astype(np.int32)


def test_bucket_lengths():
    assert packing.default_bucket_lengths(256) == [16, 32, 64, 128, 256]
    assert packing.default_bucket_lengths(100) == [16, 32, 64, 100]
    assert packing.default_bucket_lengths(12) == [12]
    assert packing.bucket_lengths(True, 64) == [16, 32, 64]
    assert packing.bucket_lengths(False, 64) == [64]
    assert packing.bucket_lengths([48, 8, 128], 64) == [8, 48, 64]
    with pytest.raises(ValueError, match="positive"):
        packing.bucket_lengths([0, 8], 64)
    assert [packing.bucket_length(n, [16, 32, 64]) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
    with pytest.raises(ValueError, match="longer than the longest bucket"):
        packing.bucket_length(65, [16, 32, 64])


@pytest.mark.parametrize("seed", range(4))
def test_pack_places_every_text_whole_in_order_and_unpacks(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 41, size=37)
    tokens = token_ids(lengths, 40, seed)
    packed, segment_ids = packing.pack(tokens)
    np.testing.assert_array_equal(packing.text_lengths(tokens), lengths)
    assert packed.shape == segment_ids.shape and packed.shape[1] == 40
    assert packed.shape[0] % packing.row_multiple(37) == 0
    # Every text is one contiguous run of its row, tokens in order, with segment id n + 1.
    for n, length in enumerate(lengths):
        rows, columns = np.nonzero(segment_ids == n + 1)
        assert len(set(rows)) == 1 and len(rows) == length
        np.testing.assert_array_equal(np.diff(columns), 1)
        np.testing.assert_array_equal(packed[rows, columns], tokens[n, :length])
    assert np.all((packed == 0) == (segment_ids == 0))
    np.testing.assert_array_equal(packing.unpack(packed, segment_ids, 37, 40), tokens)
    # First-fit decreasing uses at most 11/9 of the optimum (>= total / row length) + 1 rows.
    used_rows = int(np.any(segment_ids, axis=1).sum())
    assert used_rows <= np.ceil(11 / 9 * np.ceil(lengths.sum() / 40)) + 1


def test_pack_is_deterministic_and_fills_rows():
    tokens = token_ids([30, 10, 20, 10, 2, 8, 40, 40], 40)
    first, second = packing.pack(tokens), packing.pack(tokens)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    packed, segment_ids = packing.pack(tokens, multiple=1)
    assert packed.shape == (4, 40)  # 160 tokens in 4 full rows: 40 | 40 | 30+10 | 20+10+8+2
    assert np.all(packed != 0)
    with pytest.raises(ValueError, match="1 to 40 tokens"):
        packing.first_fit_decreasing(np.array([41]), 40)


def test_pad_rows_adds_empty_rows_to_packed_arrays_only():
    batch = {"query_tokens": np.ones((3, 4), np.int32),
             "query_segment_ids": np.ones((3, 4), np.int32),
             "passage_tokens": np.ones((8, 6), np.int32),
             "passage_segment_ids": np.ones((8, 6), np.int32),
             "query_ids": np.arange(5, dtype=np.int32)}
    assert (packing.is_packed(batch)
            and not packing.is_packed({"query_tokens": batch["query_tokens"]}))
    padded = packing.pad_rows(batch, 4)
    assert padded["query_tokens"].shape == (4, 4) and padded["passage_tokens"].shape == (8, 6)
    assert not padded["query_tokens"][3].any() and not padded["query_segment_ids"][3].any()
    assert padded["query_ids"] is batch["query_ids"]
