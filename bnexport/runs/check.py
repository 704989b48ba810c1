"""The verify stage of a run: the written ONNX file in onnxruntime against the recorded
reference, on the random batches and on the data, merged into the report's verdict.

A comparison that cannot run is the verdict `not run`. A bfloat16 file that onnxruntime cannot
run (its CPU provider has no bfloat16 Conv or Gemm) is verified through its float32 twin: the
same weights cast exactly to float32.
"""

from __future__ import annotations

import re
from pathlib import Path

from bnexport.defaults import (
    FLOAT16_FALLBACK_RTOL,
    FLOAT32_ERROR_FACTOR,
    HALF_ERROR_FACTOR,
    ONNX_FLOAT32_FACTOR,
)
from bnexport.errors import summarize_exception
from bnexport.interrupts import raise_if_interrupted
from bnexport.onnx_runtime import OnnxRunner, float32_twin_runner, uses_half_type
from bnexport.report import FoldReport, RunReport, VerifyResult
from bnexport.runs.layers import check_layers
from bnexport.runs.options import Progress, RunOptions
from bnexport.runs.prepare import Prepared, random_samples_of
from bnexport.runs.reference import measure_noise_floor
from bnexport.verify import compare, merge

TWIN = "float32 twin"
ONNX_OWN_ERROR = "the original file with every weight moved by one float32 unit in the last place"
ONNX_FILE = "ONNX file"


def verify_output(
    reference: list,
    onnx_path: Path,
    prep: Prepared,
    opts: RunOptions,
    report: RunReport,
    progress: Progress,
    folds: FoldReport | None = None,
    unplaced: list | None = None,
) -> None:
    """Fill `report.verify` (or `report.verify_error`) and add the comparison's warnings.
    Every fold of `folds` (the run's own, by default) is also checked where it is."""
    progress("verifying with onnxruntime")
    optimize = not prep.onnx_in  # an ONNX original ran without graph optimizations
    try:
        result, notes, verified = _compare_file(reference, onnx_path, prep, opts, optimize)
        if _needs_noise_floor(result, prep, opts):
            problem = measure_noise_floor(prep, progress)
            if problem is None:
                result, notes, verified = _compare_file(reference, onnx_path, prep, opts, optimize)
            else:
                notes.append(
                    f"the model's own float32 rounding could not be measured ({problem}), so "
                    "the plain tolerance applies"
                )
        progress("checking every folded layer")
        folds = report.fold if folds is None else folds
        check_layers(result, Path(onnx_path), folds, prep, opts, optimize, unplaced)
        result.random_samples, result.random_source = random_samples_of(prep), prep.random_source
        _describe_precision(result, prep, verified)
        notes += _overflow_notes(result, prep)
        report.verify = result
        report.warnings += notes
    except Exception as exc:  # noqa: BLE001 - a run-time mismatch is a verification failure
        raise_if_interrupted()  # onnxruntime interrupted while importing: not a verdict
        report.verify_error = summarize_exception(exc)


def _compare_file(reference, onnx_path: Path, prep: Prepared, opts: RunOptions, optimize: bool):
    """(result, notes, what was run): the file itself, or a bfloat16 file's float32 twin."""
    try:
        runner = OnnxRunner(str(onnx_path), optimize=optimize)
        return (*compare_all(reference, runner, prep, opts), ONNX_FILE)
    except Exception as exc:  # noqa: BLE001 - a bfloat16 file gets its twin verified
        if uses_half_type(onnx_path) != "bfloat16":
            raise
        cause = summarize_exception(exc)
    try:
        runner = float32_twin_runner(onnx_path, optimize=optimize)
        result, notes = compare_all(reference, runner, prep, opts)
    except Exception as twin_exc:  # noqa: BLE001
        raise RuntimeError(
            f"onnxruntime cannot run the bfloat16 file ({cause}), nor its float32 twin "
            f"({summarize_exception(twin_exc)})"
        ) from twin_exc
    return result, [_twin_warning(cause), *notes], TWIN


