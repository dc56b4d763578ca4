"""Reading Gin configs for the commands: search paths, `--gin.NAME=VALUE`, checks, settings.

Config files are looked up on the search path: the current folder, any `--gin_search_paths`,
then the folder holding samtone's gin/ and configs/ (the repository root for a source checkout
or an editable install, the installed package's samtone/_resources otherwise). Bindings given
on the command line are checked before they apply: a macro that no file defines
(`--gin.TRAIN_DAT=...`) is an error naming the nearest known macros, never a silently unused
setting. Gin's own errors
(unknown configurable or parameter, syntax, a missing `%gin.REQUIRED`) become ConfigErrors:
a syntax error names the file and line (`file.gin:2: unclosed '('`), an error in a command-line
binding names the flag (`--gin.MODEL_DIR=/tmp/x: ...`), and a bare word where Gin expects a
value says how to quote a string (`--gin.MODEL_DIR="'/tmp/x'"`).
"""
from __future__ import annotations

import contextlib
import difflib
import io
import os
import pathlib
import re
import tokenize
from typing import Any, Iterator, Sequence

import gin
from absl import flags

from samtone.errors import ConfigError

_BINDING = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*=(.*)$", re.DOTALL)


def define_gin_flags(default_file: str | None = None) -> None:
    """Defines --gin_file, --gin_bindings and --gin_search_paths for a command.

    Without `default_file`, --gin_file is required; with it, the flag's value stays None when
    not given and the command reads `FLAGS.gin_file or [default_file]`.
    """
    # The flags belong to the command that calls this (its --help lists them), not to us.
    flags.disclaim_key_flags()
    default = f"default {default_file}" if default_file else "required"
    flags.DEFINE_multi_string("gin_file", None, f"Gin config files of the run ({default}); "
                              "later files override earlier ones.",
                              required=default_file is None)
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files; "
                              "--gin.NAME=VALUE is the same as --gin_bindings='NAME = VALUE'.")
    flags.DEFINE_list("gin_search_paths", [], "Extra folders where Gin files and their "
                      "includes are looked up (the current folder and samtone's own are always "
                      "searched).")


_PACKAGE = pathlib.Path(__file__).resolve().parents[1]  # samtone/


def resources_dir() -> pathlib.Path | None:
    """The folder holding samtone's gin/ and configs/.

    The repository root for a source checkout or an editable install (gin/ and configs/ next
    to the samtone package), else the copies a wheel installs into the package
    (samtone/_resources, see setup.py); None if neither is there.
    """
    checkout, installed = _PACKAGE.parent, _PACKAGE / "_resources"
    # gin/models, not just gin/: site-packages has a gin/ of its own (gin-config).
    if (checkout / "gin" / "models").is_dir() and (checkout / "configs").is_dir():
        return checkout
    return installed if (installed / "configs").is_dir() else None


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
        _parse_files(gin_files)
        check_bindings_name_macros(bindings, defined_macros())
        for binding in bindings:  # one at a time, so that an error names its flag
            _parse_binding(binding)
        if finalize:
            gin.finalize()
    except ConfigError:
        raise
    except (ValueError, TypeError, IOError, SyntaxError) as error:
        # A missing macro's message goes on to print the whole config: not what is wrong.
        message = str(error).split(" in config string:")[0]
        raise ConfigError(f"Gin configuration: {message}") from error


def _parse_files(gin_files: Sequence[str]) -> None:
    """Parses the files (and their includes); a syntax error names the file and line."""
    with _recording_opened_files() as opened:
        try:
            for path in gin_files:
                gin.parse_config_file(path)
        except SyntaxError as error:
            raise ConfigError(_file_syntax_error(error)) from error
        except tokenize.TokenError as error:
            # Gin's tokenizer reached the end of a file inside a bracket or a string; it says
            # neither which file (includes!) nor where that bracket opened, so find it here.
            raise ConfigError(_file_token_error(opened, error)) from error


@contextlib.contextmanager
def _recording_opened_files() -> Iterator[list[str]]:
    """Lists each config file Gin opens, includes too, in the order opened."""
    readers = gin.config._FILE_READERS  # pylint: disable=protected-access
    original = list(readers)
    opened: list[str] = []

    def recording(open_file):
        def open_and_record(path, *args, **kwargs):
            opened.append(path)
            return open_file(path, *args, **kwargs)
        return open_and_record

    readers[:] = [(recording(open_file), exists) for open_file, exists in original]
    try:
        yield opened
    finally:
        readers[:] = original


