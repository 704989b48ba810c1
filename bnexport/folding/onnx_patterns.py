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
    Tracked,
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


def _back(value: ir.Value, g: OnnxGraph) -> tuple[list[ir.Node], ir.Node | None, ir.Value]:
    """Walk up from `value` through transparent ops: (the ops in data order, the first
    producer that is not one, the value it writes)."""
    chain: list[ir.Node] = []
    node = value.producer()
    while node is not None and node.graph is g.graph and is_transparent(node):
        chain.append(node)
        value = node.inputs[0]
        node = value.producer() if value is not None else None
    chain.reverse()
    if node is not None and node.graph is not g.graph:
        node = None
    return chain, node, value


def _layer_behind(
    node: ir.Node | None, value: ir.Value, chain: list[ir.Node], consumer: ir.Node, g: OnnxGraph
) -> tuple[LayerSite, Tracked] | str:
    """The layer at `node` whose output reaches `consumer` through `chain` alone, with its
    channels tracked to the end of the chain; or why not."""
    if node is None:
        return f"its input comes from {g.describe(None, value)}, not a conv or linear"
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
            return layer
        return f"its input comes from {g.describe(node)}, not a conv or linear"
    produced = [layer.output, *(n.outputs[0] for n in chain)]
    for v in produced:
        if g.sole_consumer(v) is None:
            users = [u for u in g.consumers(v) if u not in chain and u is not consumer]
            other = g.describe(users[0]) if users else "the model's outputs"
            return f"the output '{v.name}' is also used by {other}"
    try:
        tr = initial(layer.out_channels, layer.out_axis)
        for n in chain:
            tr = step(n, tr, g)
    except NotTransparent as exc:
        return f"an op between {layer.name} and the BN does not commute: {exc}"
    return layer, tr


def into_preceding(bn: AffineSite, g: OnnxGraph) -> OnnxFoldPlan | list[OnnxFoldPlan] | Refusal:
    """Into the layer before the map; per branch when a Concat of layers along the channel
    axis stands between (each layer takes the slice of channels its outputs fill)."""

    def refuse(reason: str) -> Refusal:
        return Refusal(PRECEDING, reason)

    chain, node, value = _back(bn.input, g)
    if node is not None and is_onnx_op(node, "Concat"):
        return _per_branch(bn, node, chain, g)
    found = _layer_behind(node, value, chain, bn.node, g)
    if isinstance(found, str):
        return refuse(found)
    layer, tr = found
    channel_of = preceding_channel_of(tr, layer.out_channels, bn.channels, bn.axis)
    if isinstance(channel_of, str):
        return refuse(channel_of.replace("the layer", layer.name))
    return OnnxFoldPlan(PRECEDING, bn, layer, channel_of)


def _per_branch(
    bn: AffineSite, concat: ir.Node, chain: list[ir.Node], g: OnnxGraph
) -> list[OnnxFoldPlan] | Refusal:
    def refuse(reason: str) -> Refusal:
        return Refusal(PRECEDING, reason)

    shape = g.shape(concat.outputs[0])
    if shape is None:
        return refuse(f"the shape of the output of {g.describe(concat)} is unknown")
    dim = int(attr(concat, "axis", 0)) % len(shape)
    if not shape[dim].is_Integer:
        return refuse(f"the size of the axis {g.describe(concat)} joins on is not fixed")
    total = int(shape[dim])
    for v in [concat.outputs[0], *(n.outputs[0] for n in chain)]:
        if g.sole_consumer(v) is None:
            return refuse(f"the output '{v.name}' is also used elsewhere")
    try:
        tr = initial(total, dim)
        for n in chain:
            tr = step(n, tr, g)
    except NotTransparent as exc:
        return refuse(f"an op between {g.describe(concat)} and the BN does not commute: {exc}")
    bn_of_position = preceding_channel_of(tr, total, bn.channels, bn.axis)
    if isinstance(bn_of_position, str):
        return refuse(bn_of_position.replace("the layer", g.describe(concat)))
    plans, offset = [], 0
    inputs = list(concat.inputs)
    for k, value in enumerate(inputs):
        branch_shape = g.shape(value)
        if value is None or branch_shape is None or not branch_shape[dim].is_Integer:
            return refuse(f"the size of input {k} of {g.describe(concat)} is not known")
        if inputs.count(value) > 1:
            return refuse(f"{g.describe(concat)} reads '{value.name}' twice")
        size = int(branch_shape[dim])
        branch_chain, node, start = _back(value, g)
        found = _layer_behind(node, start, branch_chain, concat, g)
        if isinstance(found, str):
            return refuse(f"input {k} of {g.describe(concat)}: {found}")
        layer, branch_tr = found
        position = preceding_channel_of(branch_tr, layer.out_channels, size, dim)
        if isinstance(position, str):
            return refuse(position.replace("the layer", layer.name))
        plans.append(OnnxFoldPlan(PRECEDING, bn, layer, bn_of_position[offset + position]))
        offset += size
    return plans


