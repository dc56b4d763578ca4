"""XLA flags that speed up samtone's step, added to XLA_FLAGS before JAX starts a backend.

CPU: XLA's YNNPACK fusions (jaxlib 0.10) run reductions over leading axes slowly: the batch
and layer sum of the shared relative position bias's gradient, a [layers, batch, heads, L, L]
-> [heads, L, L] reduction, took 397 ms on 2 cores where XLA's own loop took 27 ms
(micro-benchmark). Keeping YNNPACK for dots, where it is fast, and leaving the rest to XLA
made the T5.1.1 train step faster (docs/benchmarks.md). The flag only concerns the CPU
backend; GPU and TPU ignore it.
"""
from __future__ import annotations

import os
from typing import MutableMapping

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "dot"}


def add_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> str:
    """Adds CPU_FLAGS to environ["XLA_FLAGS"], except flags the user already set; returns it.

    XLA reads XLA_FLAGS once, when JAX starts its first backend, so call this before any
    JAX computation (the commands do, first thing).
    """
    flags = environ.get("XLA_FLAGS", "")
    given = {flag.split("=", 1)[0] for flag in flags.split()}
    added = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in given]
    if added:
        environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return environ.get("XLA_FLAGS", "")
