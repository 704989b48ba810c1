"""Errors that carry a message for a person and the process exit code they map to.

Importable without torch, so that the command line starts fast.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2


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
