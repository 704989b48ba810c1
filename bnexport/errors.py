"""Errors that carry a message for a person and the process exit code they map to."""

from __future__ import annotations

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
