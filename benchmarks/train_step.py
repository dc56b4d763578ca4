"""Throughput of the jitted train step: steps/s and examples/s, compile time apart.

    python benchmarks/train_step.py --size tiny --batch 64 --mesh 8,1 --rules data \
        --fake_devices 8

The step is the real one (samtone.train_step.make_train_step) with Adafactor and the
SamToNe loss (query same-tower, bidirectional) on a fixed random batch already on the
devices, so data loading is not measured. Timing starts after one warm-up step and ends
with a single block_until_ready. Prints numbers only; it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base", "large", "xl",
                                                           "xxl"])
    parser.add_argument("--arch", default="ade_spl", choices=["sde", "ade", "ade_spl"])
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--query_length", type=int, default=32)
    parser.add_argument("--passage_length", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=0, help="hard negatives per example")
    parser.add_argument("--mesh", default="-1,1", help="data,model mesh shape; -1 = the rest")
    parser.add_argument("--rules", default="data", help="data | data_model | fsdp | fsdp_model")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="activation dtype (parameters stay float32)")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--scan_layers", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--fake_devices", type=int, default=0,
                        help="CPU only: pretend to have this many devices (XLA host platform)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.fake_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fake_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from samtone import losses, optimizers, partitioning  # pylint: disable=import-outside-toplevel
    from samtone import train_step as train_step_lib  # pylint: disable=import-outside-toplevel
    from samtone.models import dual_encoder, t5  # pylint: disable=import-outside-toplevel

    print("command:", shlex.join([sys.executable, *sys.argv]))
    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
          f"jax {jax.__version__}")

    config = t5.t5_1_1_config(args.size, dtype=jnp.dtype(args.dtype), remat_policy=args.remat,
                              scan_layers=args.scan_layers, dropout_rate=args.dropout)
    model = dual_encoder.DualEncoder(config, args.arch, projection_dim=config.d_model)
    mesh = partitioning.make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    rules = partitioning.logical_axis_rules(args.rules)
    optimizer = optimizers.make_optimizer(total_steps=args.steps + 10)

    rng = np.random.default_rng(0)
    low = min(2, config.vocab_size - 1)

    def tokens(*shape):
        return rng.integers(low, config.vocab_size, size=shape).astype(np.int32)

    batch = {"query_tokens": tokens(args.batch, args.query_length),
             "passage_tokens": tokens(args.batch, args.passage_length),
             "query_ids": np.arange(args.batch, dtype=np.int32),
             "passage_ids": np.arange(args.batch, dtype=np.int32)}
    if args.negatives:
        batch["negative_tokens"] = tokens(args.batch, args.negatives, args.passage_length)

    started = time.perf_counter()
    state, state_shardings = train_step_lib.init_train_state(model, optimizer, batch, mesh, rules)
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - started
    batch_shardings = partitioning.batch_shardings(batch, mesh, rules)
    device_batch = jax.device_put(batch, batch_shardings)
    step = train_step_lib.make_train_step(
        model, optimizer, train_step_lib.make_loss_fn(
            losses.samtone_loss, ("negatives", "query_ids", "passage_ids", "negative_ids")),
        state_shardings,
        batch_shardings, mesh, rules)

    started = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    compile_seconds = time.perf_counter() - started

    state, metrics = compiled(state, device_batch)  # warm-up
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, device_batch)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - started

    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"model: T5.1.1-{args.size} {args.arch}, {num_params / 1e6:.1f}M params, "
          f"activations {args.dtype}, remat {args.remat}, scan_layers {args.scan_layers}")
    print(f"batch {args.batch} (query {args.query_length}, passage {args.passage_length}, "
          f"{args.negatives} negatives), mesh {dict(mesh.shape)}, rules {args.rules!r}")
    print(f"init {init_seconds:.2f}s, compile {compile_seconds:.2f}s")
    print(f"{args.steps} steps in {seconds:.3f}s: {args.steps / seconds:.2f} steps/s, "
          f"{args.steps * args.batch / seconds:.1f} examples/s, "
          f"{1000 * seconds / args.steps:.1f} ms/step (final loss {float(metrics['loss']):.4f})")


if __name__ == "__main__":
    main()
