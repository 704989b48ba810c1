"""Recording what the original computes on the run's batches, before anything changes it:
its outputs (the reference of the verification) and, for a float16 or bfloat16 model, those
of its float32 twin (what both the original's and the export's errors are measured against);
for a float32 model whose export misses the plain tolerance, its own float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

from bnexport.errors import BadInputError, summarize_exception
from bnexport.onnx_runtime import Float32TwinReference, one_ulp_twin_runner
from bnexport.outputs import as_numpy_batch
from bnexport.report import RunReport
from bnexport.runs.options import Progress, RunOptions
from bnexport.runs.prepare import Prepared
from bnexport.source import float64_twin
from bnexport.verify import float32_batches, record_reference


def record(reference, batches) -> list:
    """The reference's outputs on every batch (a model that fails on them is bad input)."""
    try:
        return record_reference(reference, batches)
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failed on its own inputs
        raise BadInputError(
            f"The model itself fails in eval mode on the verification inputs "
            f"({summarize_exception(exc)}), so no export can be checked. Check --input-shape "
            "and --data, or run with --debug for the full traceback."
        ) from exc


def record_float32_twin(
    make_twin: Callable, prep: Prepared, opts: RunOptions, report: RunReport, progress: Progress
) -> None:
    """A half-precision model verified with its dtype tolerance: record its float32 twin's
    outputs on the same inputs (cast exactly to float32) in `prep.baseline`. A twin that
    cannot run leaves the plain tolerance, with a warning."""
    if prep.model_dtype is None or opts.tolerances[2]:
        return
    progress(f"running the {prep.model_dtype} model's float32 twin")
    try:
        prep.baseline = record_reference(make_twin(), float32_batches(prep.batches))
    except Exception as exc:  # noqa: BLE001 - the plain tolerance applies, with a warning
        report.warnings.append(
            f"the {prep.model_dtype} model's float32 twin could not run "
            f"({summarize_exception(exc)}), so the export is compared with the "
            f"{prep.model_dtype} original under the float32 tolerance"
        )


def onnx_twin(path: str) -> Float32TwinReference:
    """The float32 twin of an ONNX original, as a reference."""
    return Float32TwinReference(path)


def measure_noise_floor(prep: Prepared, progress: Progress) -> str | None:
    """A float32 model's own rounding on the run's batches, for an export that missed the
    plain tolerance: the outputs of its float64 twin (a checkpoint), or (an ONNX original,
    which onnxruntime cannot run in float64) those of the original file with every weight
    moved by one float32 unit in the last place. Returns None when measured, or why it could
    not be (then the plain tolerance stands)."""
    try:
        if prep.onnx_in:
            progress("running the original file with each weight rounded once more")
            runner = one_ulp_twin_runner(prep.original_path)
            prep.half_outputs = record_reference(runner, [as_numpy_batch(b) for b in prep.batches])
            prep.noise_floor = "one ulp"
        else:
            if prep.make_original is None:
                return "the original is no longer at hand"
            progress("running the model in float64")
            prep.baseline = record_reference(float64_twin(prep.make_original()), prep.batches)
            prep.noise_floor = "float64"
    except Exception as exc:  # noqa: BLE001 - the plain tolerance stands, with a warning
        return summarize_exception(exc)
    return None
