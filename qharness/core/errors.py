"""The errors a user can cause. The CLI prints any `QHarnessError` as one line and exits 2; anything else is a
bug and keeps its traceback."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for an error message that wraps it."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit].rstrip(".") if text else type(exc).__name__


class QHarnessError(Exception):
    """Bad input or an unmet requirement: the message says what was wrong and what would be right."""


class UnknownName(QHarnessError, KeyError):
    """A name that no registry knows (KeyError too, so `except KeyError` callers keep working)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(QHarnessError, ValueError):
    """A config field with a value outside its valid set."""


class ModelLoadError(QHarnessError):
    """A model that cannot be found or read."""


class DataError(QHarnessError):
    """Task data that cannot be found, read or trusted."""


class BackendUnavailable(QHarnessError):
    """A quantization backend or device that cannot run here."""
