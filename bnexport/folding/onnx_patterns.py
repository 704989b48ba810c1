"""The ONNX fold patterns: for each BatchNormalization, the layer it folds into and how, or
the reason it cannot; and the checks a plan must pass against the weights it would change.

* `into_preceding`: Conv / ConvTranspose / Gemm / MatMul (+ bias Add) -> [transparent ops] -> BN.
* `into_following`: BN -> [transparent ops] -> Gemm / MatMul (+ Add) / Conv; before a
  zero-padded Conv or a ConvTranspose only the scale folds (`OnnxFoldPlan.shift_kept`).

Nothing here changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from bnexport.folding import math as fm
from bnexport.folding.channels import (
    NotTransparent,
    following_channel_of,
    initial,
    preceding_channel_of,
)
from bnexport.folding.onnx_graph import SHAPE_READERS, OnnxGraph, attr, is_onnx_op
from bnexport.folding.onnx_sites import (
    AffineSite,
    LayerSite,
    is_homogeneous,
    is_transparent,
    match_layer,
    step,
    step_scalar,
    zero_padded,
)
from bnexport.folding.patterns import FOLLOWING, PRECEDING, Refusal


@dataclass
class OnnxFoldPlan:
    direction: str
    bn: AffineSite
    layer: LayerSite
    channel_of: np.ndarray  # the BN channel of each layer output / input channel
    shift_kept: bool = False  # only the scale folds; the BN becomes Add(x, t / s)


def shared_reason(layer: LayerSite, g: OnnxGraph) -> str | None:
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


def weight_calls(weight: ir.Value) -> list[ir.Node]:
    """The nodes reading the data of `weight` (Shape/Size read only its shape), each once."""
    calls: list[ir.Node] = []
    for use in weight.uses():
        if use.node not in calls and not is_onnx_op(use.node, *SHAPE_READERS):
            calls.append(use.node)
    return calls


def reads_twice(node: ir.Node, value: ir.Value) -> bool:
    return sum(1 for u in value.uses() if u.node is node) > 1


_CALL_ATTRIBUTES = {
    "conv": (("group", 1),),
    "conv_transpose": (("group", 1),),
    "gemm": (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0)),
}


def same_call(a: LayerSite, b: LayerSite, g: OnnxGraph) -> bool:
    """Two calls of one weight that one fold serves alike: the same op, the same attributes
    that enter the fold, the same bias (one value, or equal constants that each call reads
    alone, as an exporter's zero bias computed once per call)."""
    if a.node.op_type != b.node.op_type or a.kind != b.kind:
        return False
    if a.bias is not b.bias and not (_own_bias(a) and _own_bias(b) and _equal(a.bias, b.bias, g)):
        return False
    if (a.bias_add is None) != (b.bias_add is None):
        return False
    return all(
        attr(a.node, name, default) == attr(b.node, name, default)
        for name, default in _CALL_ATTRIBUTES.get(a.kind, ())
    )


def _own_bias(site: LayerSite) -> bool:
    """The call's bias is read by this call alone (its node, or its bias Add)."""
    bias = site.bias
    reader = site.bias_add or site.node
    return (
        bias is not None
        and not bias.is_graph_output()
        and all(u.node is reader for u in bias.uses())
    )


def _equal(a: ir.Value, b: ir.Value, g: OnnxGraph) -> bool:
    x, y = g.constant(a), g.constant(b)
    return x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y)


def conflict_reason(plan: OnnxFoldPlan, pending: dict) -> str | None:
    """A weight that already takes a fold must be folded through the same layer: the same
    bias (an earlier fold may have made a later Add look like the layer's bias)."""
    folds = pending.get(plan.layer.weight)
    if folds is None:
        return None
    site = folds.calls.get(plan.layer.node)
    if site is None or plan.layer.bias is not site.bias or plan.layer.bias_add is not site.bias_add:
        return (
            f"{plan.layer.name} already takes another BN's fold, and the bias this BN would "
            "fold through is not the bias that fold uses"
        )
    return None


