"""samtone.export, format sentence_transformers: the folder loaded by the real
sentence-transformers package in a process that cannot import samtone, its embeddings against
DualEncoder.apply for sde, ade and ade_spl (texts that need padding and truncation, both layer
layouts), its token ids against samtone's Tokenizer, the layout, the manifest, Encoder.load
reading it back, atomic writes and refusals."""
import json
import os
import shutil
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from samtone import export, inference
from samtone.checkpoints import hf
from samtone.data import smoke_path
from samtone.data.tokenizer import Tokenizer, train_sentencepiece
from samtone.export import sentence_transformers as st_export
from samtone.models import dual_encoder, t5

QUERY_LENGTH, PASSAGE_LENGTH = 12, 24
ARCHITECTURES = ("sde", "ade", "ade_spl")
# Odd spacing, characters outside the vocabulary, an empty text, texts longer than both lengths.
EDGE_TEXTS = ["", "hi", "  leading   and\ttrailing \n spaces  ", "naïve café ½ ﬁ ＡＢＣ 東京 🙂",
              "a b c d e f g h i j k l m n o p q r s t u v w x y z"]


def _smoke_texts(count):
    with open(smoke_path("eval.jsonl"), encoding="utf-8") as f:
        examples = [json.loads(line) for line, _ in zip(f, range(count))]
    return [e["query"] for e in examples], [e["passage"] for e in examples]


def _tiny_model(architecture):
    config = t5.t5_1_1_config("tiny", vocab_size=1000, dropout_rate=0.0)
    return dual_encoder.DualEncoder(config, architecture=architecture, projection_dim=16)


