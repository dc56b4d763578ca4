"""Tiny trained runs shared by the serving-side tests (inference, export, analysis)."""
import os
import subprocess
import sys

from samtone.data import files, smoke_path
from samtone.models import dual_encoder, t5
from compile_flags import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERY_LENGTH, PASSAGE_LENGTH = 16, 32


def run_argv(argv, *, cwd=REPO, timeout=300, fast_compile=True):
    """Runs `argv` on one CPU device, as a user's laptop has (the sharded paths have their own
    tests), without SAMTONE_TRACEBACK, so user errors show as users see them; returns the
    CompletedProcess (never raises on a failure status). `fast_compile=False` for a command
    that runs long enough (hundreds of steps) that compiling fast no longer pays."""
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE if fast_compile else "",
           "JAX_PLATFORMS": "cpu"}
    env.pop("SAMTONE_TRACEBACK", None)
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)


def run_command(module, *args):
    """`python -m samtone.cli.<module> ARGS` from the repository (see run_argv)."""
    return run_argv([sys.executable, "-m", f"samtone.cli.{module}", *args])


def train_tiny_run(model_dir, *gin_args, steps=2):
    """samtone-train with configs/smoke.gin (tiny ADE-SPL, 64-d, vocab 1000) for `steps`
    steps of 8 pairs, a checkpoint after each; returns model_dir."""
    # One CPU device: compiles twice as fast as 8.
    result = run_command(
        "train", "--gin_file=configs/smoke.gin", f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.EVAL_DATA=None", f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8",
        f"--gin.QUERY_LENGTH={QUERY_LENGTH}", f"--gin.PASSAGE_LENGTH={PASSAGE_LENGTH}",
        "--gin.CheckpointConfig.every_steps=1", "--gin.CheckpointConfig.keep=None", *gin_args)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def smoke_model(**config_overrides):
    """The DualEncoder configs/smoke.gin builds, written out independently of Gin."""
    config = t5.t5_1_1_config("tiny", vocab_size=1000, dropout_rate=0.0, **config_overrides)
    return dual_encoder.DualEncoder(config, architecture="ade_spl", projection_dim=64)


def smoke_texts(count=11):
    examples = files.read_examples(smoke_path("eval.jsonl"))[:count]
    return [e.query for e in examples], [e.passage for e in examples]


def train_in_process(model_dir, *, model, steps=6, **overrides):
    """samtone.train.train of `model` on the smoke data in this process: batch 16, lengths
    16/32, SamToNe at t = 0.05, a checkpoint every 2 steps (all kept), one device (it compiles
    fastest; the sharded paths have their own tests). `overrides` replace any argument; a
    dict given for a group (data, checkpoints, evaluation) replaces those fields of it."""
    # pylint: disable=import-outside-toplevel  (jax after conftest set the device count)
    import dataclasses
    import functools

    import jax

    from samtone import losses, partitioning
    from samtone import train as train_lib
    from samtone.train_config import CheckpointConfig, DataConfig, EvalConfig

    kwargs = dict(
        model_dir=str(model_dir), model=model,
        loss=functools.partial(losses.samtone_loss, temperature=0.05),
        data=DataConfig(train_data=smoke_path("train.jsonl"),
                        vocabulary=smoke_path("spm.model"), query_length=16, passage_length=32),
        checkpoints=CheckpointConfig(every_steps=2, keep=None), evaluation=EvalConfig(),
        global_batch_size=16, num_train_steps=steps, log_every=2,
        mesh=partitioning.make_mesh(devices=jax.devices()[:1]))
    for name, value in overrides.items():
        kwargs[name] = (dataclasses.replace(kwargs[name], **value) if isinstance(value, dict)
                        else value)
    return train_lib.train(**kwargs)