MAX_BRANCHES = 16


def _forward(value: ir.Value, g: OnnxGraph) -> list[tuple[list[ir.Node], ir.Node]] | str:
    """Every path from `value` through transparent or positively homogeneous ops to a layer
    (Conv, ConvTranspose, Gemm, MatMul) reading it as data, when every path ends at one."""
    found: list[tuple[list[ir.Node], ir.Node]] = []
    stack: list[tuple[ir.Value, list[ir.Node]]] = [(value, [])]
    while stack:
        value, chain = stack.pop()
        if value.is_graph_output():
            return f"'{value.name}' is an output of the model"
        users = g.consumers(value)
        if not users:
            return f"'{value.name}' is not used"
        for nxt in users:
            if nxt.graph is not g.graph:
                return f"its output is read inside the body of {g.describe(nxt)}"
            if nxt.inputs[0] is not value or sum(v is value for v in nxt.inputs) != 1:
                return f"its output feeds {g.describe(nxt)} as a parameter, not as data"
            if is_onnx_op(nxt, "Conv", "ConvTranspose", "Gemm", "MatMul"):
                found.append((chain, nxt))
            elif is_transparent(nxt) or is_homogeneous(nxt):
                stack.append((nxt.outputs[0], [*chain, nxt]))
            else:
                return f"its output feeds {g.describe(nxt)}"
        if len(found) + len(stack) > MAX_BRANCHES:
            return f"its output reaches more than {MAX_BRANCHES} layers"
    return found


def into_following(bn: AffineSite, g: OnnxGraph) -> OnnxFoldPlan | list[OnnxFoldPlan] | Refusal:
    """Into the layer after the map, or into every layer its output reaches."""

    def refuse(reason: str) -> Refusal:
        return Refusal(FOLLOWING, reason)

    paths = _forward(bn.output, g)
    if isinstance(paths, str):
        return refuse(paths)
    branches = []
    for chain, node in paths:
        layer = match_layer(node, g)
        if isinstance(layer, str):
            return refuse(layer)
        branches.append((chain, layer))
    # zero padding (and a transposed conv's varying number of taps per output) would not see
    # the shift, nor would the scale pass a ReLU with it: only the scale folds, the shift
    # stays as an Add where the BN was
    nonlinear = [n for chain, _ in branches for n in chain if is_homogeneous(n)]
    shift_kept = bool(nonlinear) or any(
        layer.kind == "conv_transpose" or zero_padded(layer, g) for _, layer in branches
    )
    if nonlinear:
        problem = positive_scale_reason(bn.s, g.describe(nonlinear[0]))
        if problem:
            return refuse(problem)
    if shift_kept and not bool(bn.t.any()):
        shift_kept = False  # no shift to keep (a layer scale): the scale alone folds
    if shift_kept and g.shape(bn.input) is None:
        return refuse(
            "the rank of its input is unknown, so its shift cannot be kept as an Add before "
            f"{branches[0][1].name}"
        )
    plans = []
    for chain, layer in branches:
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
        plans.append(OnnxFoldPlan(FOLLOWING, bn, layer, channel_of, shift_kept))
    return plans[0] if len(plans) == 1 else plans


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
