"""bnexport: fold BatchNorm exactly, export to ONNX, verify the export with onnxruntime.

Python API:

    from bnexport import fold, export, verify, load_model
"""

from __future__ import annotations

__version__ = "0.1.0"

from bnexport.errors import BadInputError, BnexportError, InvalidModelError  # noqa: E402
from bnexport.fold import FoldResult, fold  # noqa: E402
from bnexport.load import LoadedModel, load_model  # noqa: E402
from bnexport.report import FoldDecision, FoldReport  # noqa: E402

__all__ = [
    "BadInputError",
    "BnexportError",
    "FoldDecision",
    "FoldReport",
    "FoldResult",
    "InvalidModelError",
    "LoadedModel",
    "__version__",
    "fold",
    "load_model",
]
