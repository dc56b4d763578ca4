"""samtone.checkpoints.t5x: reading T5X checkpoints written here, and the real fixture if
present."""
import os
import pathlib
import sys

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from samtone.checkpoints import t5x

tensorstore = pytest.importorskip("tensorstore")

FIXTURE_NAME = "t5x_test_de_t5_tiny.checkpoint_1000"
FIXTURE_CANDIDATES = [
    pathlib.Path("/work/shared/fixtures") / FIXTURE_NAME,
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / FIXTURE_NAME,
]


def _write_zarr(folder, array, chunks):
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": str(folder)},
        "metadata": {
            "shape": list(array.shape), "chunks": list(chunks),
            "dtype": "bfloat16" if array.dtype == ml_dtypes.bfloat16 else array.dtype.str,
            "compressor": {"id": "gzip", "level": 1},
        },
    }
    store = tensorstore.open(spec, create=True, open=False).result()
    store.write(array).result()
    return spec["metadata"]


def _fake_dual_encoder_params(rng, vocab=11, embed=6, heads=2, d_kv=3, d_ff=5, projection=7,
                              buckets=4):
    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    layer = lambda: {  # noqa: E731
        "pre_attention_layer_norm": {"scale": normal(embed)},
        "attention": {name: {"kernel": normal(embed, heads * d_kv)}
                      for name in ("query", "key", "value")}
        | {"out": {"kernel": normal(heads * d_kv, embed)}},
        "pre_mlp_layer_norm": {"scale": normal(embed)},
        "mlp": {"wi": {"kernel": normal(embed, d_ff)}, "wo": {"kernel": normal(d_ff, embed)}},
    }
    return {
        "token_embedder": {"embedding": normal(vocab, embed)},
        "encoder": {
            "relpos_bias": {"rel_embedding": normal(heads, buckets)},
            "layers_0": layer(),
            "layers_1": layer(),
            "encoder_norm": {"scale": normal(embed)},
        },
        "projection_layer": {"kernel": normal(embed, projection)},
    }


