"""The recalibration stage of `fold --recalibrate CALIB.npz`: the traced program's BN
statistics replaced, in place, by those of their inputs over the calibration data, before the
reference is recorded and the program folded."""

from __future__ import annotations

from pathlib import Path

from bnexport.inputs import load_npz
from bnexport.report import RunReport
from bnexport.runs.options import Progress, RunOptions
from bnexport.runs.prepare import Prepared, data_chunks
from bnexport.stats.recalibrate import check_calibration_data, recalibrate_program


def recalibrate_before_fold(
    program, prep: Prepared, opts: RunOptions, report: RunReport, progress: Progress
):
    """Recalibrate `program` in place; returns the recalibrated model, which the export must
    now match."""
    calib = load_npz(Path(opts.recalibrate), prep.specs, flag="--recalibrate")
    check_calibration_data(calib, prep.specs)
    progress("recalibrating BatchNorm statistics")
    chunks, _ = data_chunks(prep, calib, None)
    done, left = recalibrate_program(program, chunks, str(opts.model))
    report.recalibrated = {
        "data": str(opts.recalibrate),
        "samples": calib.size,
        "batchnorm": [r.name for r in done],
        "left": left,
    }
    return program.module()
