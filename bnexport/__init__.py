"""bnexport: fold BatchNorm exactly, export to ONNX, verify the export with onnxruntime.

Python API (each name is imported on first use, so `import bnexport` stays cheap):

    from bnexport import fold, export_onnx, verify_onnx, load_model, run_fold, RunOptions

    result = fold(model, example_inputs)      # folded torch.export program + per-BN report
    export_onnx(result, "model.onnx")         # atomic write, onnx.checker, metadata
    verify_onnx(model, "model.onnx", [example_inputs]).passed
    run_fold(RunOptions(model="model.pt2"))   # everything `bnexport fold` does
    folded, report = fold_onnx("model.onnx")  # an ONNX file's BNs, folded (a ModelProto)
"""

from __future__ import annotations

import importlib

from bnexport.version import __version__

_PUBLIC = {
    "BadInputError": "bnexport.errors",
    "BnexportError": "bnexport.errors",
    "InvalidModelError": "bnexport.errors",
    "ExportError": "bnexport.errors",
    "FoldDecision": "bnexport.report",
    "FoldReport": "bnexport.report",
    "RunReport": "bnexport.report",
    "FoldResult": "bnexport.folding",
    "fold": "bnexport.folding",
    "fold_onnx": "bnexport.folding.onnx_engine",
    "fold_onnx_model": "bnexport.folding.onnx_engine",
    "OnnxInfo": "bnexport.report",
    "export_onnx": "bnexport.export",
    "export_program": "bnexport.export",
    "VerifyResult": "bnexport.report",
    "verify_onnx": "bnexport.verify",
    "LoadedModel": "bnexport.source",
    "Source": "bnexport.source",
    "load_model": "bnexport.load",
    "load_source": "bnexport.load",
    "RunOptions": "bnexport.runs",
    "run_fold": "bnexport.runs",
    "run_verify": "bnexport.runs",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bnexport' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
