"""samtone.export, format jax (and what every format shares): the serving folder of a trained
run (scanned layers, exported unscanned), its manifest, its embeddings against the trained
model and DualEncoder.apply, the StableHLO at other batch sizes and with jax alone, the
safetensors layout, atomic writes, refusals and damaged folders."""
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from samtone import export, inference, run_manifest
from samtone.checkpoints.manager import read_checkpoint
from samtone.errors import CheckpointError
from samtone.export import stablehlo
from samtone.data import smoke_path
from samtone.data.tokenizer import Tokenizer
from samtone.models import dual_encoder, t5
from compile_flags import FAST_COMPILE
from tiny_runs import (PASSAGE_LENGTH, QUERY_LENGTH, run_command, smoke_model,
                            smoke_texts, train_tiny_run)


@pytest.fixture(scope="module")
def scanned_run(tmp_path_factory):
    """A run whose layers are scanned: the export must unstack them."""
    return train_tiny_run(tmp_path_factory.mktemp("run"), "--gin.t5_1_1_config.scan_layers=True")


@pytest.fixture(scope="module")
def export_dir(scanned_run, tmp_path_factory):
    directory = tmp_path_factory.mktemp("exports") / "tiny"
    export.export_model(scanned_run, directory)
    return directory


def _unscanned_names_and_shapes():
    """Every parameter of the unscanned smoke model, named by its tree path."""
    model = smoke_model()
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)))
    leaves = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
    return {"/".join(key.key for key in path[:-1] if hasattr(key, "key")): leaf.shape
            for path, leaf in leaves}


@pytest.mark.slow
def test_manifest_and_files(scanned_run, export_dir):
    assert sorted(os.listdir(export_dir)) == [
        "encode_passages.stablehlo", "encode_queries.stablehlo", "params.safetensors",
        "samtone_export.json", "spm.model"]
    manifest = json.loads((export_dir / "samtone_export.json").read_text())
    assert manifest["format"] == "jax" and manifest["format_version"] == 1
    assert manifest["step"] == 2 and manifest["architecture"] == "ade_spl"
    assert manifest["source"] == {"model_dir": str(scanned_run), "step": 2}
    assert (manifest["projection_dim"], manifest["query_length"],
            manifest["passage_length"]) == (64, QUERY_LENGTH, PASSAGE_LENGTH)
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["samtone_version"] and manifest["jax_version"] == jax.__version__
    assert run_manifest.config_from_json(manifest["t5_config"]) == smoke_model().config  # unscanned
    vocabulary = open(smoke_path("spm.model"), "rb").read()
    assert (export_dir / "spm.model").read_bytes() == vocabulary
    assert manifest["vocabulary"] == "spm.model" and manifest["vocabulary_pieces"] == 1000
    assert manifest["vocabulary_sha256"] == hashlib.sha256(vocabulary).hexdigest()
    run = json.loads((scanned_run / "model.json").read_text())  # how Encoder.load lays it out
    assert manifest["logical_axis_rules"] == run["logical_axis_rules"]
    assert manifest["model_parallel"] == run["model_parallel"]
    assert oct(os.stat(export_dir / "params.safetensors").st_mode & 0o777) == oct(
        os.stat(export_dir / "samtone_export.json").st_mode & 0o777)


@pytest.mark.slow
def test_params_are_the_checkpoint_in_the_unscanned_layout(scanned_run, export_dir):
    params = safetensors.numpy.load_file(export_dir / "params.safetensors")
    expected = _unscanned_names_and_shapes()
    assert {name: value.shape for name, value in params.items()} == expected
    assert "query_encoder/layers_1/mlp/wi_0/kernel" in params  # no optimiser state, no "layers/"
    state, _, _ = read_checkpoint(scanned_run / "checkpoints")
    stacked = state["params"]["query_encoder"]["layers"]["attention"]["query"]["kernel"]
    assert stacked.shape[0] == 2  # the checkpoint really is scanned
    np.testing.assert_array_equal(params["query_encoder/layers_1/attention/query/kernel"],
                                  np.asarray(stacked[1]))
    np.testing.assert_array_equal(params["projection_layer/kernel"],
                                  np.asarray(state["params"]["projection_layer"]["kernel"]))
    assert all(value.dtype == np.float32 for value in params.values())


