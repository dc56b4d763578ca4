"""Mesh construction, rule tables, parameter / batch shardings, and an AOT compile at base size.

The golden file tests/golden/partition_specs_tiny_ade_spl.json holds every parameter's mesh
PartitionSpec for the tiny ADE-SPL model under each rule table (MaxText's sharding_compare
idea): a change to a logical axis name or a rule shows up as a diff. After an intended
change, regenerate it with SAMTONE_UPDATE_GOLDEN=1 and review the diff.
"""
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from samtone import losses, optimizers, partitioning
from samtone import train_step as train_step_lib
from samtone.models import dual_encoder, t5

GOLDEN = pathlib.Path(__file__).parent / "golden" / "partition_specs_tiny_ade_spl.json"
RULE_NAMES = ("data", "data_model", "fsdp", "fsdp_model")


def tiny_model(**overrides):
    return dual_encoder.DualEncoder(t5.t5_1_1_config("tiny", **overrides), "ade_spl",
                                    projection_dim=16)


def example_batch(batch_size=16, query_length=8, passage_length=16, num_negatives=1):
    return {
        "query_tokens": jax.ShapeDtypeStruct((batch_size, query_length), jnp.int32),
        "passage_tokens": jax.ShapeDtypeStruct((batch_size, passage_length), jnp.int32),
        "negative_tokens": jax.ShapeDtypeStruct((batch_size, num_negatives, passage_length),
                                                jnp.int32),
        "query_ids": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        "passage_ids": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }


def param_shardings(model, mesh, rules):
    tokens = jnp.zeros((2, 8), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens)["params"])
    return partitioning.tree_shardings(boxed, mesh, rules)


def golden_json(found):
    """One line per parameter, so a changed spec is a one-line diff."""
    tables = [f" {json.dumps(name)}: {{\n" + ",\n".join(
        f"  {json.dumps(path)}: {json.dumps(spec)}" for path, spec in sorted(specs.items()))
        + "\n }" for name, specs in found.items()]
    return "{\n" + ",\n".join(tables) + "\n}\n"


