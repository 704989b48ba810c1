"""Writing a torch.export program (--save-folded, a recalibrated program) and the JSON
report."""

from __future__ import annotations

from pathlib import Path

from bnexport.errors import BadInputError, summarize_exception
from bnexport.files import write_atomic


def save_program(program, path: Path, flag: str = "--save-folded") -> None:
    """Write a torch.export program atomically (`torch.export.load` reads it back)."""
    import torch

    try:
        write_atomic(path, lambda tmp: torch.export.save(program, tmp))
    except OSError as exc:
        raise BadInputError(
            f"Writing the folded program to '{path}' failed ({summarize_exception(exc)}); "
            f"nothing was written. Free some space or choose another {flag} path."
        ) from exc


def save_report(report, path: Path) -> None:
    """Write the JSON report of any command. A failure ends the run as bad input; the run's
    other files go with it (`files.all_or_nothing`)."""
    from bnexport.render import write_json

    try:
        write_json(report, path)
    except OSError as exc:
        raise BadInputError(
            f"Writing the report to '{path}' failed ({summarize_exception(exc)}); no file of "
            "this run was kept. Free some space or choose another --json path."
        ) from exc
