"""`bnexport verify MODEL FILE`: an ONNX file bnexport may not have written, checked against
the model it came from; only the JSON report is written."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from bnexport.errors import BadInputError, summarize_exception
from bnexport.export import (
    count_ops,
    describe_onnx,
    ops_with_folds_undone,
    recorded_ops_before,
)
from bnexport.files import all_or_nothing
from bnexport.input_profile import onnx_profile, program_profile
from bnexport.inputs import example_inputs
from bnexport.report import OpCounts, RunReport
from bnexport.runs.check import verify_output
from bnexport.runs.labels import check_labels
from bnexport.runs.layers import folds_in_file, record_layer_values
from bnexport.runs.options import Progress, RunOptions, check_outputs, quiet
from bnexport.runs.prepare import ONNX_REFERENCE, Prepared, prepare, profile_batches
from bnexport.runs.reference import onnx_twin, record, record_float32_twin
from bnexport.runs.saving import save_report


@all_or_nothing()
def run_verify(opts: RunOptions, onnx_path: Path, progress: Progress = quiet) -> RunReport:
    """Verify an existing ONNX file against the original model; write only the JSON report."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BadInputError(f"The ONNX file '{onnx_path}' does not exist or is not a file.")
    check_outputs([opts.json_path], [Path(opts.model), onnx_path])
    try:
        info = describe_onnx(onnx_path)
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(
            f"'{onnx_path}' is not a readable ONNX model ({summarize_exception(exc)})."
        ) from None
    prep = prepare(opts, progress)
    _follow_static_batch(prep, info, opts)
    info.dynamic_batch = info.dynamic_batch and prep.dynamic
    program = None
    if prep.onnx_in:
        profile_batches(prep, onnx_profile(prep.source.model, prep.original_path, prep.specs))
    else:
        progress("tracing the model with torch.export")
        program = prep.source.to_program(
            example_inputs(prep.specs, dynamic=prep.dynamic), dynamic_batch=prep.dynamic
        )
        profile_batches(prep, program_profile(program))
        record_layer_values(program, prep, opts)
        prep.make_original = program.module
    folds, unplaced = folds_in_file(onnx_path, prep, program)
    progress("running the original model")
    reference = record(prep.source.reference(), prep.batches)
    report = RunReport(
        "verify", str(opts.model), str(onnx_path), onnx=info, warnings=list(prep.source.warnings)
    )
    report.op_counts = _op_counts(onnx_path, prep, folds)
    check_labels(prep, reference, report)
    if prep.onnx_in:
        report.reference = ONNX_REFERENCE
        twin = functools.partial(onnx_twin, prep.source.path)
    else:
        twin = prep.source.float32_reference
    record_float32_twin(twin, prep, opts, report, progress)
    verify_output(reference, onnx_path, prep, opts, report, progress, folds, unplaced)
    if opts.json_path is not None:
        save_report(report, opts.json_path)
    return report


def _op_counts(onnx_path: Path, prep: Prepared, folds) -> OpCounts:
    """The file's nodes by op_type, and the original's: an ONNX original's own file; for a
    checkpoint, what the fold that wrote the file recorded, or for a file without that
    record the file's with the BN folds its tensor names show undone."""
    import onnx

    after = count_ops(onnx.load(str(onnx_path), load_external_data=False))
    if prep.onnx_in:
        return OpCounts(count_ops(prep.source.model), after)
    before = recorded_ops_before(onnx_path)
    return OpCounts(before if before is not None else ops_with_folds_undone(after, folds), after)


def _follow_static_batch(prep: Prepared, info, opts: RunOptions) -> None:
    """A file with a fixed batch is run at that batch only (the batches are made after)."""
    if info.dynamic_batch:
        return
    prep.dynamic = False
    if info.batch_size and not opts.input_shapes:
        prep.specs = [replace(s, shape=s.with_batch(info.batch_size)) for s in prep.specs]
