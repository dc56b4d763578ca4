"""T5Encoder against transformers' T5EncoderModel, and its scan / remat / bf16 / sharded
variants."""
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from samtone.checkpoints import load_hf_t5_encoder  # noqa: E402
from samtone.models.t5 import (  # noqa: E402
    T5_1_1_PRESETS,
    T5Encoder,
    relative_position_buckets,
    stack_layer_params,
    t5_1_1_config,
    unstack_layer_params,
)

# Long enough (40 > max_distance 32) to reach the log-spaced and the clamped buckets.
LENGTH = 40
REAL_LENGTHS = (40, 25, 7, 1)


def token_ids(lengths=REAL_LENGTHS, length=LENGTH, vocab=128, seed=0):
    """int32 [len(lengths), length]: random ids >= 2, EOS (1) last, then 0-padding."""
    ids = np.random.default_rng(seed).integers(2, vocab, size=(len(lengths), length))
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 1
        ids[row, n:] = 0
    return ids.astype(np.int32)


def hf_model(feed_forward_proj: str):
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj=feed_forward_proj,
    )
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():  # move every weight (layer-norm scales too) away from its init
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def save_hf(model, directory, weights: str):
    """Writes `model` the way a Hugging Face directory holds it: one of three weight layouts."""
    if weights == "safetensors":
        model.save_pretrained(directory)
        return
    model.config.save_pretrained(directory)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if weights == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif weights == "sharded":
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[::2],
                  "model-00002-of-00002.safetensors": names[1::2]}
        for file, shard_names in shards.items():
            safetensors_numpy.save_file({n: state[n].numpy() for n in shard_names},
                                        str(directory / file))
        weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def hf_gated(tmp_path_factory):
    model = hf_model("gated-gelu")
    directory = tmp_path_factory.mktemp("hf_gated")
    save_hf(model, directory, "safetensors")
    return model, directory


def hf_hidden(model, ids):
    with torch.no_grad():
        mask = torch.tensor(ids != 0)
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=mask).last_hidden_state.numpy()


@functools.cache  # compiling dominates these tests: one jitted function per config
def _jitted(config, what):
    model = T5Encoder(config)
    if what == "apply":
        return jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    return jax.jit(jax.value_and_grad(
        lambda p, ids: jnp.sum(jnp.square(model.apply({"params": p}, ids)))))


def encode(config, params, ids):
    return np.asarray(_jitted(config, "apply")(params, jnp.asarray(ids)), np.float32)


def test_relative_position_buckets_match_hf():
    bucket_fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    position = torch.arange(300)
    relative = position[None, :] - position[:, None]
    for num_buckets, max_distance in [(32, 128), (32, 32), (16, 20), (64, 256)]:
        expected = bucket_fn(relative, bidirectional=True, num_buckets=num_buckets,
                             max_distance=max_distance)
        np.testing.assert_array_equal(relative_position_buckets(300, num_buckets, max_distance),
                                      expected.numpy())


@pytest.mark.parametrize(
    "feed_forward_proj,weights",
    [("gated-gelu", "safetensors"), ("gated-gelu", "bin"), ("gated-gelu", "sharded"),
     ("relu", "safetensors")],
)
def test_matches_hf_t5_encoder(tmp_path, feed_forward_proj, weights):
    model = hf_model(feed_forward_proj)
    save_hf(model, tmp_path, weights)
    config, params = load_hf_t5_encoder(tmp_path)

    hf = model.config
    assert (config.d_model, config.d_kv, config.d_ff, config.num_layers, config.num_heads,
            config.vocab_size) == (
        hf.d_model, hf.d_kv, hf.d_ff, hf.num_layers, hf.num_heads, hf.vocab_size)
    assert config.relative_attention_max_distance == 32
    assert config.feed_forward_proj == feed_forward_proj
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(params))
    mlp_names = {"gated-gelu": {"wi_0", "wi_1", "wo"}, "relu": {"wi", "wo"}}[feed_forward_proj]
    assert set(params["layers_1"]["mlp"]) == mlp_names

    ids = token_ids()
    real = ids != 0
    ours = encode(config, params, ids)
    assert np.abs(ours - hf_hidden(model, ids))[real].max() <= 1e-4


def test_load_errors_name_file_and_tensor(tmp_path):
    model = hf_model("gated-gelu")
    state = {k: v.numpy() for k, v in model.state_dict().items()
             if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    model.config.save_pretrained(tmp_path)
    safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError,
                       match=r"model\.safetensors.*encoder\.block\.1\.layer\.1\."
                             r"DenseReluDense\.wo\.weight"):
        load_hf_t5_encoder(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    config["d_ff"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError,
                       match=r"model\.safetensors.*DenseReluDense\.wi_0\.weight.*shape"):
        load_hf_t5_encoder(tmp_path)

    config["feed_forward_proj"] = "gated-silu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*gated-silu"):
        load_hf_t5_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_t5_encoder(tmp_path / "missing")


