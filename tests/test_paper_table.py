"""benchmarks/paper_table.py: a 2 x 2 x 2 grid (ADE-SPL and SDE, in-batch softmax and SamToNe,
two seeds) of 2-step runs. Every cell of table.json and table.md is the mean (± std, ddof 1)
of its runs' metrics.json, read here independently; a rerun trains and evaluates nothing; a
run whose last checkpoint is lost (an interrupted run) resumes and only it is evaluated again;
an unknown architecture or loss, or a binding of what each cell sets, is refused naming the
flag."""
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from tiny_runs import PASSAGE_LENGTH, QUERY_LENGTH, REPO, run_argv

pytest.importorskip("ranx")

SCRIPT = os.path.join(REPO, "benchmarks", "paper_table.py")
ARCHITECTURES = ("ade_spl", "sde")
LOSSES = ("in_batch_softmax_bidirectional", "samtone_query")
SEEDS = (0, 1)
METRICS = ("P@1", "MRR@10", "NDCG@10")


def paper_table(output, eval_data, *extra):
    return run_argv([sys.executable, SCRIPT, "--base_gin=configs/smoke.gin",
                     f"--architectures={','.join(ARCHITECTURES)}",
                     f"--losses={','.join(LOSSES)}", f"--seeds={','.join(map(str, SEEDS))}",
                     f"--eval_data={eval_data}", f"--output={output}", "--no_figures",
                     "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=16", "--gin.EVAL_DATA=None",
                     f"--gin.QUERY_LENGTH={QUERY_LENGTH}",
                     f"--gin.PASSAGE_LENGTH={PASSAGE_LENGTH}",
                     "--gin.CheckpointConfig.every_steps=1", "--gin.CheckpointConfig.keep=None",
                     *extra], timeout=900)


def folder_times(output):
    """The modification time of every folder of the runs (their checkpoints included)."""
    return {root: os.path.getmtime(root) for root, _, _ in os.walk(output / "runs")}


@pytest.mark.slow
def test_table_is_the_mean_of_the_runs_and_reruns_reuse_them(tmp_path):
    eval_data = tmp_path / "eval.jsonl"
    with open(os.path.join(REPO, "samtone", "data", "smoke", "eval.jsonl"),
              encoding="utf-8") as f:
        eval_data.write_text("".join(f.readlines()[:40]), encoding="utf-8")
    output = tmp_path / "table"

    first = paper_table(output, eval_data)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("training ") == 8 and first.stdout.count("evaluating ") == 8

    table = json.loads((output / "table.json").read_text(encoding="utf-8"))
    markdown = (output / "table.md").read_text(encoding="utf-8")
    assert markdown.startswith("Command: `python benchmarks/paper_table.py --base_gin=")
    assert re.search(r"^Git commit: \w+", markdown, re.MULTILINE)
    assert [(row["architecture"], row["loss"]) for row in table["rows"]] == [
        (a, loss) for a in ARCHITECTURES for loss in LOSSES]
    for row in table["rows"]:
        runs = []
        for seed in SEEDS:
            folder = output / "evals" / row["architecture"] / row["loss"] / f"seed{seed}"
            runs.append(json.loads((folder / "metrics.json").read_text(encoding="utf-8")))
            assert runs[-1]["step"] == 2
        line = next(line for line in markdown.splitlines()
                    if line.startswith(f"| {row['architecture']} | {row['loss']} |"))
        for name in METRICS:
            values = [run[name] for run in runs]
            cell = row["metrics"][name]
            np.testing.assert_allclose(cell["mean"], np.mean(values), rtol=0, atol=1e-12)
            np.testing.assert_allclose(cell["std"], np.std(values, ddof=1), rtol=0, atol=1e-12)
            assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in line
            baseline = row["loss"] == LOSSES[0]
            assert (cell["p_value"] is None) == baseline
            if not baseline:
                assert 0.0 <= cell["p_value"] <= 1.0
        assert ("(baseline)" in line) == (row["loss"] == LOSSES[0])

    # The same command again: every run and evaluation is reused, nothing is written.
    before = folder_times(output)
    again = paper_table(output, eval_data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training " not in again.stdout and "evaluating " not in again.stdout
    assert again.stdout.count("reused run ") == 8
    assert again.stdout.count("reused evaluation ") == 8
    assert folder_times(output) == before
    assert json.loads((output / "table.json").read_text(encoding="utf-8"))["rows"] == \
        table["rows"]

    # A run interrupted after step 1 (its step-2 checkpoint lost) resumes, and only it is
    # trained and evaluated again.
    shutil.rmtree(output / "runs" / "sde" / LOSSES[1] / "seed1" / "checkpoints" / "2")
    resumed = paper_table(output, eval_data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("training ") == 1
    assert f"training sde/{LOSSES[1]}/seed1 (resuming from step 1) to step 2" in resumed.stdout
    assert resumed.stdout.count("evaluating ") == 1
    assert f"evaluating sde/{LOSSES[1]}/seed1" in resumed.stdout


@pytest.mark.parametrize("flags, message", [
    (["--architectures=ade,tower"],
     "--architectures: 'tower' has no gin/architectures/tower.gin; expected one of ade, "
     "ade_spl, sde"),
    (["--losses=in_batch_softmax,samtone"], "--losses: 'samtone' has no gin/losses/samtone.gin"),
    (["--gin.MODEL_DIR='/tmp/x'"], "--gin.MODEL_DIR='/tmp/x': each cell sets its own MODEL_DIR"),
    (["--gin.train.seed=3"], "--gin.train.seed=3: each cell sets its own train.seed"),
], ids=["architecture", "loss", "model_dir", "seed"])
def test_bad_flags_are_refused_naming_the_flag(tmp_path, flags, message):
    result = run_argv([sys.executable, SCRIPT, f"--eval_data={tmp_path}",
                       f"--output={tmp_path / 'out'}", *flags])
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()
