"""DualEncoder: the three architectures' sharing, pooling, normalisation, gradients, init."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samtone import optimizers
from samtone import partitioning
from samtone import train_step
from samtone.models.dual_encoder import DualEncoder, mean_pool, tower_params
from samtone.normalize import l2_normalize
from samtone.models.t5 import T5Encoder, t5_1_1_config, unstack_layer_params

CONFIG = t5_1_1_config("tiny", num_layers=1, dropout_rate=0.0)  # one layer: compiles fast
PROJECTION_DIM = 16
TREE_KEYS = {
    "sde": {"encoder", "projection_layer"},
    "ade": {"query_encoder", "passage_encoder", "query_projection_layer",
            "passage_projection_layer"},
    "ade_spl": {"query_encoder", "passage_encoder", "projection_layer"},
}


def tokens(lengths, length, seed):
    """int32 [len(lengths), length]: random ids >= 2, EOS (1) last, then 0-padding."""
    ids = np.random.default_rng(seed).integers(2, CONFIG.vocab_size, size=(len(lengths), length))
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 1
        ids[row, n:] = 0
    return ids.astype(np.int32)


# Queries and passages share one length so that most tests reuse one compiled forward pass.
QUERIES = tokens((6, 3, 8, 1), 12, seed=0)
PASSAGES = tokens((12, 5, 9, 2), 12, seed=1)
# [B=4, K=3, Lp]
NEGATIVES = tokens((12, 4, 7, 12, 1, 3), 12, seed=2).reshape(2, 3, 12)[[0, 1, 0, 1]]


@functools.cache  # compiling dominates these tests: build each model and jitted function once
def model_and_params(architecture, config=CONFIG):
    model = DualEncoder(config, architecture=architecture, projection_dim=PROJECTION_DIM)
    params = jax.jit(model.init)(jax.random.key(0), QUERIES, PASSAGES)["params"]
    return model, params


@functools.cache
def _jitted_apply(model, method):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))


def apply(model, params, *args, method="__call__"):
    return _jitted_apply(model, method)(params, *args)


@pytest.mark.parametrize("architecture", ["sde", "ade", "ade_spl"])
def test_outputs_shapes_norms_and_negatives(architecture):
    model, params = model_and_params(architecture)
    assert set(params) == TREE_KEYS[architecture]

    @jax.jit
    def every_entry_point(p):
        return (model.apply({"params": p}, QUERIES, PASSAGES, NEGATIVES),
                model.apply({"params": p}, NEGATIVES.reshape(12, 12), method="encode_passages"),
                model.apply({"params": p}, QUERIES, method="encode_queries"),
                model.apply({"params": p}, QUERIES, PASSAGES))

    outputs, flat_negatives, queries, without_negatives = every_entry_point(params)
    assert set(outputs) == {"query", "passage", "negatives"}
    assert set(without_negatives) == {"query", "passage"}
    assert outputs["query"].shape == outputs["passage"].shape == (4, PROJECTION_DIM)
    assert outputs["negatives"].shape == (4, 3, PROJECTION_DIM)
    for embeddings in outputs.values():
        assert embeddings.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)
    # Negatives go through the passage tower, row by row.
    np.testing.assert_allclose(outputs["negatives"], np.asarray(flat_negatives).reshape(4, 3, -1),
                               atol=1e-6)
    np.testing.assert_allclose(outputs["query"], queries, atol=1e-6)
    np.testing.assert_allclose(outputs["passage"], without_negatives["passage"], atol=1e-6)


@pytest.mark.parametrize("architecture", ["sde", "ade", "ade_spl"])
def test_towers_share_what_the_architecture_says(architecture):
    model, params = model_and_params(architecture)
    same_text = apply(model, params, PASSAGES, PASSAGES)
    if architecture == "sde":  # one tower: a text embeds identically as query and as passage
        np.testing.assert_allclose(same_text["query"], same_text["passage"], atol=1e-6)
        return
    assert not np.allclose(same_text["query"], same_text["passage"], atol=1e-3)
    towers_differ = jax.tree.map(lambda q, p: not np.allclose(q, p),
                                 nn.unbox(params["query_encoder"]),
                                 nn.unbox(params["passage_encoder"]))
    del towers_differ["encoder_norm"], towers_differ["layers_0"]["pre_attention_layer_norm"]
    del towers_differ["layers_0"]["pre_mlp_layer_norm"]  # norm scales start at one in both towers
    assert all(jax.tree.leaves(towers_differ))
    # Give both towers the same weights: only the projection then tells queries from passages.
    shared = {**params, "passage_encoder": params["query_encoder"]}
    same_towers = apply(model, shared, PASSAGES, PASSAGES)
    if architecture == "ade_spl":
        np.testing.assert_allclose(same_towers["query"], same_towers["passage"], atol=1e-6)
    else:
        assert not np.allclose(same_towers["query"], same_towers["passage"], atol=1e-3)


@pytest.mark.parametrize("architecture", ["sde", "ade", "ade_spl"])
def test_gradients_reach_every_tower_and_projection(architecture):
    model, params = model_and_params(architecture)

    def loss(p):
        outputs = model.apply({"params": p}, QUERIES, PASSAGES, NEGATIVES)
        logits = outputs["query"] @ outputs["passage"].T + jnp.einsum("bd,bkd->bk",
                                                                      outputs["query"],
                                                                      outputs["negatives"]).sum()
        return -jnp.mean(jax.nn.log_softmax(logits / 0.05, axis=-1).diagonal())

    grads = nn.unbox(jax.jit(jax.grad(loss))(params))
    assert set(grads) == TREE_KEYS[architecture]
    for name in TREE_KEYS[architecture]:
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads[name])))
        assert np.isfinite(norm) and norm > 0, name
        if name.endswith("encoder"):
            assert jnp.abs(grads[name]["layers_0"]["mlp"]["wo"]["kernel"]).max() > 0, name


def test_mean_pooling_ignores_padding():
    model, params = model_and_params("ade_spl")
    padded = np.pad(PASSAGES, ((0, 0), (0, 7)))
    np.testing.assert_allclose(apply(model, params, padded, padded)["passage"],
                               apply(model, params, PASSAGES, PASSAGES)["passage"], atol=1e-5)


def test_all_padding_text_gives_zero_embedding_and_finite_gradients():
    model, params = model_and_params("sde")
    empty = np.zeros_like(QUERIES)
    np.testing.assert_array_equal(apply(model, params, empty, PASSAGES)["query"], 0.0)
    gradient = jax.grad(lambda x: jnp.sum(l2_normalize(x)))(jnp.zeros((2, 4)))
    assert np.all(np.isfinite(gradient))


def test_unknown_architecture_names_valid_ones():
    with pytest.raises(ValueError, match="sde, ade, ade_spl"):
        DualEncoder(CONFIG, architecture="tied").init(jax.random.key(0), QUERIES, PASSAGES)


@pytest.mark.parametrize("architecture,scan_layers", [("ade", False), ("sde", True)])
@pytest.mark.slow
def test_pretrained_encoder_fills_every_tower(architecture, scan_layers):
    """tower_params + init_train_state: the one path from a pretrained encoder to the towers."""
    config = dataclasses.replace(CONFIG, scan_layers=scan_layers)
    model = DualEncoder(config, architecture=architecture, projection_dim=PROJECTION_DIM)
    # A pretrained tree as the importers give it: plain numpy, one subtree per layer.
    unscanned = dataclasses.replace(config, scan_layers=False)
    pretrained = jax.tree.map(np.asarray, nn.unbox(
        jax.jit(T5Encoder(unscanned).init)(jax.random.key(7), QUERIES)["params"]))
    mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
    rules = partitioning.logical_axis_rules("data")
    batch = {"query_tokens": QUERIES, "passage_tokens": PASSAGES}
    optimizer = optimizers.make_optimizer(
        total_steps=10, logical_axes=train_step.param_logical_specs(model, batch, mesh, rules))
    loaded, _ = train_step.init_train_state(model, optimizer, batch, mesh, rules, seed=3,
                                            init_params=tower_params(pretrained, architecture))
    fresh, _ = train_step.init_train_state(model, optimizer, batch, mesh, rules, seed=3)

    assert set(loaded.params) == TREE_KEYS[architecture]
    for name, value in loaded.params.items():
        if name.endswith("encoder"):
            tower = unstack_layer_params(value) if scan_layers else value
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(tower), pretrained)
        else:  # the projection starts from the same random init as without a checkpoint
            jax.tree.map(np.testing.assert_array_equal, value, fresh.params[name])
    assert np.isfinite(apply(model, loaded.params, QUERIES, PASSAGES)["query"]).all()

    with pytest.raises(ValueError, match="token_embedder.*embedding"):
        bad = {**pretrained, "token_embedder": {"embedding": np.zeros((3, 3), np.float32)}}
        train_step.init_train_state(model, optimizer, batch, mesh, rules,
                                    init_params=tower_params(bad, architecture))


# ---------------------------------------------------------------------------------------------
# Packed rows, and float32 pooling and projection.


@pytest.mark.parametrize("architecture", ["sde", "ade", "ade_spl"])
def test_packed_texts_embed_as_they_do_alone_in_both_towers(architecture):
    """Queries packed into query rows, passages and hard negatives into passage rows (as
    samtone.data.pipeline.pack_batch packs them): every embedding equals the unpacked one."""
    from samtone.data import pipeline
    model, params = model_and_params(architecture)
    batch = {"query_tokens": QUERIES, "passage_tokens": PASSAGES, "negative_tokens": NEGATIVES,
             "query_ids": np.arange(4), "negative_ids": np.zeros((4, 3), np.int32)}
    packed = pipeline.pack_batch(batch)
    assert packed["passage_tokens"].shape[0] < 4 * (1 + 3)  # several texts share a row

    @jax.jit
    def both(p):
        alone = model.apply({"params": p}, QUERIES, PASSAGES, NEGATIVES)
        together = model.apply(
            {"params": p}, packed["query_tokens"], packed["passage_tokens"],
            query_segment_ids=packed["query_segment_ids"],
            passage_segment_ids=packed["passage_segment_ids"], num_examples=4, num_negatives=3)
        return alone, together

    alone, together = both(params)
    assert set(together) == {"query", "passage", "negatives"}
    for name in alone:
        assert together[name].shape == alone[name].shape
        np.testing.assert_allclose(together[name], alone[name], atol=1e-6, err_msg=name)


def test_pooling_and_projection_stay_float32_with_bfloat16_activations():
    config = dataclasses.replace(CONFIG, dtype=jnp.bfloat16)
    model = DualEncoder(config, architecture="ade_spl", projection_dim=PROJECTION_DIM)
    params = model_and_params("ade_spl")[1]

    @jax.jit
    def embeddings_and_pooled(p):
        embeddings = model.apply({"params": p}, QUERIES, method="encode_queries")
        pooled = model.apply({"params": p}, QUERIES, method=lambda m, ids: mean_pool(
            m.query_encoder(ids), ids))
        return embeddings, pooled

    embeddings, pooled = embeddings_and_pooled(params)
    assert pooled.dtype == jnp.float32
    kernel = np.asarray(nn.unbox(params["projection_layer"]["kernel"]), np.float64)
    projected = np.asarray(pooled, np.float64) @ kernel
    expected = projected / np.linalg.norm(projected, axis=-1, keepdims=True)
    np.testing.assert_allclose(embeddings, expected, atol=1e-6)
    # A bfloat16 projection (what the model did before) would be ~100x further off.
    rounded = np.asarray(jnp.asarray(pooled, jnp.bfloat16) @ jnp.asarray(kernel, jnp.bfloat16),
                         np.float64)
    rounded /= np.linalg.norm(rounded, axis=-1, keepdims=True)
    assert np.abs(rounded - expected).max() > 100 * np.abs(np.asarray(embeddings) - expected).max()
