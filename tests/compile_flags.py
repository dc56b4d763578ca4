"""XLA flags every test process runs with: CPU code generated with LLVM's cheap passes only.
The tests compile hundreds of tiny steps and run each a few times, so compiling faster
(about 30% off a tiny training run) matters more than running fast; HLO optimisation is
unchanged. Benchmarks never use these flags. No imports: conftest sets them before jax loads."""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_devices(count: int) -> str:
    """XLA_FLAGS for a test subprocess with `count` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={count} {FAST_COMPILE}"
