"""samtone.plan and samtone-plan: FLOPs against 6 x parameters x tokens and against XLA's own
count, per-device bytes against the shardings, and the command's JSON."""
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from samtone import losses, optimizers, partitioning, plan
from samtone import train_step as train_step_lib
from samtone.models import dual_encoder, t5
from compile_flags import FAST_COMPILE

BATCH, QUERY_LENGTH, PASSAGE_LENGTH = 8, 8, 16
LOSS_FN = train_step_lib.make_loss_fn(losses.samtone_loss)


def _model(**overrides):
    config = t5.t5_1_1_config("tiny", **{"d_model": 128, "d_ff": 256, "num_heads": 4,
                                         "d_kv": 32, "dropout_rate": 0.0, **overrides})
    return dual_encoder.DualEncoder(config, "ade_spl", projection_dim=64)


def _matrix_params_per_tower(model):
    """Parameters of the layers' kernels of one tower (the N of 6 N T), counted from init."""
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), np.ones((1, 4), np.int32), np.ones((1, 4), np.int32)))
    tower = nn.unbox(shapes["params"])["query_encoder"]
    layers = {k: v for k, v in tower.items() if k.startswith("layers")}
    return sum(math.prod(leaf.shape) for path, leaf in
               jax.tree_util.tree_flatten_with_path(layers)[0] if "kernel" in str(path[-1]))


def test_flops_are_six_times_parameters_times_tokens_plus_attention():
    model = _model()
    tokens = BATCH * (QUERY_LENGTH + PASSAGE_LENGTH)
    six_n_t = 6 * _matrix_params_per_tower(model) * tokens
    flops = plan.train_step_flops(model, BATCH, QUERY_LENGTH, PASSAGE_LENGTH)
    # The rest is the attention scores (2 * 2 L h per token and layer) and the projection.
    config = model.config
    inner = config.num_heads * config.d_kv
    attention = (3 * 2 * 2 * inner * config.num_layers * BATCH
                 * (QUERY_LENGTH**2 + PASSAGE_LENGTH**2))
    projection = 3 * 2 * 2 * BATCH * config.d_model * model.projection_dim
    assert flops == pytest.approx(six_n_t + attention + projection, rel=1e-12)
    assert 1.0 < flops / six_n_t < 1.2
    # A scanned model is the same computation: the count does not depend on the layout.
    assert plan.train_step_flops(_model(scan_layers=True), BATCH, QUERY_LENGTH,
                                 PASSAGE_LENGTH) == flops


def test_flops_of_texts_count_each_text_at_its_own_length():
    """What MFU counts for bucketed and packed batches: the real tokens, no padding."""
    model = _model()
    queries, passages = np.array([3, 8, 5]), np.array([16, 2, 9, 12, 1, 7])  # 3 negatives too
    flops = plan.texts_train_flops(model, queries, passages)
    expected = (sum(plan.train_step_flops(model, 1, q, p) for q, p in zip(queries, passages[:3]))
                + sum(plan.train_step_flops(model, 1, 0, n)
                      - plan.train_step_flops(model, 1, 0, 0) / 2
                      for n in passages[3:]))
    assert flops == pytest.approx(expected, rel=1e-12)
    assert plan.train_step_flops(model, BATCH, QUERY_LENGTH, PASSAGE_LENGTH, 1) == (
        plan.texts_train_flops(model, [QUERY_LENGTH] * BATCH, [PASSAGE_LENGTH] * 2 * BATCH))


def _plan(model, mesh_shape, rules_name, **kwargs):
    devices = jax.devices()[:math.prod(mesh_shape)]
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    batch = plan.example_batch(BATCH, QUERY_LENGTH, PASSAGE_LENGTH)
    rules = partitioning.logical_axis_rules(rules_name)
    optimizer = optimizers.make_optimizer(
        total_steps=10,
        logical_axes=train_step_lib.param_logical_specs(model, batch, mesh, rules))
    return plan.plan_train_step(model, optimizer, LOSS_FN, mesh, rules, batch, **kwargs)


@pytest.mark.slow
def test_plan_counts_each_devices_bytes_and_agrees_with_xla_flops():
    model = _model()
    single = _plan(model, (1, 1), "data", device_memory_bytes=1 << 30)
    params = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.PRNGKey(0), np.ones((1, 4), np.int32), np.ones((1, 4), np.int32))))
    assert single.params_bytes == sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(params))
    assert single.fits and single.total_bytes == (single.params_bytes + single.opt_state_bytes
                                                  + single.batch_bytes + single.temp_bytes)
    # Fully sharded over 8 devices: each holds about an eighth of the parameters.
    sharded = _plan(model, (8, 1), "fsdp")
    assert sharded.params_bytes < single.params_bytes / 4
    # XLA's count of the same (unrolled) step, mostly matmuls: within a quarter of ours.
    mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
    rules = partitioning.logical_axis_rules("data")
    batch = plan.example_batch(BATCH, QUERY_LENGTH, PASSAGE_LENGTH)
    optimizer = optimizers.make_optimizer(total_steps=10)
    abstract, shardings = train_step_lib.train_state_shardings(model, optimizer, batch, mesh, rules)
    step = train_step_lib.make_train_step(model, optimizer, LOSS_FN, shardings,
                                          partitioning.batch_shardings(batch, mesh, rules),
                                          mesh, rules)
    xla_flops = step.lower(abstract, batch).compile().cost_analysis()["flops"]
    assert single.flops == pytest.approx(xla_flops, rel=0.25)


@pytest.mark.slow
def test_remat_and_microbatches_count_their_recomputation():
    base = plan.train_step_flops(_model(), BATCH, QUERY_LENGTH, PASSAGE_LENGTH)
    remat = _plan(_model(remat_policy="full", scan_layers=True), (1, 1), "data", microbatches=2)
    assert remat.flops == pytest.approx(base)
    assert remat.executed_flops == pytest.approx(base * 5 / 3)


@pytest.mark.slow
def test_command_line_json(tmp_path):
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    result = subprocess.run(
        [sys.executable, "-m", "samtone.cli.plan", "--gin_file=configs/smoke.gin", "--devices=4",
         "--device_memory_gib=0.001", "--json", "--gin.BATCH_SIZE=8", "--gin.QUERY_LENGTH=8",
         "--gin.PASSAGE_LENGTH=16"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert result.returncode == 1, result.stderr[-3000:]  # 1: printed, and it does not fit
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"params_bytes", "opt_state_bytes", "temp_bytes", "total_bytes", "flops",
            "fits"} <= set(found)
    assert found["devices"] == 4 and found["fits"] is False
    assert found["total_bytes"] > found["params_bytes"] > 0
