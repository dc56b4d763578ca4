"""samtone.train and samtone.cli (train): the loop, resume, preemption, non-finite losses, Gin."""
import functools
import glob
import os
import pathlib
import signal
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from samtone.cli import gin_parsing
from samtone.cli import gin_registry  # noqa: F401  (registers the Gin names)
from samtone import optimizers
from samtone import partitioning
from samtone import train as train_lib
from samtone import train_step as train_step_lib
from samtone.preemption import PREEMPTED_EXIT_CODE
from samtone.checkpoints.manager import read_checkpoint
from samtone.data import pipeline, prepare, smoke_path
from samtone.models import dual_encoder
from samtone.models import t5
from tiny_runs import train_in_process

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.gin"))


def _model(dropout_rate=0.1):
    config = t5.t5_1_1_config("tiny", vocab_size=1000, dropout_rate=dropout_rate)
    return dual_encoder.DualEncoder(config, architecture="ade_spl", projection_dim=16)


def _train(model_dir, *, steps=6, **overrides):
    """A tiny run on the smoke data; dropout on, so resuming must also restore the rng."""
    return train_in_process(model_dir, model=overrides.pop("model", _model()), steps=steps,
                            **overrides)


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(jax.device_get(a))
    leaves_b, tree_b = jax.tree.flatten(jax.device_get(b))
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _Interrupted(Exception):
    pass


def _interrupting_factory(batches, **options):
    """A batch iterator factory whose iterator dies after handing out `batches` training batches."""
    def factory(*args, **kwargs):
        iterator = pipeline.make_batch_iterator(*args, **kwargs, **options)
        handed_out = [-1]  # train() peeks one batch (and rewinds) before the loop

        class Dying:
            def __next__(self):
                handed_out[0] += 1
                if handed_out[0] > batches:
                    raise _Interrupted
                return next(iterator)

            get_state, set_state = iterator.get_state, iterator.set_state

        return Dying()
    return factory


@pytest.mark.slow
def test_resume_after_a_crash_reaches_the_uninterrupted_params(tmp_path):
    reference = _train(tmp_path / "reference")
    assert reference.step == 6 and not reference.preempted

    # Dies reading batch 5, which train() reads (and copies to the devices) before step 4,
    # so after the checkpoint of step 2.
    with pytest.raises(_Interrupted):
        _train(tmp_path / "resumed", data={"batch_iterator_factory": _interrupting_factory(4)})
    resumed = _train(tmp_path / "resumed")

    assert resumed.step == 6
    _assert_trees_equal(resumed.state, reference.state)
    assert int(resumed.state.step) == 6


@pytest.mark.slow
def test_packed_run_resumes_exactly_and_a_rerun_compiles_nothing(tmp_path):
    """pack=True end to end (the step sees several shapes); the resumed call finds its
    compiled steps in the persistent compilation cache under model_dir."""
    factory = functools.partial(pipeline.make_batch_iterator, pack=True)
    cache = "compilation_cache"
    reference = _train(tmp_path / "reference", data={"batch_iterator_factory": factory},
                       mesh=None)
    with pytest.raises(_Interrupted):
        _train(tmp_path / "resumed",
               data={"batch_iterator_factory": _interrupting_factory(4, pack=True)},
               compilation_cache_dir=cache, mesh=None)
    assert list((tmp_path / "resumed" / cache).iterdir())
    events = []

    def listen(event, **kwargs):
        events.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        resumed = _train(tmp_path / "resumed", data={"batch_iterator_factory": factory},
                         compilation_cache_dir=cache, mesh=None)
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert resumed.step == 6
    _assert_trees_equal(resumed.state, reference.state)
    assert events.count("/jax/compilation_cache/cache_hits") >= 1
    assert "/jax/compilation_cache/cache_misses" not in events


def _nan_loss(query, passage):
    return jnp.mean(query * passage) * jnp.nan


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    _train(tmp_path, steps=2)
    with pytest.raises(train_lib.NonFiniteLossError, match="at step 3"):
        _train(tmp_path, steps=4, loss=_nan_loss)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    assert manager.all_steps() == [2]


@pytest.mark.slow
def test_skip_nonfinite_leaves_the_params_untouched(tmp_path):
    result = _train(tmp_path, steps=2, loss=_nan_loss, skip_nonfinite=True)
    assert result.step == 2
    example = {"query_tokens": np.zeros((16, 16), np.int32),
               "passage_tokens": np.zeros((16, 32), np.int32)}
    initial, _ = train_step_lib.init_train_state(
        _model(), optimizers.make_optimizer(total_steps=2), example,
        partitioning.make_mesh(), partitioning.logical_axis_rules("data"))
    _assert_trees_equal(result.state.params, initial.params)


def test_vocabulary_larger_than_the_embedding_is_an_error(tmp_path):
    small = dual_encoder.DualEncoder(t5.t5_1_1_config("tiny"), projection_dim=16)  # 128 rows
    with pytest.raises(ValueError, match="t5_1_1_config.vocab_size"):
        _train(tmp_path, model=small)


