"""The per-layer stage of a verification: the original's tensors recorded where folds may be
checked, and every folded layer of the written file compared there (`bnexport.layer_check`).

A checkpoint's tensors are recorded from the traced program before the fold rewrites it; an
ONNX original is run again afterwards, with the tensors the checks need as extra outputs.
Half-precision models and float16 exports are not checked per layer (their rounding is not
one float32 layer's).
"""

from __future__ import annotations

from pathlib import Path

from bnexport.defaults import LAYER_CHECK_BYTES, LAYER_RTOL
from bnexport.export import recorded_folds
from bnexport.layer_check import (
    capture_program_values,
    compare_layers,
    cut_layers,
    folds_by_names,
    needed_names,
    onnx_batchnorm_points,
    onnx_value_names,
    onnx_values,
    program_batchnorm_points,
    program_capture_names,
)
from bnexport.report import FoldReport, VerifyResult
from bnexport.runs.options import RunOptions
from bnexport.runs.prepare import Prepared


def checks_layers(prep: Prepared, opts: RunOptions) -> bool:
    """Whether this run checks every folded layer (float32 models and exports only)."""
    return prep.model_dtype is None and not opts.fp16


def record_layer_values(program, prep: Prepared, opts: RunOptions) -> None:
    """A checkpoint: the traced program's tensors a check may need, before the fold."""
    if not checks_layers(prep, opts):
        return
    names = program_capture_names(program)
    prep.layer_values = capture_program_values(program, prep.batches, names, LAYER_CHECK_BYTES)


def folds_in_file(onnx_path: Path, prep: Prepared, program) -> tuple[FoldReport, list]:
    """The folds of a file to verify: as its metadata records them (a file bnexport wrote),
    else as its tensor names show them; and the BNs that could not be placed."""
    recorded = recorded_folds(onnx_path)
    if recorded is not None and all(d.check is not None for d in recorded.folded):
        return recorded, []
    if program is not None:
        points = program_batchnorm_points(program)
    else:
        points = onnx_batchnorm_points(prep.original_path)
    return folds_by_names(points, onnx_value_names(str(onnx_path)))


def check_layers(
    result: VerifyResult,
    onnx_path: Path,
    fold: FoldReport | None,
    prep: Prepared,
    opts: RunOptions,
    optimize: bool,
    unplaced: list | None = None,
) -> None:
    """Compare every folded layer of the file at `onnx_path` where it is; fill
    `result.layers` and `result.layers_unmapped` (after `unplaced`, the BNs whose place in
    the file is unknown)."""
    import onnx

    result.layers_unmapped = list(unplaced or [])
    if fold is None or not fold.folded or not checks_layers(prep, opts):
        return
    export = onnx.load(str(onnx_path), load_external_data=False)
    if prep.onnx_in:
        original = onnx_value_names(prep.original_path)
        cuts, unmapped = cut_layers(export, fold, original.__contains__, str(onnx_path.parent))
        values = onnx_values(
            prep.original_path, prep.batches, needed_names(cuts), LAYER_CHECK_BYTES
        )
    else:
        values = prep.layer_values or [{}]
        cuts, unmapped = cut_layers(export, fold, values[0].__contains__, str(onnx_path.parent))
    del export
    checks, unrunnable = compare_layers(cuts, values, optimize=optimize)
    result.layer_rtol = LAYER_RTOL
    order = {d.name: i for i, d in enumerate(fold.decisions)}
    result.layers = sorted(checks, key=lambda c: order.get(c.batchnorm, 0))
    result.layers_unmapped += unmapped + unrunnable
