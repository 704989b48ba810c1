"""The `--fp16` stages: the model's own float16 run, whose error against the float32 original
sets the float16 export's allowance, and the conversion of the folded model to float16 (each
folded value rounded once from float64; layers out of float16's range kept in float32)."""

from __future__ import annotations

import copy

from bnexport.errors import BadInputError, summarize_exception
from bnexport.half import to_float16
from bnexport.onnx_runtime import OnnxRunner
from bnexport.outputs import as_numpy_batch
from bnexport.report import RunReport
from bnexport.runs.options import Progress, RunOptions
from bnexport.runs.prepare import Prepared
from bnexport.verify import record_reference


def check_float16_request(prep: Prepared, opts: RunOptions) -> None:
    """--fp16 converts float32 models only."""
    if opts.fp16 and prep.model_dtype is not None:
        raise BadInputError(
            f"--fp16 converts a float32 model to float16, but this model already computes in "
            f"{prep.model_dtype}. Leave out --fp16: the export keeps the model's own dtype."
        )


def record_float16_run(original, prep: Prepared, report: RunReport, progress: Progress) -> None:
    """From a checkpoint: the model's own outputs in float16 (PyTorch, `.half()` on a copy)."""
    import torch

    progress("running the model in float16")
    try:
        half = copy.deepcopy(original).half()
        batches = [
            tuple(x.half() if torch.is_floating_point(x) else x for x in batch)
            for batch in prep.batches
        ]
        prep.half_outputs = record_reference(half, batches)
    except Exception as exc:  # noqa: BLE001 - the plain tolerance applies, with a warning
        report.warnings.append(
            f"the model could not run in float16 in PyTorch ({summarize_exception(exc)}), so "
            "the float16 export is held to the float32 tolerance"
        )


def record_float16_file(model, prep: Prepared, report: RunReport, progress: Progress) -> None:
    """From an ONNX file: the original file converted to float16 the same way, run in
    onnxruntime as the original and the export are (without graph optimizations)."""
    from onnxscript import ir

    progress("converting the original file to float16")
    try:
        batches = [as_numpy_batch(b) for b in prep.batches]
        half, _ = to_float16(ir.serde.serialize_model(model), batches)
        runner = OnnxRunner(half.SerializeToString(), optimize=False)
        prep.half_outputs = record_reference(runner, batches)
    except Exception as exc:  # noqa: BLE001 - the plain tolerance applies, with a warning
        report.warnings.append(
            f"the original file could not be converted to float16 ({summarize_exception(exc)}), "
            "so the float16 export is held to the float32 tolerance"
        )


def convert_to_float16(
    model, prep: Prepared, opts: RunOptions, report: RunReport, progress: Progress, exact
):
    """The folded float32 model (onnx_ir) as float16 (`bnexport.half.to_float16`), ranges
    measured on the verification inputs; `exact` holds the float64 folded values, each
    rounded once. Sets `report.float16`."""
    from onnxscript import ir

    progress("converting to float16")
    batches = [as_numpy_batch(b) for b in prep.batches]
    proto = ir.serde.serialize_model(model)
    # float64 tensors from the PyTorch engine, arrays from the ONNX engine; a value the
    # exporter stored under another name (or folded into a constant) is rounded from float32
    names = {i.name for i in proto.graph.initializer}
    values = {
        k: getattr(v, "numpy", lambda v=v: v)() for k, v in (exact or {}).items() if k in names
    }
    half, report.float16 = to_float16(proto, batches, keep_io_types=not opts.fp16_io, exact=values)
    return ir.serde.deserialize_model(half)
