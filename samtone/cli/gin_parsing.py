"""Reading Gin configs for the commands: search paths, `--gin.NAME=VALUE`, checks, settings.

Config files are looked up on the search path: the current folder, any `--gin_search_paths`,
then the folder holding samtone's gin/ and configs/ (the repository root for a source checkout
or an editable install, `<prefix>/share/samtone` otherwise). Bindings given on the command
line are checked before they apply: a macro that no file defines (`--gin.TRAIN_DAT=...`) is an
error naming the nearest known macros, never a silently unused setting. Gin's own errors
(unknown configurable or parameter, syntax, a missing `%gin.REQUIRED`) become ConfigErrors.
"""
from __future__ import annotations

import difflib
import os
import pathlib
import re
import site
import sys
import sysconfig
from typing import Any, Sequence

import gin

from samtone.errors import ConfigError

_BINDING = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*=(.*)$", re.DOTALL)


def resources_dir() -> pathlib.Path | None:
    """The folder holding gin/ and configs/: repo root (source, editable) or installed data."""
    candidates = [pathlib.Path(__file__).resolve().parents[2]]
    for prefix in (sysconfig.get_path("data"), sys.prefix, site.getuserbase()):
        candidates.append(pathlib.Path(prefix) / "share" / "samtone")
    for candidate in candidates:
        if (candidate / "gin").is_dir() and (candidate / "configs").is_dir():
            return candidate
    return None


def search_paths(extra: Sequence[str] = ()) -> list[str]:
    """Where config files are looked for, in order: cwd, `extra`, samtone's own folder."""
    paths = [os.getcwd(), *extra]
    resources = resources_dir()
    if resources is not None:
        paths.append(str(resources))
    return paths


def _use_search_paths_only() -> None:
    """Stops Gin from also reading config paths as Python packages.

    Gin's package reader takes "configs/x.gin" for a file of a package `configs`: it logs an
    error for every miss and crashes on a namespace package (any folder named configs/ on
    sys.path). samtone finds config files through the search paths alone.
    """
    from gin import resource_reader  # pylint: disable=import-outside-toplevel
    readers = gin.config._FILE_READERS  # pylint: disable=protected-access
    readers[:] = [entry for entry in readers
                  if entry[1] is not resource_reader.system_path_file_exists]


def defined_macros() -> set[str]:
    """Names of the macros the parsed config defines (`NAME = value`)."""
    config = gin.config._CONFIG  # pylint: disable=protected-access
    return {scope for scope, selector in config if selector == "gin.macro" and scope}


def check_bindings_name_macros(bindings: Sequence[str], known: set[str]) -> None:
    """A binding `NAME = value` (no dot: a macro) must name a macro the files define."""
    for binding in bindings:
        match = _BINDING.match(binding)
        if not match or "." in match.group(1) or "/" in match.group(1):
            continue
        name = match.group(1)
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(close)}?" if close
                    else f"the config defines {', '.join(sorted(known)) or 'no macros'}")
            raise ConfigError(f"--gin.{name}: no config file defines the macro {name}, so this "
                              f"binding would be ignored; {hint}")


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          extra_search_paths: Sequence[str] = (), finalize: bool = True) -> None:
    """Parses config files, checks the command-line bindings, then parses them.

    Raises:
      ConfigError: Gin's own error (file, line, binding), or a binding naming an unknown macro.
    """
    _use_search_paths_only()
    for path in search_paths(extra_search_paths):
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(gin_files, [], finalize_config=False)
        check_bindings_name_macros(bindings, defined_macros())
        gin.parse_config_files_and_bindings([], bindings, finalize_config=finalize)
    except ConfigError:
        raise
    except (ValueError, TypeError, IOError, SyntaxError) as error:
        raise ConfigError(f"Gin configuration: {error}") from error


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns t5x-style `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`."""
    rewritten = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            rewritten.append(f"--gin_bindings={name} = {value}")
        else:
            rewritten.append(arg)
    return rewritten


_UNSET = object()


def setting(name: str, default: Any = _UNSET) -> Any:
    """A parameter of the parsed config, `%MACRO` and `@fn()` references evaluated.

    `@fn` (no call) gives the configured function. Without `default`, an unbound parameter
    is a ConfigError naming it.
    """
    try:
        value = gin.query_parameter(name)
    except ValueError as error:
        if default is not _UNSET:
            return default
        raise ConfigError(f"the Gin config binds no {name}") from error
    while isinstance(value, gin.config.ConfigurableReference):
        if not value.evaluate:
            return value.scoped_configurable_fn
        value = value.scoped_configurable_fn()
    return value


def binding_source(name: str) -> str:
    """`name`, followed by the macro it is bound to if any: 'train.num_train_steps (TRAIN_STEPS)'."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return name
    if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        return f"{value.scoped_selector.split('/')[0]} ({name})"
    return name
