"""The multi-host launchers (launch/tpu_pod.sh, tpu_worker.sh, slurm.sh) without a cluster.

Stub `gcloud`, `sbatch`, `srun` and `scontrol` first on PATH record their arguments. The stub
gcloud can also act as the TPU workers' ssh (it runs the command in a folder standing for a
worker's home) and scp (a copy); the stub sbatch runs the script as a batch job; the stub srun
starts SLURM_NTASKS local tasks with the variables JAX's SLURM detection reads. A fake Python
stands in for samtone-train where only the launcher's own logic is under test. The slow tests
train for real: two CPU processes over gloo, one preempted (SIGTERM, SIGHUP) mid-run.
"""
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import pytest

from samtone.cli import gin_registry
from samtone.errors import ConfigError
from samtone.preemption import PREEMPTED_EXIT_CODE, PreemptionNotice

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_ENV = {"TPU_NAME": "my-v4-128", "ZONE": "us-central2-b", "PROJECT": "my-project"}

_STUB = f"""#!{sys.executable}
# Stub of a cluster command: records its arguments as a JSON line in STUB_RECORD, then acts.
import json, os, shutil, subprocess, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["STUB_RECORD"], "a") as record:
    env = {{key: os.environ.get(key) for key in ("SAMTONE_EXPECTED_LOCAL_DEVICES",)}}
    record.write(json.dumps({{"command": name, "args": args, "env": env}}) + "\\n")
home = os.environ.get("STUB_WORKER_HOME")
if name == "gcloud" and home and args[3] == "ssh":  # the worker's login shell runs --command
    command = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--command="))
    sys.exit(subprocess.run(["sh", "-c", command], cwd=home,
                            env={{**os.environ, "HOME": home}}).returncode)
if name == "gcloud" and home and args[3] == "scp":
    paths = [arg for arg in args[4:] if not arg.startswith("--")]
    for source in paths[:-1]:
        shutil.copy(source, os.path.join(home, paths[-1].split(":", 1)[1]))
if name == "sbatch":  # runs the batch script at once, as the job's first node would
    script = next(i for i, arg in enumerate(args) if not arg.startswith("-"))
    sys.exit(subprocess.run(["bash", *args[script:]],
                            env={{**os.environ, "SLURM_JOB_ID": "4242"}}).returncode)
if name == "srun" and "STUB_SRUN_EXIT" in os.environ:
    sys.exit(int(os.environ["STUB_SRUN_EXIT"]))
if name == "srun":  # SLURM_NTASKS tasks on this one node
    command = args[next(i for i, arg in enumerate(args) if not arg.startswith("-")):]
    count = int(os.environ["SLURM_NTASKS"])
    tasks = [subprocess.Popen(command, env={{
        **os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
        "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1"}})
        for i in range(count)]
    with open(os.environ["STUB_RECORD"] + ".pids", "w") as pids:
        pids.write(" ".join(str(task.pid) for task in tasks))
    sys.exit(max(task.wait() for task in tasks))  # srun: the highest exit status of a task
"""

# Stands in for the workers' Python (samtone-train): records its arguments, then exits with
# the next status of FAKE_EXITS; "wait" waits for SIGTERM, then exits 143 as a checkpoint would.
_FAKE_PYTHON = """#!/usr/bin/env bash
calls=$(( $(cat "$FAKE_DIR/calls" 2>/dev/null || echo 0) + 1 ))
printf '%s\\0' "$@" >"$FAKE_DIR/args.$calls"
echo "$calls" >"$FAKE_DIR/calls.new" && mv "$FAKE_DIR/calls.new" "$FAKE_DIR/calls"
exits=(${FAKE_EXITS:-0})
status=${exits[calls - 1]:-0}
if [[ $status == wait ]]; then
  trap 'exit 143' TERM
  sleep 60 &
  wait $!
  exit 1
fi
exit "$status"
"""


def _write_executable(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def stubs(tmp_path):
    """The environment with the stubs first on PATH; `.records()` reads what they recorded."""
    for name in ("gcloud", "sbatch", "srun", "scontrol"):
        _write_executable(tmp_path / "bin" / name, _STUB)
    record = tmp_path / "record.jsonl"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "SAMTONE_", "TPU_", "JAX_COORDINATOR"))}
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", STUB_RECORD=str(record))

    def records(command=None):
        lines = record.read_text().splitlines() if record.exists() else []
        found = [json.loads(line) for line in lines]
        return [r for r in found if command in (None, r["command"])]

    return types.SimpleNamespace(env=env, records=records, root=tmp_path)


