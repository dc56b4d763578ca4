"""samtone.checkpoints.convert (samtone-convert): the real T5X checkpoint written by t5x and a
folder written by transformers, converted and then served by Encoder.load (against the T5X
arrays applied directly and against transformers' own T5EncoderModel), used as
INIT_CHECKPOINT, arrays read one at a time, and every bad input named."""
import json
import os
import pathlib
import pickle
import shutil

import jax
import numpy as np
import pytest

from samtone import export, inference, run_manifest
from samtone.checkpoints import convert, pretrained, t5x
from samtone.data import smoke_path
from samtone.data.tokenizer import Tokenizer
from samtone.errors import CheckpointError, UserError
from samtone.models import dual_encoder, t5
from samtone.normalize import l2_normalize
from tiny_runs import run_command, train_tiny_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = next((path for path in (
    pathlib.Path("/work/shared/fixtures/t5x_test_de_t5_tiny.checkpoint_1000"),
    REPO.parent / "shared" / "fixtures" / "t5x_test_de_t5_tiny.checkpoint_1000")
    if path.is_dir()), None)
needs_fixture = pytest.mark.skipif(FIXTURE is None, reason="T5X fixture not found")
TEXTS = ["what is samtone?", "", "a passage long enough to be cut at sixteen tokens, which is "
         "the length these tests give the towers", "naïve café ½ 東京"]
LENGTH = 16


def _tokens(texts=TEXTS):
    return Tokenizer(smoke_path("spm.model")).encode(texts, LENGTH)


def _convert(source, output, **kwargs):
    kwargs.setdefault("query_length", LENGTH)
    kwargs.setdefault("passage_length", LENGTH)
    return convert.convert(source, output, **kwargs)


@pytest.fixture(scope="module")
def t5x_converted(tmp_path_factory):
    if FIXTURE is None:
        pytest.skip("T5X fixture not found")
    output = tmp_path_factory.mktemp("t5x") / "converted"
    _convert(FIXTURE, output, vocabulary=smoke_path("spm.model"))
    return output