def _needs_noise_floor(result: VerifyResult, prep: Prepared, opts: RunOptions) -> bool:
    """A float32 model, checked with the default tolerance, whose export missed it: deep
    networks round more than a fixed tolerance allows, so measure how much."""
    plain = prep.model_dtype is None and prep.half_outputs is None and not opts.fp16
    return plain and not opts.tolerances[2] and not result.outputs_passed


def _describe_precision(result: VerifyResult, prep: Prepared, verified: str) -> None:
    """Record what a half-precision model, a float16 export or a float32 model whose own
    rounding was measured was measured against."""
    if prep.noise_floor == "float64":
        result.model_dtype, result.verified_file = "float32", verified
    elif prep.noise_floor == "one ulp":
        result.model_dtype, result.verified_file = "float32", verified
        result.own_error_of = ONNX_OWN_ERROR
    elif prep.model_dtype is not None:
        result.model_dtype, result.verified_file = prep.model_dtype, verified
    elif prep.half_outputs is not None:
        result.model_dtype, result.verified_file = "float16", verified
        result.own_error_of = (
            "the original file converted to float16 the same way"
            if prep.onnx_in
            else "the model run in float16 by PyTorch"
        )
        result.fallback_rtol = FLOAT16_FALLBACK_RTOL


def _overflow_notes(result: VerifyResult, prep: Prepared) -> list[str]:
    overflow = [o.name for o in result.outputs if o.original_err == float("inf")]
    if overflow and result.own_error_of is not None:
        return [
            f"{result.own_error_of} gives inf or NaN (output {', '.join(overflow)}), so "
            f"there the float16 export may differ from the float32 original by "
            f"{FLOAT16_FALLBACK_RTOL:.2g} x scale (8 float16 epsilons) + atol"
        ]
    if overflow:
        return [
            f"the {prep.model_dtype} original itself gives inf or NaN where its float32 twin "
            f"does not (output {', '.join(overflow)}): the model overflows in "
            f"{prep.model_dtype}, so no tolerance is granted for its own error there"
        ]
    return []


def _twin_warning(cause: str) -> str:
    op = re.search(r"of operator \((\w+)\)|implementation for (\w+)\(", cause)
    what = f"bfloat16 {op.group(1) or op.group(2)}" if op else "every op of this file in bfloat16"
    return (
        f"onnxruntime's CPU provider cannot run {what}, so the bfloat16 file itself was not "
        "run; its float32 twin (the same folded weights, cast exactly) was verified instead"
    )


def compare_all(reference: list, runner, prep: Prepared, opts: RunOptions):
    """The comparison on the random batches and on the data: (merged result, warnings)."""
    atol, rtol, _ = opts.tolerances
    n_random = prep.n_random
    baseline = prep.baseline
    half = prep.half_outputs
    kw = {"atol": atol, "rtol": rtol}
    if prep.noise_floor == "float64":
        kw["factor"], kw["baseline_dtype"] = FLOAT32_ERROR_FACTOR, "float64"
    elif prep.noise_floor == "one ulp":
        kw["factor"] = ONNX_FLOAT32_FACTOR
    elif baseline is not None:
        kw["factor"] = HALF_ERROR_FACTOR[prep.model_dtype]
    elif half is not None:
        kw["factor"] = HALF_ERROR_FACTOR["float16"]
    notes, results = [], []
    if n_random:
        if baseline is not None:
            kw["baseline"] = baseline[:n_random]
        elif half is not None:
            kw["half_outputs"] = half[:n_random]
        results.append(compare(reference[:n_random], runner, prep.batches[:n_random], **kw))
    if prep.dataset is not None:
        if baseline is not None:
            kw["baseline"] = baseline[n_random:]
        elif half is not None:
            kw["half_outputs"] = half[n_random:]
        data = compare(
            reference[n_random:],
            runner,
            prep.batches[n_random:],
            labels=prep.dataset.labels,
            **kw,
        )
        used = sum(int(b[0].shape[0]) for b in prep.batches[n_random:])
        data.data, data.data_size = prep.dataset.path, used
        if used < prep.dataset.size:
            notes.append(
                f"only {used} of the {prep.dataset.size} rows of {prep.dataset.path} were "
                f"compared: the model's batch is fixed to {prep.batches[0][0].shape[0]}, "
                "and the rows left over do not fill a batch"
            )
        results.append(data)
    return merge(results), notes
