"""A run folder is safe from the user's own mistakes: a changed config is refused, not taken for
damage; nothing is written before a start can succeed; config.gin replays into a new folder;
one trainer at a time; Ctrl-C and a full disk stop cleanly; scan_layers resumes either way."""
import errno
import functools
import hashlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from samtone import losses
from samtone import optimizers
from samtone import run_dir
from samtone.checkpoints import layout
from samtone.checkpoints import manager as checkpoint_lib
from samtone.errors import CheckpointError, ConfigError, OutputExistsError
from samtone.models import dual_encoder
from samtone.models import t5
from tiny_runs import REPO, run_command, train_in_process, train_tiny_run
from compile_flags import FAST_COMPILE


def _digest(folder) -> dict[str, str]:
    """sha256 of every file under `folder` (the compilation cache aside: JAX's, not the run's)."""
    folder = pathlib.Path(folder)
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and "compilation_cache" not in path.parts}


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def _train_command(*args):
    return run_command("train", "--gin_file=configs/smoke.gin", "--gin.EVAL_DATA=None",
                       "--gin.BATCH_SIZE=8", "--gin.QUERY_LENGTH=16", "--gin.PASSAGE_LENGTH=32",
                       *args)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-step tiny run, a checkpoint after each step."""
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "base", steps=2)


# ---------------------------------------------------------------------------------------------
# A changed config, a failed start, a step beyond TRAIN_STEPS: refused, the run untouched.


@pytest.mark.parametrize("args, named", [
    (["--gin.dual_encoder.projection_dim=32"], "dual_encoder.projection_dim: run 64, now 32"),
    (["--gin.t5_1_1_config.num_heads=2"], "t5_1_1_config.num_heads: run 4, now 2"),
    # The data is checked before anything is written, so a bad file changes nothing either.
    (["--gin.TRAIN_DATA='/nope.jsonl'"], "/nope.jsonl"),
    (["--gin.TRAIN_STEPS=1"], "holds step 2, beyond TRAIN_STEPS (train.num_train_steps) = 1"),
    (["--gin.VOCABULARY='/nope/spm.model'"], "/nope/spm.model"),
])
@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_byte_identical(base_run, args, named):
    before = _digest(base_run)
    result = _train_command(f"--gin.MODEL_DIR='{base_run}'", "--gin.TRAIN_STEPS=2", *args)
    assert result.returncode == 2
    assert named in _one_error_line(result)
    assert _digest(base_run) == before
    assert not list(pathlib.Path(base_run, "checkpoints").glob("*.damaged*"))


@pytest.mark.parametrize("binding, named", [
    ("--gin.TRAIN_DATA='/nope.jsonl'", "TRAIN_DATA (DataConfig.train_data): no such file"),
    # Checked before training, not after it (the evaluation at the end reads it).
    ("--gin.EVAL_DATA='/nope'", "EVAL_DATA (EvalConfig.data): no such file"),
])
def test_a_failed_start_creates_no_model_dir(tmp_path, binding, named):
    model_dir = tmp_path / "new" / "run"
    result = _train_command(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", binding)
    assert result.returncode == 2 and named in _one_error_line(result)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_the_tree_of_another_model_is_a_changed_config_not_damage(base_run, tmp_path):
    """Without model.json to compare, the checkpoint's own tree tells the change."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(base_run), str(copy)], check=True)
    (copy / "model.json").unlink()
    before = _digest(copy)
    result = _train_command(f"--gin.MODEL_DIR='{copy}'", "--gin.TRAIN_STEPS=2",
                            "--gin.dual_encoder.projection_dim=32")
    line = _one_error_line(result)
    assert result.returncode == 2 and "holds another model or optimiser" in line
    assert "params/projection_layer/kernel has shape (32, 64), expected (32, 32)" in line
    assert _digest(copy) == before


# ---------------------------------------------------------------------------------------------
# config.gin replays; MODEL_DIR that cannot be a folder; the lock.


