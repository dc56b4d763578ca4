"""Every test sees 8 fake CPU devices, so sharded paths run without an accelerator, and
compiles with the cheap flags of compile_flags.py."""
import os

from compile_flags import FAST_COMPILE

# Must happen before jax is imported anywhere.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
