"""Peak memory of the plain train step against cached-gradient microbatches, same global batch.

    python benchmarks/grad_cache_memory.py [--batch 512] [--microbatches 8] [--size tiny]

Each setting runs in a fresh process (one CPU device): build the smoke config's model (tiny
T5.1.1 ADE-SPL, 64-d, query 32 / passage 128 tokens), compile the step, run two steps, and
report XLA's compiled memory analysis (temporaries) and the process's peak RSS (ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def measure(size: str, batch: int, microbatches: int) -> dict:
    # pylint: disable=import-outside-toplevel  (jax in the child process only)
    import jax
    import numpy as np

    from samtone import losses, optimizers, partitioning, plan, train_step
    from samtone.models import dual_encoder, t5

    model = dual_encoder.DualEncoder(t5.t5_1_1_config(size, vocab_size=1000, dropout_rate=0.0),
                                     "ade_spl", projection_dim=64)
    mesh = partitioning.make_mesh((1, 1), devices=jax.devices()[:1])
    rules = partitioning.logical_axis_rules("data")
    optimizer = optimizers.make_optimizer(total_steps=100)
    loss_fn = train_step.make_loss_fn(losses.samtone_loss)
    rng = np.random.default_rng(0)
    batch_arrays = {"query_tokens": rng.integers(2, 1000, (batch, 32)).astype(np.int32),
                    "passage_tokens": rng.integers(2, 1000, (batch, 128)).astype(np.int32),
                    "query_ids": np.arange(batch, dtype=np.int32),
                    "passage_ids": np.arange(batch, dtype=np.int32)}
    state, shardings = train_step.init_train_state(model, optimizer, batch_arrays, mesh, rules)
    batch_shardings = partitioning.batch_shardings(batch_arrays, mesh, rules)
    step = train_step.make_train_step(model, optimizer, loss_fn, shardings, batch_shardings,
                                      mesh, rules, microbatches=microbatches)
    abstract = plan.example_batch(batch, 32, 128)
    compiled = step.lower(state, {k: abstract[k] for k in batch_arrays}).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    for _ in range(2):
        state, metrics = step(state, jax.device_put(batch_arrays, batch_shardings))
    loss = float(metrics["loss"])
    return {"microbatches": microbatches, "batch": batch, "temp_bytes": int(temp),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.size, args.batch, args.child)))
        return
    print("command:", " ".join(["python", *sys.argv]), flush=True)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    results = []
    for microbatches in (1, args.microbatches):
        out = subprocess.run([sys.executable, __file__, f"--batch={args.batch}",
                              f"--size={args.size}", f"--child={microbatches}"],
                             capture_output=True, text=True, check=True, env=env)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"microbatches {microbatches}: compiled temporaries "
              f"{result['temp_bytes'] / 2**20:.0f} MiB, peak RSS "
              f"{result['peak_rss_bytes'] / 2**20:.0f} MiB, loss {result['loss']:.4f}",
              flush=True)
    plain, cached = results
    print(f"ratio: temporaries {cached['temp_bytes'] / plain['temp_bytes']:.2f}x, peak RSS "
          f"{cached['peak_rss_bytes'] / plain['peak_rss_bytes']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