@pytest.mark.slow
def test_replaying_config_gin_with_a_new_model_dir_starts_a_new_run(base_run, tmp_path):
    config = pathlib.Path(base_run, "config.gin").read_text()
    assert "train.model_dir = %MODEL_DIR" in config and f"MODEL_DIR = '{base_run}'" in config
    before = _digest(base_run)
    new = tmp_path / "replayed"
    new.mkdir()  # an existing empty folder is a new run (and its lock is the trainer's own)
    result = run_command("train", f"--gin_file={base_run}/config.gin",
                         f"--gin.MODEL_DIR='{new}'", "--gin.TRAIN_STEPS=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (new / "checkpoints" / "1").is_dir() and not (new / ".lock").exists()
    assert _digest(base_run) == before


def test_a_resume_with_another_config_keeps_the_runs_own_and_records_its_own(base_run,
                                                                           tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(base_run), str(run)], check=True)
    config, manifest = (run / "config.gin").read_bytes(), (run / "model.json").read_bytes()
    result = _train_command(f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=3",
                            "--gin.train.log_every=1", "--gin.t5_1_1_config.remat_policy='full'")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "3").is_dir()
    assert (run / "config.gin").read_bytes() == config
    assert (run / "model.json").read_bytes() == manifest
    resumed = (run / "config.step2.gin").read_text()
    assert "TRAIN_STEPS = 3" in resumed and "train.log_every = 1" in resumed


@pytest.mark.parametrize("make, named", [
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "is a file, not a folder"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "run", "which is a file"),
])
def test_model_dir_that_cannot_be_a_folder_is_one_line(tmp_path, make, named):
    model_dir = make(tmp_path)
    result = _train_command(f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=1")
    assert result.returncode == 2 and named in _one_error_line(result)


def test_check_writable_refuses_a_read_only_parent(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            run_dir.RunDir.at(tmp_path / "run").check_writable()
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.slow
def test_a_second_trainer_is_refused_naming_the_holder(base_run):
    lock = pathlib.Path(base_run, ".lock")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        before = _digest(base_run)
        result = _train_command(f"--gin.MODEL_DIR='{base_run}'", "--gin.TRAIN_STEPS=2")
        line = _one_error_line(result)
        assert result.returncode == 2
        assert f"pid {os.getpid()}" in line and socket.gethostname() in line
        assert _digest(base_run) == before
    finally:
        lock.unlink()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_the_lock_of_a_dead_process_is_taken_over_and_another_hosts_is_not(tmp_path):
    run = run_dir.RunDir.at(tmp_path)
    run.lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with run_dir.RunLock(run):
        holder = json.loads(run.lock_file.read_text())
        assert holder == {"host": socket.gethostname(), "pid": os.getpid()}
        with pytest.raises(run_dir.LockHeld, match=f"pid {os.getpid()}"):
            run_dir.RunLock(run).acquire()
    assert not run.lock_file.exists()
    run.lock_file.write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid()}))
    with pytest.raises(run_dir.LockHeld, match="host elsewhere"):
        run_dir.RunLock(run).acquire()


@pytest.mark.slow
def test_outputs_never_replace_or_hold_an_input_or_a_runs_state(base_run, tmp_path):
    inputs = [("--model_dir", base_run)]
    for output in (base_run, pathlib.Path(base_run).parent, pathlib.Path(base_run) / "checkpoints"
                   / "x", pathlib.Path(base_run) / "config.gin"):
        with pytest.raises(OutputExistsError, match="--output="):
            run_dir.check_output(output, inputs)
    run_dir.check_output(pathlib.Path(base_run) / "export", inputs)
    run_dir.check_output(tmp_path / "elsewhere", inputs)


