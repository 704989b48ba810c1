"""Folding a PyTorch checkpoint: trace once, (recalibrate,) record the reference, fold the
program in place, export it, (convert to float16,) write the ONNX file.

The reference outputs are recorded from the eval-mode original before the fold, so the fold
can rewrite the one traced program in place and the original need not stay in memory; for a
large model each stage's leftovers are freed before the next stage allocates.
"""

from __future__ import annotations

import copy
import functools
import gc
from pathlib import Path

from bnexport.export import (
    count_ops,
    export_names,
    exported_report,
    onnx_metadata,
    ops_before_fold,
    release_weights,
    save_onnx_model,
    to_onnx_program,
    traced_ops,
)
from bnexport.folding.torch_engine import fold_program
from bnexport.input_profile import program_profile
from bnexport.inputs import example_inputs
from bnexport.report import OpCounts, RunReport
from bnexport.runs.float16 import convert_to_float16, record_float16_run
from bnexport.runs.labels import check_labels
from bnexport.runs.layers import record_layer_values
from bnexport.runs.options import Progress, RunOptions
from bnexport.runs.prepare import Prepared, profile_batches, reload_original
from bnexport.runs.recalibration import recalibrate_before_fold
from bnexport.runs.reference import record, record_float32_twin
from bnexport.runs.saving import save_program
from bnexport.source import float32_twin

# Above this many bytes of weights, each stage's leftovers are garbage-collected before the next
# stage allocates (graphs hold reference cycles, so the weights would otherwise linger); below
# it the collection costs more time than the memory is worth.
COLLECT_ABOVE_BYTES = 256 * 2**20


def fold_checkpoint(
    prep: Prepared, opts: RunOptions, output: Path, report: RunReport, progress: Progress
) -> list:
    """Fold, export and write the checkpoint; returns the recorded reference outputs."""
    source = prep.source
    progress("tracing the model with torch.export")
    program = source.to_program(
        example_inputs(prep.specs, dynamic=prep.dynamic), dynamic_batch=prep.dynamic
    )
    profile_batches(prep, program_profile(program))
    original = source.reference()
    prep.make_original = functools.partial(reload_original, opts, prep.specs, prep.dynamic)
    if opts.recalibrate is not None:
        original = recalibrate_before_fold(program, prep, opts, report, progress)
        kept = copy.deepcopy(original)  # the fold rewrites the program's weights in place
        prep.make_original = lambda: kept
    progress("running the original model")
    reference = record(original, prep.batches)
    check_labels(prep, reference, report)
    record_float32_twin(functools.partial(float32_twin, original), prep, opts, report, progress)
    if opts.fp16:
        record_float16_run(original, prep, report, progress)
    record_layer_values(program, prep, opts)
    del original
    module_names = source.batchnorm_modules()
    # From here on the traced program is all this run holds of the model.
    prep.source = source = None
    large = _weight_bytes(program) > COLLECT_ABOVE_BYTES
    _collect(large)

    progress("folding BatchNorm layers")
    traced = traced_ops(program)  # before the fold rewrites it in place
    exact: dict | None = {} if opts.fp16 else None  # float64 folded values, rounded once
    folded, report.fold = fold_program(
        program,
        module_names,
        copy_graph=False,
        in_place=True,
        duplicate_shared=opts.duplicate_shared,
        exact=exact,
    )
    del program
    _collect(large)
    report.warnings += report.fold.warnings

    progress("exporting to ONNX")
    onnx_program = to_onnx_program(folded, opset=opts.opset)
    # the file's own names for the places where folds are checked
    report.fold = exported_report(report.fold, export_names(onnx_program, folded))
    model = onnx_program.model
    before = ops_before_fold(count_ops(model), traced, traced_ops(folded))  # as exported
    if opts.fp16:
        model = convert_to_float16(model, prep, opts, report, progress, exact)
    report.op_counts = OpCounts(before, count_ops(model))
    save_folded = None
    if opts.save_folded is not None:
        # written after onnx.checker accepts the export and before the ONNX file is moved
        # into place: a run that fails leaves neither
        report.saved_program = str(opts.save_folded)
        save_folded = functools.partial(save_program, folded, Path(opts.save_folded))
    progress("writing and checking the ONNX file")
    report.onnx = save_onnx_model(
        model,
        output,
        metadata=onnx_metadata(
            report.fold, bnexport_source=Path(opts.model).name, bnexport_ops_before=before
        ),
        external_data=opts.external_data,
        threshold=opts.external_data_threshold,
        before_commit=save_folded,
    )
    release_weights(onnx_program.model)
    del model, onnx_program, save_folded, folded
    _collect(large)
    if prep.dynamic != (not opts.static_batch):
        report.warnings.append(
            f"the checkpoint fixes the batch size to {prep.batches[0][0].shape[0]}; the ONNX "
            "file keeps that static batch"
        )
    return reference


def _weight_bytes(program) -> int:
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def _collect(large: bool) -> None:
    if large:
        gc.collect()
