"""Float16 deployment of a float32 ONNX model that never overflows or clamps silently.

`to_float16(model, batches)` converts a float32 ONNX model (as bnexport writes it) to float16
weights and compute, layer by layer, after a range analysis:

* weights: an initializer whose values (its exact float64 values when given, else its stored
  float32 ones) exceed float16's largest finite value (65504), or whose nonzero values are
  mostly (more than `TINY_SHARE`) below float16's smallest normal (6.1e-5, where float16 loses
  relative precision), keeps every node reading it in float32;
* activations: the float32 model runs in onnxruntime (CPU, graph optimizations off) on every
  batch with every intermediate float tensor exposed as an output; a tensor whose max |x|,
  times `ACTIVATION_MARGIN`, exceeds 65504 is out of range, and every node producing or reading
  it stays in float32. A float16 node therefore never sees an out-of-range value, and the
  nodes between two out-of-range layers stay float32 too;
* op types on onnxconverter-common's list of ops kept in float32 (`DEFAULT_OP_BLOCK_LIST`:
  Resize, TopK, Range, ...), nodes holding subgraphs and calls of non-standard domains stay
  float32.

Everything else becomes float16: each float16 weight is rounded once,
`np.asarray(value, np.float64).astype(np.float16)`, from its exact value or its stored float32
one, after checking that the result is finite; nothing is clamped. A Cast is inserted wherever
a tensor crosses between a float32 and a float16 node (one per tensor and direction).

Why not `onnxconverter_common.float16.convert_float_to_float16(node_block_list=...)`: it
routes the output of a blocked node through a Cast to float16 and back to float32, and removes
that pair only when the tensor has a single consumer (for several consumers its clean-up
compares the wrong type codes), so an out-of-range tensor read by two float32 nodes (a
residual branch) would pass through float16 and become inf. It also clamps tiny weights to
`min_positive_val` and rounds weights from float32 only. The conversion here places the casts
itself; the converter's op block list is reused.

The result passes onnx.checker (full check) and runs in onnxruntime on the batches with finite
outputs, or `ExportError` is raised.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from bnexport.errors import ExportError, summarize_exception

FLOAT16_MAX = 65504.0  # float16's largest finite value
FLOAT16_MIN_NORMAL = 2.0**-14  # float16's smallest normal value, about 6.1e-5
# Activations must stay below FLOAT16_MAX / ACTIVATION_MARGIN on the verification inputs: the
# margin covers inputs larger than the ones measured and float16's rounding on the way.
ACTIVATION_MARGIN = 4.0
# A weight whose nonzero values are more than this share below FLOAT16_MIN_NORMAL stays float32
TINY_SHARE = 0.5

_FLOAT = 1  # onnx.TensorProto.FLOAT
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16
_DTYPE_NAMES = {_FLOAT: "float32", _FLOAT16: "float16"}


@dataclass
class KeptNode:
    """A node left in float32, with the reasons (one sentence each)."""

    name: str
    op_type: str
    reasons: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "reason": self.reason}


@dataclass
class HalfReport:
    """What `to_float16` did: the nodes kept in float32 and why, the weight bytes by dtype, the
    dtype of each graph input and output."""

    kept_float32: list[KeptNode]
    nodes: int  # nodes of the float32 graph
    float16_weight_bytes: int
    float32_weight_bytes: int
    inputs: dict[str, str]  # graph input -> "float16" / "float32"
    outputs: dict[str, str]  # graph output -> "float16" / "float32"
    samples: int  # rows of the batches the activation ranges were measured on
    casts_added: int = 0
    activation_margin: float = ACTIVATION_MARGIN

    @property
    def float16_weight_share(self) -> float:
        total = self.float16_weight_bytes + self.float32_weight_bytes
        return self.float16_weight_bytes / total if total else 1.0

    @property
    def float16_nodes(self) -> int:
        return self.nodes - len(self.kept_float32)

    def to_dict(self) -> dict:
        return {
            "kept_float32": [k.to_dict() for k in self.kept_float32],
            "nodes": self.nodes,
            "float16_nodes": self.float16_nodes,
            "weight_bytes": {
                "float16": self.float16_weight_bytes,
                "float32": self.float32_weight_bytes,
                "float16_share": self.float16_weight_share,
            },
            "inputs": dict(self.inputs),
            "outputs": dict(self.outputs),
            "samples": self.samples,
            "casts_added": self.casts_added,
            "activation_margin": self.activation_margin,
            "float16_max": FLOAT16_MAX,
            "float16_min_normal": FLOAT16_MIN_NORMAL,
        }


def to_float16(
    model,
    batches: list[tuple[np.ndarray, ...]],
    *,
    keep_io_types: bool = True,
    exact: dict[str, np.ndarray] | None = None,
):
    """A float16 copy of the float32 ONNX `model` and its `HalfReport`.

    `batches` are the verification inputs (positional, float32 numpy arrays), on which the
    activation ranges are measured and the result is checked. `exact` maps initializer names to
    their float64 values (folded weights before their cast to float32), so each weight is
    rounded once from float64 to float16. `keep_io_types=False` gives float16 inputs and
    outputs (an input or output out of float16's range stays float32).
    """
    import onnx

    if not batches:
        raise ValueError("to_float16 needs at least one batch of inputs")
    exact = dict(exact or {})
    model32 = copy.deepcopy(model)
    _name_nodes(model32.graph)
    types = _tensor_types(model32)
    graph = model32.graph
    initializers = {t.name: t for t in graph.initializer}
    unknown = sorted(exact.keys() - initializers.keys())
    if unknown:
        raise ValueError(f"exact values given for tensors that are no initializers: {unknown}")

    float_values = [
        name for node in graph.node for name in node.output if name and types.get(name) == _FLOAT
    ]
    float_inputs = [i.name for i in graph.input if types.get(i.name) == _FLOAT]
    ranges = activation_ranges(model32, batches, float_inputs + float_values)
    out_of_range = {
        name: peak for name, peak in ranges.items() if not peak * ACTIVATION_MARGIN <= FLOAT16_MAX
    }

    weights = {}
    for name, tensor in initializers.items():
        if tensor.data_type != _FLOAT:
            continue
        value = _initializer_value(tensor, exact.get(name))
        weights[name] = value
    weight_reasons = {name: r for name, v in weights.items() if (r := _weight_problem(name, v))}

    kept = _decide(graph, weight_reasons, out_of_range)
    io32 = {name for name in float_inputs if name in out_of_range}
    io32 |= {o.name for o in graph.output if o.name in out_of_range}
    half, casts = _convert(model32, types, kept, weights, keep_io_types, io32)

    try:
        half = onnx.shape_inference.infer_shapes(half, check_type=True, strict_mode=True)
        onnx.checker.check_model(half, full_check=True)
    except Exception as exc:  # noqa: BLE001 - reported with the cause
        raise ExportError(
            f"The float16 model fails onnx.checker ({summarize_exception(exc)})."
        ) from exc
    _check_finite(half, batches)

    f16 = f32 = 0
    for t in half.graph.initializer:
        size = int(np.prod(t.dims, dtype=np.int64))
        if t.data_type == _FLOAT16:
            f16 += 2 * size
        elif t.data_type == _FLOAT:
            f32 += 4 * size
    elem = {v.name: v.type.tensor_type.elem_type for v in [*half.graph.input, *half.graph.output]}
    report = HalfReport(
        kept_float32=[kept[n.name] for n in graph.node if n.name in kept],
        nodes=len(graph.node),
        float16_weight_bytes=f16,
        float32_weight_bytes=f32,
        inputs={i.name: _DTYPE_NAMES.get(elem[i.name], "other") for i in half.graph.input},
        outputs={o.name: _DTYPE_NAMES.get(elem[o.name], "other") for o in half.graph.output},
        samples=sum(int(b[0].shape[0]) if np.ndim(b[0]) else 1 for b in batches),
        casts_added=casts,
    )
    _set_metadata(half, "bnexport_float16", json.dumps([k.to_dict() for k in report.kept_float32]))
    return half, report


def _name_nodes(graph) -> None:
    """Give every unnamed node (and every repeated name after its first) a unique name."""
    taken = {n.name for n in graph.node if n.name}
    seen = set()
    for i, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.name or node.op_type}_{i}"
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        taken.add(name)
        seen.add(name)


def _tensor_types(model) -> dict[str, int]:
    """Element type of every tensor of the main graph (by ONNX type inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types.setdefault(v.name, v.type.tensor_type.elem_type)
    untyped = [o for n in g.node for o in n.output if o and o not in types]
    if untyped:
        raise ExportError(
            f"ONNX type inference leaves {len(untyped)} tensor(s) untyped (first: "
            f"'{untyped[0]}'), so their float16 ranges cannot be measured."
        )
    return types


def activation_ranges(model, batches, names: list[str]) -> dict[str, float]:
    """max |x| of each named float tensor over all batches (inf when not finite), measured in
    onnxruntime (CPU, graph optimizations off) with the tensors exposed as graph outputs."""
    import onnx
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, _FLOAT, None))
            present.add(name)
    session = _session(probe.SerializeToString(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    wanted = set(names)
    fetch = [o.name for o in session.get_outputs() if o.name in wanted]
    peaks = dict.fromkeys(fetch, 0.0)
    for batch in batches:
        feeds = {i.name: np.asarray(a) for i, a in zip(session.get_inputs(), batch)}
        for name, value in zip(fetch, session.run(fetch, feeds)):
            peaks[name] = max(peaks[name], _peak(value))
        for inp, a in zip(session.get_inputs(), batch):
            if inp.name in wanted:
                peaks[inp.name] = max(peaks.get(inp.name, 0.0), _peak(np.asarray(a)))
    return peaks


def _peak(value: np.ndarray) -> float:
    if value.size == 0:
        return 0.0
    if not np.isfinite(value).all():
        return float("inf")
    return float(np.abs(value).max())


def _session(model_bytes: bytes, level):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _initializer_value(tensor, exact) -> np.ndarray:
    from onnx import numpy_helper

    stored = numpy_helper.to_array(tensor)
    if exact is None:
        return stored
    value = np.asarray(exact, dtype=np.float64)
    if value.shape != stored.shape:
        raise ValueError(
            f"exact value of '{tensor.name}' has shape {value.shape}, the initializer "
            f"{stored.shape}"
        )
    return value


def _weight_problem(name: str, value: np.ndarray) -> str | None:
    """Why the weight `value` cannot be float16 (one sentence), or None."""
    if value.size == 0:
        return None
    magnitude = np.abs(np.asarray(value, dtype=np.float64))
    if not np.isfinite(magnitude).all():
        return f"weight '{name}' is not finite"
    peak = float(magnitude.max())
    if peak > FLOAT16_MAX:
        return (
            f"weight '{name}' reaches {peak:.2g}, beyond float16's largest finite value "
            f"{FLOAT16_MAX:.0f}"
        )
    nonzero = magnitude[magnitude > 0]
    if nonzero.size:
        tiny = float((nonzero < FLOAT16_MIN_NORMAL).mean())
        if tiny > TINY_SHARE:
            return (
                f"{tiny:.0%} of weight '{name}''s nonzero values are below float16's smallest "
                f"normal {FLOAT16_MIN_NORMAL:.2g}, where float16 loses precision"
            )
    return None


def _decide(graph, weight_reasons: dict[str, str], out_of_range: dict[str, float]) -> dict:
    """The nodes that stay float32, by name, each a KeptNode with its reasons."""
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST

    op_block = set(DEFAULT_OP_BLOCK_LIST)
    kept: dict[str, KeptNode] = {}

    def keep(node, reason: str) -> None:
        entry = kept.setdefault(node.name, KeptNode(node.name, node.op_type))
        if reason not in entry.reasons:
            entry.reasons.append(reason)

    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            keep(node, f"an op of domain '{node.domain}', kept in float32")
        elif node.op_type in op_block:
            keep(node, f"{node.op_type} is on onnxconverter-common's list of ops kept in float32")
        if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            keep(node, "holds a subgraph, kept in float32")
        for name in node.input:
            if name in weight_reasons:
                keep(node, weight_reasons[name])
        for name in node.output:
            if name in out_of_range:
                keep(
                    node,
                    f"its output '{name}' reaches {out_of_range[name]:.2g} on the verification "
                    f"inputs, {ACTIVATION_MARGIN:g} x that is beyond float16's range",
                )
        for name in node.input:
            if name in out_of_range:
                keep(node, f"reads '{name}' which is out of float16's range")
    return kept


def _round_once(name: str, value: np.ndarray) -> np.ndarray:
    half = np.asarray(value, dtype=np.float64).astype(np.float16)
    if not np.isfinite(half).all():
        raise ExportError(f"'{name}' is not finite in float16")  # excluded by _weight_problem
    return half


def _half_attributes(node) -> None:
    """Float tensors held by a float16 node's attributes become float16 (Constant's value,
    ConstantOfShape's value, ...); Cast to float32 becomes Cast to float16."""
    from onnx import helper, numpy_helper

    for attr in list(node.attribute):
        if attr.type == attr.TENSOR and attr.t.data_type == _FLOAT:
            value = _round_once(node.name, numpy_helper.to_array(attr.t))
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
        for t in attr.tensors:
            if t.data_type == _FLOAT:
                t.CopyFrom(
                    numpy_helper.from_array(
                        _round_once(node.name, numpy_helper.to_array(t)), t.name
                    )
                )
        if node.op_type == "Cast" and attr.name == "to" and attr.i == _FLOAT:
            attr.i = _FLOAT16
        if node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            value = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats))
            node.attribute.remove(attr)
            tensor = numpy_helper.from_array(_round_once(node.name, value))
            node.attribute.append(helper.make_attribute("value", tensor))