def flat_specs(shardings):
    """{'query_encoder/layers_0/mlp/wi_0/kernel': [None, 'model'], ...} (one entry per dim)."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {"/".join(k.key for k in path): list(sharding.spec) for path, sharding in flat}


# ---------------------------------------------------------------------------------------------
# Mesh.


@pytest.mark.parametrize("mesh_shape, expected", [((-1, 1), (8, 1)), ((2, -1), (2, 4)),
                                                  ((4, 2), (4, 2))])
def test_make_mesh_resolves_the_shape_over_all_devices(mesh_shape, expected):
    mesh = partitioning.make_mesh(mesh_shape)
    assert mesh.axis_names == ("data", "model")
    assert tuple(mesh.devices.shape) == expected
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_a_subset_of_devices():
    mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
    assert mesh.devices.shape == (1, 1) and mesh.devices.flat[0] == jax.devices()[0]


@pytest.mark.parametrize("mesh_shape, axis_names, message", [
    ((3, 1), ("data", "model"), "needs 3 devices, found 8"),
    ((3, -1), ("data", "model"), "do not split into groups of 3"),
    ((-1, -1), ("data", "model"), "at most one -1"),
    ((8,), ("data", "model"), "has 1 axes but"),
])
def test_make_mesh_errors_name_the_binding(mesh_shape, axis_names, message):
    with pytest.raises(ValueError, match=message) as error:
        partitioning.make_mesh(mesh_shape, axis_names)
    assert "make_mesh." in str(error.value)


# ---------------------------------------------------------------------------------------------
# Rule tables.


def test_rule_tables_by_name():
    assert partitioning.logical_axis_rules("data") is partitioning.DATA_PARALLEL_RULES
    assert partitioning.logical_axis_rules("data_model") is partitioning.TENSOR_PARALLEL_RULES
    assert partitioning.logical_axis_rules("fsdp") is partitioning.FSDP_RULES
    tensor = dict(partitioning.TENSOR_PARALLEL_RULES)
    # t5x's standard_logical_axis_rules.
    assert tensor["batch"] == "data" and tensor["embed"] is None
    assert all(tensor[name] == "model" for name in ("mlp", "heads", "joined_kv", "vocab"))
    assert dict(partitioning.FSDP_RULES)["embed"] == "data"
    with pytest.raises(ValueError, match="'data_model'"):
        partitioning.logical_axis_rules("tensor")


@pytest.mark.parametrize("rules_name, mesh_shape, expected", [
    ("data", (8, 1), [None, None]),
    ("data_model", (4, 2), [None, "model"]),
    ("fsdp", (8, 1), ["data", None]),
    ("fsdp_model", (2, 4), ["data", "model"]),
])
def test_wi_0_kernel_sharding_follows_the_rules(rules_name, mesh_shape, expected):
    mesh = partitioning.make_mesh(mesh_shape)
    shardings = param_shardings(tiny_model(), mesh, partitioning.logical_axis_rules(rules_name))
    kernel = shardings["query_encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # [embed, mlp]
    assert list(kernel.spec) == expected and kernel.mesh is mesh


def test_partition_specs_match_the_golden_file():
    mesh = partitioning.make_mesh((2, 4))
    found = {name: flat_specs(param_shardings(tiny_model(), mesh,
                                              partitioning.logical_axis_rules(name)))
             for name in RULE_NAMES}
    if os.environ.get("SAMTONE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(golden_json(found))
    golden = json.loads(GOLDEN.read_text())
    for name in RULE_NAMES:
        changed = {k: (golden[name].get(k), v) for k, v in found[name].items()
                   if golden[name].get(k) != v}
        missing = sorted(set(golden[name]) - set(found[name]))
        assert not changed and not missing, (
            f"rules {name!r}: (golden, now) {changed}; missing {missing}. If intended, rerun with "
            "SAMTONE_UPDATE_GOLDEN=1 and review the diff")


def test_golden_file_spot_checks():
    """A few entries of the golden file written out by hand from the rule tables."""
    golden = json.loads(GOLDEN.read_text())
    tensor, fsdp = golden["data_model"], golden["fsdp_model"]
    assert tensor["query_encoder/token_embedder/embedding"] == ["model", None]  # vocab, embed
    assert tensor["query_encoder/relpos_bias/rel_embedding"] == ["model", None]  # heads, buckets
    assert tensor["passage_encoder/layers_1/attention/out/kernel"] == ["model", None]
    assert tensor["passage_encoder/layers_1/pre_mlp_layer_norm/scale"] == [None]
    assert tensor["projection_layer/kernel"] == [None, None]
    assert fsdp["query_encoder/layers_0/attention/query/kernel"] == ["data", "model"]
    assert fsdp["query_encoder/token_embedder/embedding"] == ["model", "data"]
    assert fsdp["query_encoder/encoder_norm/scale"] == ["data"]
    assert all(spec == [None] * len(spec) for spec in golden["data"].values())


def test_scanned_layers_axis_is_replicated():
    mesh = partitioning.make_mesh((2, 4))
    shardings = param_shardings(tiny_model(scan_layers=True), mesh,
                                partitioning.logical_axis_rules("fsdp_model"))
    kernel = shardings["query_encoder"]["layers"]["mlp"]["wi_0"]["kernel"]  # [layers, embed, mlp]
    assert list(kernel.spec) == [None, "data", "model"]


def test_batch_shardings_split_the_leading_axis_over_data():
    mesh = partitioning.make_mesh((4, 2))
    shardings = partitioning.batch_shardings(example_batch(), mesh,
                                             partitioning.logical_axis_rules("fsdp_model"))
    assert shardings["query_tokens"].spec == P("data", None)
    assert shardings["negative_tokens"].spec == P("data", None, None)
    assert shardings["query_ids"].spec == P("data")
    single = partitioning.batch_shardings(jax.ShapeDtypeStruct((8, 3), jnp.int32), mesh,
                                          partitioning.DATA_PARALLEL_RULES)
    assert single.spec == P("data", None)


def test_unknown_logical_axis_and_unknown_mesh_axis_are_errors():
    mesh = partitioning.make_mesh((4, 2))
    with pytest.raises(ValueError, match=r"'hidden'.*\('hidden', None\)"):
        partitioning.logical_shardings({"w": P("embed", "hidden")}, mesh,
                                       partitioning.TENSOR_PARALLEL_RULES)
    with pytest.raises(ValueError, match="mesh axis 'tensor'"):
        partitioning.logical_shardings({"w": P("embed")}, mesh, (("embed", "tensor"),))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation of the real step at base size (MaxText's train_compile_test):
# abstract shapes only, so no parameter is ever allocated.


@pytest.mark.slow
def test_base_size_train_step_compiles_ahead_of_time_on_8_devices():
    config = t5.t5_1_1_config("base", scan_layers=True, remat_policy="full", dtype=jnp.bfloat16)
    model = dual_encoder.DualEncoder(config, "ade_spl", projection_dim=768)
    batch = example_batch(batch_size=32, query_length=32, passage_length=128, num_negatives=1)
    mesh = partitioning.make_mesh((4, 2))
    rules = partitioning.logical_axis_rules("data_model")
    optimizer = optimizers.make_optimizer(
        total_steps=1000,
        logical_axes=train_step_lib.param_logical_specs(model, batch, mesh, rules))
    started = time.monotonic()
    abstract_state, state_shardings = train_step_lib.train_state_shardings(
        model, optimizer, batch, mesh, rules)
    step = train_step_lib.make_train_step(
        model, optimizer, train_step_lib.make_loss_fn(
            losses.samtone_loss, ("negatives", "query_ids", "passage_ids", "negative_ids")),
        state_shardings,
        partitioning.batch_shardings(batch, mesh, rules), mesh, rules)
    compiled = step.lower(abstract_state, batch).compile()
    memory = compiled.memory_analysis()
    print(f"AOT compile of the base step: {time.monotonic() - started:.1f}s; per-device "
          f"arguments {memory.argument_size_in_bytes / 2**20:.0f} MiB")
    # ~2 x 110M float32 parameters (+ factored Adafactor state), mostly split over 'model'=2:
    # well under the replicated size.
    num_params = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    assert 200e6 < num_params < 250e6
    assert memory.argument_size_in_bytes < 0.7 * 4 * num_params
    # The state is donated: its buffers are reused for the new state.
    assert memory.alias_size_in_bytes > 0.9 * memory.argument_size_in_bytes