def _random_params(model, seed):
    """Boxed (nn.Partitioned) per-layer parameters, as DualEncoder.init lays them out, drawn
    at random: norm scales too, which init sets to ones, so a misplaced scale shows."""
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.ones((1, QUERY_LENGTH), jnp.int32),
        jnp.ones((1, PASSAGE_LENGTH), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = [key.key for key in path if hasattr(key, "key")][-1]
        values = rng.standard_normal(leaf.shape)
        if name == "scale":
            values = 1 + 0.3 * values
        elif name == "kernel":
            values = values / np.sqrt(leaf.shape[0])
        return values.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


# Runs with the real package; samtone is made unimportable, so nothing in the folder needs it.
_LOAD_WITHOUT_SAMTONE = r"""
import json, sys
import numpy as np

class _NoSamtone:
    def find_spec(self, name, path=None, target=None):
        if name == "samtone" or name.startswith("samtone."):
            raise ImportError("samtone must not be needed to load the folder")
sys.meta_path.insert(0, _NoSamtone())

from sentence_transformers import SentenceTransformer

request = json.load(open(sys.argv[1]))
for name, folder in request["folders"].items():
    model = SentenceTransformer(folder, device="cpu")
    queries, passages = request["queries"], request["passages"]
    np.savez(
        folder + ".npz",
        query=model.encode_query(queries, convert_to_numpy=True),
        document=model.encode_document(passages, convert_to_numpy=True),
        plain=model.encode(passages, convert_to_numpy=True),
        query_ids=model.preprocess(queries, task="query")["input_ids"].numpy(),
        document_ids=model.preprocess(passages, task="document")["input_ids"].numpy())
assert not any(name.startswith("samtone") for name in sys.modules)
"""


@pytest.fixture(scope="module")
def texts():
    queries, passages = _smoke_texts(6)
    return queries + EDGE_TEXTS, passages + EDGE_TEXTS


@pytest.fixture(scope="module")
def exported(tmp_path_factory, texts):
    """architecture -> (model, boxed per-layer params, folder, what sentence-transformers
    computed there). sde is exported from scanned params, ade from boxed, ade_spl from
    unboxed ones; one subprocess loads all three folders."""
    root = tmp_path_factory.mktemp("sentence_transformers")
    runs, folders = {}, {}
    for seed, architecture in enumerate(ARCHITECTURES):
        model = _tiny_model(architecture)
        params = _random_params(model, seed)
        given = {"sde": t5.stack_layer_params(params, model.config.num_layers),  # scanned
                 "ade": params,  # boxed
                 "ade_spl": jax.tree.map(np.asarray, nn.unbox(params))}[architecture]
        folder = root / architecture
        start = time.perf_counter()
        export.write_export(
            folder, format="sentence_transformers", model=model, params=given,
            vocabulary=smoke_path("spm.model"), query_length=QUERY_LENGTH,
            passage_length=PASSAGE_LENGTH, step=7)
        print(f"{architecture}: exported in {time.perf_counter() - start:.1f} s")
        runs[architecture] = (model, params, folder)
        folders[architecture] = str(folder)
    queries, passages = texts
    request = root / "request.json"
    request.write_text(json.dumps({"folders": folders, "queries": queries, "passages": passages}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_SAMTONE, str(request)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return {architecture: (*runs[architecture], dict(np.load(f"{folders[architecture]}.npz")))
            for architecture in ARCHITECTURES}


def _samtone_embeddings(model, params, texts):
    tokenizer = Tokenizer(smoke_path("spm.model"))
    queries, passages = texts
    variables = {"params": params}
    return (np.asarray(model.apply(variables, tokenizer.encode(queries, QUERY_LENGTH),
                                   method="encode_queries")),
            np.asarray(model.apply(variables, tokenizer.encode(passages, PASSAGE_LENGTH),
                                   method="encode_passages")))


def test_texts_need_padding_and_truncation(texts):
    tokenizer = Tokenizer(smoke_path("spm.model"))
    queries, passages = texts
    query_lengths = (tokenizer.encode(queries, 10 * QUERY_LENGTH) != 0).sum(1)
    passage_lengths = (tokenizer.encode(passages, 10 * PASSAGE_LENGTH) != 0).sum(1)
    assert query_lengths.min() < QUERY_LENGTH < query_lengths.max()
    # Some query fits passage_length but not query_length: sde must truncate per task.
    assert ((query_lengths > QUERY_LENGTH) & (query_lengths <= PASSAGE_LENGTH)).any()
    assert passage_lengths.min() < PASSAGE_LENGTH < passage_lengths.max()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.slow
def test_embeddings_match_samtone(exported, texts, architecture):
    model, params, _, computed = exported[architecture]
    query_embeddings, passage_embeddings = _samtone_embeddings(model, params, texts)
    query_error = np.abs(computed["query"] - query_embeddings).max()
    passage_error = np.abs(computed["document"] - passage_embeddings).max()
    print(f"{architecture}: max |difference| queries {query_error:.2e}, "
          f"passages {passage_error:.2e}")
    assert query_error < 1e-4 and passage_error < 1e-4
    # encode without a task is the document side.
    np.testing.assert_array_equal(computed["plain"], computed["document"])
    if architecture != "sde":  # the towers differ, and so do the routes
        assert np.abs(query_embeddings[:3] - passage_embeddings[:3]).max() > 1e-2


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.slow
def test_token_ids_match_samtones_tokenizer(exported, texts, architecture):
    """What sentence-transformers feeds each tower: samtone's ids, padded to the batch's
    longest text instead of the full length."""
    computed = exported[architecture][3]
    tokenizer = Tokenizer(smoke_path("spm.model"))
    for ids, batch, length in ((computed["query_ids"], texts[0], QUERY_LENGTH),
                               (computed["document_ids"], texts[1], PASSAGE_LENGTH)):
        assert ids.shape[1] == length  # some texts were truncated to exactly the length
        np.testing.assert_array_equal(ids, tokenizer.encode(batch, length))


@pytest.fixture(scope="module", params=["identity", "nmt_nfkc"])
def vocabulary(request, tmp_path_factory):
    """The shipped vocabulary (identity normalisation), and one trained here with T5's NFKC."""
    if request.param == "identity":
        return smoke_path("spm.model")
    queries, passages = _smoke_texts(300)
    return train_sentencepiece(queries + passages, tmp_path_factory.mktemp("spm") / "nfkc", 400,
                               normalization_rule_name="nmt_nfkc")


@pytest.mark.parametrize("max_length", [1, 2, 9, 200])
def test_hf_tokenizer_gives_samtones_ids(vocabulary, max_length):
    queries, passages = _smoke_texts(20)
    batch = queries + passages + EDGE_TEXTS + ["x  \t\u3000y", "ｆｕｌｌ　ｗｉｄｔｈ", "①②"]
    hf_tokenizer = st_export.hf_tokenizer(vocabulary, max_length)
    encoded = hf_tokenizer(batch, padding="max_length", truncation=True, return_tensors="np")
    expected = Tokenizer(vocabulary).encode(batch, max_length)
    np.testing.assert_array_equal(encoded["input_ids"], expected)
    np.testing.assert_array_equal(encoded["attention_mask"], expected != 0)


@pytest.mark.slow
def test_folder_layout(exported):
    folder = exported["ade_spl"][2]
    assert json.loads((folder / "modules.json").read_text()) == [
        {"idx": 0, "name": "0", "path": "", "type":
         "sentence_transformers.base.modules.router.Router"}]
    router = json.loads((folder / "router_config.json").read_text())
    assert router["structure"] == {
        "query": ["query_0_Transformer", "query_1_Pooling", "query_2_Dense", "query_3_Normalize"],
        # ade_spl shares its projection: one Dense, in both routes.
        "document": ["document_0_Transformer", "document_1_Pooling", "query_2_Dense",
                     "document_3_Normalize"]}
    assert router["parameters"]["default_route"] == "document"
    for route, length in (("query", QUERY_LENGTH), ("document", PASSAGE_LENGTH)):
        tokenizer_config = json.loads(
            (folder / f"{route}_0_Transformer" / "tokenizer_config.json").read_text())
        assert tokenizer_config["model_max_length"] == length
        hf_config = json.loads((folder / f"{route}_0_Transformer" / "config.json").read_text())
        assert hf_config["architectures"] == ["T5EncoderModel"] and hf_config["vocab_size"] == 1000
    dense = json.loads((folder / "query_2_Dense" / "config.json").read_text())
    assert (dense["in_features"], dense["out_features"], dense["bias"]) == (32, 16, False)
    assert dense["activation_function"] == "torch.nn.modules.linear.Identity"
    pooling = json.loads((folder / "query_1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "mean"
    manifest = json.loads((folder / "samtone_export.json").read_text())
    assert (manifest["format"], manifest["architecture"], manifest["step"]) == (
        "sentence_transformers", "ade_spl", 7)
    assert (manifest["query_length"], manifest["passage_length"]) == (QUERY_LENGTH,
                                                                      PASSAGE_LENGTH)
    assert (folder / "spm.model").read_bytes() == open(smoke_path("spm.model"), "rb").read()
    assert not [name for name in os.listdir(folder.parent) if name.startswith(".")]
    mode = os.stat(folder / "modules.json").st_mode & 0o777
    assert {os.stat(path).st_mode & 0o777 for path in folder.glob("*/*.safetensors")} == {mode}
    assert not (folder / ".staging").exists()

    sde = exported["sde"][2]
    assert [module["type"].rsplit(".", 1)[1] for module in
            json.loads((sde / "modules.json").read_text())] == [
                "Transformer", "Pooling", "Dense", "Normalize"]
    transformer = json.loads((sde / "sentence_bert_config.json").read_text())
    assert (transformer["query_length"], transformer["document_length"]) == (
        QUERY_LENGTH, PASSAGE_LENGTH)


@pytest.mark.parametrize("architecture", ["sde", "ade"])
@pytest.mark.slow
def test_weights_are_the_params(exported, architecture):
    """Read back with samtone's own Hugging Face importer: bit-equal towers and projections."""
    model, params, folder, _ = exported[architecture]
    params = nn.unbox(params)
    if architecture == "sde":
        towers = {"": ("encoder", "projection_layer")}
        dense_folders = {"": "2_Dense"}
    else:
        towers = {"query_0_Transformer": ("query_encoder", "query_projection_layer"),
                  "document_0_Transformer": ("passage_encoder", "passage_projection_layer")}
        dense_folders = {"query_0_Transformer": "query_2_Dense",
                         "document_0_Transformer": "document_2_Dense"}
    for subfolder, (encoder, projection) in towers.items():
        config, encoder_params = hf.load_hf_t5_encoder(folder / subfolder)
        assert config == model.config
        jax.tree.map(np.testing.assert_array_equal, encoder_params, params[encoder])
        dense = safetensors.numpy.load_file(folder / dense_folders[subfolder] / "model.safetensors")
        np.testing.assert_array_equal(dense["linear.weight"].T, params[projection]["kernel"])


def _tiny_export(folder, **kwargs):
    model = _tiny_model("sde")
    export.write_export(
        folder, format="sentence_transformers", model=model, params=_random_params(model, 0),
        vocabulary=smoke_path("spm.model"), query_length=QUERY_LENGTH,
        passage_length=PASSAGE_LENGTH, step=0, **kwargs)


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        _tiny_export(folder)
    assert os.listdir(folder) == ["notes.txt"]
    _tiny_export(folder, overwrite=True)
    assert "modules.json" in os.listdir(folder) and "notes.txt" not in os.listdir(folder)
    assert os.listdir(tmp_path) == ["model"]


def test_an_interrupted_export_leaves_no_folder(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(st_export, "_dense", interrupt)  # after the towers are staged
    with pytest.raises(KeyboardInterrupt):
        _tiny_export(tmp_path / "model")
    assert os.listdir(tmp_path) == []
    # With overwrite, the folder already there survives a failed export untouched.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "modules.json").write_text("[]")
    with pytest.raises(KeyboardInterrupt):
        _tiny_export(tmp_path / "model", overwrite=True)
    assert os.listdir(tmp_path) == ["model"]
    assert (tmp_path / "model" / "modules.json").read_text() == "[]"


def test_a_vocabulary_larger_than_the_embedding_is_refused(tmp_path):
    config = t5.t5_1_1_config("tiny", vocab_size=512, dropout_rate=0.0)
    model = dual_encoder.DualEncoder(config, architecture="sde", projection_dim=16)
    with pytest.raises(ValueError, match="1000 pieces but the model's embedding has 512 rows"):
        export.write_export(
            tmp_path / "model", format="sentence_transformers", model=model,
            params=_random_params(model, 0), vocabulary=smoke_path("spm.model"),
            query_length=QUERY_LENGTH, passage_length=PASSAGE_LENGTH, step=0)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.slow
def test_encoder_load_reads_the_folder_back(exported, texts, architecture):
    """samtone serves the folder too: its weights read back, no torch involved."""
    model, params, folder, _ = exported[architecture]
    encoder = inference.Encoder.load(folder, batch_size=8)
    assert encoder.step == 7
    query_embeddings, passage_embeddings = _samtone_embeddings(model, params, texts)
    np.testing.assert_allclose(encoder.encode_queries(texts[0]), query_embeddings, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_passages(texts[1]), passage_embeddings,
                               atol=1e-5)


@pytest.mark.slow
def test_a_damaged_folder_is_named(exported, tmp_path):
    folder = tmp_path / "ade"
    shutil.copytree(exported["ade"][2], folder)
    weights = folder / "document_2_Dense" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{weights}: cannot read 'linear.weight'"):
        inference.Encoder.load(folder)
    os.remove(folder / "query_0_Transformer" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="query_0_Transformer: no model.safetensors"):
        inference.Encoder.load(folder)
