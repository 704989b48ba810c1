"""Errors that carry a message for a person and the process exit code they map to.

Importable without torch, so that the command line starts fast.
"""

from __future__ import annotations

import re
import signal

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2
# 128 + the signal's number, as a shell reports a process ended by that signal
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: SIGINT (Ctrl-C)
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: SIGTERM


class BnexportError(Exception):
    """Base class: `str(error)` is a one-paragraph message naming the problem and the fix."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(BnexportError):
    """The model file, its arguments or its inputs cannot be used (exit code 2)."""


class InvalidModelError(BadInputError):
    """The model's own state makes a correct export impossible (NaN statistics, ...)."""


class TraceError(BadInputError):
    """The model could not be traced with the given example inputs."""


class ExportError(BnexportError):
    """torch.onnx could not export the model, or the result failed onnx.checker."""


class Interrupted(BaseException):
    """The run was stopped by SIGINT or SIGTERM before it completed (exit code 128 + the
    signal's number). A BaseException, like KeyboardInterrupt, so that no `except Exception`
    turns it into a failure of the model or of its export.

    `removed` names the files the run had moved into place and removed again on the way out.
    """

    def __init__(self, signum: int, removed: list[str] | None = None):
        super().__init__(signum)
        self.signum = int(signum)
        self.removed = list(removed or [])

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.removed:
            return (
                f"interrupted ({name}): the run stopped before it completed and removed "
                f"{', '.join(self.removed)}, which it had written but not yet verified and "
                "reported"
            )
        return f"interrupted ({name}): the run stopped before it completed; it left no file"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def summarize_exception(exc: BaseException | None, limit: int = 300) -> str:
    """`Type: first line of the message` (or `Type (no message)`), at most `limit` characters.

    The one place that turns an exception into text for a person.
    """
    if exc is None:
        return "unknown error"
    text = _ANSI.sub("", str(exc))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return f"{name} (no message)"
    first = lines[0]
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{name}: {first}"