def overflow_reason(
    plan: OnnxFoldPlan, s: torch.Tensor, t: torch.Tensor, u: torch.Tensor | None = None
) -> str | None:
    """For a weight of 16 bits or fewer: why the folded values (the weight, the preceding
    fold's bias shift, the shift `u` kept as an Add) would not fit its dtype."""
    layer = plan.layer
    dtype = layer.weight_array.dtype
    if dtype.itemsize > 2 or not np.issubdtype(dtype, np.floating):
        return None
    finite = float(np.finfo(dtype).max)
    axis = layer.layout.out_axis if plan.direction == PRECEDING else layer.layout.in_axis
    w = fm.scale_weight(fm.array_f64(layer.weight_array), s, axis, layer.layout)
    values = {"weights": w}
    if plan.direction == PRECEDING:
        values["bias"] = t
    if u is not None:
        values["shift kept as an Add"] = u
    for what, value in values.items():
        largest = float(value.abs().max()) if value.numel() else 0.0
        if largest > finite:
            return (
                f"folding it into {layer.name} would give {dtype} {what} of {largest:.3g}, "
                f"beyond the largest finite {dtype} ({finite:.0f})"
            )
    return None


def into_preceding(bn: AffineSite, g: OnnxGraph) -> OnnxFoldPlan | Refusal:
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
    try:
        tr = initial(layer.out_channels, layer.out_axis)
        for n in chain:
            tr = step(n, tr, g)
    except NotTransparent as exc:
        return refuse(f"an op between {layer.name} and the BN does not commute: {exc}")
    channel_of = preceding_channel_of(tr, layer.out_channels, bn.channels, bn.axis)
    if isinstance(channel_of, str):
        return refuse(channel_of.replace("the layer", layer.name))
    return OnnxFoldPlan(PRECEDING, bn, layer, channel_of)


def into_following(bn: AffineSite, g: OnnxGraph) -> OnnxFoldPlan | Refusal:
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
        if not is_transparent(nxt) and not is_homogeneous(nxt):
            return refuse(f"its output feeds {g.describe(nxt)}")
        chain.append(nxt)
        value = nxt.outputs[0]
    layer = match_layer(nxt, g)
    if isinstance(layer, str):
        return refuse(layer)
    # zero padding (and a transposed conv's varying number of taps per output) would not see
    # the shift, nor would the scale pass a ReLU with it: only the scale folds, the shift
    # stays as an Add where the BN was
    nonlinear = [n for n in chain if is_homogeneous(n)]
    shift_kept = layer.kind == "conv_transpose" or zero_padded(layer, g) or bool(nonlinear)
    if nonlinear:
        problem = positive_scale_reason(bn.s, g.describe(nonlinear[0]))
        if problem:
            return refuse(problem)
    if shift_kept and not bool(bn.t.any()):
        shift_kept = False  # no shift to keep (a layer scale): the scale alone folds
    if shift_kept and g.shape(bn.input) is None:
        return refuse(
            f"the rank of its input is unknown, so its shift cannot be kept as an Add before "
            f"{layer.name}"
        )
    try:
        if bn.channels == 1:  # a scalar map: any linear op on channels passes it
            for n in chain:
                step_scalar(n, g)
            in_channels = layer.weight_array.shape[layer.layout.in_axis]
            in_channels *= layer.layout.groups if layer.layout.in_axis == 1 else 1
            channel_of = np.zeros(in_channels, dtype=np.int64)
        else:
            tr = initial(bn.channels, bn.axis)
            for n in chain:
                tr = step(n, tr, g)
            channel_of = following_channel_of(tr, layer.in_axis)
    except NotTransparent as exc:
        return refuse(f"an op between the BN and {layer.name} does not commute: {exc}")
    if isinstance(channel_of, str):
        return refuse(channel_of.replace("the layer", layer.name))
    return OnnxFoldPlan(FOLLOWING, bn, layer, channel_of, shift_kept)


def positive_scale_reason(s: torch.Tensor, op: str) -> str | None:
    """Why the scale cannot pass the positively homogeneous op `op` (f(a x) = a f(x) needs
    a > 0): the channels whose scale is not positive."""
    bad = [int(i) for i in torch.nonzero(s <= 0).flatten()]
    if not bad:
        return None
    shown = ", ".join(str(c) for c in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return (
        f"{len(bad)} of its {s.numel()} channels have a scale <= 0 (channel "
        f"{shown}), and only a positive scale passes {op}"
    )


PATTERNS = {PRECEDING: into_preceding, FOLLOWING: into_following}
