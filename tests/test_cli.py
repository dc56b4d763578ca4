"""samtone.cli: the README's commands verbatim from a fresh folder, user errors as one-line
messages with exit status 2, damaged checkpoints survived, and a rerun of a module loading
each module once. The import layering is checked in test_layering.py."""
import json
import pathlib
import re
import subprocess
import sys

import pytest

from samtone.data import smoke_path
from tiny_runs import run_argv

BIN = pathlib.Path(sys.executable).parent


def _command(name):
    """The console script as the README runs it, or `python -m` where it is not installed."""
    script = BIN / name
    module = {"samtone-train": "train", "samtone-export": "export", "samtone-mine": "mine",
              "samtone-analyze": "analyze", "samtone-eval": "eval",
              "samtone-convert": "convert"}[name]
    return [str(script)] if script.exists() else [sys.executable, "-m", f"samtone.cli.{module}"]


def _run(cwd, name, *args, timeout=600, fast_compile=True):
    return run_argv([*_command(name), *args], cwd=cwd, timeout=timeout,
                    fast_compile=fast_compile)


# ---------------------------------------------------------------------------------------------
# The README's main command, verbatim, from a folder that is not the repository.


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`samtone-train --gin_file=configs/smoke.gin` in an empty folder: MODEL_DIR runs/smoke."""
    folder = tmp_path_factory.mktemp("user")
    # As a user runs it (400 steps: XLA's default code generation pays for itself).
    result = _run(folder, "samtone-train", "--gin_file=configs/smoke.gin", fast_compile=False)
    return folder, result


@pytest.mark.slow
def test_smoke_run_from_a_fresh_folder_trains_well_and_says_what_next(smoke):
    folder, result = smoke
    assert result.returncode == 0, result.stderr[-3000:]
    run = folder / "runs" / "smoke"
    assert (run / "checkpoints" / "400").is_dir() and (run / "model.json").is_file()
    lines = result.stdout.splitlines()
    metrics = {line.split()[0]: float(line.split()[1]) for line in lines
               if line.startswith("  ") and line.split()[0] in ("P@1", "MRR@10", "NDCG@10")}
    # A quality floor on the shipped held-out set: chance P@1 is 1/300, TF-IDF reaches 0.63.
    assert metrics["P@1"] >= 0.8 and metrics["MRR@10"] >= 0.85 and metrics["NDCG@10"] >= 0.85
    assert f"samtone-eval --model_dir={run} --data=" in result.stdout
    assert "samtone-train: step 400/400 in 0:" in result.stdout
    assert f"checkpoint: {run / 'checkpoints' / '400'}" in result.stdout
    assert f"samtone-export --model_dir={run}" in result.stdout
    # Quiet: no orbax INFO chatter, no TPU probe.
    assert "Unable to initialize backend" not in result.stderr
    assert not [line for line in result.stderr.splitlines() if "/orbax/" in line
                or "checkpoint_manager.py" in line]


@pytest.mark.slow
def test_serving_commands_take_relative_paths(smoke):
    folder, result = smoke
    assert result.returncode == 0, result.stderr[-3000:]
    with open(smoke_path("eval.jsonl"), encoding="utf-8") as f:
        (folder / "pairs.jsonl").write_text("".join(next(f) for _ in range(40)))
    exported = _run(folder, "samtone-export", "--model_dir=runs/smoke", "--output=exported",
                    "--platforms=cpu")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (folder / "exported" / "params.safetensors").is_file()
    analyzed = _run(folder, "samtone-analyze", "--model_dir=runs/smoke", "--data=pairs.jsonl",
                    "--output=analysis", "--max_points=40", "--batch_size=16")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    assert json.loads((folder / "analysis" / "summary.json").read_text())["step"] == 400
    evaluated = _run(folder, "samtone-eval", "--model_dir=runs/smoke", "--data=pairs.jsonl",
                     "--batch_size=16")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((folder / "runs/smoke/eval/pairs/metrics.json").read_text())["step"] == 400
    mined = _run(folder, "samtone-mine", "--model_dir=runs/smoke", "--train_data=pairs.jsonl",
                 "--output=mined.jsonl", "--k=2", "--batch_size=16")
    assert mined.returncode == 0, mined.stderr[-3000:]
    assert len((folder / "mined.jsonl").read_text().splitlines()) == 40
    for completed in (exported, analyzed, evaluated, mined):
        assert "damaged" not in completed.stderr and "/orbax/" not in completed.stderr


# ---------------------------------------------------------------------------------------------
# User errors: one message naming what is wrong, exit status 2, no traceback.

_QUICK = ["--gin_file=configs/smoke.gin", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
          "--gin.EVAL_DATA=None"]


@pytest.mark.parametrize("args,message", [
    (["--gin.TRAIN_DAT='x.jsonl'"], "no config file defines the macro TRAIN_DAT.*did you mean "
                                    "TRAIN_DATA"),
    (["--gin.BATCH_SIZE='sixty-four'"], "BATCH_SIZE \\(train.global_batch_size\\) must be a "
                                        "positive integer, got 'sixty-four'"),
    (["--gin.TRAIN_STEPS=10.5"], "TRAIN_STEPS \\(train.num_train_steps\\) must be a positive "
                                 "integer, got 10.5"),
    (["--gin.CheckpointConfig.every_steps=0"],
     "CheckpointConfig.every_steps must be a positive integer"),
    (["--gin.make_optimizer.learning_rate=-1.0"], "make_optimizer.learning_rate=-1.0 must be "
                                                  ">= 0"),
    (["--gin.losses.samtone_loss.temperature=0.0"], "train.loss \\(samtone_loss\\): temperature "
                                                    "must be > 0, got 0.0"),
    (["--gin.train.checkpont_every=3"], "train' doesn't have a parameter named "
                                        "'checkpont_every'"),
    (["--gin.INIT_CHECKPOINT='no_such_model'"], "INIT_CHECKPOINT .*no_such_model' is neither a "
                                                "Hugging Face T5 folder .*config.json.* nor a "
                                                "T5X checkpoint .*it does not exist"),
    (["--gin.TRAIN_DATA='empty.jsonl'"], "empty.jsonl: holds no records \\(the file is empty\\)"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
])
@pytest.mark.slow
def test_user_errors_are_one_line_messages_with_status_2(tmp_path, args, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    result = _run(tmp_path, "samtone-train", *_QUICK, "--gin.MODEL_DIR='run'", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_traceback_flag_shows_the_stack(tmp_path):
    result = _run(tmp_path, "samtone-train", *_QUICK, "--gin.MODEL_DIR='run'",
                  "--gin.TRAIN_STEPS=0", "--traceback")
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "must be a positive integer" in result.stderr


# ---------------------------------------------------------------------------------------------
# A damaged newest checkpoint: moved aside once, the run resumes before it and finishes, and
# the next rerun is clean.


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_moved_aside_and_reruns_are_clean(tmp_path):
    args = [*_QUICK, "--gin.TRAIN_STEPS=4", "--gin.CheckpointConfig.every_steps=2",
            "--gin.QUERY_LENGTH=16", "--gin.PASSAGE_LENGTH=32", "--gin.MODEL_DIR='run'"]
    first = _run(tmp_path, "samtone-train", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    step_dir = tmp_path / "run" / "checkpoints" / "4"
    arrays = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()
                     and not p.name.startswith("_")), key=lambda p: p.stat().st_size)
    damaged_file = arrays[-1]
    damaged_file.write_bytes(damaged_file.read_bytes()[: damaged_file.stat().st_size // 2])

    second = _run(tmp_path, "samtone-train", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoint step 4" in second.stderr and "moved it to" in second.stderr
    assert (tmp_path / "run" / "checkpoints" / "4.damaged").is_dir()
    assert "resumed from step 2" in second.stderr
    assert "samtone-train: step 4/4" in second.stdout

    third = _run(tmp_path, "samtone-train", *args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from step 4" in third.stderr and "moved it to" not in third.stderr


def test_a_rerun_of_the_module_loads_each_module_once(tmp_path):
    """`python -m samtone.cli.train` does not load the loop or the CLI a second time."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['samtone-train', '--helpshort']\n"
             "try:\n"
             "    runpy.run_module('samtone.cli.train', run_name='__main__', alter_sys=True)\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('cli.train loaded as:', sorted(m for m in sys.modules "
             "if m.endswith('cli.train')))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=False, cwd=tmp_path)
    assert "cli.train loaded as: []" in result.stdout, result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize("name,args", [
    ("samtone-export", ["--output=exported"]),
    ("samtone-mine", ["--train_data=pairs.jsonl", "--output=mined.jsonl", "--k=4"]),
])
def test_serving_commands_name_a_folder_that_is_not_a_run(tmp_path, name, args):
    """Flags parsed, the run checked first: one line, exit 2, nothing written (no trained run
    needed, so this stays in the fast tier; the slow tests run the commands on a run)."""
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"query_id": "q", "query": "a", "passage_id": "p", "passage": "b"}) + "\n")
    result = _run(tmp_path, name, "--model_dir=no_run", *args, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "no_run/model.json not found" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]
