"""Multi-host training rehearsed on CPU: two processes over gloo reach one process's params.

launch/local_multiprocess.sh starts two `samtone-train` processes with two fake CPU devices
each, joined by jax.distributed over gloo; each feeds its half of every global batch and they
write one checkpoint together. A single process with four devices runs the same config; the
two final states must agree (up to the order of float additions in the all-reduce).
"""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from samtone.checkpoints.manager import read_checkpoint
from samtone.data import prepare, smoke_path
from compile_flags import with_devices

REPO = pathlib.Path(__file__).resolve().parents[1]
_CONFIG = "configs/smoke.gin"
_BINDINGS = ["--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=16", "--gin.PASSAGE_LENGTH=32",
             "--gin.train.log_every=2", "--gin.CheckpointConfig.every_steps=2",
             "--gin.t5_1_1_config.dropout_rate=0.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, PORT=str(_free_port()),
               DEVICES=str(devices), XLA_FLAGS=with_devices(devices),
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return env


def _run(command, env, what):
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=300)
    output = completed.stdout + completed.stderr
    if completed.returncode != 0 and "gloo" in output.lower() and "not" in output.lower() \
            and "available" in output.lower():
        pytest.skip(f"gloo CPU collectives are not available in this jaxlib: {output[-500:]}")
    assert completed.returncode == 0, f"{what} failed:\n{output[-4000:]}"
    return completed


def _assert_same_state(one_dir, two_dir, same_data_state=True):
    state_one, data_one, step_one = read_checkpoint(one_dir / "checkpoints")
    state_two, data_two, step_two = read_checkpoint(two_dir / "checkpoints")
    assert step_one == step_two == 4
    # The same global batches were consumed (a prepared folder has its own fingerprint).
    if same_data_state:
        assert data_one == data_two
    else:
        def position(data):
            return {**data, "iterator": {**data["iterator"], "data_fingerprint": None}}
        assert data_one["iterator"]["data_fingerprint"] != data_two["iterator"]["data_fingerprint"]
        assert position(data_one) == position(data_two)
    leaves_one, tree_one = jax.tree.flatten(state_one)
    leaves_two, tree_two = jax.tree.flatten(state_two)
    assert tree_one == tree_two
    for a, b in zip(leaves_one, leaves_two):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """One process, four devices, data parallel: the reference for every two-process mesh (the
    parameters do not depend on the mesh; tests/test_train_step.py proves it per step)."""
    model_dir = tmp_path_factory.mktemp("single") / "run"
    completed = _run([sys.executable, "-m", "samtone.cli.train", f"--gin_file={_CONFIG}",
                      *_BINDINGS, f"--gin.MODEL_DIR='{model_dir}'"], _env(4),
                     "the single-process run")
    return model_dir, completed


@pytest.mark.slow
def test_two_processes_reach_the_single_process_params(tmp_path, single_process_run):
    one_dir, single = single_process_run
    two_dir = tmp_path / "two"
    double = _run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", _CONFIG,
                   *_BINDINGS, f"--gin.MODEL_DIR='{two_dir}'"], _env(2), "the two-process run")

    assert "joined distributed job: process 0 of 2" in double.stderr
    # Logs and the printed evaluation come from process 0 only.
    assert double.stderr.count("step 4/4 | loss") == 1
    assert double.stdout.count("samtone-train: step 4/4") == 1  # the summary, once
    assert single.stdout.count("samtone-train: step 4/4") == 1
    _assert_same_state(one_dir, two_dir)


@pytest.fixture(scope="module")
def prepared_smoke_data(tmp_path_factory):
    """The smoke training pairs as a samtone-prepare folder, at the runs' lengths."""
    folder = tmp_path_factory.mktemp("prepared") / "smoke_train"
    prepare.prepare(smoke_path("train.jsonl"), smoke_path("spm.model"),
                    str(folder), prepare.Settings(query_length=32, passage_length=32),
                    shards=3, workers=1, progress=False)
    return folder


@pytest.mark.parametrize("model_parallel,prepared", [(4, True), (2, False)],
                         ids=["model_axis_across_processes_prepared_folder", "data2_model2"])
@pytest.mark.slow
def test_tensor_parallel_meshes_across_processes_reach_the_single_process_params(
        tmp_path, single_process_run, prepared_smoke_data, model_parallel, prepared):
    """Processes holding the same rows (replicas along 'model') feed the same examples; from a
    prepared folder (through a grain worker process each), they are the examples the single
    process read from the files."""
    two_dir = tmp_path / "two"
    # The prepared folder read by a grain worker process on each host.
    data = [f"--gin.TRAIN_DATA='{prepared_smoke_data}'",
            "--gin.make_batch_iterator.worker_processes=1"] if prepared else []
    double = _run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", _CONFIG,
                   "--gin_file=gin/mesh/data_model.gin", *_BINDINGS, *data,
                   f"--gin.MODEL_PARALLEL={model_parallel}", "--gin.EVAL_DATA=None",
                   f"--gin.MODEL_DIR='{two_dir}'"], _env(2), "the two-process run")
    assert f"'model': {model_parallel}" in double.stderr  # the mesh the run used
    _assert_same_state(single_process_run[0], two_dir, same_data_state=not prepared)


@pytest.mark.slow
def test_hosts_with_different_prepared_folders_all_exit_2_naming_theirs(
        tmp_path, prepared_smoke_data):
    """Process 1 gets a folder prepared from other pairs: both processes stop before the first
    step with exit 2, each naming its TRAIN_DATA and the process that differs, and no
    MODEL_DIR is created."""
    other = tmp_path / "other_prepared"
    lines = open(smoke_path("train.jsonl"), encoding="utf-8").readlines()
    (tmp_path / "other.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    prepare.prepare(str(tmp_path / "other.jsonl"), smoke_path("spm.model"), str(other),
                    prepare.Settings(query_length=32, passage_length=32), workers=1,
                    progress=False)
    env, model_dir = _env(2), tmp_path / "run"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "samtone.cli.train", f"--gin_file={_CONFIG}",
         f"--gin.distributed.coordinator_address='localhost:{env['PORT']}'",
         "--gin.distributed.num_processes=2", f"--gin.distributed.process_id={index}",
         "--gin.distributed.cpu_collectives='gloo'", *_BINDINGS, f"--gin.TRAIN_DATA='{data}'",
         "--gin.EVAL_DATA=None", f"--gin.MODEL_DIR='{model_dir}'"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index, data in enumerate([prepared_smoke_data, other])]
    try:
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr), data in zip(processes, outputs, [prepared_smoke_data, other]):
        assert process.returncode == 2, stderr[-3000:]
        assert stderr.splitlines()[-1].startswith(
            f"error: TRAIN_DATA (DataConfig.train_data): '{data}' differs between "
            "hosts: process 1 read other data than process 0"), stderr[-3000:]
    assert not model_dir.exists()
