"""samtone.export, format saved_model: the SavedModel loaded by TensorFlow in a process that
cannot import samtone, strings in, its embeddings against DualEncoder.apply for sde, ade and
ade_spl at two batch sizes (texts that need padding and truncation), its signatures, the
manifest, Encoder.load reading it without TensorFlow, and the missing extra named."""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samtone import export, inference
from samtone.data import smoke_path
from samtone.data.tokenizer import Tokenizer
from samtone.errors import MissingDependencyError
from samtone.models import dual_encoder, t5

pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_text")

QUERY_LENGTH, PASSAGE_LENGTH = 12, 24
ARCHITECTURES = ("sde", "ade", "ade_spl")
EDGE_TEXTS = ["", "hi", "  leading   and\ttrailing \n spaces  ", "naïve café ½ ﬁ ＡＢＣ 東京 🙂",
              "a b c d e f g h i j k l m n o p q r s t u v w x y z"]

# Runs with TensorFlow alone: samtone (and JAX) cannot be imported.
_SERVE_WITHOUT_SAMTONE = r"""
import json, sys
import numpy as np

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("samtone", "jax", "flax"):
            raise ImportError(name + " must not be needed to serve the SavedModel")
sys.meta_path.insert(0, _Blocked())

import tensorflow as tf
import tensorflow_text  # registers the SentencePiece op

request = json.load(open(sys.argv[1]))
for name, folder in request["folders"].items():
    model = tf.saved_model.load(folder)
    outputs, specs = {}, {}
    for signature, texts in (("embed_queries", request["queries"]),
                             ("embed_passages", request["passages"])):
        function = model.signatures[signature]
        specs[signature] = [str(spec.shape) for spec in
                            function.structured_input_signature[1].values()]
        outputs[signature] = function(texts=tf.constant(texts))["embeddings"].numpy()
        outputs[signature + "_one"] = function(texts=tf.constant(texts[:1]))["embeddings"].numpy()
    np.savez(folder + ".npz", **outputs)
    json.dump(specs, open(folder + ".json", "w"))
assert not any(name.split(".")[0] in ("samtone", "jax") for name in sys.modules)
"""


def _texts(count=6):
    with open(smoke_path("eval.jsonl"), encoding="utf-8") as f:
        examples = [json.loads(line) for line, _ in zip(f, range(count))]
    return ([e["query"] for e in examples] + EDGE_TEXTS,
            [e["passage"] for e in examples] + EDGE_TEXTS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """architecture -> (model, params, folder, manifest, what TensorFlow computed there)."""
    root = tmp_path_factory.mktemp("saved_model")
    runs, folders = {}, {}
    for seed, architecture in enumerate(ARCHITECTURES):
        config = t5.t5_1_1_config("tiny", vocab_size=1000, dropout_rate=0.0,
                                  scan_layers=architecture == "ade")  # exported unscanned
        model = dual_encoder.DualEncoder(config, architecture=architecture, projection_dim=16)
        params = model.init(jax.random.PRNGKey(seed), jnp.ones((1, QUERY_LENGTH), jnp.int32),
                            jnp.ones((1, PASSAGE_LENGTH), jnp.int32))["params"]
        folder = root / architecture
        start = time.perf_counter()
        manifest = export.write_export(
            folder, format="saved_model", model=model, params=params,
            vocabulary=smoke_path("spm.model"), query_length=QUERY_LENGTH,
            passage_length=PASSAGE_LENGTH, step=3,
            # One architecture lowers for every default platform, the others for cpu only.
            platforms=export.DEFAULT_PLATFORMS if architecture == "ade_spl" else ("cpu",))
        print(f"{architecture}: exported in {time.perf_counter() - start:.1f} s")
        runs[architecture] = (model, params, folder, manifest)
        folders[architecture] = str(folder)
    queries, passages = _texts()
    request = root / "request.json"
    request.write_text(json.dumps({"folders": folders, "queries": queries,
                                   "passages": passages}))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _SERVE_WITHOUT_SAMTONE, str(request)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    print(f"TensorFlow loaded and ran the three SavedModels in {time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    return {architecture: (*runs[architecture], dict(np.load(f"{folders[architecture]}.npz")),
                           json.loads(open(f"{folders[architecture]}.json").read()))
            for architecture in ARCHITECTURES}


def _jax_embeddings(model, params, method, texts, length):
    tokens = Tokenizer(smoke_path("spm.model")).encode(texts, length)
    return np.asarray(model.apply({"params": params}, tokens, method=method))


