"""SIGINT and SIGTERM as an exception: for the duration of a run each raises `Interrupted`,
so that every `finally` on the way out runs (temporary files removed, an unverified output
removed) and the process ends with 128 + the signal's number.

The first signal raises; a later one is only recorded, so that it cannot cut the clean-up of
the first short. Inside a `held()` section (moving files into place, removing them) a signal is
recorded and raised when the section ends. A library may turn the exception into one of its
own (onnxruntime interrupted while importing reports `ImportError: initialization failed`);
`raise_if_interrupted()` at the points where it matters raises it again from the record.

Importable without torch; signal handlers can be installed from the main thread only.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from bnexport.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None  # the first signal of the run
_raised = False  # Interrupted was raised for it (or the run is complete: nothing more raises)
_held = 0  # depth of held() sections


def _handler(signum: int, frame) -> None:
    global _received, _raised
    if _received is None:
        _received = signum
    if not _raised and not _held:
        _raised = True
        raise Interrupted(_received)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted`; afterwards the previous
    handlers are back and the record is cleared."""
    global _received, _raised, _held
    _received, _raised, _held = None, False, 0
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received, _raised, _held = None, False, 0


def interrupted() -> int | None:
    """The signal received during the run, or None."""
    return _received


def raise_if_interrupted() -> None:
    """Raise `Interrupted` if a signal was received, even if its first raise was swallowed."""
    global _raised
    if _received is not None:
        _raised = True
        raise Interrupted(_received)


def completed() -> None:
    """The run has completed (its files are in place): a signal from now on raises nothing."""
    global _raised
    _raised = True


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A section a signal must not cut in half: a signal received inside it is raised when it
    ends (unless the block itself raised)."""
    global _held, _raised
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if _received is not None and not _raised and not _held:
        _raised = True
        raise Interrupted(_received)
