"""`bnexport fold`: check every output path, load, fold and write (a checkpoint or an ONNX
file), verify the written file against the recorded reference, write the JSON report."""

from __future__ import annotations

from pathlib import Path

from bnexport.files import all_or_nothing
from bnexport.report import RunReport
from bnexport.runs.check import verify_output
from bnexport.runs.float16 import check_float16_request
from bnexport.runs.fold_checkpoint import fold_checkpoint
from bnexport.runs.fold_onnx import fold_onnx_file
from bnexport.runs.options import (
    Progress,
    RunOptions,
    check_outputs,
    companion_data,
    default_output,
    quiet,
)
from bnexport.runs.prepare import ONNX_REFERENCE, prepare
from bnexport.runs.saving import save_report


@all_or_nothing()
def run_fold(opts: RunOptions, progress: Progress = quiet) -> RunReport:
    """Fold, export, verify; write the ONNX file (and the JSON report / folded program).

    A run that does not complete (an error, SIGINT or SIGTERM) removes every file it wrote,
    the ONNX file included even if it was complete and only its verification was pending."""
    output = Path(opts.output or default_output(opts.model))
    inputs = [Path(opts.model)] + ([Path(opts.data)] if opts.data else [])
    inputs += [Path(opts.recalibrate)] if opts.recalibrate else []
    if companion_data(opts.model) is not None:
        inputs.append(companion_data(opts.model))
    data_file = output.with_name(output.name + ".data")
    check_outputs([output, data_file, opts.json_path, opts.save_folded], inputs)
    prep = prepare(opts, progress)
    check_float16_request(prep, opts)
    report = RunReport("fold", str(opts.model), str(output), warnings=list(prep.source.warnings))
    if prep.onnx_in:
        report.reference = ONNX_REFERENCE
        reference = fold_onnx_file(prep, opts, output, report, progress)
    else:
        reference = fold_checkpoint(prep, opts, output, report, progress)
    verify_output(reference, output, prep, opts, report, progress)
    if opts.json_path is not None:
        save_report(report, opts.json_path)
    return report