def _write_checkpoint(directory, params, stored_in_zarr, *, legacy_path=(), absolute_path=()):
    """A T5X-format checkpoint: params at `stored_in_zarr` key paths go to zarr folders."""
    directory.mkdir(parents=True, exist_ok=True)
    target = jax.tree_util.tree_map(lambda x: x, params)  # a copy we can overwrite
    for key in stored_in_zarr:
        node = target
        for name in key[:-1]:
            node = node[name]
        folder_name = "target." + ".".join(key)
        array = node[key[-1]]
        chunks = tuple(max(1, (size + 1) // 2) for size in array.shape)  # uneven edge chunks
        metadata = _write_zarr(directory / folder_name, array, chunks)
        if key in legacy_path:
            spec = {"driver": "zarr", "path": folder_name, "metadata": metadata}
        else:
            path = (f"gs://bucket/run/checkpoint_3/{folder_name}" if key in absolute_path
                    else folder_name)
            spec = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": path},
                    "metadata": metadata}
        node[key[-1]] = spec
    contents = {
        "version": 3,
        "optimizer": {"target": target, "state": {"step": np.int32(3), "param_states": {}}},
    }
    (directory / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(contents))
    return directory


ZARR_KEYS = [
    ("token_embedder", "embedding"),
    ("encoder", "layers_0", "mlp", "wi", "kernel"),
    ("encoder", "layers_1", "attention", "out", "kernel"),
]


def _assert_trees_equal(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                            jax.tree_util.tree_leaves(expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("open_file", [False, True])
def test_reads_inline_and_zarr_leaves_exactly(tmp_path, open_file):
    params = _fake_dual_encoder_params(np.random.default_rng(0))
    directory = _write_checkpoint(
        tmp_path / "checkpoint_3", params, ZARR_KEYS,
        legacy_path=[ZARR_KEYS[1]], absolute_path=[ZARR_KEYS[2]],
    )
    loaded = t5x.load_t5x_checkpoint(directory / "checkpoint" if open_file else directory)
    _assert_trees_equal(loaded, params)
    loaded["encoder"]["encoder_norm"]["scale"][0] = 1.0  # inline arrays come back writable


def test_reads_without_tensorstore_through_numpy(tmp_path, monkeypatch):
    params = _fake_dual_encoder_params(np.random.default_rng(2))
    directory = _write_checkpoint(tmp_path / "c", params, ZARR_KEYS)
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # `import tensorstore` now fails
    _assert_trees_equal(t5x.load_t5x_checkpoint(directory), params)


def test_bfloat16_and_scalar_leaves_keep_their_dtype(tmp_path):
    params = {
        "encoder": {"big": np.arange(15, dtype=np.float32).reshape(5, 3).astype(ml_dtypes.bfloat16),
                    "small": np.ones(3, ml_dtypes.bfloat16)},
        "step_like": np.int32(7),
    }
    loaded = t5x.load_t5x_checkpoint(_write_checkpoint(tmp_path / "c", params,
                                                       [("encoder", "big")]))
    assert loaded["encoder"]["big"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded["encoder"]["big"].astype(np.float32),
                                  np.arange(15.0).reshape(5, 3))
    assert loaded["encoder"]["small"].dtype == ml_dtypes.bfloat16
    assert loaded["step_like"] == 7 and loaded["step_like"].shape == ()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_numpy_zarr_reader_matches_tensorstore(tmp_path, dtype):
    array = np.random.default_rng(1).normal(size=(7, 5)).astype(dtype)
    _write_zarr(tmp_path / "a", array, chunks=(3, 2))
    np.testing.assert_array_equal(t5x.read_zarr_v2(str(tmp_path / "a")), array)


def test_missing_zarr_folder_names_checkpoint_and_key(tmp_path):
    params = _fake_dual_encoder_params(np.random.default_rng(0))
    directory = _write_checkpoint(tmp_path / "ckpt", params, ZARR_KEYS)
    for child in (directory / "target.encoder.layers_0.mlp.wi.kernel").iterdir():
        child.unlink()
    (directory / "target.encoder.layers_0.mlp.wi.kernel").rmdir()
    with pytest.raises(ValueError,
                       match=r"ckpt/checkpoint: cannot read target/encoder/layers_0/mlp/wi/kernel"):
        t5x.load_t5x_checkpoint(directory)


def test_bad_inputs_have_explicit_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        t5x.load_t5x_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no 'checkpoint' file"):
        t5x.load_t5x_checkpoint(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint").write_bytes(
        flax.serialization.msgpack_serialize({"params": {}}))
    with pytest.raises(ValueError,
                       match=r"other/checkpoint: expected .*found top-level \['params'\]"):
        t5x.load_t5x_checkpoint(tmp_path / "other")


def test_dual_encoder_conversion_layouts():
    params = _fake_dual_encoder_params(np.random.default_rng(0))
    encoder = t5x.t5x_encoder_to_samtone(params)
    assert sorted(encoder) == ["encoder_norm", "layers_0", "layers_1", "relpos_bias",
                               "token_embedder"]
    assert encoder["token_embedder"] is params["token_embedder"]
    assert encoder["layers_1"] is params["encoder"]["layers_1"]

    sde = t5x.t5x_dual_encoder_to_samtone(params, "sde")
    assert sde == {"encoder": encoder, "projection_layer": params["projection_layer"]}
    ade = t5x.t5x_dual_encoder_to_samtone(params, "ade")
    assert sorted(ade) == ["passage_encoder", "passage_projection_layer", "query_encoder",
                           "query_projection_layer"]
    assert ade["query_encoder"] == ade["passage_encoder"] == encoder
    ade_spl = t5x.t5x_dual_encoder_to_samtone(params, "ade_spl")
    assert sorted(ade_spl) == ["passage_encoder", "projection_layer", "query_encoder"]


def test_pretrained_t5_conversion_drops_decoder_and_rejects_dual_encoder_use():
    params = _fake_dual_encoder_params(np.random.default_rng(0))
    pretrained = {"token_embedder": params["token_embedder"], "encoder": params["encoder"],
                  "decoder": {"decoder_norm": {"scale": np.ones(6, np.float32)}}}
    assert "decoder" not in t5x.t5x_encoder_to_samtone(pretrained)
    with pytest.raises(ValueError, match="projection_layer"):
        t5x.t5x_dual_encoder_to_samtone(pretrained, "sde")
    with pytest.raises(ValueError, match="encoder/encoder_norm"):
        t5x.t5x_encoder_to_samtone({"token_embedder": {},
                                    "encoder": {"relpos_bias": {}, "layers_0": {}}})
    with pytest.raises(ValueError, match="scanned"):
        t5x.t5x_encoder_to_samtone({"token_embedder": {}, "encoder": {"layers": {}}})


def test_converted_tree_applies_in_samtone_model():
    dual_encoder = pytest.importorskip("samtone.models.dual_encoder")
    from samtone.models.t5 import T5Config

    config = T5Config(vocab_size=11, d_model=6, d_kv=3, d_ff=5, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=4, feed_forward_proj="relu")
    params = _fake_dual_encoder_params(np.random.default_rng(0))
    for architecture in ("sde", "ade", "ade_spl"):
        model = dual_encoder.DualEncoder(config, architecture, projection_dim=7)
        _check_applies(model, t5x.t5x_dual_encoder_to_samtone(params, architecture))


def _check_applies(model, converted):
    tokens = jnp.array([[5, 3, 1, 0], [2, 1, 0, 0]], jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)
    expected = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), nn.unbox(abstract["params"]))
    actual = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), converted)
    assert actual == expected
    outputs = model.apply({"params": converted}, tokens, tokens)
    assert np.all(np.isfinite(outputs["query"]))
    np.testing.assert_allclose(np.linalg.norm(outputs["passage"], axis=-1), 1.0, rtol=1e-5)
    return outputs


