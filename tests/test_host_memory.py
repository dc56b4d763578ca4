"""keep_freed_memory: a jitted CPU computation's temporaries mostly stop page-faulting after a few
runs.

Each case runs in its own process: mallopt settings are process-wide and cannot be undone.
The page faults are the kernel's count (getrusage), independent of glibc and XLA.
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys

import pytest

# Repeated executions (argv[2]) of a function whose temporaries (several 16 MB matrices) XLA:CPU
# mallocs per execution; prints the minor page faults of each execution as JSON.
PROGRAM = """
import json, resource, sys
if sys.argv[1] == "keep":
    from samtone import host_memory
    assert host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory()  # once per process, then a no-op
import jax, jax.numpy as jnp
x = jnp.ones((2048, 2048), jnp.float32)
f = jax.jit(lambda x: jnp.dot(jnp.cos(jnp.dot(jnp.sin(jnp.dot(x, x)), x)), x).sum())
faults = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
TEMPORARY_PAGES = 2 * 2048 * 2048 * 4 // resource.getpagesize()  # two live 16 MB temporaries
EXECUTIONS = 24
SETTLED = slice(4, None)  # the executions after the heap has first grown to fit


def execution_page_faults(mode: str) -> list[int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode, str(EXECUTIONS)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as file:
            return "[always]" in file.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.slow
def test_repeated_executions_reuse_their_pages():
    kept = execution_page_faults("keep")[SETTLED]
    # Once the heap has grown to fit, the temporaries land on pages already mapped: most
    # executions fault nothing. The single arena still grows now and then, when the worker
    # threads' allocations interleave into a layout that does not fit (seen: one execution in
    # ten, one temporary's pages), so the bound is on the typical execution and on the total.
    assert statistics.median(kept) < TEMPORARY_PAGES // 100, kept
    assert sum(kept) < len(kept) * TEMPORARY_PAGES // 4, kept
    default = execution_page_faults("default")[SETTLED]
    # What it fixes, where the kernel maps base pages: glibc maps each large temporary anew.
    # (Under transparent huge pages "always" the default faults in 2 MiB pages, far fewer.)
    if not huge_pages_always():
        assert min(default) > TEMPORARY_PAGES // 2, default
