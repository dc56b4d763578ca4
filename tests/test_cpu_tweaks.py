"""samtone.cli.common.apply_cpu_tweaks: samtone's process-wide CPU settings, applied by every
command before JAX starts, only when the backend is the CPU, and not at all when opted out."""
import pytest

from samtone import host_memory
from samtone import xla_flags
from samtone.cli import common

YNN_FLAG = next(iter(xla_flags.CPU_FLAGS))


@pytest.mark.parametrize("environ, plugins, expected", [
    ({"JAX_PLATFORMS": "cpu"}, ["cuda12"], True),  # the variable decides when set
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], False),
    ({"JAX_PLATFORMS": "tpu"}, [], False),
    ({}, [], True),  # no accelerator plugin: JAX falls back to the CPU
    ({}, ["cuda12"], False),
    ({}, ["libtpu"], False),
])
def test_runs_on_cpu(environ, plugins, expected):
    assert common.runs_on_cpu(environ, plugins) is expected


@pytest.fixture
def kept(monkeypatch):
    """Records keep_freed_memory calls instead of changing this test process's malloc."""
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    return calls


def test_applied_on_the_cpu(kept):
    environ = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert common.apply_cpu_tweaks(environ)
    assert environ["XLA_FLAGS"].split()[0] == "--xla_force_host_platform_device_count=2"
    assert any(flag.startswith(YNN_FLAG + "=") for flag in environ["XLA_FLAGS"].split())
    assert kept == [1]


@pytest.mark.parametrize("environ", [
    {"JAX_PLATFORMS": "cuda"},  # another backend: its threads would share one malloc arena
    {"JAX_PLATFORMS": "cpu", common.CPU_TWEAKS_VARIABLE: "0"},  # opted out
])
def test_not_applied_off_the_cpu_or_when_opted_out(kept, environ):
    before = dict(environ)
    assert not common.apply_cpu_tweaks(environ)
    assert environ == before and kept == []