def _hf_model():
    """A tiny T5.1.1 encoder that transformers itself writes, weights moved off their init."""
    config = transformers.T5Config(
        vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = _hf_model()
    folder = tmp_path_factory.mktemp("hf") / "t5-tiny"
    model.save_pretrained(folder)
    shutil.copyfile(smoke_path("spm.model"), folder / "spiece.model")  # as T5 folders hold it
    return model, folder


@pytest.fixture(scope="module")
def hf_converted(hf_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("hf_out") / "converted"
    _convert(hf_folder[1], output)
    return output


# --- the real T5X checkpoint ----------------------------------------------------------------


@needs_fixture
def test_t5x_checkpoint_encodes_as_the_checkpoint_applied_directly(t5x_converted):
    manifest = run_manifest.read(t5x_converted)
    assert (manifest.architecture, manifest.projection_dim) == ("sde", 768)
    assert manifest.converted_from == {"path": str(FIXTURE), "format": "t5x", "step": 1000,
                                       "projection": "checkpoint"}
    config = manifest.t5_config
    assert (config.vocab_size, config.d_model, config.d_kv, config.d_ff, config.num_layers,
            config.num_heads, config.relative_attention_num_buckets,
            config.feed_forward_proj) == (32128, 4, 2, 8, 2, 2, 4, "relu")
    encoder = inference.Encoder.load(t5x_converted, batch_size=8)
    assert encoder.step == 1000

    expected_params = t5x.t5x_dual_encoder_to_samtone(t5x.load_t5x_checkpoint(FIXTURE), "sde")
    model = dual_encoder.DualEncoder(config, "sde", projection_dim=768)
    expected = model.apply({"params": expected_params}, _tokens(), method="encode_queries")
    found = encoder.encode_queries(TEXTS)
    print(f"t5x: max |difference| {np.abs(found - expected).max():.2e}")
    np.testing.assert_allclose(found, expected, atol=1e-6)
    np.testing.assert_allclose(encoder.encode_passages(TEXTS), found, atol=1e-6)  # one tower


@needs_fixture
def test_t5x_arrays_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Each zarr array is read on its own, and none twice (ade's towers share it)."""
    reads = []
    real_read = t5x.StoredArray.read
    monkeypatch.setattr(t5x.StoredArray, "read",
                        lambda self: reads.append(self.where) or real_read(self))
    monkeypatch.setattr(t5x, "_read_all", lambda stored: pytest.fail("read all at once"))
    _convert(FIXTURE, tmp_path / "ade", architecture="ade")
    assert len(reads) == len(set(reads)) == 13  # the fixture's zarr folders
    params, step, _, _ = run_manifest.read_params(tmp_path / "ade")
    assert step == 1000
    np.testing.assert_array_equal(params["query_encoder"]["layers_1"]["mlp"]["wo"]["kernel"],
                                  params["passage_encoder"]["layers_1"]["mlp"]["wo"]["kernel"])
    assert set(params) == {"query_encoder", "passage_encoder", "query_projection_layer",
                           "passage_projection_layer"}


@needs_fixture
def test_without_a_vocabulary_the_weights_convert_but_text_needs_one(tmp_path):
    manifest = _convert(FIXTURE, tmp_path / "bare")
    assert manifest.vocabulary == "" and not (tmp_path / "bare" / "spm.model").exists()
    assert run_manifest.read_params(tmp_path / "bare")[1] == 1000  # INIT_CHECKPOINT reads it
    with pytest.raises(UserError, match="no vocabulary .* --vocabulary=SPM_MODEL"):
        inference.Encoder.load(tmp_path / "bare", batch_size=8)
    with pytest.raises(UserError, match="no vocabulary .* --vocabulary=SPM_MODEL"):
        export.export_model(tmp_path / "bare", tmp_path / "out")
    with pytest.raises(UserError, match="--vocabulary=.*spm.model has 1000 pieces but the "
                                        "checkpoint's embedding has 128 rows"):
        _convert(FIXTURE, tmp_path / "small", size="tiny", vocabulary=smoke_path("spm.model"))


# --- a folder transformers wrote ------------------------------------------------------------


def _transformers_embeddings(model, tokens):
    """transformers' T5EncoderModel, mean-pooled over real tokens and normalised."""
    with torch.no_grad():
        mask = torch.tensor(tokens != 0)
        hidden = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                       attention_mask=mask).last_hidden_state.numpy()
    pooled = (hidden * (tokens != 0)[..., None]).sum(1) / (tokens != 0).sum(1, keepdims=True)
    return np.asarray(l2_normalize(pooled))


def test_hf_folder_encodes_as_transformers(hf_folder, hf_converted):
    model, folder = hf_folder
    manifest = run_manifest.read(hf_converted)
    assert manifest.converted_from["projection"] == "identity" and manifest.projection_dim == 32
    assert (hf_converted / "spm.model").read_bytes() == (folder / "spiece.model").read_bytes()
    encoder = inference.Encoder.load(hf_converted, batch_size=8)
    expected = _transformers_embeddings(model, _tokens())
    for found in (encoder.encode_queries(TEXTS), encoder.encode_passages(TEXTS)):
        print(f"hf: max |difference| {np.abs(found - expected).max():.2e}")
        np.testing.assert_allclose(found, expected, atol=1e-4)


@pytest.mark.parametrize("architecture", ["ade", "ade_spl"])
def test_every_tower_starts_from_the_encoder(hf_folder, hf_converted, tmp_path, architecture):
    _convert(hf_folder[1], tmp_path / architecture, architecture=architecture)
    sde = run_manifest.read_params(hf_converted)[0]
    params = run_manifest.read_params(tmp_path / architecture)[0]
    for tower in ("query_encoder", "passage_encoder"):
        jax.tree.map(np.testing.assert_array_equal, params[tower], sde["encoder"])
    projections = [name for name in params if name.endswith("projection_layer")]
    assert projections == (["passage_projection_layer", "query_projection_layer"]
                           if architecture == "ade" else ["projection_layer"])
    for name in projections:
        np.testing.assert_array_equal(params[name]["kernel"], np.eye(32))


def test_parameters_are_laid_out_by_the_models_rules(hf_folder, hf_converted, tmp_path):
    """fsdp: every weight split over the 8 devices along 'embed', read back and served so."""
    _convert(hf_folder[1], tmp_path / "fsdp", logical_axis_rules="fsdp")
    params = run_manifest.read_params(tmp_path / "fsdp")[0]
    kernel = params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # (embed, mlp)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(4, 64)}  # 32 / 8
    encoder = inference.Encoder.load(tmp_path / "fsdp", batch_size=8)
    np.testing.assert_allclose(encoder.encode_passages(TEXTS), inference.Encoder.load(
        hf_converted, batch_size=8).encode_passages(TEXTS), atol=1e-6)


# --- INIT_CHECKPOINT -------------------------------------------------------------------------


def test_a_converted_encoder_initialises_training_towers(hf_converted):
    config = t5.t5_1_1_config("tiny", vocab_size=1000, relative_attention_max_distance=32)
    model = dual_encoder.DualEncoder(config, "ade_spl", projection_dim=16)
    init = pretrained.load_encoder_params(str(hf_converted), model)
    # Both towers from the encoder; the identity projection is left to random init.
    assert set(init) == {"query_encoder", "passage_encoder"}
    sde = run_manifest.read_params(hf_converted)[0]
    jax.tree.map(np.testing.assert_array_equal, init["passage_encoder"], sde["encoder"])

    other = dual_encoder.DualEncoder(t5.t5_1_1_config("tiny", vocab_size=1000, d_ff=48),
                                     "ade_spl", projection_dim=16)
    with pytest.raises(CheckpointError, match="d_ff: checkpoint 64 vs config 48"):
        pretrained.load_encoder_params(str(hf_converted), other)


@pytest.mark.slow
def test_training_starts_from_a_converted_checkpoint(hf_converted, tmp_path):
    """samtone-train --gin.INIT_CHECKPOINT=<converted folder>, end to end (a learning rate
    too small to move a weight): both towers hold the converted encoder."""
    run = train_tiny_run(tmp_path / "run", f"--gin.INIT_CHECKPOINT='{hf_converted}'",
                         "--gin.make_optimizer.learning_rate=1e-30", steps=1)
    trained = run_manifest.read_params(run)[0]
    converted = run_manifest.read_params(hf_converted)[0]["encoder"]
    for tower in ("query_encoder", "passage_encoder"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                     trained[tower], converted)


@needs_fixture
def test_a_converted_dual_encoder_brings_its_projection(t5x_converted, tmp_path):
    config = run_manifest.read(t5x_converted).t5_config
    init = pretrained.load_encoder_params(
        str(t5x_converted), dual_encoder.DualEncoder(config, "ade", projection_dim=768))
    assert set(init) == {"query_encoder", "passage_encoder", "query_projection_layer",
                         "passage_projection_layer"}
    with pytest.raises(CheckpointError, match=r"projection_layer/kernel has shape \(4, 768\), "
                                              r"the configured model needs \(4, 16\)"):
        pretrained.load_encoder_params(
            str(t5x_converted), dual_encoder.DualEncoder(config, "sde", projection_dim=16))
    _convert(FIXTURE, tmp_path / "ade", architecture="ade")
    with pytest.raises(CheckpointError, match="is an ade model, which initialises only an ade "
                                              "model .* configured model is ade_spl"):
        pretrained.load_encoder_params(
            str(tmp_path / "ade"), dual_encoder.DualEncoder(config, "ade_spl", 768))


# --- bad input --------------------------------------------------------------------------------


def _hf_copy(hf_folder, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder[1], folder)
    return folder


def test_a_truncated_weight_file_is_named(hf_folder, tmp_path):
    folder = _hf_copy(hf_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{weights}: .*truncated or damaged"):
        _convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_config_that_does_not_fit_the_arrays_names_tensor_and_shapes(hf_folder, tmp_path):
    folder = _hf_copy(hf_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_ff": 48}))
    with pytest.raises(CheckpointError, match=r"tensor 'encoder.block.0.layer.1.DenseReluDense"
                                              r".wi_0.weight' has shape \(64, 32\); config.json "
                                              r"implies \(48, 32\) for layers_0/mlp/wi_0/kernel"):
        _convert(folder, tmp_path / "out")
    with pytest.raises(CheckpointError, match="d_model: 32 vs 512"):
        _convert(hf_folder[1], tmp_path / "out", size="small")


def test_a_checkpoint_of_another_architecture_is_refused(hf_folder, tmp_path):
    folder = _hf_copy(hf_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type='bert' is not a T5 model"):
        _convert(folder, tmp_path / "out")
    with pytest.raises(UserError, match="neither a Hugging Face T5 folder .* nor a T5X "
                                        "checkpoint .*it does not exist"):
        _convert(tmp_path / "nothing", tmp_path / "out")


def test_a_missing_weight_file_is_named(hf_folder, tmp_path):
    folder = _hf_copy(hf_folder, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}))
    os.remove(folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        _convert(folder, tmp_path / "out")


class _Payload:
    """Unpickling this would write a file: weights_only must refuse it unconstructed."""

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(os.environ["SAMTONE_TEST_MARKER"]),))


def test_a_pickle_holding_more_than_tensors_is_refused_unopened(hf_folder, tmp_path, monkeypatch):
    folder = _hf_copy(hf_folder, tmp_path)
    state = {name: tensor.contiguous() for name, tensor in hf_folder[0].state_dict().items()}
    os.remove(folder / "model.safetensors")
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("SAMTONE_TEST_MARKER", str(marker))
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({**state, "extra": _Payload()}, f)
    torch.save(state, tmp_path / "plain.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be read as a PyTorch "
                                              "state dict of tensors"):
        _convert(folder, tmp_path / "out")
    assert not marker.exists()
    shutil.copyfile(tmp_path / "plain.bin", folder / "pytorch_model.bin")  # tensors: fine
    _convert(folder, tmp_path / "out")


@needs_fixture
def test_damaged_and_mismatched_t5x_arrays_are_named(tmp_path):
    checkpoint = tmp_path / "checkpoint_1000"
    shutil.copytree(FIXTURE, checkpoint)
    for path in checkpoint.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    with pytest.raises(CheckpointError, match=r"do not fit a T5 encoder of vocab_size=128, "
                                              r"d_model=32.*encoder/layers_0/attention/key/kernel"
                                              r" has shape \(4, 4\), expected \(32, 32\)"):
        _convert(checkpoint, tmp_path / "out", size="tiny")
    chunk = next(p for p in (checkpoint / "target.encoder.layers_1.mlp.wo.kernel").iterdir()
                 if not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(CheckpointError, match="cannot read target/encoder/layers_1/mlp/wo/kernel"):
        _convert(checkpoint, tmp_path / "out")
    shutil.rmtree(checkpoint / "target.encoder.layers_0.attention.key.kernel")
    with pytest.raises(CheckpointError, match="target/encoder/layers_0/attention/key/kernel: its "
                                              "folder .* is missing"):
        _convert(checkpoint, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1000"]


def test_output_is_refused_or_written_whole(hf_folder, hf_converted, tmp_path, monkeypatch):
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        _convert(hf_folder[1], hf_converted)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.checkpoint_lib, "save_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _convert(hf_folder[1], tmp_path / "out")
    assert os.listdir(tmp_path) == []


def _cli(*args):
    return run_command("convert", *args)


def test_command_line(hf_folder, tmp_path):
    result = _cli(f"--from={hf_folder[1]}", f"--output={tmp_path / 'out'}",
                  "--architecture=ade_spl")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "samtone-convert: hf checkpoint" in result.stdout
    assert "ade_spl, d_model=32, 2 layers" in result.stdout and "identity projection" in (
        result.stdout)
    assert f"INIT_CHECKPOINT=\"'{tmp_path / 'out'}'\"" in result.stdout
    refused = _cli(f"--from={hf_folder[1]}", f"--output={tmp_path / 'out'}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"error: --output={tmp_path / 'out'} exists and is not empty" in refused.stderr
