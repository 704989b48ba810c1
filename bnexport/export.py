"""ONNX export of a (folded) model with torch.onnx's torch.export-based exporter."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from bnexport.errors import BnexportError
from bnexport.files import write_atomic
from bnexport.fold.torch_graph import batch_dynamic_shapes

DEFAULT_OPSET = 18


@dataclass
class OnnxInfo:
    path: str
    opset: int
    batchnorm_nodes: int
    inputs: list[str]
    outputs: list[str]
    dynamic_batch: bool


class ExportError(BnexportError):
    """torch.onnx could not export the model."""


def count_batchnorm_nodes(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the main graph and in every function and subgraph."""

    def in_graph(graph: onnx.GraphProto) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    n += in_graph(attr.g)
                n += sum(in_graph(g) for g in attr.graphs)
        return n

    total = in_graph(model.graph)
    for fn in model.functions:
        total += sum(node.op_type == "BatchNormalization" for node in fn.node)
    return total


def to_onnx_proto(
    model: nn.Module, args: tuple, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True
) -> onnx.ModelProto:
    """Export `model` (called with `args`) to an ONNX ModelProto, batch axis dynamic if asked."""
    dynamic_shapes = batch_dynamic_shapes(args) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                report=False,
            )
        except Exception as exc:  # noqa: BLE001 - summarised for the user
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ExportError(
                f"torch.onnx.export failed ({type(exc).__name__}: {first}). Try another --opset "
                "or --static-batch; run with --debug for the full trace."
            ) from exc
    return program.model_proto


def save_onnx(
    proto: onnx.ModelProto, path: Path, *, metadata: dict[str, object] | None = None
) -> OnnxInfo:
    """Check `proto` with onnx.checker, add metadata, and write it to `path` atomically."""
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)

    def write(tmp: Path) -> None:
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))  # before the rename: a failing check leaves no file

    write_atomic(Path(path), write)
    inputs = [i.name for i in proto.graph.input]
    first_dims = [i.type.tensor_type.shape.dim for i in proto.graph.input]
    dynamic = any(len(d) and d[0].dim_param for d in first_dims)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxInfo(
        path=str(path),
        opset=int(opset),
        batchnorm_nodes=count_batchnorm_nodes(proto),
        inputs=inputs,
        outputs=[o.name for o in proto.graph.output],
        dynamic_batch=bool(dynamic),
    )


def fold_metadata(report, **extra: object) -> dict[str, object]:
    """ONNX metadata recording the tool version and every fold decision of `report`."""
    from bnexport import __version__

    meta: dict[str, object] = {"bnexport_version": __version__, **extra}
    if report is not None:
        meta["bnexport_folded"] = [
            {"name": d.name, "into": d.into, "direction": d.direction} for d in report.folded
        ]
        meta["bnexport_left"] = [{"name": d.name, "reason": d.reason} for d in report.left]
    return meta


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: dict[str, object] | None = None,
) -> OnnxInfo:
    """Export a model (or a `FoldResult`) to `path` atomically; returns what was written.

    A FoldResult brings its own example inputs and records its fold decisions in the ONNX
    metadata (`bnexport_folded`, `bnexport_left`).
    """
    report = getattr(model, "report", None)
    meta = fold_metadata(report)
    if report is not None:
        example_inputs = example_inputs if example_inputs is not None else model.example_inputs
        model = model.module
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is None:
        raise TypeError("export_onnx() needs example_inputs for a plain nn.Module")
    meta.update(metadata or {})
    proto = to_onnx_proto(model, tuple(example_inputs), opset=opset, dynamic_batch=dynamic_batch)
    return save_onnx(proto, Path(path), metadata=meta)
