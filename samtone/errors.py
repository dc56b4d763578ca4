"""User errors: mistakes in what a user gave, reported by the commands as one-line messages.

A `UserError` names the file, line, flag, Gin binding or parameter at fault, what was expected
and what was found. The command-line layer (samtone.cli) prints it and exits with status 2;
any other exception is a programming error and keeps its traceback. Each concrete class also
derives from the built-in exception Python code expects (ValueError, FileNotFoundError), so
library callers can catch either.
"""


class UserError(Exception):
    """Bad input from the user: configuration, flags, data or checkpoints."""


class ConfigError(UserError, ValueError):
    """A Gin binding, macro or flag has a wrong name, type or value."""


class DataError(UserError, ValueError):
    """Bad input data; the message reads `file:line: field 'name' <problem>`."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        where = path if line is None else f"{path}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {problem}")
        self.path, self.line, self.field, self.problem = path, line, field, problem


class MissingFileError(UserError, FileNotFoundError):
    """A path the user named (data, checkpoint, vocabulary, run directory) does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is damaged, or does not fit the configured model."""


class OutputExistsError(UserError, FileExistsError):
    """An output the command would write already exists and must not be replaced silently."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a requested feature needs is not installed; says what to install."""


class ChangedConfigError(ConfigError):
    """The configuration differs from the run it would resume (a model or optimiser setting)."""