# ---------------------------------------------------------------------------------------------
# Ctrl-C and a full disk.


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_current_step_and_exits_130(tmp_path):
    model_dir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
    env.pop("SAMTONE_TRACEBACK", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "samtone.cli.train", "--gin_file=configs/smoke.gin",
         f"--gin.MODEL_DIR='{model_dir}'", "--gin.EVAL_DATA=None", "--gin.BATCH_SIZE=8",
         "--gin.QUERY_LENGTH=16", "--gin.PASSAGE_LENGTH=32", "--gin.TRAIN_STEPS=100000",
         "--gin.CheckpointConfig.every_steps=100000"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr = []
    for line in process.stderr:  # wait for the first step, so the loop is running
        stderr.append(line)
        if "step 1 took" in line:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    stderr.extend(rest.splitlines(keepends=True))
    assert process.returncode == 130, "".join(stderr)[-3000:]
    last = stderr[-1].strip()
    assert last.startswith("samtone-train: interrupted at step ") and "resume" in last
    assert "Traceback" not in "".join(stderr)
    steps = checkpoint_lib.checkpoint_steps(model_dir / "checkpoints")
    assert steps and f"at step {steps[-1]};" in last
    assert not (model_dir / ".lock").exists()


def _model(scan_layers=False, projection_dim=16):
    config = t5.t5_1_1_config("tiny", vocab_size=1000, dropout_rate=0.0, scan_layers=scan_layers)
    return dual_encoder.DualEncoder(config, architecture="ade_spl", projection_dim=projection_dim)


def _train(model_dir, *, steps, **overrides):
    return train_in_process(model_dir, model=overrides.pop("model", _model()), steps=steps,
                            **overrides)


@pytest.mark.slow
def test_a_full_disk_names_the_folder_and_the_intact_checkpoint(tmp_path, monkeypatch):
    save = checkpoint_lib.save_checkpoint

    def save_until_full(manager, step, state, data_state):
        if step > 2:
            raise RuntimeError("orbax save failed") from OSError(errno.ENOSPC,
                                                                 "No space left on device")
        save(manager, step, state, data_state)

    monkeypatch.setattr(checkpoint_lib, "save_checkpoint", save_until_full)
    with pytest.raises(CheckpointError) as raised:
        _train(tmp_path / "run", steps=4)
    message = str(raised.value)
    assert f"{tmp_path / 'run' / 'checkpoints'}" in message and "step 4" in message
    assert "the previous checkpoint (step 2) is intact" in message
    assert not (tmp_path / "run" / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# scan_layers is a layout: a run resumes in the other one and reaches the same parameters.


def _unrolled(params):
    return jax.tree.map(np.asarray, jax.device_get(t5.unstack_layer_params(params)))


# Temperature 1 keeps every gradient well above rounding (at 0.05 a tiny model saturates, and
# Adafactor's normalisation turns ~1e-10 gradients' rounding into visible differences; see
# test_optimizers). Factoring every matrix puts (1,) placeholders in the optimiser state.
_LAYOUT_RUN = dict(loss=functools.partial(losses.samtone_loss, temperature=1.0),
                   optimizer_factory=functools.partial(optimizers.make_optimizer,
                                                       learning_rate=1e-2,
                                                       min_dim_size_to_factor=2))


@pytest.mark.parametrize("first, then", [(False, True), (True, False)],
                         ids=["unrolled-then-scanned", "scanned-then-unrolled"])
@pytest.mark.slow
def test_a_run_resumes_in_the_other_layer_layout(tmp_path, first, then):
    """Resumed in the other layout, a run ends where its resume in the same layout does."""
    _train(tmp_path / "same", steps=2, model=_model(scan_layers=first), **_LAYOUT_RUN)
    subprocess.run(["cp", "-r", str(tmp_path / "same"), str(tmp_path / "run")], check=True)
    reference = _train(tmp_path / "same", steps=4, model=_model(scan_layers=first),
                       **_LAYOUT_RUN)
    resumed = _train(tmp_path / "run", steps=4, model=_model(scan_layers=then), **_LAYOUT_RUN)
    assert resumed.step == 4
    expected, found = _unrolled(reference.state.params), _unrolled(resumed.state.params)
    assert jax.tree.structure(expected) == jax.tree.structure(found)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(found)):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
    # Serving reads the newest (other-layout) checkpoint with the run's first model.json.
    from samtone import run_manifest  # pylint: disable=import-outside-toplevel
    params, step, _, _ = run_manifest.read_params(tmp_path / "run")
    assert step == 4
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(_unrolled(params))):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)


def test_layout_plan_restacks_placeholders_and_names_every_difference():
    leaf = jax.ShapeDtypeStruct
    stored = {("v", "enc", "layers_0", "k"): leaf((4, 3), np.float32),
              ("v", "enc", "layers_1", "k"): leaf((4, 3), np.float32),
              ("v_row", "enc", "layers_0", "k"): leaf((1,), np.float32),  # a placeholder
              ("v_row", "enc", "layers_1", "k"): leaf((1,), np.float32)}
    target = {("v", "enc", "layers", "k"): leaf((2, 4, 3), np.float32),
              ("v_row", "enc", "layers", "k"): leaf((1,), np.float32)}
    plan = layout.plan(stored, target)
    assert not plan.identity
    arrays = {path: np.full(value.shape, float(path[2][-1]), np.float32)
              for path, value in stored.items()}
    built = plan.apply(arrays, target)
    np.testing.assert_array_equal(built[("v", "enc", "layers", "k")][:, 0, 0], [0.0, 1.0])
    assert built[("v_row", "enc", "layers", "k")].shape == (1,)
    assert layout.plan(target, target).identity
    other = {("v", "enc", "layers", "k"): leaf((2, 4, 5), np.float32),
             ("v", "enc", "extra"): leaf((3,), np.float32)}
    with pytest.raises(layout.LayoutMismatch) as raised:
        layout.plan(other, target)
    assert raised.value.differences == [
        "v/enc/extra (shape (3,)) is not in the configured tree",
        "v/enc/layers/k has shape (2, 4, 5), expected (2, 4, 3)",
        "v_row/enc/layers/k is missing (expected shape (1,))"]
