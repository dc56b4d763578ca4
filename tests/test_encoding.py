"""samtone.encoding: length buckets give the embeddings of full-length padding, in input order,
with a few compiled shapes; windows stream in order."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samtone import encoding
from samtone.data import smoke_path
from samtone.data.tokenizer import Tokenizer

from tiny_runs import smoke_model, smoke_texts


class CountTokenizer:
    """'n ...' -> n real tokens (ids n + 2, ...), EOS, padding; truncated like T5's."""

    def encode(self, texts, max_length):
        tokens = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            count = min(int(text.split()[0]), max_length - 1)
            tokens[row, :count] = np.arange(count) + int(text.split()[0]) + 2
            tokens[row, count] = 1
        return tokens


def test_bucket_lengths():
    assert encoding.default_bucket_lengths(256) == [16, 32, 64, 128, 256]
    assert encoding.default_bucket_lengths(100) == [16, 32, 64, 100]
    assert encoding.default_bucket_lengths(16) == [16]
    assert encoding.default_bucket_lengths(10) == [10]


@pytest.mark.parametrize("window_batches", [1, 256])
def test_buckets_keep_input_order_and_compile_a_few_shapes(monkeypatch, window_batches):
    monkeypatch.setattr(encoding, "WINDOW_BATCHES", window_batches)
    traced = []

    @jax.jit
    def encode(tokens):  # a summary of the real tokens that ignores padding
        traced.append(tokens.shape)
        real = tokens > 0
        return jnp.stack([real.sum(1), jnp.where(real, tokens, 0).max(1)], axis=1) * 1.0

    counts = [int(n) for n in np.random.default_rng(0).integers(1, 120, size=37)] + [500]
    texts = [f"{n} words" for n in counts]
    embeddings = encoding.encode_texts(encode, CountTokenizer(), texts, 100, batch_size=4)
    # Real length (EOS included, truncated at 100) and largest id, row for row.
    kept = np.minimum(counts, 99)
    np.testing.assert_array_equal(embeddings, np.stack([kept + 1, kept + np.array(counts) + 1],
                                                       axis=1))
    assert embeddings.dtype == np.float32
    assert sorted(set(traced)) == [(4, 16), (4, 32), (4, 64), (4, 100)]  # one compile each
    chunks = list(encoding.encode_chunks(encode, CountTokenizer(), texts, 100, batch_size=4))
    assert [len(c) for c in chunks] == ([4] * 9 + [2] if window_batches == 1 else [38])
    np.testing.assert_array_equal(np.concatenate(chunks), embeddings)


def test_without_buckets_every_batch_is_full_length():
    shapes = []

    def encode(tokens):
        shapes.append(tokens.shape)
        return tokens[:, :1].astype(np.float32)

    texts = [f"{n} x" for n in (3, 40, 7)]
    encoding.encode_texts(encode, CountTokenizer(), texts, 64, batch_size=2, buckets=False)
    assert shapes == [(2, 64), (2, 64)]


def test_bucketed_embeddings_equal_full_length_padding_on_a_t5_dual_encoder():
    """Padding does not change mean pooling: the same embeddings at every bucket length."""
    model = smoke_model()
    tokenizer = Tokenizer(smoke_path("spm.model"))
    queries, passages = smoke_texts(13)
    # 2 to 64 tokens (passages truncated): every bucket, interleaved.
    texts = [text for query, passage in zip(queries, passages)
             for text in (query, passage, passage[:len(passage) // 3])]
    texts += ["a"]
    # Random parameters of the right shapes (tracing init is instant, compiling it is not).
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                     jnp.ones((1, 8), jnp.int32),
                                     jnp.ones((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: rng.normal(scale=0.3, size=leaf.shape).astype(leaf.dtype),
                          shapes)
    encode = jax.jit(lambda tokens: model.apply({"params": params}, tokens,
                                                method="encode_passages"))
    bucketed = encoding.encode_texts(encode, tokenizer, texts, 64, batch_size=8)
    full = encoding.encode_texts(encode, tokenizer, texts, 64, batch_size=8, buckets=False)
    assert encode._cache_size() == 3  # 16, 32, 64: the full length is a bucket too
    np.testing.assert_allclose(bucketed, full, atol=2e-6)
    reference = encode(tokenizer.encode(texts, 64))  # one batch of every text, in order
    np.testing.assert_allclose(bucketed, np.asarray(reference), atol=2e-6)  # input order


def test_bad_inputs():
    with pytest.raises(TypeError, match="a list of texts"):
        encoding.encode_texts(None, CountTokenizer(), "1 x", 8, 2)
    with pytest.raises(ValueError, match="no texts"):
        encoding.encode_texts(None, CountTokenizer(), [], 8, 2)