def test_presets_and_overrides():
    assert set(T5_1_1_PRESETS) == {"tiny", "small", "base", "large", "xl", "xxl"}
    xl = t5_1_1_config("xl")
    assert (xl.d_model, xl.d_kv, xl.d_ff, xl.num_layers, xl.num_heads, xl.vocab_size) == (
        2048, 64, 5120, 24, 32, 32128)
    assert t5_1_1_config("base", dropout_rate=0.0, scan_layers=True).scan_layers
    with pytest.raises(ValueError, match="small, base"):
        t5_1_1_config("huge")
    with pytest.raises(TypeError, match="d_modle"):
        t5_1_1_config("tiny", d_modle=8)
    with pytest.raises(ValueError, match="remat_policy"):
        t5_1_1_config("tiny", remat_policy="some")


def test_param_names_and_logical_axes():
    config = t5_1_1_config("tiny")
    boxed = jax.eval_shape(T5Encoder(config).init, jax.random.key(0),
                           jnp.ones((1, 4), jnp.int32))["params"]
    specs = {
        "/".join(k.key for k in path): tuple(spec)
        for path, spec in jax.tree_util.tree_flatten_with_path(
            nn.get_partition_spec(boxed),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    }
    expected = {
        "token_embedder/embedding": ("vocab", "embed"),
        "relpos_bias/rel_embedding": ("heads", "relpos_buckets"),
        "encoder_norm/scale": ("embed",),
    }
    for i in range(config.num_layers):
        layer = f"layers_{i}"
        expected |= {
            f"{layer}/pre_attention_layer_norm/scale": ("embed",),
            f"{layer}/pre_mlp_layer_norm/scale": ("embed",),
            **{f"{layer}/attention/{n}/kernel": ("embed", "joined_kv")
               for n in ("query", "key", "value")},
            f"{layer}/attention/out/kernel": ("joined_kv", "embed"),
            f"{layer}/mlp/wi_0/kernel": ("embed", "mlp"),
            f"{layer}/mlp/wi_1/kernel": ("embed", "mlp"),
            f"{layer}/mlp/wo/kernel": ("mlp", "embed"),
        }
    assert specs == expected


@pytest.mark.parametrize("remat_policy,scan_layers",
                         [("full", False), ("dots", False), ("none", True), ("dots", True)])
@pytest.mark.slow
def test_remat_and_scan_match_plain(hf_gated, remat_policy, scan_layers):
    config, params = load_hf_t5_encoder(hf_gated[1])
    variant = dataclasses.replace(config, remat_policy=remat_policy, scan_layers=scan_layers)
    variant_params = stack_layer_params(params, config.num_layers) if scan_layers else params
    if scan_layers:  # the restacked tree is exactly what the scanned model initialises
        initialised = jax.eval_shape(T5Encoder(variant).init, jax.random.key(0),
                                     jnp.ones((1, 4), jnp.int32))
        assert jax.tree.map(lambda x: x.shape, nn.unbox(initialised["params"])) == jax.tree.map(
            lambda x: x.shape, variant_params)
        assert nn.get_partition_spec(initialised)["params"]["layers"]["mlp"]["wo"]["kernel"] == (
            jax.sharding.PartitionSpec("layers", "mlp", "embed"))
        unstacked = unstack_layer_params(variant_params)
        assert jax.tree.all(jax.tree.map(np.array_equal, unstacked, params))

    ids = jnp.asarray(token_ids())
    plain_loss, plain_grads = _jitted(config, "loss_and_grad")(params, ids)
    variant_loss, variant_grads = _jitted(variant, "loss_and_grad")(variant_params, ids)
    np.testing.assert_allclose(encode(variant, variant_params, ids), encode(config, params, ids),
                               atol=1e-5)
    np.testing.assert_allclose(variant_loss, plain_loss, rtol=1e-5)
    if scan_layers:
        variant_grads = unstack_layer_params(variant_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 variant_grads, plain_grads)


def test_dropout_uses_rng_and_deterministic_flag(hf_gated):
    config, params = load_hf_t5_encoder(hf_gated[1])
    model = T5Encoder(dataclasses.replace(config, dropout_rate=0.3))
    ids = jnp.asarray(token_ids())
    apply = jax.jit(model.apply, static_argnames="deterministic")
    first = apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    again = apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    other = apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    np.testing.assert_allclose(apply({"params": params}, ids, deterministic=True),
                               encode(config, params, ids), atol=1e-6)


@pytest.mark.slow
def test_bfloat16_activations_stay_close():
    config = t5_1_1_config("tiny", dropout_rate=0.0)
    bf16 = dataclasses.replace(config, dtype="bfloat16")  # the string form gin files use
    ids = jnp.asarray(token_ids())
    # T5's init: realistic scales
    params = jax.jit(T5Encoder(config).init)(jax.random.key(0), ids)["params"]
    hidden = jax.jit(T5Encoder(bf16).apply)({"params": params}, ids)
    assert hidden.dtype == jnp.bfloat16
    real = np.asarray(ids) != 0
    reference = encode(config, nn.unbox(params), ids)
    error = np.abs(np.asarray(hidden, np.float32) - reference)[real]
    scale = np.abs(reference[real]).max()
    # bfloat16 keeps ~3 significant digits; two layers of residual updates stay within a few %.
    assert np.all(np.isfinite(error)) and error.max() < 0.05 * scale and error.mean() < 0.01 * scale

    bf16_params = jax.eval_shape(
        T5Encoder(dataclasses.replace(bf16, param_dtype=jnp.bfloat16)).init,
        jax.random.key(0), ids)
    assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
def test_all_padding_row_is_finite():
    config = t5_1_1_config("tiny")
    ids = token_ids(lengths=(5, 1), length=8)
    ids[1] = 0
    ids = jnp.asarray(ids)
    params = T5Encoder(config).init(jax.random.key(0), ids)
    assert np.all(np.isfinite(jax.jit(T5Encoder(config).apply)(params, ids)))


RULES = (("batch", "data"), ("mlp", "model"), ("heads", "model"), ("joined_kv", "model"),
         ("vocab", "model"))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_forward_matches_unsharded(hf_gated, scan_layers):
    config, params = load_hf_t5_encoder(hf_gated[1])
    config = dataclasses.replace(config, scan_layers=scan_layers)
    if scan_layers:
        params = stack_layer_params(params, config.num_layers)
    model = T5Encoder(config)
    ids = jnp.asarray(token_ids(lengths=(40, 25, 7, 1, 3, 33, 12, 40)))
    expected = encode(config, params, ids)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
    ids_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    sharded_params = jax.device_put(params, param_shardings)
    wi_0 = sharded_params["layers"]["mlp"]["wi_0"]["kernel"] if scan_layers else (
        sharded_params["layers_0"]["mlp"]["wi_0"]["kernel"])
    assert wi_0.sharding.spec[-1] == "model"

    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x),
                          in_shardings=(param_shardings, ids_sharding))
        hidden = forward(sharded_params, jax.device_put(ids, ids_sharding))
    assert hidden.sharding.spec[0] == "data"
    # Sharded matmuls sum partial products in another order: float32 rounding only.
    np.testing.assert_allclose(np.asarray(hidden), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Packed rows and the one-hot embedding lookup.


@pytest.mark.parametrize("scan_layers", [False, True])
def test_packed_rows_give_each_text_its_hidden_states_alone(hf_gated, scan_layers):
    """Several texts per row with segment ids: attention stays within each text and relative
    positions are the text's own, so every token's hidden state is the one it has alone."""
    from samtone.data import packing
    config, params = load_hf_t5_encoder(hf_gated[1])
    config = dataclasses.replace(config, scan_layers=scan_layers)
    if scan_layers:
        params = stack_layer_params(params, config.num_layers)
    lengths = (40, 25, 7, 1, 3, 33, 12, 9, 2)
    alone = token_ids(lengths=lengths)
    packed, segment_ids = packing.pack(alone, multiple=1)
    assert packed.shape[0] < len(lengths)
    hidden_alone = np.asarray(jax.jit(T5Encoder(config).apply)({"params": params}, alone))
    hidden_packed = np.asarray(jax.jit(functools.partial(T5Encoder(config).apply))(
        {"params": params}, packed, segment_ids=segment_ids))
    for text, length in enumerate(lengths):
        rows, columns = np.nonzero(segment_ids == text + 1)
        np.testing.assert_allclose(hidden_packed[rows, columns], hidden_alone[text, :length],
                                   atol=2e-5, err_msg=f"text {text}")


@pytest.mark.slow
def test_one_hot_lookup_when_vocab_is_sharded_equals_the_gather(monkeypatch):
    from samtone.models import t5  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(t5, "ONE_HOT_PLATFORMS", (jax.default_backend(),))
    config = t5_1_1_config("tiny", dropout_rate=0.0)
    model = T5Encoder(config)
    ids = jnp.asarray(token_ids())
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]

    def make_loss():  # a new function each time: JAX's trace caches ignore the rules context
        return lambda p: jnp.sum(jnp.square(model.apply({"params": p}, ids)))

    gathers = str(jax.make_jaxpr(make_loss())(params)).count("gather[")
    plain_loss, plain_grads = jax.jit(jax.value_and_grad(make_loss()))(params)
    with nn.logical_axis_rules((("batch", "data"), ("vocab", "model"))):
        one_hot_gathers = str(jax.make_jaxpr(make_loss())(params)).count("gather[")
        one_hot_loss, one_hot_grads = jax.jit(jax.value_and_grad(make_loss()))(params)
    # The position bias's lookup stays a gather; the token embedding's became a matmul.
    assert one_hot_gathers + 1 == gathers
    np.testing.assert_allclose(one_hot_loss, plain_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 one_hot_grads, plain_grads)