@pytest.mark.slow
def test_init_from_a_hugging_face_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                      num_heads=4, feed_forward_proj="gated-gelu")
    transformers.T5EncoderModel(hf_config).save_pretrained(tmp_path / "hf")
    from samtone.checkpoints import load_hf_t5_encoder  # pylint: disable=import-outside-toplevel
    _, expected = load_hf_t5_encoder(tmp_path / "hf")

    # A zero learning rate keeps the params at their initial values.
    result = _train(tmp_path / "run", steps=1,
                    checkpoints={"init_checkpoint": str(tmp_path / "hf")},
                    optimizer_factory=functools.partial(
                        optimizers.make_optimizer, learning_rate=0.0))
    for tower in ("query_encoder", "passage_encoder"):
        _assert_trees_equal(result.state.params[tower], expected)


# ---------------------------------------------------------------------------------------------
# Gin: every config parses and builds; the paper recipe says what the paper says.

_REQUIRED = ["MODEL_DIR = '/tmp/unused'", "TRAIN_DATA = 'pairs.jsonl'",
             "INIT_CHECKPOINT = '/models/t5'", "VOCABULARY = 'spiece.model'"]


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_config_parses_and_builds(config, clean_gin, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # includes must resolve from anywhere
    bindings = [] if config.name == "smoke.gin" else _REQUIRED
    gin_parsing.parse([f"configs/{config.name}"], bindings)
    model = gin.get_configurable("dual_encoder")()
    mesh = gin.get_configurable("make_mesh")()
    rules = gin.get_configurable("logical_axis_rules")()
    loss = gin.query_parameter("train.loss").scoped_configurable_fn
    batch = {"query_tokens": np.zeros((mesh.shape["data"], 8), np.int32),
             "passage_tokens": np.zeros((mesh.shape["data"], 8), np.int32)}
    optimizer = gin.get_configurable("make_optimizer")(
        total_steps=10, logical_axes=train_step_lib.param_logical_specs(model, batch, mesh, rules))
    abstract, shardings = train_step_lib.train_state_shardings(model, optimizer, batch, mesh, rules)
    assert jax.tree.structure(abstract.params) == jax.tree.structure(shardings.params)
    assert callable(loss)


# T5.1.1 encoder sizes as published (d_model, layers, heads, d_ff), google-research/text-to-text-
# transfer-transformer released_checkpoints.md.
_T5_1_1_SIZES = {"base": (768, 12, 12, 2048), "large": (1024, 24, 16, 2816),
                 "xxl": (4096, 24, 64, 10240)}


@pytest.mark.parametrize("size", ["base", "large", "xxl"])
def test_paper_recipe(size, clean_gin):
    """What the configured objects compute equals the paper's recipe, computed independently."""
    from test_losses import reference_samtone  # pylint: disable=import-outside-toplevel
    gin_parsing.parse([f"configs/paper_{size}_ade_spl_samtone.gin"], _REQUIRED)
    model = gin.get_configurable("dual_encoder")()
    config = model.config
    assert (config.d_model, config.num_layers, config.num_heads, config.d_ff) == _T5_1_1_SIZES[size]
    assert (model.architecture, model.projection_dim) == ("ade_spl", 768)
    # The loss: SamToNe, query side, bidirectional, t = 0.01, against numpy.
    rng = np.random.default_rng(0)
    query, passage = rng.normal(size=(2, 6, 8)).astype(np.float32)
    loss = gin_parsing.setting("train.loss")
    expected = reference_samtone(query, passage, temperature=0.01, query_same_tower=True,
                                 passage_same_tower=False, bidirectional=True)
    np.testing.assert_allclose(loss(query, passage), expected, rtol=1e-5)
    # Global batch 512 for 20k steps; Adafactor whose rate falls linearly from 1e-3 to 0.
    assert gin_parsing.setting("train.global_batch_size") == 512
    total = gin_parsing.setting("train.num_train_steps")
    assert total == 20000
    optimizer = gin.get_configurable("make_optimizer")(total_steps=total)
    params = {"w": jnp.ones((4, 4))}
    state = optimizer.init(params)
    rates = []
    for _ in range(3):
        _, state = optimizer.update({"w": jnp.full((4, 4), 0.1)}, state, params)
        rates.append(float(optimizers.current_learning_rate(state)))
    np.testing.assert_allclose(rates, [1e-3 * (1 - k / total) for k in range(3)], rtol=1e-6)
    assert gin_parsing.setting("CheckpointConfig.init_checkpoint") == "/models/t5"
    if size == "xxl":
        assert config.scan_layers and config.remat_policy != "none"


def test_gin_errors_name_the_file_and_binding(tmp_path, clean_gin):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin/models/t5_1_1_tiny.gin'\ntrain.no_such_parameter = 3\n")
    with pytest.raises(ValueError, match="no_such_parameter") as error:
        gin_parsing.parse([str(bad)])
    assert str(bad) in str(error.value)


def test_missing_required_macro_is_reported(clean_gin):
    with pytest.raises(ValueError, match="TRAIN_DATA.*gin.REQUIRED"):
        gin_parsing.parse(["configs/paper_base_ade_spl_samtone.gin"],
                         [b for b in _REQUIRED if not b.startswith("TRAIN_DATA")])


def test_search_paths_find_user_files_and_samtone_includes(tmp_path, monkeypatch, clean_gin):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "run.gin").write_text("include 'configs/smoke.gin'\nBATCH_SIZE = 8\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    gin_parsing.parse(["run.gin"], ["TRAIN_STEPS = 3"], extra_search_paths=[str(tmp_path / "mine")])
    assert gin_parsing.setting(("train.global_batch_size")) == 8
    assert gin_parsing.setting(("train.num_train_steps")) == 3
    assert gin.query_parameter("dual_encoder.architecture") == "ade_spl"


def test_gin_flag_shorthand():
    assert gin_parsing.rewrite_gin_args(["x", "--gin.MODEL_DIR='/a=b'", "--gin_file=c.gin"]) == [
        "x", "--gin_bindings=MODEL_DIR = '/a=b'", "--gin_file=c.gin"]


# ---------------------------------------------------------------------------------------------
# The command line, in subprocesses: the smoke config end to end, and SIGTERM then resume.

_CLI = ["-m", "samtone.cli.train", "--gin_file=configs/smoke.gin", "--gin.TRAIN_STEPS=40",
        "--gin.BATCH_SIZE=16", "--gin.PASSAGE_LENGTH=48", "--gin.CheckpointConfig.every_steps=1000"]
# Runs the CLI, then reports whether anything imported TensorFlow.
_WITHOUT_TF = ("import runpy, sys\n"
               "try:\n"
               "    runpy.run_module('samtone.cli.train', run_name='__main__', alter_sys=True)\n"
               "finally:\n"
               "    print('tensorflow imported:', any(m == 'tensorflow' or m.startswith("
               "('tensorflow.', 'seqio', 'tensorflow_datasets')) for m in sys.modules))\n")


def _env():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _final_state(model_dir):
    state, _, step = read_checkpoint(pathlib.Path(model_dir) / "checkpoints")
    return step, state


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke config, shortened, run once through the CLI without interruption."""
    model_dir = tmp_path_factory.mktemp("smoke")
    completed = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TF, *_CLI[2:], f"--gin.MODEL_DIR='{model_dir}'",
         "--gin.train.log_every=10", "--gin.EvalConfig.every_steps=20"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    return model_dir, completed


@pytest.mark.slow
def test_smoke_config_end_to_end_without_tensorflow(smoke_run):
    model_dir, completed = smoke_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tensorflow imported: False" in completed.stdout
    assert "samtone-train: step 40/40" in completed.stdout and "MRR" in completed.stdout
    assert "eval at step 20 on eval (300 queries, 300 passages)" in completed.stderr  # every_steps
    assert "step 40/40 | loss" in completed.stderr and "examples/s | ETA" in completed.stderr
    assert _final_state(model_dir)[0] == 40
    assert glob.glob(str(model_dir / "train" / "events.out.tfevents.*"))
    assert glob.glob(str(model_dir / "eval" / "events.out.tfevents.*"))
    assert "dual_encoder.architecture = 'ade_spl'" in (model_dir / "config.gin").read_text()


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_matches_the_uninterrupted_run(smoke_run, tmp_path):
    """Preempted and rerun on a samtone-prepare folder of the smoke pairs, read by 2 grain
    worker processes, the run ends where the uninterrupted run on the JSONL did: the same
    batches, and the same resumed position. SIGTERM goes to the whole process group, workers
    included, as a cluster's preemption sends it."""
    reference_dir, reference = smoke_run
    assert reference.returncode == 0, reference.stderr[-3000:]
    prepared = tmp_path / "prepared"
    prepare.prepare(smoke_path("train.jsonl"), smoke_path("spm.model"), str(prepared),
                    prepare.Settings(query_length=32, passage_length=48), workers=1,
                    progress=False)
    model_dir = tmp_path / "run"
    command = [sys.executable, *_CLI, f"--gin.MODEL_DIR='{model_dir}'",
               "--gin.train.log_every=1", "--gin.EVAL_DATA=None",
               f"--gin.TRAIN_DATA='{prepared}'", "--gin.make_batch_iterator.worker_processes=2"]
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        for line in process.stderr:
            if "step 3/40" in line:
                os.killpg(process.pid, signal.SIGTERM)
                break
        rest = process.stderr.read()
        assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE, rest[-3000:]
    finally:
        process.kill()
    assert "preemption notice: checkpoint of step" in rest
    interrupted_step, _ = _final_state(model_dir)
    assert 3 <= interrupted_step < 40

    rerun = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {interrupted_step}" in rerun.stderr
    step, state = _final_state(model_dir)
    assert step == 40
    _assert_trees_equal(state, _final_state(reference_dir)[1])
