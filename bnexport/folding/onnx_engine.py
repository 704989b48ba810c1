"""The ONNX fold engine: fold every BatchNormalization of an ONNX model that folds exactly.

Patterns (the same as the PyTorch engine's, on ONNX ops):

* into the preceding layer: Conv / ConvTranspose / Gemm / MatMul (+ bias Add)
  -> [channel-transparent ops] -> BN, with  W' = s * W,  b' = s * b + t  per output channel;
* into the following layer: BN -> [channel-transparent ops] -> Gemm / MatMul (+ Add) / Conv
  without zero padding, with  W' = W * s,  b' = b + W t  per input channel.

For Gemm (Y = alpha * A B + beta * C) the bias written is the whole additive term, so the
folded node has beta = 1: C' = s * (beta * C) + t, or C' = beta * C + alpha * (W t).

Every BN is first checked against the graph as it stands (check, then rewire; a refused BN
leaves the graph untouched). Rewiring removes the BN node at once; the weight arithmetic is
collected per layer and done at the end in float64 (`bnexport.folding.math`), each weight and
bias cast once to its own dtype. BNs inside If/Loop/Scan bodies and local functions stay, with
their reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import torch

from bnexport.folding import math as fm
from bnexport.folding.channels import (
    NotTransparent,
    following_channel_of,
    initial,
    preceding_channel_of,
)
from bnexport.folding.checks import check_statistics
from bnexport.folding.onnx_graph import SHAPE_READERS, OnnxGraph, attr, is_onnx_op, node_name
from bnexport.folding.onnx_sites import (
    BN_OP,
    BatchNormSite,
    LayerSite,
    is_transparent,
    match_batchnorm,
    match_layer,
    step,
    zero_padded,
)
from bnexport.folding.patterns import FOLLOWING, PRECEDING, Refusal
from bnexport.report import FOLDED, LEFT, FoldDecision, FoldReport

KIND = "BatchNormalization"


@dataclass
class OnnxFoldPlan:
    direction: str
    bn: BatchNormSite
    layer: LayerSite
    channel_of: np.ndarray  # the BN channel of each layer output / input channel


def _shared_reason(layer: LayerSite, g: OnnxGraph) -> str | None:
    """Why the layer's weight or bias cannot change without changing another use of it.

    The weight may also be read by Shape/Size nodes (a fold keeps its shape); the bias may
    change shape (a scalar becomes a per-channel vector), so it must have no other reader."""
    for what, value in (("weight", layer.weight), ("bias", layer.bias)):
        if value is None:
            continue
        uses = [u for u in value.uses() if what == "bias" or not is_onnx_op(u.node, *SHAPE_READERS)]
        others = [u.node for u in uses if u.node is not layer.node and u.node is not layer.bias_add]
        if others or len(uses) > 1 or value.is_graph_output():
            other = (
                g.describe(others[0])
                if others
                else "the model's outputs"
                if value.is_graph_output()
                else f"another input of {layer.name}"
            )
            return (
                f"the {what} initializer '{value.name}' of {layer.name} is shared with {other}, "
                "and folding would change that use too"
            )
    return None


def _conflict_reason(plan: OnnxFoldPlan, pending: dict) -> str | None:
    """A layer that already takes a fold must be the same layer to this plan: the same bias
    (an earlier fold may have made a later Add look like the layer's bias)."""
    folds = pending.get(id(plan.layer.node))
    if folds is None:
        return None
    if plan.layer.bias is not folds.layer.bias or plan.layer.bias_add is not folds.layer.bias_add:
        return (
            f"{plan.layer.name} already takes another BN's fold, and the bias this BN would "
            "fold through is not the bias that fold uses"
        )
    return None


def _overflow_reason(plan: OnnxFoldPlan, s: torch.Tensor, t: torch.Tensor) -> str | None:
    """For a weight of 16 bits or fewer: why the folded values would not fit its dtype."""
    layer = plan.layer
    dtype = layer.weight_array.dtype
    if dtype.itemsize > 2 or not np.issubdtype(dtype, np.floating):
        return None
    finite = float(np.finfo(dtype).max)
    axis = layer.layout.out_axis if plan.direction == PRECEDING else layer.layout.in_axis
    w = fm.scale_weight(_f64(layer.weight_array), s, axis, layer.layout)
    largest = max(float(w.abs().max()), float(t.abs().max()) if plan.direction == PRECEDING else 0)
    if largest > finite:
        return (
            f"folding it into {layer.name} would give {dtype} weights of {largest:.3g}, beyond "
            f"the largest finite {dtype} ({finite:.0f})"
        )
    return None


def _into_preceding(bn: BatchNormSite, g: OnnxGraph) -> OnnxFoldPlan | Refusal:
    def refuse(reason: str) -> Refusal:
        return Refusal(PRECEDING, reason)

    chain: list[ir.Node] = []
    value = bn.input
    node = value.producer()
    while node is not None and node.graph is g.graph and is_transparent(node):
        chain.append(node)
        value = node.inputs[0]
        node = value.producer() if value is not None else None
    if node is None or node.graph is not g.graph:
        return refuse(f"its input comes from {g.describe(None, value)}, not a conv or linear")
    # a MatMul's bias Add: the layer is the MatMul, its output the Add's
    if is_onnx_op(node, "Add"):
        for operand in node.inputs:
            producer = operand.producer() if operand is not None else None
            if producer is not None and is_onnx_op(producer, "MatMul"):
                site = match_layer(producer, g)
                if isinstance(site, LayerSite) and site.bias_add is node:
                    node = producer
                    break
    layer = match_layer(node, g)
    if isinstance(layer, str):
        if is_onnx_op(node, "Conv", "ConvTranspose", "Gemm", "MatMul"):
            return refuse(layer)
        return refuse(f"its input comes from {g.describe(node)}, not a conv or linear")
    chain.reverse()
    produced = [layer.output, *(n.outputs[0] for n in chain)]
    for v in produced:
        if g.sole_consumer(v) is None:
            users = [u for u in g.consumers(v) if u not in chain and u is not bn.node]
            other = g.describe(users[0]) if users else "the model's outputs"
            return refuse(f"the output '{v.name}' is also used by {other}")
    reason = _shared_reason(layer, g)
    if reason:
        return refuse(reason)
    try:
        tr = initial(layer.out_channels, layer.out_axis)
        for n in chain:
            tr = step(n, tr, g)
    except NotTransparent as exc:
        return refuse(f"an op between {layer.name} and the BN does not commute: {exc}")
    channel_of = preceding_channel_of(tr, layer.out_channels, bn.channels)
    if isinstance(channel_of, str):
        return refuse(channel_of.replace("the layer", layer.name))
    return OnnxFoldPlan(PRECEDING, bn, layer, channel_of)


def _into_following(bn: BatchNormSite, g: OnnxGraph) -> OnnxFoldPlan | Refusal:
    def refuse(reason: str) -> Refusal:
        return Refusal(FOLLOWING, reason)

    chain: list[ir.Node] = []
    value = bn.output
    while True:
        users = g.consumers(value)
        if value.is_graph_output():
            return refuse(f"'{value.name}' is an output of the model")
        if len(users) != 1:
            others = ", ".join(g.describe(u) for u in users[:3]) or "nothing"
            return refuse(f"its output goes to {len(users)} consumers ({others})")
        nxt = users[0]
        if nxt.graph is not g.graph:
            return refuse(f"its output is read inside the body of {g.describe(nxt)}")
        if nxt.inputs[0] is not value:
            return refuse(f"its output feeds {g.describe(nxt)} as a parameter, not as data")
        if is_onnx_op(nxt, "Conv", "ConvTranspose", "Gemm", "MatMul"):
            break
        if not is_transparent(nxt):
            return refuse(f"its output feeds {g.describe(nxt)}")
        chain.append(nxt)
        value = nxt.outputs[0]
    layer = match_layer(nxt, g)
    if isinstance(layer, str):
        return refuse(layer)
    if layer.kind == "conv_transpose":
        return refuse(
            f"{layer.name} is a transposed conv, which adds the BN shift to a varying number "
            "of taps per output position"
        )
    if zero_padded(layer, g):
        return refuse(
            f"{layer.name} pads with zeros that do not pass through the BN, so folding would "
            "change its border outputs"
        )
    reason = _shared_reason(layer, g)
    if reason:
        return refuse(reason)
    try:
        tr = initial(bn.channels, 1)
        for n in chain:
            tr = step(n, tr, g)
    except NotTransparent as exc:
        return refuse(f"an op between the BN and {layer.name} does not commute: {exc}")
    channel_of = following_channel_of(tr, layer.in_axis)
    if isinstance(channel_of, str):
        return refuse(channel_of.replace("the layer", layer.name))
    return OnnxFoldPlan(FOLLOWING, bn, layer, channel_of)


# --------------------------------------------------------------------------- applying


@dataclass
class _LayerFolds:
    """The affines to fold into one layer, in the order they were decided."""

    layer: LayerSite
    affines: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _rewire(plan: OnnxFoldPlan, g: OnnxGraph) -> None:
    """Take the BN node out of the graph: its consumers read its input instead."""
    bn = plan.bn.node
    x, y = bn.inputs[0], bn.outputs[0]
    params = list(bn.inputs[1:])  # removing the node detaches its inputs
    if y.is_graph_output():
        # the model's output keeps its name: the BN's input value takes it over
        name, declared_type, declared_shape = y.name, y.type, y.shape
        ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
        g.graph.remove(bn, safe=True)
        x.name = name
        x.type, x.shape = declared_type or x.type, declared_shape or x.shape
    else:
        ir.convenience.replace_all_uses_with(y, x)
        g.graph.remove(bn, safe=True)
    for value in params:
        _drop_if_unused(value, g)


def _drop_if_unused(value: ir.Value | None, g: OnnxGraph) -> None:
    """Remove `value` once nothing reads it: an initializer, or the nodes that computed it
    (a Constant, or an exporter's bias computation), back to the first value still in use."""
    if value is None or value.uses() or value.is_graph_output():
        return
    if value.is_graph_input():
        if not g.initializer_input(value):
            return
        g.graph.inputs.remove(value)
    if value.is_initializer():
        g.graph.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is None or producer.graph is not g.graph:
        return
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in producer.outputs):
        return
    inputs = list(producer.inputs)
    g.graph.remove(producer, safe=True)
    for v in inputs:
        _drop_if_unused(v, g)


