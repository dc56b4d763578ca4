"""`samtone-plan`: will a configured run fit N devices? Memory per device and FLOPs per step.

    samtone-plan --gin_file=configs/paper_xxl_ade_spl_samtone.gin --devices=256 \
        --device_memory_gib=32 [--gin.NAME=VALUE ...] [--json]

Compiles the configured train step ahead of time for N fake CPU devices (abstract shapes,
nothing allocated) and prints, per device, the bytes of the parameters, the optimiser state,
the batch and the compiled step's temporaries, their total against the device memory, and
the FLOPs of one step (samtone.plan). Required macros the plan does not need (MODEL_DIR,
TRAIN_DATA, VOCABULARY, INIT_CHECKPOINT) may be left out.

Exit status: 0 when the plan was made (and fits --device_memory_gib, if given); 1 when it does
not fit --device_memory_gib, after printing the table or the JSON object (its "fits" is false),
so a script can test the status; 2 for a user error (a bad config, flag, or a batch the
devices cannot split).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import flags

from samtone.cli import common
from samtone.cli import gin_parsing

FLAGS = flags.FLAGS
DEFAULT_DEVICES = 8
DOES_NOT_FIT_EXIT = 1  # the plan was made, and it does not fit --device_memory_gib
# Macros a run requires that shape nothing the plan measures.
_PLACEHOLDERS = {"MODEL_DIR": "'/tmp/samtone-plan'", "TRAIN_DATA": "'unused.jsonl'",
                 "VOCABULARY": "'unused.model'", "INIT_CHECKPOINT": "None"}


def define_flags() -> None:
    gin_parsing.define_gin_flags()
    flags.DEFINE_integer("devices", DEFAULT_DEVICES, "Devices to plan for (fake CPU devices).",
                         lower_bound=1)
    flags.DEFINE_float("device_memory_gib", None, "Memory of one device in GiB (16: v5e, 32: "
                       "v4, 80: H100); the plan says whether the step fits, and exits with "
                       "status 1 (after printing the plan) when it does not.", lower_bound=0)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def _fake_devices(argv: Sequence[str]) -> None:
    """Makes jax see --devices CPU devices; must run before jax is imported."""
    count = DEFAULT_DEVICES
    for arg in argv:
        if arg.startswith("--devices="):
            try:
                count = int(arg.split("=", 1)[1])
            except ValueError:
                return  # absl reports the bad value
    os.environ["JAX_PLATFORMS"] = "cpu"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def _gib(value: int) -> str:
    from samtone import plan  # pylint: disable=import-outside-toplevel  (main imported it)
    return f"{value / plan.GIB:9.3f} GiB"


def main(argv: Sequence[str]) -> None:
    del argv
    # pylint: disable=import-outside-toplevel  (jax after _fake_devices set the device count)
    import gin

    from samtone import partitioning
    from samtone import plan
    from samtone import train_step
    from samtone.cli import gin_registry  # noqa: F401  (registers the Gin names)

    placeholders = [f"{name} = {value}" for name, value in _PLACEHOLDERS.items()]
    gin_parsing.parse(FLAGS.gin_file, [*placeholders, *FLAGS.gin_bindings],
                      FLAGS.gin_search_paths)
    setting = gin_parsing.setting
    model = gin.get_configurable("dual_encoder")()
    mesh = setting("train.mesh", None) or gin.get_configurable("make_mesh")()
    rules = setting("train.logical_axis_rules", "data")
    rules = partitioning.logical_axis_rules(rules) if isinstance(rules, str) else rules
    loss_fn = train_step.make_loss_fn(setting("train.loss"), setting("train.loss_inputs", None))
    batch = plan.example_batch(setting("train.global_batch_size"),
                               setting("DataConfig.query_length", 64),
                               setting("DataConfig.passage_length", 256),
                               setting("make_batch_iterator.num_negatives", 0))
    optimizer = gin.get_configurable("make_optimizer")(
        total_steps=setting("train.num_train_steps"),
        logical_axes=train_step.param_logical_specs(model, batch, mesh, rules))
    memory = (None if FLAGS.device_memory_gib is None
              else int(FLAGS.device_memory_gib * plan.GIB))
    microbatches = setting("train.microbatches", 1)
    result = plan.plan_train_step(model, optimizer, loss_fn, mesh, rules, batch,
                                  microbatches=microbatches, device_memory_bytes=memory)
    if FLAGS.json:
        print(json.dumps(result.to_json()), flush=True)
    else:
        _print_table(result, model, batch, microbatches)
    if result.fits is False:
        sys.exit(DOES_NOT_FIT_EXIT)


def _print_table(result, model, batch: dict, microbatches: int) -> None:
    """The plan as the table of the module docstring."""
    # pylint: disable=import-outside-toplevel  (jax after _fake_devices set the device count)
    import jax
    import numpy as np

    config = model.config
    print(f"samtone-plan: {' '.join(FLAGS.gin_file)} on {result.devices} devices, mesh "
          f"{result.mesh} ({jax.devices()[0].platform} stand-ins)\n"
          f"  model {config.d_model}d x {config.num_layers} layers, {model.architecture}, "
          f"batch {batch['query_tokens'].shape[0]}, lengths {batch['query_tokens'].shape[1]}/"
          f"{batch['passage_tokens'].shape[1]}, remat {config.remat_policy}, scan "
          f"{config.scan_layers}, microbatches {microbatches}, "
          f"dtype {np.dtype(config.dtype).name}\n"
          f"per device:\n"
          f"  parameters     {_gib(result.params_bytes)}\n"
          f"  optimiser      {_gib(result.opt_state_bytes)}\n"
          f"  batch          {_gib(result.batch_bytes)}\n"
          f"  temporaries    {_gib(result.temp_bytes)}\n"
          f"  total          {_gib(result.total_bytes)}"
          + ("" if result.fits is None else
             f" of {FLAGS.device_memory_gib:g} GiB: {'fits' if result.fits else 'DOES NOT FIT'}")
          + f"\nper step: {result.flops:.3e} model FLOPs ({result.executed_flops:.3e} executed, "
          "with recomputation)", flush=True)


def console_entry() -> None:
    """`samtone-plan` and `python -m samtone.cli.plan`."""
    _fake_devices(sys.argv)
    define_flags()
    common.run(main, gin_parsing.rewrite_gin_args(sys.argv))


if __name__ == "__main__":
    console_entry()
