"""Error types that map to CLI exit codes (DESIGN §2)."""

from __future__ import annotations


class DsomError(Exception):
    """Bad input or bad configuration: the CLI prints one line and exits with status 2.

    The message should say what is wrong, where (file, line, key) and how to fix it.
    """


class DataError(DsomError):
    """A dataset file is malformed or inconsistent."""

    def __init__(self, message: str, path: object | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ConfigError(DsomError):
    """An unknown or invalid configuration key/value."""