def _convert(model32, types, kept, weights, keep_io_types: bool, io32: set[str]):
    """The float16 model: nodes not in `kept` compute in float16, casts where dtypes meet."""
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model32)
    g = model.graph
    taken = set(types) | {n.name for n in g.node}
    is_half = {n.name: n.name not in kept for n in g.node}
    native: dict[str, int] = {}  # dtype of each float tensor in the new graph

    for inp in g.input:
        if types.get(inp.name) == _FLOAT:
            dtype = _FLOAT if keep_io_types or inp.name in io32 else _FLOAT16
            inp.type.tensor_type.elem_type = dtype
            native[inp.name] = dtype

    readers = defaultdict(set)  # initializer -> precision of the nodes reading it
    for node in g.node:
        names = set(node.input) | _outer_names(node)
        for name in names:
            readers[name].add(_FLOAT16 if is_half[node.name] else _FLOAT)
    half_copies = {}
    new_inits = []
    for t in g.initializer:
        if t.data_type != _FLOAT:
            continue
        want = readers.get(t.name, {_FLOAT})
        if want == {_FLOAT16}:
            t.CopyFrom(numpy_helper.from_array(_round_once(t.name, weights[t.name]), t.name))
            native[t.name] = _FLOAT16
        else:
            native[t.name] = _FLOAT
            if _FLOAT16 in want:  # read by float16 and float32 nodes: a float16 copy too
                copy_name = _fresh(f"{t.name}.float16", taken)
                half_copies[t.name] = copy_name
                new_inits.append(
                    numpy_helper.from_array(_round_once(t.name, weights[t.name]), copy_name)
                )
    g.initializer.extend(new_inits)

    nodes, casts = [], {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = _fresh(f"{name}.to_{_DTYPE_NAMES[to]}", taken)
            nodes.append(helper.make_node("Cast", [name], [out], name=out, to=to))
            casts[key] = out
        return casts[key]

    for node in g.node:
        want = _FLOAT16 if is_half[node.name] else _FLOAT
        for i, name in enumerate(node.input):
            if name not in native:
                continue
            if want == _FLOAT16 and name in half_copies:
                node.input[i] = half_copies[name]
            elif native[name] != want:
                node.input[i] = cast(name, want)
        if want == _FLOAT16:
            _half_attributes(node)
        for name in node.output:
            if types.get(name) == _FLOAT:
                native[name] = want
        nodes.append(node)

    for out in g.output:
        if types.get(out.name) != _FLOAT:
            continue
        want = _FLOAT if keep_io_types or out.name in io32 else _FLOAT16
        if out.name in {i.name for i in g.input}:
            continue  # an input passed through: it has the input's dtype
        if native.get(out.name, want) != want:
            inner = _fresh(f"{out.name}.{_DTYPE_NAMES[native[out.name]]}", taken)
            for node in nodes:
                node.input[:] = [inner if n == out.name else n for n in node.input]
                node.output[:] = [inner if n == out.name else n for n in node.output]
            nodes.append(helper.make_node("Cast", [inner], [out.name], name=inner, to=want))
            casts[(out.name, want)] = inner
        out.type.tensor_type.elem_type = want
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # re-inferred with the new types
    return model, len(casts)


def _outer_names(node) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (all names they mention)."""
    names = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_outer_names(inner))
    return names


def _fresh(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ...: a name no tensor or node has yet (now reserved)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _check_finite(model, batches) -> None:
    import onnxruntime as ort

    try:
        session = _session(model.SerializeToString(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except Exception as exc:  # noqa: BLE001 - reported with the cause
        raise ExportError(
            f"onnxruntime cannot load the float16 model ({summarize_exception(exc)})."
        ) from exc
    inputs = session.get_inputs()
    for batch in batches:
        feeds = {
            i.name: np.asarray(a).astype(np.float16)
            if i.type == "tensor(float16)"
            else np.asarray(a)
            for i, a in zip(inputs, batch)
        }
        for out, value in zip(session.get_outputs(), session.run(None, feeds)):
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise ExportError(
                    f"The float16 model's output '{out.name}' is not finite on the verification "
                    "inputs."
                )


def _set_metadata(model, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
