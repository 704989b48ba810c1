"""The per-layer stage of a verification: the original's tensors recorded where folds may be
checked, and every folded layer of the written file compared there (`bnexport.layer_cut`
finds the pieces, `bnexport.layer_check` records and compares).

A checkpoint's tensors are recorded from the traced program before the fold rewrites it; an
ONNX original is run again afterwards, with the tensors the checks need as extra outputs.
Half-precision models and float16 exports are not checked per layer (their rounding is not
one float32 layer's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bnexport.defaults import (
    FLOAT32_ERROR_FACTOR,
    LAYER_CHECK_BYTES,
    LAYER_RTOL,
    ONNX_FLOAT32_FACTOR,
)
from bnexport.errors import summarize_exception
from bnexport.export import recorded_folds
from bnexport.interrupts import raise_if_interrupted
from bnexport.layer_check import (
    capture_module_values,
    capture_program_values,
    compare_layers,
    onnx_values,
    program_capture_names,
)
from bnexport.layer_cut import (
    cut_layers,
    folds_by_names,
    needed_names,
    onnx_batchnorm_inputs,
    onnx_batchnorm_points,
    onnx_value_names,
    program_batchnorm_points,
)
from bnexport.report import FoldReport, VerifyResult
from bnexport.runs.options import RunOptions
from bnexport.runs.prepare import Prepared
from bnexport.source import float64_twin


def checks_layers(prep: Prepared, opts: RunOptions) -> bool:
    """Whether this run checks every folded layer (float32 models and exports only)."""
    return prep.model_dtype is None and not opts.fp16


def record_layer_values(program, prep: Prepared, opts: RunOptions) -> None:
    """A checkpoint: the traced program's tensors a check may need, before the fold."""
    if not checks_layers(prep, opts):
        return
    try:
        names = program_capture_names(program)
        prep.layer_values = capture_program_values(program, prep.batches, names, LAYER_CHECK_BYTES)
    except Exception as exc:  # noqa: BLE001 - the outputs are still verified; the report says why
        raise_if_interrupted()
        prep.layer_values = None
        prep.layer_problem = (
            f"the original's tensors could not be recorded ({summarize_exception(exc)})"
        )


def _layer_floor(prep: Prepared, cuts, count: int):
    """The original's tensors at the checked points computed otherwise: by its float64
    twin (a checkpoint) or with its weights moved by one unit in the last place (an ONNX
    file); (values per batch, what they are, the factor), or (None, None, 0) when they
    cannot be had."""
    names = needed_names(cuts)
    batches = prep.batches[:count]
    try:
        if prep.onnx_in:
            values = onnx_values(prep.original_path, batches, names, 2**62, one_ulp=True)
            return (
                values,
                "its weights moved by one float32 unit in the last place",
                (ONNX_FLOAT32_FACTOR),
            )
        if prep.make_original is None:
            return None, None, 0.0
        twin = float64_twin(prep.make_original()).twin
        values = capture_module_values(twin, batches, names, 2**62, dtype=torch.float64)
        return values, "its float64 twin", FLOAT32_ERROR_FACTOR
    except Exception:  # noqa: BLE001 - the plain per-layer tolerance stands
        return None, None, 0.0


def folds_in_file(onnx_path: Path, prep: Prepared, program) -> tuple[FoldReport, list]:
    """The folds of a file to verify: as its metadata records them (a file bnexport wrote),
    else as its tensor names show them; and the BNs that could not be placed."""
    recorded = recorded_folds(onnx_path)
    if recorded is not None and all(
        d.check is not None or d.merged_into is not None for d in recorded.folded
    ):
        return recorded, []
    if program is not None:
        points = program_batchnorm_points(program)
    else:
        points = onnx_batchnorm_points(prep.original_path)
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return folds_by_names(points, onnx_value_names(model), onnx_batchnorm_inputs(model))


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
    the file is unknown). A check that cannot run leaves the outputs' verdict standing and
    says why in `layers_unmapped`."""
    result.layers_unmapped = list(unplaced or [])
    if fold is None or not (fold.folded or fold.merged) or not checks_layers(prep, opts):
        return
    problem = prep.layer_problem
    if problem is None:
        try:
            _check_layers(result, onnx_path, fold, prep, opts, optimize)
            return
        except Exception as exc:  # noqa: BLE001 - the outputs are still verified; said below
            raise_if_interrupted()
            problem = f"the per-layer check could not run ({summarize_exception(exc)})"
    result.layers = []
    result.layers_unmapped.append({"name": "every folded layer", "reason": problem})


def _check_layers(
    result: VerifyResult,
    onnx_path: Path,
    fold: FoldReport,
    prep: Prepared,
    opts: RunOptions,
    optimize: bool,
) -> None:
    import onnx

    export = onnx.load(str(onnx_path), load_external_data=False)
    if prep.onnx_in:
        original = onnx_value_names(onnx.load(prep.original_path, load_external_data=False))
        cuts, unmapped = cut_layers(export, fold, original.__contains__, str(onnx_path.parent))
        values = onnx_values(
            prep.original_path, prep.batches, needed_names(cuts), LAYER_CHECK_BYTES
        )
    else:
        values = prep.layer_values or [{}]
        cuts, unmapped = cut_layers(export, fold, values[0].__contains__, str(onnx_path.parent))
    del export
    checks, unrunnable = compare_layers(cuts, values, optimize=optimize)
    if any(not c.passed for c in checks) and not opts.tolerances[2]:
        # some layer misses one layer's rounding: measure the original's own there
        floor, what, factor = _layer_floor(prep, cuts, len(values))
        if floor is not None:
            checks, unrunnable = compare_layers(
                cuts, values, optimize=optimize, floor=floor, factor=factor
            )
            result.layer_own_error_of = what
    result.layer_rtol = LAYER_RTOL
    order = {d.name: i for i, d in enumerate(fold.decisions)}
    result.layers = sorted(checks, key=lambda c: order.get(c.batchnorm, len(order)))
    result.layers_unmapped += unmapped + unrunnable