@pytest.mark.slow
def test_load_exported_gives_the_trained_models_embeddings(scanned_run, export_dir):
    queries, passages = smoke_texts(13)
    trained = inference.Encoder.load(str(scanned_run), batch_size=8)
    exported = inference.Encoder.load(export_dir, batch_size=5)
    assert exported.step == 2 and not exported.length_buckets  # StableHLO of fixed lengths
    np.testing.assert_allclose(exported.encode_queries(queries), trained.encode_queries(queries),
                               atol=1e-5)
    np.testing.assert_allclose(exported.encode_passages(passages),
                               trained.encode_passages(passages), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.slow
def test_stablehlo_runs_at_any_batch_size(export_dir, batch):
    queries, _ = smoke_texts(batch)
    tokens = Tokenizer(smoke_path("spm.model")).encode(queries, QUERY_LENGTH)
    flat = safetensors.numpy.load_file(export_dir / "params.safetensors")
    encode = jax.export.deserialize(
        bytearray((export_dir / "encode_queries.stablehlo").read_bytes()))
    assert str(encode.in_avals[-1].shape[0]) == "b"
    assert encode.platforms == ("cpu", "cuda", "tpu")
    expected = smoke_model().apply({"params": traverse_util.unflatten_dict(flat, sep="/")},
                                   tokens, method="encode_queries")
    np.testing.assert_allclose(encode.call(flat, tokens), expected, atol=1e-5)


_SERVER = """
import sys
import jax, numpy as np, safetensors.numpy
directory, tokens_file, output_file = sys.argv[1:]
params = safetensors.numpy.load_file(directory + "/params.safetensors")
with open(directory + "/encode_passages.stablehlo", "rb") as f:
    encode = jax.export.deserialize(bytearray(f.read()))
np.save(output_file, np.asarray(encode.call(params, np.load(tokens_file))))
assert not [m for m in sys.modules if m.split(".")[0] in ("samtone", "flax", "gin")]
"""


@pytest.mark.slow
def test_a_server_needs_only_jax(export_dir, tmp_path):
    _, passages = smoke_texts(4)
    np.save(tmp_path / "tokens.npy",
            Tokenizer(smoke_path("spm.model")).encode(passages, PASSAGE_LENGTH))
    result = subprocess.run(
        [sys.executable, "-c", _SERVER, str(export_dir), str(tmp_path / "tokens.npy"),
         str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"),
        inference.load_exported(export_dir, batch_size=4).encode_passages(passages), atol=1e-6)


def _random_export(tmp_path, architecture, platforms=export.DEFAULT_PLATFORMS,
                   **config_overrides):
    """Exports a randomly initialised tiny model; returns (model, params, directory, manifest)."""
    config = t5.t5_1_1_config("tiny", vocab_size=1000, **config_overrides)
    model = dual_encoder.DualEncoder(config, architecture=architecture, projection_dim=8)
    params = model.init(jax.random.PRNGKey(1), jnp.ones((1, 8), jnp.int32),
                        jnp.ones((1, 12), jnp.int32))["params"]
    directory = tmp_path / architecture
    config = export.write_export(directory, model=model, params=params,
                                 vocabulary=smoke_path("spm.model"), query_length=8,
                                 passage_length=12, step=0, platforms=platforms)
    return model, params, directory, config


@pytest.mark.parametrize("architecture,overrides", [
    ("sde", {}), ("ade", {}), ("ade_spl", {"param_dtype": jnp.bfloat16, "scan_layers": True})])
@pytest.mark.slow
def test_architectures_and_dtypes_round_trip(tmp_path, architecture, overrides):
    model, params, directory, config = _random_export(tmp_path, architecture, **overrides)
    assert config["t5_config"]["param_dtype"] == jnp.dtype(model.config.param_dtype).name
    stored = safetensors.numpy.load_file(directory / "params.safetensors")
    assert {value.dtype for value in stored.values()} == {jnp.dtype(model.config.param_dtype)}
    queries, passages = smoke_texts(3)
    tokenizer = Tokenizer(smoke_path("spm.model"))
    encoders = inference.load_exported(directory, batch_size=2)
    for texts, method, length in ((queries, "encode_queries", 8),
                                  (passages, "encode_passages", 12)):
        expected = model.apply({"params": params}, tokenizer.encode(texts, length), method=method)
        np.testing.assert_allclose(getattr(encoders, method)(texts), expected, atol=1e-5)


def test_a_platform_that_fails_to_lower_is_dropped(tmp_path, monkeypatch):
    real_export = jax.export.export

    def no_tpu(function, *, platforms):
        if "tpu" in platforms:
            raise NotImplementedError("no TPU lowering for this test")
        return real_export(function, platforms=platforms)

    monkeypatch.setattr(jax.export, "export", no_tpu)
    *_, manifest = _random_export(tmp_path, "sde")
    assert manifest["platforms"] == ["cpu", "cuda"]
    with pytest.raises(ValueError, match=r"unknown platforms \['gpu'\]\)"):
        export.write_export(tmp_path / "other", model=None, params={}, vocabulary="", step=0,
                            query_length=8, passage_length=12, platforms=("cpu", "gpu"))


@pytest.mark.slow
def test_overwrite_is_refused_unless_asked(scanned_run, export_dir, tmp_path):
    before = {name: (export_dir / name).read_bytes() for name in os.listdir(export_dir)}
    with pytest.raises(FileExistsError, match=f"--output={export_dir} exists and is not empty"):
        export.export_model(scanned_run, export_dir, step=1)
    assert {name: (export_dir / name).read_bytes() for name in os.listdir(export_dir)} == before

    target = tmp_path / "target"
    target.mkdir()  # an empty directory is fine
    assert export.export_model(scanned_run, target, step=1)["step"] == 1
    assert export.export_model(scanned_run, target, overwrite=True)["step"] == 2
    assert inference.load_exported(target).step == 2
    assert os.listdir(tmp_path) == ["target"]  # no temporary directories left


@pytest.mark.slow
def test_errors_name_the_model_dir_and_the_missing_file(scanned_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/model.json not found"):
        export.export_model(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 in .*checkpoints; "
                                                r"it has steps \[1, 2\]"):
        export.export_model(scanned_run, tmp_path / "out", step=7)
    assert not os.path.exists(tmp_path / "out")

    _, _, directory, _ = _random_export(tmp_path, "sde", platforms=("cpu",))
    os.remove(directory / "encode_passages.stablehlo")
    with pytest.raises(FileNotFoundError, match=f"{directory} is not a complete samtone-export "
                                                "folder: missing encode_passages.stablehlo"):
        inference.Encoder.load(directory)
    with pytest.raises(ValueError, match="--format='onnx'; expected one of jax, "
                                         "sentence_transformers, saved_model"):
        export.export_model(scanned_run, tmp_path / "out", format="onnx")


def test_damaged_exports_are_named(tmp_path):
    _, _, directory, _ = _random_export(tmp_path, "ade", platforms=("cpu",))
    params = directory / "params.safetensors"
    params.write_bytes(params.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{params}: not a readable safetensors file"):
        inference.Encoder.load(directory)
    _, _, directory, _ = _random_export(tmp_path / "2", "ade", platforms=("cpu",))
    (directory / "spm.model").write_bytes(b"other")
    with pytest.raises(CheckpointError, match="spm.model does not match the vocabulary_sha256"):
        inference.Encoder.load(directory)
    with pytest.raises(ValueError, match="is an export, which holds one step only"):
        inference.Encoder.load(tmp_path / "ade", step=3)


def test_params_of_another_model_are_refused_naming_each_and_both_shapes(tmp_path):
    model, params, *_ = _random_export(tmp_path, "ade", platforms=("cpu",))
    with pytest.raises(CheckpointError, match=r"query_encoder/layers_0/mlp/wi_0/kernel has "
                                              r"shape \(32, 64\), expected \(32, 48\)"):
        export.write_export(tmp_path / "other", model=dual_encoder.DualEncoder(
            t5.t5_1_1_config("tiny", vocab_size=1000, d_ff=48), "ade", projection_dim=8),
            params=params, vocabulary=smoke_path("spm.model"), query_length=8,
            passage_length=12, step=0)
    with pytest.raises(CheckpointError, match="projection_layer/kernel is missing"):
        export.write_export(tmp_path / "other", model=dual_encoder.DualEncoder(
            model.config, "ade_spl", projection_dim=8), params=params,
            vocabulary=smoke_path("spm.model"), query_length=8, passage_length=12, step=0)
    assert sorted(os.listdir(tmp_path)) == ["ade"]


def test_an_interrupted_export_leaves_no_folder(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stablehlo, "export_encoder", interrupt)  # after params.safetensors
    with pytest.raises(KeyboardInterrupt):
        _random_export(tmp_path, "sde")
    assert os.listdir(tmp_path) == []


def _cli(*args):
    return run_command("export", *args)


@pytest.mark.slow
def test_command_line(scanned_run, tmp_path):
    result = _cli(f"--model_dir={scanned_run}", f"--output={tmp_path / 'cli'}", "--step=1",
                  "--platforms=cpu", "--format=jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1 of" in result.stdout and "as jax" in result.stdout
    assert "platforms cpu" in result.stdout and "samtone_export.json" in result.stdout
    manifest = json.loads((tmp_path / "cli" / "samtone_export.json").read_text())
    assert manifest["platforms"] == ["cpu"] and manifest["step"] == 1
    # An existing folder is refused.
    refused = _cli(f"--model_dir={scanned_run}", f"--output={tmp_path / 'cli'}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"error: --output={tmp_path / 'cli'} exists and is not empty" in refused.stderr
    unknown = _cli(f"--model_dir={scanned_run}", f"--output={tmp_path / 'x'}", "--format=onnx")
    assert unknown.returncode == 2 and "--format" in unknown.stderr
