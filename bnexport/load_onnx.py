"""Loading an ONNX file as a `Source`: the model (onnx_ir, external weights read on use), its
input specs, and onnxruntime on the original file as the reference.

The reference runs with graph optimizations disabled, as does the verification of the folded
file, so that the comparison tests the graphs themselves and not onnxruntime's own fusions.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bnexport.errors import BadInputError, summarize_exception
from bnexport.inputs import InputSpec, npz_headers, parse_shape
from bnexport.source import ONNX, Source

DECLARED_VALUE_INFO = "bnexport_declared_value_info"


def _dtype(value) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=value.dtype.numpy())).dtype
    except Exception:  # noqa: BLE001 - bfloat16, strings, float8 ...
        raise BadInputError(
            f"The ONNX input '{value.name}' has type {value.dtype}, which bnexport cannot feed "
            "from numpy. Export the model with float, integer or bool inputs."
        ) from None


def load_onnx(path: Path):
    """Read an ONNX file (weights in external data stay on disk until used) as a Source."""
    import onnx_ir as ir

    try:
        # as ir.load does (external data stays on disk), keeping the names of the file's own
        # value_info so that writing it back adds none
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        declared = {info.name for info in proto.graph.value_info}
        model = ir.serde.deserialize_model(proto)
        del proto
        ir.external_data.set_base_dir(model.graph, str(Path(path).parent))
        model.graph.meta[DECLARED_VALUE_INFO] = declared
    except Exception as exc:  # noqa: BLE001 - any parse failure is a broken file
        raise BadInputError(
            f"'{path}' is not a readable ONNX model ({summarize_exception(exc, 200)}). The file "
            "may be truncated or corrupt: export or download it again."
        ) from None
    if not model.graph.outputs:
        raise BadInputError(
            f"'{path}' is an ONNX file without a graph (no outputs). It may be truncated or "
            "only a header: export or download the model again."
        )
    external = [
        t
        for v in model.graph.initializers.values()
        if isinstance(t := v.const_value, ir.ExternalTensor)
    ]
    escaping = sorted({t.location for t in external if _escapes_folder(t.location)})
    if escaping:
        raise BadInputError(
            f"The ONNX model '{path}' names external data '{escaping[0]}', which lies outside "
            "the model's folder. bnexport, like onnxruntime, reads external data only from the "
            "folder of the .onnx file (or below it), so the file was not read. Keep the .data "
            "file next to the model and save the model with that relative location."
        )
    missing = sorted(
        {
            str(Path(t.base_dir) / t.location)
            for t in external
            if not (Path(t.base_dir) / t.location).is_file()
        }
    )
    if missing:
        raise BadInputError(
            f"The ONNX model '{path}' keeps its weights in external data, but {missing[0]} "
            "does not exist. Keep the .data file(s) next to the .onnx file, under the name the "
            "model records, and try again."
        )
    return Source(model, ONNX, str(path), onnx_input_specs(model))


def _escapes_folder(location: str) -> bool:
    """True when an external data location is absolute or climbs out of the model's folder
    (judged on the text, as onnxruntime does: a symlink inside the folder stays inside)."""
    normal = os.path.normpath(location.replace("\\", "/"))
    return os.path.isabs(normal) or normal == ".." or normal.startswith("../")


def onnx_checker_error(path: Path) -> str | None:
    """What onnx.checker finds wrong with the file at `path`, or None when it passes."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - the message is the answer
        return summarize_exception(exc, 200)
    return None


def keep_declared_value_info(model) -> None:
    """Clear the types that reading gave initializers the file did not declare in its
    value_info, so that the written file carries the value_info it came with."""
    declared = model.graph.meta.get(DECLARED_VALUE_INFO)
    if declared is None:
        return
    for value in model.graph.initializers.values():
        if value.name not in declared and not (value.is_graph_input() or value.is_graph_output()):
            value.type, value.shape = None, None


def onnx_input_specs(model) -> list[InputSpec]:
    """The graph inputs (initializers excluded), with -1 for a dim still unknown.

    A symbolic axis 0 is the batch axis; beside it, an input with a fixed axis 0 is unbatched.
    """
    initializers = set(model.graph.initializers)
    specs = []
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        dims = value.shape.dims if value.shape is not None else None
        if dims is None:
            raise BadInputError(
                f"The ONNX input '{value.name}' has no shape in the file. Give it with "
                f"--input-shape {value.name}=DIMS (batch first, for example 1,3,224,224)."
            )
        shape = tuple(d if isinstance(d, int) else -1 for d in dims)
        dynamic = bool(shape) and shape[0] == -1
        shape = (1, *shape[1:]) if dynamic else shape
        specs.append(InputSpec(value.name, shape, _dtype(value), dynamic_batch=dynamic))
    if any(s.dynamic_batch for s in specs):
        specs = [s if s.dynamic_batch else replace(s, batched=False) for s in specs]
    return specs


def resolve_onnx_specs(
    specs: list[InputSpec], shapes: list[str], data_shapes: dict[str, tuple] | None = None
) -> list[InputSpec]:
    """Fill every dim the file leaves open: from --input-shape (NAME=DIMS, or one per input in
    order) or from the data's arrays; refuse a shape that contradicts a fixed dim."""
    by_name = {s.name: s for s in specs}
    given: dict[str, tuple[int, ...]] = {}
    for i, text in enumerate(shapes):
        name, sep, dims = text.partition("=")
        if not sep:
            if i >= len(specs):
                raise BadInputError(
                    f"{len(shapes)} --input-shape flags were given but the model has "
                    f"{len(specs)} input(s): {', '.join(by_name)}."
                )
            name, dims = specs[i].name, text
        if name not in by_name:
            raise BadInputError(
                f"--input-shape names '{name}', which is not an input of the model (its inputs: "
                f"{', '.join(by_name)})."
            )
        given[name] = parse_shape(dims)
    resolved = []
    for spec in specs:
        shape = given.get(spec.name)
        if shape is None and data_shapes and spec.name in data_shapes:
            shape = (spec.shape[0], *data_shapes[spec.name][1:])
        if shape is None:
            shape = spec.shape
        elif len(shape) != len(spec.shape) or any(
            d != -1 and d != g and not (i == 0 and spec.dynamic_batch)
            for i, (d, g) in enumerate(zip(spec.shape, shape))
        ):
            expected = ", ".join("?" if d == -1 else str(d) for d in spec.shape)
            raise BadInputError(
                f"The shape {shape} does not fit ONNX input '{spec.name}', which the file "
                f"declares as ({expected}). Give a shape with the declared fixed dims."
            )
        if any(d == -1 for d in shape):
            expected = ", ".join("?" if d == -1 else str(d) for d in spec.shape)
            raise BadInputError(
                f"The ONNX input '{spec.name}' has dims the file leaves open ({expected}), so "
                f"no test input can be made for it. Give them with --input-shape "
                f"{spec.name}=DIMS (batch first), or pass --data with arrays of that input."
            )
        resolved.append(replace(spec, shape=tuple(shape)))
    return resolved


def npz_shapes(path: Path | None) -> dict[str, tuple] | None:
    """The shapes of the arrays in an .npz file (from their headers: no data is read), or
    None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return {name: shape for name, (shape, _) in npz_headers(Path(path)).items()}
    except Exception:  # noqa: BLE001 - load_npz reports an unreadable file later
        return None