@pytest.fixture
def fake_python(tmp_path):
    """A fake Python in a folder whose name has a space; `.calls()` lists each call's args."""
    folder = tmp_path / "fake python"
    path = _write_executable(folder / "python", _FAKE_PYTHON)

    def calls():
        count = int((folder / "calls").read_text()) if (folder / "calls").exists() else 0
        return [(folder / f"args.{i}").read_bytes().decode().split("\0")[:-1]
                for i in range(1, count + 1)]

    return types.SimpleNamespace(path=path, dir=folder, calls=calls)


def _run(argv, env, timeout=60):
    return subprocess.run([str(a) for a in argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _remote_command(record):
    """The ssh --command of a recorded gcloud call, as the worker's shell splits it."""
    command = next(a.split("=", 1)[1] for a in record["args"] if a.startswith("--command="))
    return shlex.split(command)


def _wait_for(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --- tpu_pod.sh -----------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["ref", "wheel"])
def test_setup_installs_the_tpu_extra_on_every_worker(stubs, fake_python, source):
    worker_home = stubs.root / "worker home"
    worker_home.mkdir()
    if source == "ref":
        argument, spec = "v0.1.0", "samtone[tpu,gcs] @ git+https://example.com/samtone.git@v0.1.0"
    else:
        wheel = stubs.root / "dist dir" / "samtone-0.1.0-py3-none-any.whl"
        wheel.parent.mkdir()
        wheel.write_bytes(b"")
        argument, spec = wheel, "samtone/samtone-0.1.0-py3-none-any.whl[tpu,gcs]"
    env = {**stubs.env, **TPU_ENV, "REPO_URL": "https://example.com/samtone.git",
           "STUB_WORKER_HOME": str(worker_home), "PYTHON": str(fake_python.path),
           "FAKE_DIR": str(fake_python.dir)}

    result = _run(["bash", LAUNCH / "tpu_pod.sh", "--setup", argument], env)

    assert result.returncode == 0, result.stderr
    calls = stubs.records("gcloud")
    assert [c["args"][:4] for c in calls] == [
        ["compute", "tpus", "tpu-vm", verb] for verb in ("ssh", "scp", "ssh")]
    for call in calls:
        assert {"--worker=all", "--zone=us-central2-b", "--project=my-project"} <= set(
            call["args"])
    copied = [a for a in calls[1]["args"][4:] if not a.startswith("--")]
    assert copied[0] == str(LAUNCH / "tpu_worker.sh") and copied[-1] == "my-v4-128:samtone/"
    assert _remote_command(calls[2])[-1] == spec  # the install, with the tpu extra
    # On the worker: the worker script in place, and pip given exactly that requirement.
    assert (worker_home / "samtone" / "tpu_worker.sh").is_file()
    assert fake_python.calls() == [["-m", "pip", "install", "--upgrade", spec]]
    if source == "wheel":
        assert copied[1] == str(argument)
        assert (worker_home / "samtone" / argument.name).is_file()


def test_start_detaches_and_status_and_stop_find_the_run(stubs, fake_python):
    """A start returns at once (its ssh session may drop), the run goes on, --status says so,
    --stop ends it with a checkpoint and no rerun; arguments with spaces arrive intact."""
    worker_home = stubs.root / "worker home"
    (worker_home / "samtone").mkdir(parents=True)
    (worker_home / "samtone" / "tpu_worker.sh").write_text((LAUNCH / "tpu_worker.sh").read_text())
    env = {**stubs.env, **TPU_ENV, "STUB_WORKER_HOME": str(worker_home), "WORKER_ID": "0",
           "PYTHON": str(fake_python.path), "FAKE_DIR": str(fake_python.dir),
           "FAKE_EXITS": "wait", "SAMTONE_EXPECTED_LOCAL_DEVICES": "4"}
    pid_file = worker_home / "samtone" / "logs" / "worker-0.pid"
    log = worker_home / "samtone" / "logs" / "worker-0.log"
    pod = ["bash", LAUNCH / "tpu_pod.sh"]
    try:
        started = time.monotonic()
        result = _run([*pod, "my configs/run.gin", "--gin.MODEL_DIR='gs://bucket/my run'"], env)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 30  # returned while training goes on

        (start,) = stubs.records("gcloud")
        assert "--worker=all" in start["args"]
        command = next(a for a in start["args"] if a.startswith("--command="))
        assert "setsid nohup bash samtone/tpu_worker.sh" in command
        assert "PYTHON=" in command and "SAMTONE_EXPECTED_LOCAL_DEVICES='4'" in command
        _wait_for(lambda: fake_python.calls(), "the worker to start training")
        assert fake_python.calls() == [[
            "-m", "samtone.cli.train", "--gin_file=my configs/run.gin",
            "--gin.distributed.auto=True", "--gin.MODEL_DIR='gs://bucket/my run'"]]

        status = _run([*pod, "--status"], env)
        assert "worker-0.log: training (pid" in status.stdout, status
        again = _run([*pod, "my configs/run.gin"], env)
        assert again.returncode == 1 and "already training" in again.stderr

        stop = _run([*pod, "--stop"], env)
        assert "stopping pid" in stop.stdout, stop
        _wait_for(lambda: not pid_file.exists(), "the worker to stop")
        assert len(fake_python.calls()) == 1  # stopped on request: no rerun
        assert "stopped on request" in log.read_text().splitlines()[-1]
        status = _run([*pod, "--status"], env)
        assert "worker-0.log: not running; last line: tpu_worker:" in status.stdout
        assert "stopped on request" in status.stdout
    finally:
        if pid_file.exists():
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("argv, worker", [([], "0"), (["3"], "3")], ids=["default", "third"])
def test_logs_follow_one_workers_log(stubs, argv, worker):
    result = _run(["bash", LAUNCH / "tpu_pod.sh", "--logs", *argv], {**stubs.env, **TPU_ENV})
    assert result.returncode == 0, result.stderr
    (call,) = stubs.records("gcloud")
    assert f"--worker={worker}" in call["args"]
    bash, flag, script, _, *args = _remote_command(call)
    assert (bash, flag, args) == ("bash", "-c", [worker])
    assert 'tail -n 100 -F "samtone/logs/worker-$1.log"' in script


@pytest.mark.parametrize("argv", [[], ["--nonsense"], ["--setup"]])
def test_tpu_pod_usage_errors_exit_2(stubs, argv):
    result = _run(["bash", LAUNCH / "tpu_pod.sh", *argv], {**stubs.env, **TPU_ENV})
    assert result.returncode == 2 and "usage:" in result.stderr
    assert stubs.records() == []


# --- tpu_worker.sh, with a fake samtone-train ------------------------------------------------

@pytest.mark.parametrize("exits, max_retries, status, calls, last_note", [
    ("143 143 0", "20", 0, 3, "finished (exit 0)"),
    ("1", "20", 1, 1, "stopped: exit 1 is not a preemption"),
    ("143 143 143", "1", 143, 2, "gave up: preempted (exit 143) 2 times, MAX_RETRIES=1"),
], ids=["reruns_until_done", "stops_on_a_failure", "gives_up_after_max_retries"])
def test_worker_reruns_only_after_preemption(tmp_path, fake_python, exits, max_retries,
                                             status, calls, last_note):
    env = {**os.environ, "PYTHON": str(fake_python.path), "FAKE_DIR": str(fake_python.dir),
           "FAKE_EXITS": exits, "MAX_RETRIES": max_retries, "RETRY_DELAY": "0",
           "LOG_DIR": str(tmp_path / "logs dir"), "WORKER_ID": "5"}
    result = _run(["bash", LAUNCH / "tpu_worker.sh", "configs/smoke.gin", "--gin.X=1"], env)
    assert result.returncode == status
    assert len(fake_python.calls()) == calls
    assert fake_python.calls()[0] == ["-m", "samtone.cli.train", "--gin_file=configs/smoke.gin",
                                      "--gin.X=1"]
    notes = (tmp_path / "logs dir" / "worker-5.log").read_text().splitlines()
    assert last_note in notes[-1]
    assert sum("rerunning" in note for note in notes) == min(exits.split().count("143"), calls - 1)
    assert not (tmp_path / "logs dir" / "worker-5.pid").exists()


# --- slurm.sh --------------------------------------------------------------------------------

@pytest.mark.parametrize("srun_exit", [0, 1, 143])
def test_slurm_gives_each_task_all_gpus_and_requeues_on_preemption(stubs, srun_exit):
    env = {**stubs.env, "SLURM_GPUS_ON_NODE": "8", "STUB_SRUN_EXIT": str(srun_exit)}
    result = _run(["sbatch", "--nodes=2", LAUNCH / "slurm.sh", "configs/x.gin", "--gin.A=1"], env)
    assert result.returncode == srun_exit
    (srun,) = stubs.records("srun")
    assert srun["args"][:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun["args"][3:] == [  # after the Python: one process per node, all 8 GPUs
        "-m", "samtone.cli.train", "--gin_file=configs/x.gin", "--gin.distributed.auto=True",
        "--gin.distributed.local_device_ids=[0,1,2,3,4,5,6,7]", "--gin.A=1"]
    assert srun["env"]["SAMTONE_EXPECTED_LOCAL_DEVICES"] == "8"
    requeues = [r["args"] for r in stubs.records("scontrol")]
    assert requeues == ([["requeue", "4242"]] if srun_exit == PREEMPTED_EXIT_CODE else [])


@pytest.mark.parametrize("gpu_env, device_ids", [
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, "[0,1,2,3]"), ({}, None)],
    ids=["typed_gpus_per_node", "no_gpus"])
def test_slurm_gpu_count_from_the_job(stubs, gpu_env, device_ids):
    env = {**stubs.env, **gpu_env, "STUB_SRUN_EXIT": "0"}
    result = _run(["sbatch", LAUNCH / "slurm.sh", "configs/x.gin"], env)
    srun = stubs.records("srun")
    if device_ids is None:
        assert result.returncode == 2 and "--gpus-per-node" in result.stderr and not srun
    else:
        assert f"--gin.distributed.local_device_ids={device_ids}" in srun[0]["args"]


# --- the device check and SIGHUP, in this process --------------------------------------------

@pytest.mark.parametrize("platform, seen, expected, message", [
    ("gpu", 1, "8", "this process sees 1 GPU, the launcher gave this host 8"),
    ("cpu", 1, "4", "sees 1 CPU device, the launcher gave this host 4.*samtone\\[tpu\\]"),
    ("tpu", 4, "4", None),
    ("cpu", 1, None, None),
], ids=["one_gpu_of_8", "cpu_only_jax", "every_tpu_chip", "no_count_from_a_launcher"])
def test_distributed_start_checks_the_local_device_count(monkeypatch, platform, seen,
                                                         expected, message):
    joined = []
    monkeypatch.setattr(jax.distributed, "initialize",
                        lambda *args, **kwargs: joined.append((args, kwargs)))
    monkeypatch.setattr(jax, "local_device_count", lambda: seen)
    monkeypatch.setattr(jax, "local_devices", lambda: [types.SimpleNamespace(platform=platform)])
    if expected is None:
        monkeypatch.delenv("SAMTONE_EXPECTED_LOCAL_DEVICES", raising=False)
    else:
        monkeypatch.setenv("SAMTONE_EXPECTED_LOCAL_DEVICES", expected)
    ids = list(range(8))
    if message:
        with pytest.raises(ConfigError, match=message):
            gin_registry.initialize_distributed(auto=True, local_device_ids=ids)
    else:
        gin_registry.initialize_distributed(auto=True, local_device_ids=ids)
    # With auto-detection, the local devices given still reach JAX.
    assert joined == [((None, None, None), {"local_device_ids": ids})]


def test_sighup_in_one_process_stops_with_a_checkpoint_like_a_preemption_notice():
    before = signal.getsignal(signal.SIGHUP)
    with PreemptionNotice() as notice:
        assert not notice.reached(1)
        os.kill(os.getpid(), signal.SIGHUP)
        assert notice.reached(2) and not notice.interrupted
        assert notice.reason == "hang-up (SIGHUP)"
    assert signal.getsignal(signal.SIGHUP) == before


# --- real training: two CPU processes over gloo ----------------------------------------------

_TRAIN_STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# configs/smoke.gin cut down (one layer, batch 8, short texts), two processes over gloo.
_TINY_RUN = ["configs/smoke.gin", "--gin.EVAL_DATA=None", f"--gin.TRAIN_STEPS={_TRAIN_STEPS}",
             "--gin.BATCH_SIZE=8", "--gin.QUERY_LENGTH=16", "--gin.PASSAGE_LENGTH=32",
             "--gin.t5_1_1_config.num_layers=1", "--gin.train.log_every=10",
             "--gin.distributed.cpu_collectives='gloo'"]


def _cpu_env(base):
    """One CPU device per process; XLA's cheapest CPU compile (halves the step's compile time,
    and with it these tests': each process compiles it on each start)."""
    return {**base, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                         "--xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true",
            "SAMTONE_EXPECTED_LOCAL_DEVICES": "1"}


def _first_step_done(path: pathlib.Path) -> bool:
    return path.exists() and "step 1 took" in path.read_text()


def _stopped_step(text: str) -> int:
    marker = "preemption notice: checkpoint of step "
    assert marker in text, text[-3000:]
    return int(text.split(marker, 1)[1].split()[0])


@pytest.mark.slow
def test_tpu_workers_survive_a_hang_up_and_finish_the_run(tmp_path):
    """Worker 1's session hangs up mid-run: both processes stop at one step with a checkpoint
    (exit 143), both workers rerun them, and the run finishes from that checkpoint."""
    logs, model_dir, port = tmp_path / "logs", tmp_path / "run", _free_port()
    workers = []
    try:
        for index in range(2):
            env = {**_cpu_env(os.environ), "LOG_DIR": str(logs), "WORKER_ID": str(index),
                   "RETRY_DELAY": "1", "MAX_RETRIES": "2"}
            workers.append(subprocess.Popen(
                ["bash", LAUNCH / "tpu_worker.sh", *_TINY_RUN,
                 f"--gin.MODEL_DIR='{model_dir}'",
                 f"--gin.distributed.coordinator_address='localhost:{port}'",
                 "--gin.distributed.num_processes=2", f"--gin.distributed.process_id={index}"],
                cwd=REPO, env=env, start_new_session=True))
        _wait_for(lambda: _first_step_done(logs / "worker-0.log"), "the first step", 300)
        os.killpg(workers[1].pid, signal.SIGHUP)  # what a dropped ssh session sends
        statuses = [worker.wait(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    log_0, log_1 = ((logs / f"worker-{i}.log").read_text() for i in range(2))
    assert statuses == [0, 0], log_0[-3000:] + log_1[-3000:]
    assert "SIGHUP received" in log_1 and "SIGHUP received" not in log_0  # a log per worker
    step = _stopped_step(log_0)
    assert 1 <= step < _TRAIN_STEPS
    for log in (log_0, log_1):
        assert "preempted (exit 143) after a checkpoint; rerunning" in log
        assert "attempt 2:" in log and "attempt 3:" not in log
        assert log.rstrip().endswith("finished (exit 0)")
    assert f"resumed from step {step} of" in log_0
    assert f"samtone-train: step {_TRAIN_STEPS}/{_TRAIN_STEPS}" in log_0
    assert (model_dir / "checkpoints" / str(_TRAIN_STEPS)).is_dir()


@pytest.mark.slow
def test_slurm_job_checkpoints_and_requeues_itself_when_preempted(stubs):
    """sbatch -> slurm.sh -> srun with two local tasks; SLURM's SIGTERM (--signal) reaches the
    tasks mid-run: a checkpoint, exit 143, and `scontrol requeue` of the job."""
    output, model_dir = stubs.root / "slurm-4242.out", stubs.root / "run"
    env = {**_cpu_env(stubs.env), "SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "1",
           "JAX_COORDINATOR_PORT": str(_free_port())}
    pids_file = pathlib.Path(stubs.env["STUB_RECORD"] + ".pids")
    with open(output, "w") as out:
        job = subprocess.Popen(["sbatch", "--nodes=2", LAUNCH / "slurm.sh", *_TINY_RUN,
                                f"--gin.MODEL_DIR='{model_dir}'"],
                               cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
        try:
            _wait_for(lambda: _first_step_done(output), "the first step", 300)
            for pid in pids_file.read_text().split():
                os.kill(int(pid), signal.SIGTERM)
            status = job.wait(timeout=300)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    text = output.read_text()
    assert status == PREEMPTED_EXIT_CODE, text[-3000:]
    assert "joined distributed job: process 0 of 2, 1 local devices" in text
    step = _stopped_step(text)
    assert (model_dir / "checkpoints" / str(step)).is_dir()
    assert [r["args"] for r in stubs.records("scontrol")] == [["requeue", "4242"]]
    (srun,) = stubs.records("srun")
    assert "--gin.distributed.local_device_ids=[0]" in srun["args"]
