"""bnexport: fold BatchNorm exactly, export to ONNX, verify the export with onnxruntime.

Python API:

    from bnexport import fold, export_onnx, verify_onnx, load_model

    result = fold(model, example_inputs)      # folded GraphModule + per-BN report
    export_onnx(result, "model.onnx")         # atomic write, onnx.checker, metadata
    verify_onnx(model, "model.onnx", [example_inputs]).passed
"""

from __future__ import annotations

__version__ = "0.1.0"

from bnexport.errors import BadInputError, BnexportError, InvalidModelError  # noqa: E402
from bnexport.export import OnnxInfo, export_onnx  # noqa: E402
from bnexport.fold import FoldResult, fold  # noqa: E402
from bnexport.load import LoadedModel, load_model  # noqa: E402
from bnexport.report import FoldDecision, FoldReport  # noqa: E402
from bnexport.verify import VerifyResult, verify_onnx  # noqa: E402

__all__ = [
    "BadInputError",
    "BnexportError",
    "FoldDecision",
    "FoldReport",
    "FoldResult",
    "InvalidModelError",
    "LoadedModel",
    "OnnxInfo",
    "VerifyResult",
    "__version__",
    "fold",
    "export_onnx",
    "load_model",
    "verify_onnx",
]
