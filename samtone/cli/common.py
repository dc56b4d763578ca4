"""What every samtone command shares: one-line user errors (exit 2), quiet logs, absolute paths.

    def main(argv): ...
    if __name__ == "__main__":
        common.run(main)

`run` parses the absl flags, silences library chatter (orbax's per-save INFO, JAX's probe for
a TPU backend), and turns a `samtone.errors.UserError`, a bad flag or Gin's own configuration
errors into `error: <message>` on stderr with exit status 2. `--traceback` (or
SAMTONE_TRACEBACK=1) shows the stack instead. Any other exception is a programming error and
keeps its traceback. Ctrl-C ends a command with one line and exit status 130 (commands write
their outputs atomically, so nothing half written is left); `--help` prints the command's
docstring and its own flags, exit 0. On a CPU backend every command first applies samtone's
CPU settings (`apply_cpu_tweaks`; SAMTONE_CPU_TWEAKS=0 opts out).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging as std_logging
import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from samtone import host_memory
from samtone import xla_flags
from samtone.errors import UserError
from samtone.paths import absolute_path, absolute_paths  # noqa: F401  (the commands' helpers)

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report Ctrl-C
TRACEBACK_VARIABLE = "SAMTONE_TRACEBACK"
# SAMTONE_CPU_TWEAKS=0 turns off the process-wide CPU settings (`apply_cpu_tweaks`).
CPU_TWEAKS_VARIABLE = "SAMTONE_CPU_TWEAKS"
FLAGS = flags.FLAGS


class _LibraryNoise(std_logging.Filter):
    """Drops orbax's INFO lines and JAX's 'Unable to initialize backend' probe; keeps warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        if "/orbax/" in record.pathname:
            return False
        return not record.getMessage().startswith("Unable to initialize backend")


def quiet_library_logs() -> None:
    """Installs the filter on absl's handler and on the root logger's handlers."""
    noise = _LibraryNoise()
    logging.get_absl_handler().addFilter(noise)
    for handler in std_logging.getLogger().handlers:
        handler.addFilter(noise)


def _wants_traceback() -> bool:
    from_flag = "traceback" in FLAGS and FLAGS.is_parsed() and FLAGS.traceback
    return bool(from_flag) or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0")


def fail(message: str) -> None:
    """Prints `error: message` and exits with status 2."""
    # Gin appends "In call to configurable 'train' (<function ...>)": noise to a user.
    lines = [line for line in message.splitlines()
             if not line.strip().startswith("In call to configurable")]
    print("error: " + "\n".join(lines), file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT)


def _accelerator_plugins() -> list[str]:
    """JAX's installed accelerator plugins (CUDA, ROCm) and libtpu."""
    found = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return found


def runs_on_cpu(environ=os.environ, plugins: Sequence[str] | None = None) -> bool:
    """Will JAX's default backend be the CPU? JAX_PLATFORMS decides if set (its first
    entry); otherwise the CPU is the backend when no accelerator plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not (_accelerator_plugins() if plugins is None else plugins)


def apply_cpu_tweaks(environ=os.environ) -> bool:
    """On a CPU backend, before JAX starts it: samtone's XLA CPU flags (xla_flags) and host
    memory kept in the process (host_memory). Both are process-wide and help only the CPU:
    on GPU and TPU hosts a single malloc arena would serialise the input, orbax and
    tensorstore threads. SAMTONE_CPU_TWEAKS=0 opts out. Returns whether they were applied."""
    if environ.get(CPU_TWEAKS_VARIABLE, "1").strip().lower() in ("0", "false", "no"):
        return False
    if not runs_on_cpu(environ):
        return False
    xla_flags.add_cpu_flags(environ)
    host_memory.keep_freed_memory()
    return True


def _parse_flags(argv: Sequence[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as error:
        fail(f"{error}\n(pass --help to list the flags)")
        raise  # unreachable: fail exits


def command_name(module: str) -> str:
    """'samtone.cli.train' -> 'samtone-train'."""
    return "samtone-" + module.rsplit(".", 1)[-1]


def help_text(module: str) -> str:
    """The command's docstring, then its own flags and the shared ones, with their help."""
    docstring = (sys.modules[module].__doc__ or "").strip()
    own = FLAGS.get_flags_for_module(module)
    shared = [FLAGS[name] for name in ("traceback",) if name in FLAGS]
    lines = [docstring, "", "flags:"]
    for flag in sorted(own, key=lambda f: f.name) + shared:
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  --{flag.name}: {flag.help}{default}")
    lines.append("\n(--helpfull also lists the flags of the libraries)")
    return "\n".join(lines)


def _help_requested(argv: Sequence[str]) -> bool:
    return any(arg in ("--help", "-h", "-?", "--helpshort") for arg in argv[1:])


def run(main: Callable[[Sequence[str]], None], argv: Sequence[str] | None = None) -> None:
    """Runs `main` as a command: absl flags, quiet logs, user errors as messages (exit 2),
    Ctrl-C as one line (exit 130), `--help` listing the command's own flags (exit 0)."""
    if "traceback" not in FLAGS:
        flags.DEFINE_bool("traceback", False, "Show the full stack of a user error (also "
                          f"{TRACEBACK_VARIABLE}=1).")
    argv = list(sys.argv if argv is None else argv)
    apply_cpu_tweaks()  # before JAX starts a backend
    name = command_name(main.__module__)
    if _help_requested(argv):
        print(help_text(main.__module__), flush=True)
        sys.exit(0)

    def guarded(arguments: Sequence[str]) -> None:
        quiet_library_logs()
        if len(arguments) > 1:
            fail(f"unexpected arguments {list(arguments[1:])}; every input is a --flag "
                 "(--help lists them)")
        try:
            main(arguments)
        except UserError as error:
            if _wants_traceback():
                raise
            fail(str(error))
        except KeyboardInterrupt:
            if _wants_traceback():
                raise
            print(f"{name}: interrupted (Ctrl-C); nothing was left half written",
                  file=sys.stderr, flush=True)
            sys.exit(INTERRUPTED_EXIT)

    app.run(guarded, argv=argv, flags_parser=_parse_flags)
