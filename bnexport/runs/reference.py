"""Recording what the original computes on the run's batches, before anything changes it:
its outputs (the reference of the verification) and, for a float16 or bfloat16 model, those
of its float32 twin (what both the original's and the export's errors are measured against).
"""

from __future__ import annotations

from collections.abc import Callable

from bnexport.errors import BadInputError, summarize_exception
from bnexport.onnx_runtime import Float32TwinReference
from bnexport.report import RunReport
from bnexport.runs.options import Progress, RunOptions
from bnexport.runs.prepare import Prepared
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