def _unclosed(text: str) -> tuple[str, int] | None:
    """(what, line) of the outermost bracket or string `text` never closes; None if none."""
    brackets: list[tuple[str, int]] = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.OP and token.string in "([{":
                brackets.append((f"'{token.string}'", token.start[0]))
            elif token.type == tokenize.OP and token.string in ")]}" and brackets:
                brackets.pop()
    except tokenize.TokenError as error:
        if brackets:
            return brackets[0]
        return "string", error.args[1][0]  # 'EOF in multi-line string' gives where it began
    return None


def _read_text(path: str | None) -> str | None:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8") if path else None
    except (OSError, UnicodeDecodeError):
        return None


def _file_token_error(opened: Sequence[str], error: tokenize.TokenError) -> str:
    for path in reversed(opened):  # only the file being read when it failed leaves one open
        text = _read_text(path)
        found = _unclosed(text) if text is not None else None
        if found:
            what, line = found
            return f"{path}:{line}: unclosed {what}: nothing closes it before the end of the file"
    where = opened[-1] if opened else "a Gin file"
    return f"{where}: Gin syntax error: {error.args[0]}"


def _bare_word(binding: str) -> tuple[str, str] | None:
    """(name, value) of `NAME = value` when value is a bare word (no number, quotes, brackets,
    @, % or commas): when Gin cannot read one, it is a string missing its quotes."""
    match = _BINDING.match(binding.strip())
    if not match:
        return None
    value = match.group(2).strip()
    if not value or value[0] in "0123456789+-" or set("'\"()[]{}@%,") & set(value):
        return None
    return match.group(1), value


def _syntax_problem(error: SyntaxError) -> str:
    # Gin's messages may go on with a second line of parser internals ('<ast.Name ...>').
    return f"Gin syntax error: {error.msg.splitlines()[0].rstrip('. ')}"


def _file_syntax_error(error: SyntaxError) -> str:
    where = f"{error.filename}:{error.lineno}"
    text = _read_text(error.filename)
    found = _unclosed(text) if text is not None else None
    if found and found[1] <= (error.lineno or 0):  # the real mistake, before where Gin stopped
        return (f"{where}: {_syntax_problem(error)} (the {found[0]} opened on line {found[1]} is "
                "never closed)")
    bare = _bare_word(error.text or "")
    if bare:
        name, value = bare
        return (f"{where}: Gin cannot read the value {value} of {name}; a string needs quotes: "
                f"{name} = '{value}'")
    return f"{where}: {_syntax_problem(error)}"


def _binding_flag(binding: str) -> str:
    """How a binding reads on the command line: `--gin.NAME=VALUE`."""
    match = _BINDING.match(binding.strip())
    if not match:
        return f"--gin_bindings={binding!r}"
    return f"--gin.{match.group(1)}={match.group(2).strip()}"


def _parse_binding(binding: str) -> None:
    """Parses one `NAME = VALUE` binding; an error names its `--gin.NAME=VALUE` flag."""
    flag = _binding_flag(binding)
    try:
        gin.parse_config(binding)
    except tokenize.TokenError as error:
        found = _unclosed(binding)
        what = f"unclosed {found[0]}" if found else error.args[0]
        raise ConfigError(f"{flag}: {what} in the value; close it, or quote a string") from error
    except SyntaxError as error:
        bare = _bare_word(binding)
        if bare:
            name, value = bare
            raise ConfigError(f"{flag}: Gin cannot read the value {value}; a string needs inner "
                              f"quotes: --gin.{name}=\"'{value}'\"") from error
        raise ConfigError(f"{flag}: {_syntax_problem(error)}") from error
    except (ValueError, TypeError) as error:
        # Gin's message goes on to quote the binding ("In bindings string line 1"): the flag
        # says that better.
        raise ConfigError(f"{flag}: {str(error).splitlines()[0]}") from error


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
    """`name`, followed by the macro it is bound to if any:
    'train.num_train_steps (TRAIN_STEPS)'."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return name
    if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        return f"{value.scoped_selector.split('/')[0]} ({name})"
    return name