def _f64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64).copy())


def _store(node: ir.Node, value: ir.Value, array: np.ndarray, dtype: np.dtype, g: OnnxGraph):
    """Give `node`'s input `value` the new contents (cast once to `dtype`): in place for an
    initializer, else (a Constant node's output) as a new initializer that `node` reads."""
    array = np.ascontiguousarray(array.astype(dtype))
    if value.is_initializer():
        value.const_value = ir.Tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    new = _new_initializer(g, value.name, array)
    for use in list(value.uses()):
        if use.node is node:
            node.replace_input_with(use.idx, new)
    _drop_if_unused(value, g)


def _new_initializer(g: OnnxGraph, base: str, array: np.ndarray) -> ir.Value:
    name = g.fresh_name(base)
    tensor = ir.Tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    g.graph.register_initializer(value)
    if (g.model.ir_version or 0) < 4:
        g.graph.inputs.append(value)  # IR version 3 lists every initializer as an input
    return value


def _apply_layer(folds: _LayerFolds, g: OnnxGraph) -> None:
    """Fold every affine decided for one layer, in float64; cast weight and bias once."""
    layer = folds.layer
    w_dtype = layer.weight_array.dtype
    weight = _f64(layer.weight_array)
    n_out = layer.out_channels
    bias_array = g.constant(layer.bias)
    b_dtype = bias_array.dtype if bias_array is not None else w_dtype
    bias = torch.zeros(n_out, dtype=torch.float64) if bias_array is None else _f64(bias_array)
    if layer.kind == "gemm":
        alpha = float(attr(layer.node, "alpha", 1.0))
        bias = bias * float(attr(layer.node, "beta", 1.0)) if bias_array is not None else bias
    else:
        alpha = 1.0
    for direction, s, t in folds.affines:
        if direction == PRECEDING:
            weight = fm.scale_weight(weight, s, layer.layout.out_axis, layer.layout)
            bias = s * bias + t  # the bias broadcasts along its last axis, the channels
        else:
            delta = fm.following_bias_delta(weight, t, layer.layout, n_out)
            weight = fm.scale_weight(weight, s, layer.layout.in_axis, layer.layout)
            bias = bias + alpha * _as_bias(delta, bias)
    _store(layer.node, layer.weight, weight.numpy(), w_dtype, g)
    _write_bias(layer, bias.numpy(), b_dtype, g)


