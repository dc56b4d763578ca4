"""XLA flags samtone adds: added once, never over a flag the user set."""
import os
import subprocess
import sys

from samtone import xla_flags


def test_cpu_flags_are_added_unless_the_user_set_them():
    environ = {}
    flags = xla_flags.add_cpu_flags(environ)
    assert flags == "--xla_cpu_experimental_ynn_fusion_type=dot" == environ["XLA_FLAGS"]
    assert xla_flags.add_cpu_flags(environ) == flags  # idempotent
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                            "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"}
    assert xla_flags.add_cpu_flags(environ) == environ["XLA_FLAGS"]
    assert environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_the_installed_jaxlib_accepts_every_flag_samtone_adds(tmp_path):
    """XLA aborts at backend start on a flag it does not know (a renamed or removed experimental
    flag after a jaxlib upgrade), so start a fresh python with exactly samtone's flags and run
    a jitted computation on the CPU backend."""
    environ = {}
    flags = xla_flags.add_cpu_flags(environ)
    assert flags and all(name in flags for name in xla_flags.CPU_FLAGS)
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    probe = ("import jax, jax.numpy as jnp\n"
             "x = jnp.arange(12.0).reshape(3, 4)\n"
             "print('result', float(jax.jit(lambda a: (a @ a.T).sum(axis=0).sum())(x)))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=False, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "result 1134.0" in result.stdout, result.stdout + result.stderr[-3000:]
