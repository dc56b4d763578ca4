"""XLA flags samtone adds: added once, never over a flag the user set."""
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
