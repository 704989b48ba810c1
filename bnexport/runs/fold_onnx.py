"""Folding an ONNX file: record the reference in onnxruntime, fold the model in place with the
ONNX engine, (convert to float16,) write it back, with external data when the input had it.

The reference is onnxruntime on the original file; both files run with onnxruntime's graph
optimizations off, so the comparison tests the graphs and not onnxruntime's own fusions.
"""

from __future__ import annotations

import functools
from pathlib import Path

from bnexport.errors import BadInputError
from bnexport.export import count_ops, has_external_data, onnx_metadata, save_onnx_model
from bnexport.folding.onnx_engine import fold_onnx_model
from bnexport.input_profile import onnx_profile
from bnexport.load_onnx import keep_declared_value_info, onnx_checker_error
from bnexport.report import OpCounts, RunReport
from bnexport.runs.float16 import convert_to_float16, record_float16_file
from bnexport.runs.labels import check_labels
from bnexport.runs.options import Progress, RunOptions
from bnexport.runs.prepare import Prepared, profile_batches
from bnexport.runs.reference import onnx_twin, record, record_float32_twin


def check_onnx_request(opts: RunOptions) -> None:
    """Refuse the options that only a checkpoint has a meaning for."""
    if opts.recalibrate is not None:
        raise BadInputError(
            "--recalibrate recomputes the statistics of a PyTorch checkpoint; an ONNX file "
            "cannot be recalibrated here. Recalibrate the checkpoint it was exported from."
        )
    if opts.save_folded is not None:
        raise BadInputError(
            "--save-folded saves a folded torch.export program, which an ONNX input does not "
            "have; the folded ONNX file (-o) is the result. Leave out --save-folded."
        )


def fold_onnx_file(
    prep: Prepared, opts: RunOptions, output: Path, report: RunReport, progress: Progress
) -> list:
    """Fold and write the ONNX file; returns the recorded reference outputs."""
    check_onnx_request(opts)
    source = prep.source
    profile_batches(prep, onnx_profile(source.model, prep.original_path, prep.specs))
    progress("running the original model in onnxruntime")
    reference = record(source.reference(), prep.batches)
    check_labels(prep, reference, report)
    record_float32_twin(functools.partial(onnx_twin, source.path), prep, opts, report, progress)
    model = source.model
    if opts.fp16:
        record_float16_file(model, prep, report, progress)
    came_external = has_external_data(model)  # before folds replace external tensors
    before = count_ops(model)

    progress("folding BatchNormalization nodes")
    exact: dict | None = {} if opts.fp16 else None  # float64 folded values, rounded once
    report.fold = fold_onnx_model(model, duplicate_shared=opts.duplicate_shared, exact=exact)
    report.warnings += report.fold.warnings
    keep_declared_value_info(model)
    if opts.fp16:
        model = convert_to_float16(model, prep, opts, report, progress, exact)
    report.op_counts = OpCounts(before, count_ops(model))

    progress("writing the folded ONNX file")
    external = opts.external_data
    if external is None and came_external:
        external = True  # written back the way it came
    report.onnx = save_onnx_model(
        model,
        output,
        metadata=onnx_metadata(
            report.fold, bnexport_source=Path(opts.model).name, bnexport_ops_before=before
        ),
        external_data=external,
        threshold=opts.external_data_threshold,
        accept_checker_error=functools.partial(_input_fails_checker_too, opts.model, report),
    )
    prep.source = source = model = None
    return reference


def _input_fails_checker_too(model: Path, report: RunReport, exc: Exception) -> bool:
    """A folded file the checker rejects is written when the input file fails it too (the
    fold did not cause it), with a warning; the verification still runs."""
    problem = onnx_checker_error(Path(model))
    if problem is None:
        return False
    report.warnings.append(
        f"the input file does not pass onnx.checker ({problem}); the folded file is written "
        "all the same and verified in onnxruntime as usual"
    )
    return True
