"""T5 attention, forward and backward: samtone's einsum form against jax.nn.dot_product_attention.

    python benchmarks/attention.py --batch=32 --length=128 --heads=6 --head_dim=64

Both compute softmax(q k^T + T5's position bias, masked) v with unscaled logits, as
samtone.models.t5.SelfAttention does; on GPU with bfloat16 the cuDNN implementation is timed
too. The einsum form stays in the model unless the fused call is faster on a platform: the
figures decide. Timing: the best of --repeats calls of the jitted gradient, after compilation.
Prints numbers and the command; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from samtone import xla_flags  # pylint: disable=import-outside-toplevel
    xla_flags.add_cpu_flags()  # as samtone-train runs

    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    print("command:", shlex.join([os.path.basename(sys.executable), *sys.argv]))
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, args.length, args.heads, args.head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(1, args.heads, args.length, args.length)), jnp.float32)
    mask = jnp.asarray(rng.random((args.batch, 1, 1, args.length)) > 0.1)

    def einsum_attention(q, k, v, bias):  # samtone.models.t5.SelfAttention
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

    def fused(implementation):
        def attention(q, k, v, bias):
            return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(dtype), mask=mask,
                                                scale=1.0, implementation=implementation)
        return attention

    candidates = {"einsum (samtone)": einsum_attention,
                  "dot_product_attention (xla)": fused("xla")}
    if device.platform == "gpu" and args.dtype == "bfloat16":
        candidates["dot_product_attention (cudnn)"] = fused("cudnn")
    reference = np.asarray(einsum_attention(q, k, v, bias), np.float32)
    for name, attention in candidates.items():
        gradient = jax.jit(jax.grad(lambda *a, f=attention: jnp.sum(
            jnp.square(f(*a).astype(jnp.float32))), argnums=(0, 1, 2, 3)))
        try:
            jax.block_until_ready(gradient(q, k, v, bias))
        except Exception as error:  # pylint: disable=broad-except
            print(f"{name:30s} unavailable: {str(error).splitlines()[0]}")
            continue
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            jax.block_until_ready(gradient(q, k, v, bias))
            best = min(best, time.perf_counter() - started)
        difference = np.abs(np.asarray(attention(q, k, v, bias), np.float32) - reference).max()
        print(f"{name:30s} {best * 1000:8.2f} ms forward+backward (max |diff| {difference:.1e})")


if __name__ == "__main__":
    main()