def _fixture_dir():
    for candidate in FIXTURE_CANDIDATES:
        if candidate.is_dir():
            return candidate
    pytest.skip(f"T5X fixture {FIXTURE_NAME} not found")


def test_real_t5x_retrieval_checkpoint():
    directory = _fixture_dir()
    params = t5x.load_t5x_checkpoint(directory)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert shapes["token_embedder"]["embedding"] == (32128, 4)
    assert shapes["encoder"]["relpos_bias"]["rel_embedding"] == (2, 4)  # heads, buckets
    assert shapes["encoder"]["layers_1"]["mlp"]["wi"]["kernel"] == (4, 8)  # T5 1.0 ReLU MLP
    # 2 heads x d_kv 2
    assert shapes["encoder"]["layers_0"]["attention"]["query"]["kernel"] == (4, 4)
    assert shapes["projection_layer"]["kernel"] == (4, 768)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))
    # The zarr folder and the numpy fallback agree on the real on-disk bytes.
    np.testing.assert_array_equal(
        t5x.read_zarr_v2(os.path.join(directory, "target.token_embedder.embedding")),
        params["token_embedder"]["embedding"],
    )
    dual_encoder = pytest.importorskip("samtone.models.dual_encoder")
    from samtone.models.t5 import T5Config

    config = T5Config(vocab_size=32128, d_model=4, d_kv=2, d_ff=8, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=4, feed_forward_proj="relu")
    model = dual_encoder.DualEncoder(config, "sde", projection_dim=768)
    outputs = _check_applies(model, t5x.t5x_dual_encoder_to_samtone(params, "sde"))
    # A trained model tells different texts apart.
    assert not np.allclose(outputs["query"][0], outputs["query"][1])