def _as_bias(delta: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return delta if bias.ndim <= 1 else delta.reshape((1,) * (bias.ndim - 1) + (-1,))


def _write_bias(layer: LayerSite, bias: np.ndarray, dtype: np.dtype, g: OnnxGraph) -> None:
    node = layer.node
    if layer.bias is not None:
        _store(layer.bias_add or node, layer.bias, bias, dtype, g)
        if layer.kind == "gemm":
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return
    base = f"{layer.weight.name}_bias"
    if layer.kind in ("conv", "conv_transpose", "gemm"):
        value = _new_initializer(g, base, bias.astype(dtype))
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
        if layer.kind == "gemm":
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return
    # a MatMul without bias gets an Add after it
    value = _new_initializer(g, base, bias.astype(dtype))
    out = node.outputs[0]
    users = list(out.uses())
    add = ir.Node("", "Add", [out, value], name=g.fresh_name(f"{node_name(node)}_bias_add"))
    result = add.outputs[0]
    result.name = g.fresh_name(f"{out.name}_biased")
    if out.type is not None:
        result.type, result.shape = out.type, out.shape
    g.graph.insert_after(node, add)
    for use in users:
        use.node.replace_input_with(use.idx, result)
    if out.is_graph_output():
        outputs = g.graph.outputs
        index = outputs.index(out)
        name = out.name
        out.name = g.fresh_name(f"{name}_unbiased")
        result.name = name
        outputs[index] = result


# --------------------------------------------------------------------------- the engine


def _nested_batchnorms(model: ir.Model) -> list[tuple[ir.Node, str]]:
    """BNs the engine does not fold: in subgraph bodies and local functions."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if is_onnx_op(node, BN_OP) and node.graph is not model.graph:
            owner = node.graph.name or "a subgraph"
            found.append(
                (
                    node,
                    f"it is inside the subgraph '{owner}' (an If/Loop/Scan body); bnexport "
                    "folds BNs of the main graph",
                )
            )
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            if is_onnx_op(node, BN_OP):
                found.append(
                    (
                        node,
                        f"it is inside the local function '{function.domain}::{function.name}'; "
                        "bnexport folds BNs of the main graph",
                    )
                )
    return found


def _statistics_warnings(site: BatchNormSite) -> list[str]:
    t = torch.from_numpy
    return check_statistics(
        site.name,
        t(site.mean.astype(np.float64)),
        t(site.var.astype(np.float64)),
        t(site.scale.astype(np.float64)),
        t(site.bias.astype(np.float64)),
        site.eps,
    )


def fold_onnx_model(model: ir.Model) -> FoldReport:
    """Fold every BN of `model` (an onnx_ir model, changed in place) that folds exactly.

    Returns the report: each BatchNormalization node folded (into which layer, which way) or
    left, with its reason. Raises InvalidModelError on NaN/Inf or negative variances.
    """
    g = OnnxGraph(model)
    report = FoldReport()
    bns = [n for n in g.graph if is_onnx_op(n, BN_OP)]
    sites = {}
    for node in bns:
        site = match_batchnorm(node, g)
        sites[node] = site
        if isinstance(site, BatchNormSite):
            report.warnings.extend(_statistics_warnings(site))
    pending: dict[int, _LayerFolds] = {}
    for node in bns:
        site = sites[node]
        if isinstance(site, str):
            report.decisions.append(
                FoldDecision(name=node_name(node), kind=KIND, status=LEFT, reason=site)
            )
            continue
        s, t = fm.bn_scale_shift(
            _f64(site.mean), _f64(site.var), _f64(site.scale), _f64(site.bias), site.eps
        )
        refusals = []
        plan = None
        for pattern in (_into_preceding, _into_following):
            outcome = pattern(site, g)
            if isinstance(outcome, OnnxFoldPlan):
                index = torch.from_numpy(outcome.channel_of)
                problem = _conflict_reason(outcome, pending) or _overflow_reason(
                    outcome, s[index], t[index]
                )
                if problem is None:
                    plan = outcome
                    break
                outcome = Refusal(outcome.direction, problem)
            refusals.append(outcome)
        if plan is None:
            reason = "; ".join(f"{r.direction}: {r.reason}" for r in refusals)
            report.decisions.append(
                FoldDecision(
                    name=site.name, kind=KIND, status=LEFT, reason=reason, channels=site.channels
                )
            )
            continue
        index = torch.from_numpy(plan.channel_of)
        key = id(plan.layer.node)
        folds = pending.setdefault(key, _LayerFolds(plan.layer))
        folds.affines.append((plan.direction, s[index], t[index]))
        _rewire(plan, g)
        report.decisions.append(
            FoldDecision(
                name=site.name,
                kind=KIND,
                status=FOLDED,
                into=plan.layer.name,
                direction=plan.direction,
                channels=site.channels,
            )
        )
    for folds in pending.values():
        _apply_layer(folds, g)
    for node, reason in _nested_batchnorms(model):
        report.decisions.append(
            FoldDecision(name=node_name(node), kind=KIND, status=LEFT, reason=reason)
        )
    return report


def fold_onnx(model) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold an ONNX model given as a path or an onnx.ModelProto; return the folded
    ModelProto and the report. The input (file or proto) is left unchanged; weights stored as
    external data are read from next to the file."""
    if isinstance(model, (str, os.PathLike)):
        ir_model = ir.load(os.fspath(model))
    elif isinstance(model, onnx.ModelProto):
        ir_model = ir.serde.deserialize_model(model)  # folds write new tensors, never into these
    else:
        raise TypeError(f"fold_onnx() takes a path or an onnx.ModelProto, not {type(model)}")
    report = fold_onnx_model(ir_model)
    return ir.serde.serialize_model(ir_model), report
