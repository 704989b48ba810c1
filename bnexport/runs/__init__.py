"""The jobs behind the CLI commands, one module per command, each a short composition of the
stages below it:

    fold:        check outputs -> prepare -> (recalibrate) -> record reference -> fold -> export
                 -> (float16) -> write -> verify -> JSON report
    verify:      check outputs -> prepare -> record reference -> verify -> JSON report
    inspect:     check outputs -> prepare -> trace -> statistics (and drift) -> JSON report
    recalibrate: check outputs -> prepare -> trace -> recalibrate -> write -> JSON report

The shared core: `options` (flags and paths), `prepare` (model, data, batches), `reference`
(outputs recorded before anything changes), `check` (the verify stage), `float16` and
`recalibration` (stages composed into `fold`), `saving` (torch.export programs).
"""

from __future__ import annotations

from bnexport.runs.fold import run_fold
from bnexport.runs.inspect_model import run_inspect
from bnexport.runs.options import (
    RunOptions,
    companion_data,
    default_output,
    default_recalibrated,
)
from bnexport.runs.recalibrate_model import run_recalibrate
from bnexport.runs.verify_file import run_verify

__all__ = [
    "RunOptions",
    "companion_data",
    "default_output",
    "default_recalibrated",
    "run_fold",
    "run_inspect",
    "run_recalibrate",
    "run_verify",
]