class _TokenIdsModel:
    """A stand-in for DualEncoder whose towers return their token ids: the serving module's
    signatures then show the ids its TensorFlow graph computed from the strings."""

    def apply(self, variables, token_ids, method):
        del variables, method
        return token_ids.astype(jnp.float32)


def test_the_graph_tokenises_as_samtones_tokenizer():
    """In the SavedModel's graph, as in Tokenizer.encode: pieces cut to length - 1, EOS, then
    padding, on texts (edge cases included) both shorter and longer than the lengths."""
    saved_model = pytest.importorskip("samtone.export.saved_model")
    tokenizer = Tokenizer(smoke_path("spm.model"))
    with open(smoke_path("spm.model"), "rb") as f:
        vocabulary = f.read()
    module = saved_model._serving_module(  # pylint: disable=protected-access
        _TokenIdsModel(), {"unused": np.zeros(1, np.float32)}, vocabulary,
        {"encode_queries": QUERY_LENGTH, "encode_passages": PASSAGE_LENGTH}, ("cpu",))
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    for signature, texts, length in zip(saved_model.SIGNATURES, _texts(),
                                        (QUERY_LENGTH, PASSAGE_LENGTH)):
        # Both paths are exercised: some texts are padded, some truncated.
        lengths = (tokenizer.encode(texts, 10 * length) != 0).sum(1)
        assert lengths.min() < length < lengths.max()
        function = getattr(module, signature)
        token_ids = function(tf.constant(texts))[saved_model.OUTPUT_NAME].numpy()
        np.testing.assert_array_equal(token_ids, tokenizer.encode(texts, length), signature)
        np.testing.assert_array_equal(function(tf.constant(texts[:1]))[
            saved_model.OUTPUT_NAME].numpy(), tokenizer.encode(texts[:1], length))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.slow
def test_tensorflow_embeddings_equal_jax(exported, architecture):
    model, params, _, _, computed, _ = exported[architecture]
    queries, passages = _texts()
    for signature, method, texts, length in (
            ("embed_queries", "encode_queries", queries, QUERY_LENGTH),
            ("embed_passages", "encode_passages", passages, PASSAGE_LENGTH)):
        expected = _jax_embeddings(model, params, method, texts, length)
        error = np.abs(computed[signature] - expected).max()
        print(f"{architecture} {signature}: max |difference| {error:.2e}")
        assert computed[signature].shape == (len(texts), 16) and error < 1e-4
        np.testing.assert_allclose(computed[signature + "_one"], expected[:1], atol=1e-4)
    if architecture != "sde":  # the towers differ, and so do the signatures
        assert np.abs(computed["embed_queries"][:3] - computed["embed_passages"][:3]).max() > 1e-2


@pytest.mark.slow
def test_signatures_take_any_batch_of_strings(exported):
    *_, manifest, _, specs = exported["ade_spl"]
    assert specs == {"embed_queries": ["(None,)"], "embed_passages": ["(None,)"]}
    assert manifest["format"] == "saved_model" and manifest["step"] == 3
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["signatures"]["embed_queries"] == {
        "inputs": {"texts": "string [b]"}, "outputs": {"embeddings": "float32 [b, 16]"}}
    folder = exported["ade_spl"][2]
    assert {"saved_model.pb", "variables", "params.safetensors", "spm.model",
            "samtone_export.json"} <= set(os.listdir(folder))
    assert not [name for name in os.listdir(folder.parent) if name.startswith(".")]


@pytest.mark.parametrize("architecture", ["sde", "ade"])
@pytest.mark.slow
def test_encoder_load_reads_it_without_tensorflow(exported, architecture):
    model, params, folder, *_ = exported[architecture]
    encoder = inference.Encoder.load(folder, batch_size=8)
    queries, passages = _texts()
    np.testing.assert_allclose(encoder.encode_queries(queries), _jax_embeddings(
        model, params, "encode_queries", queries, QUERY_LENGTH), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_passages(passages), _jax_embeddings(
        model, params, "encode_passages", passages, PASSAGE_LENGTH), atol=1e-5)


def test_without_tensorflow_the_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    config = t5.t5_1_1_config("tiny", vocab_size=1000)
    model = dual_encoder.DualEncoder(config, architecture="sde", projection_dim=16)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32),
                        jnp.ones((1, 4), jnp.int32))["params"]
    with pytest.raises(MissingDependencyError, match=r"pip install 'samtone\[serving\]'"):
        export.write_export(tmp_path / "out", format="saved_model", model=model, params=params,
                            vocabulary=smoke_path("spm.model"), query_length=4,
                            passage_length=4, step=0)
    assert os.listdir(tmp_path) == []
