"""The ONNX fold engine: fold every BatchNormalization of an ONNX model that folds exactly.

Patterns (the same as the PyTorch engine's, on ONNX ops):

* into the preceding layer: Conv / ConvTranspose / Gemm / MatMul (+ bias Add)
  -> [channel-transparent ops] -> BN, with  W' = s * W,  b' = s * b + t  per output channel;
* into the following layer: BN -> [channel-transparent ops] -> Gemm / MatMul (+ Add) / Conv
  without zero padding, with  W' = W * s,  b' = b + W t  per input channel;
* into a following Conv that pads with zeros, or any following ConvTranspose: the scale only,
  W' = W * s per input channel, and the BN becomes Add(x, u) with u = t / s on its channels
  (`shift_kept`). Zero padding commutes with the scale, conv_W(pad0(s x + t)) =
  conv_{W s}(pad0(x + u)), and a transposed conv is linear in its input. Refused when a
  channel has s = 0.

For Gemm (Y = alpha * A B + beta * C) the bias written is the whole additive term, so the
folded node has beta = 1: C' = s * (beta * C) + t, or C' = beta * C + alpha * (W t).

A layer called several times (one weight read by several nodes: a Siamese encoder, a block
applied in a loop) folds once when every call has a BN on the same side with the same scale
and shift: the weight and bias change once and every one of those BNs goes. Otherwise, with
`duplicate_shared`, the calls that share this BN's values get their own copy of the weight
(and of the bias) to fold into; without it the BN is left, with the size such a copy adds.

Every BN is first checked against the graph as it stands (check, then rewire; a refused BN
leaves the graph untouched). Rewiring removes the BN node at once; the weight arithmetic is
collected per weight and done at the end in float64 (`bnexport.folding.math`), each weight and
bias cast once to its own dtype. BNs inside If/Loop/Scan bodies and local functions stay, with
their reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

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
from bnexport.folding.shared import shared_refusal, zero_scale_refusal
from bnexport.report import FOLDED, LEFT, FoldDecision, FoldReport

KIND = "BatchNormalization"


@dataclass
class OnnxFoldPlan:
    direction: str
    bn: BatchNormSite
    layer: LayerSite
    channel_of: np.ndarray  # the BN channel of each layer output / input channel
    shift_kept: bool = False  # only the scale folds; the BN becomes Add(x, t / s)


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


def _calls(weight: ir.Value) -> list[ir.Node]:
    """The nodes reading the data of `weight` (Shape/Size read only its shape), each once."""
    calls: list[ir.Node] = []
    for use in weight.uses():
        if use.node not in calls and not is_onnx_op(use.node, *SHAPE_READERS):
            calls.append(use.node)
    return calls


def _reads_twice(node: ir.Node, value: ir.Value) -> bool:
    return sum(1 for u in value.uses() if u.node is node) > 1


_CALL_ATTRIBUTES = {
    "conv": (("group", 1),),
    "conv_transpose": (("group", 1),),
    "gemm": (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0)),
}


def _same_call(a: LayerSite, b: LayerSite) -> bool:
    """Two calls of one weight that one fold serves alike: the same op, the same attributes
    that enter the fold, the same bias."""
    if a.node.op_type != b.node.op_type or a.kind != b.kind or a.bias is not b.bias:
        return False
    if (a.bias_add is None) != (b.bias_add is None):
        return False
    return all(
        attr(a.node, name, default) == attr(b.node, name, default)
        for name, default in _CALL_ATTRIBUTES.get(a.kind, ())
    )


def _conflict_reason(plan: OnnxFoldPlan, pending: dict) -> str | None:
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


def _overflow_reason(
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
    w = fm.scale_weight(_f64(layer.weight_array), s, axis, layer.layout)
    largest = max(
        float(w.abs().max()),
        float(t.abs().max()) if plan.direction == PRECEDING else 0.0,
        float(u.abs().max()) if u is not None else 0.0,
    )
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
    # zero padding (and a transposed conv's varying number of taps per output) would not see
    # the shift: only the scale folds, the shift stays as an Add where the BN was
    shift_kept = layer.kind == "conv_transpose" or zero_padded(layer, g)
    if shift_kept and g.shape(bn.input) is None:
        return refuse(
            f"the rank of its input is unknown, so its shift cannot be kept as an Add before "
            f"{layer.name}"
        )
    try:
        tr = initial(bn.channels, 1)
        for n in chain:
            tr = step(n, tr, g)
    except NotTransparent as exc:
        return refuse(f"an op between the BN and {layer.name} does not commute: {exc}")
    channel_of = following_channel_of(tr, layer.in_axis)
    if isinstance(channel_of, str):
        return refuse(channel_of.replace("the layer", layer.name))
    return OnnxFoldPlan(FOLLOWING, bn, layer, channel_of, shift_kept)


PATTERNS = {PRECEDING: _into_preceding, FOLLOWING: _into_following}


# --------------------------------------------------------------------------- applying


@dataclass
class _Affine:
    """One BN's affine, on the layer's channels, to fold into a weight."""

    direction: str
    s: torch.Tensor
    t: torch.Tensor
    shift_kept: bool = False


@dataclass
class _LayerFolds:
    """The affines to fold into one weight, in the order they were decided, and every call
    (layer node) reading that weight and its bias."""

    calls: dict[ir.Node, LayerSite]
    affines: list[_Affine] = field(default_factory=list)

    @property
    def layer(self) -> LayerSite:
        return next(iter(self.calls.values()))


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


def _rewire_with_add(plan: OnnxFoldPlan, u: np.ndarray, g: OnnxGraph) -> None:
    """Replace the BN node by Add(x, u), u on axis 1 of x; the Add's output takes the name of
    the BN's output."""
    bn = plan.bn.node
    x, y = bn.inputs[0], bn.outputs[0]
    params = list(bn.inputs[1:])
    rank = len(g.shape(x))
    shift = _new_initializer(g, f"{plan.bn.name}_shift", u.reshape((-1,) + (1,) * (rank - 2)))
    add = ir.Node("", "Add", [x, shift], name=g.fresh_name(f"{plan.bn.name}_shift_add"))
    result = add.outputs[0]
    g.graph.insert_before(bn, add)
    name, declared_type, declared_shape = y.name, y.type, y.shape
    ir.convenience.replace_all_uses_with(y, result, replace_graph_outputs=True)
    g.graph.remove(bn, safe=True)
    result.name = name
    result.type, result.shape = declared_type or x.type, declared_shape or x.shape
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


def _store(nodes: list[ir.Node], value: ir.Value, array: np.ndarray, dtype: np.dtype, g: OnnxGraph):
    """Give the input `value` of `nodes` the new contents (cast once to `dtype`): in place for
    an initializer, else (a Constant node's output) as a new initializer that `nodes` read."""
    array = np.ascontiguousarray(array.astype(dtype))
    if value.is_initializer():
        value.const_value = ir.Tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    new = _new_initializer(g, value.name, array)
    for use in list(value.uses()):
        if any(use.node is node for node in nodes):
            use.node.replace_input_with(use.idx, new)
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
    """Fold every affine decided for one weight, in float64; cast weight and bias once."""
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
    for a in folds.affines:
        if a.direction == PRECEDING:
            weight = fm.scale_weight(weight, a.s, layer.layout.out_axis, layer.layout)
            bias = a.s * bias + a.t  # the bias broadcasts along its last axis, the channels
        elif a.shift_kept:  # the shift stays before the layer: the bias is unchanged
            weight = fm.scale_weight(weight, a.s, layer.layout.in_axis, layer.layout)
        else:
            delta = fm.following_bias_delta(weight, a.t, layer.layout, n_out)
            weight = fm.scale_weight(weight, a.s, layer.layout.in_axis, layer.layout)
            bias = bias + alpha * _as_bias(delta, bias)
    calls = list(folds.calls.values())
    _store([c.node for c in calls], layer.weight, weight.numpy(), w_dtype, g)
    if any(not a.shift_kept for a in folds.affines):
        _write_bias(calls, bias.numpy(), b_dtype, g)


def _as_bias(delta: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return delta if bias.ndim <= 1 else delta.reshape((1,) * (bias.ndim - 1) + (-1,))


def _write_bias(calls: list[LayerSite], bias: np.ndarray, dtype: np.dtype, g: OnnxGraph) -> None:
    """Write the folded bias of a weight's calls: into their bias, or as one new bias that
    every call reads."""
    layer = calls[0]
    if layer.bias is not None:
        _store([c.bias_add or c.node for c in calls], layer.bias, bias, dtype, g)
        if layer.kind == "gemm":
            for c in calls:
                c.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return
    value = _new_initializer(g, f"{layer.weight.name}_bias", bias.astype(dtype))
    if layer.kind in ("conv", "conv_transpose", "gemm"):
        for c in calls:
            if len(c.node.inputs) < 3:
                c.node.resize_inputs(3)
            c.node.replace_input_with(2, value)
            if layer.kind == "gemm":
                c.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return
    for c in calls:  # a MatMul without bias gets an Add after it
        _add_after(c.node, value, g)


def _add_after(node: ir.Node, value: ir.Value, g: OnnxGraph) -> None:
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


@dataclass
class _Fold:
    """What one decision folds: a plan per call of one weight (one plan unless the layer is
    called several times), and which of weight and bias those calls get a copy of first."""

    plans: list[OnnxFoldPlan]
    copy_weight: bool = False
    copy_bias: bool = False


class _Folder:
    """Decides the BNs one by one (check, then rewire), collecting the weight arithmetic."""

    def __init__(self, g: OnnxGraph, sites: dict, duplicate_shared: bool):
        self.g = g
        self.sites = sites
        self.duplicate_shared = duplicate_shared
        self.affine = {
            node: fm.bn_scale_shift(
                _f64(site.mean), _f64(site.var), _f64(site.scale), _f64(site.bias), site.eps
            )
            for node, site in sites.items()
            if isinstance(site, BatchNormSite)
        }
        self.pending: dict[ir.Value, _LayerFolds] = {}
        self.decided: dict[ir.Node, FoldDecision] = {}
        self._plans: dict[tuple[ir.Node, str], OnnxFoldPlan | Refusal] = {}

    # ------------------------------------------------------------------ deciding
    def decide(self, node: ir.Node) -> None:
        site = self.sites[node]
        if isinstance(site, str):
            self.decided[node] = FoldDecision(
                name=node_name(node), kind=KIND, status=LEFT, reason=site
            )
            return
        refusals = []
        for direction in (PRECEDING, FOLLOWING):
            outcome = self._plan(site, direction)
            if isinstance(outcome, OnnxFoldPlan):
                fold = self._resolve(outcome)
                if isinstance(fold, _Fold):
                    self._fold(fold, node)
                    return
                outcome = Refusal(direction, fold)
            refusals.append(outcome)
        reason = "; ".join(f"{r.direction}: {r.reason}" for r in refusals)
        self.decided[node] = FoldDecision(
            name=site.name, kind=KIND, status=LEFT, reason=reason, channels=site.channels
        )

    def _plan(self, site: BatchNormSite, direction: str) -> OnnxFoldPlan | Refusal:
        """The pattern's outcome on the graph as it stands (kept until the graph changes)."""
        key = (site.node, direction)
        if key not in self._plans:
            self._plans[key] = PATTERNS[direction](site, self.g)
        return self._plans[key]

    def _mapped(self, plan: OnnxFoldPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN's (s, t) on the layer's channels."""
        s, t = self.affine[plan.bn.node]
        index = torch.from_numpy(plan.channel_of)
        return s[index], t[index]

    def _resolve(self, plan: OnnxFoldPlan) -> _Fold | str:
        """The fold `plan` makes, with the plans of the other calls of its layer, or why not."""
        layer = plan.layer
        calls = _calls(layer.weight)
        if (
            len(calls) <= 1
            or layer.weight.is_graph_output()
            or _reads_twice(layer.node, layer.weight)
        ):
            reason = _shared_reason(layer, self.g)
            fold = _Fold([plan]) if reason is None else reason
        else:
            fold = self._shared_fold(plan, calls)
        if isinstance(fold, str):
            return fold
        return self._check(fold.plans) or fold

    def _shared_fold(self, plan: OnnxFoldPlan, calls: list[ir.Node]) -> _Fold | str:
        """A weight read by several nodes: one fold for every call when each has a BN on the
        same side with the same values; else a copy for the calls alike to this one."""
        g, layer = self.g, plan.layer
        found = self._sibling_plans(plan, calls)
        side = "followed" if plan.direction == PRECEDING else "preceded"
        members: list[OnnxFoldPlan] = []
        why = None
        for call in calls:
            plans = found[call]
            site = plans[0].layer if plans else match_layer(call, g)
            if isinstance(site, str) or site.weight is not layer.weight:
                problem = f"the weight is also read by {g.describe(call)}"
            elif not _same_call(site, layer):
                problem = f"{g.describe(call)} uses them with another bias or other attributes"
            elif not plans:
                problem = f"{g.describe(call)} has no BN to fold"
            elif len(plans) > 1 or not self._same_affine(plan, plans[0]):
                problem = f"{g.describe(call)} is {side} by another BN"
            else:
                members.append(plans[0])
                continue
            why = why or problem
        if not any(p is plan for p in members):
            return why or "its layer's calls could not be matched"
        copy_weight = len(members) < len(calls)
        copy_bias = False
        if layer.bias is not None:
            readers = {p.layer.bias_add or p.layer.node for p in members}
            others = [u.node for u in layer.bias.uses() if u.node not in readers]
            if others or layer.bias.is_graph_output():
                copy_bias = True
                why = why or (
                    f"the bias is also read by {g.describe(others[0])}"
                    if others
                    else "the bias is also an output of the model"
                )
        if why is None:
            return _Fold(members)
        if not self.duplicate_shared:
            size = (layer.weight_array.nbytes if copy_weight else 0) + (
                g.constant(layer.bias).nbytes if copy_bias else 0
            )
            return shared_refusal(layer.name, len(calls), why, size)
        return _Fold(members, copy_weight, copy_bias)

    def _sibling_plans(
        self, plan: OnnxFoldPlan, calls: list[ir.Node]
    ) -> dict[ir.Node, list[OnnxFoldPlan]]:
        """For each call, the undecided BNs that would fold into it on the plan's side."""
        found: dict[ir.Node, list[OnnxFoldPlan]] = {call: [] for call in calls}
        found.setdefault(plan.layer.node, []).append(plan)
        for node, site in self.sites.items():
            if node is plan.bn.node or node in self.decided or isinstance(site, str):
                continue
            other = self._plan(site, plan.direction)
            if (
                isinstance(other, OnnxFoldPlan)
                and other.layer.weight is plan.layer.weight
                and other.layer.node in found
            ):
                found[other.layer.node].append(other)
        return found

    def _same_affine(self, plan: OnnxFoldPlan, other: OnnxFoldPlan) -> bool:
        if other.direction != plan.direction or other.shift_kept != plan.shift_kept:
            return False
        if not np.array_equal(other.channel_of, plan.channel_of):
            return False
        (s, t), (s2, t2) = self._mapped(plan), self._mapped(other)
        return torch.equal(s, s2) and torch.equal(t, t2)

    def _shift(self, plan: OnnxFoldPlan) -> torch.Tensor | None:
        """u = t / s on the BN's channels, for a plan that keeps the shift."""
        return fm.shift_before_scale(*self.affine[plan.bn.node]) if plan.shift_kept else None

    def _check(self, plans: list[OnnxFoldPlan]) -> str | None:
        """Why one of the plans cannot fold into the weight as it stands."""
        for p in plans:
            u = self._shift(p)
            if p.shift_kept and u is None:
                s = self.affine[p.bn.node][0]
                return zero_scale_refusal(p.layer.name, fm.zero_scale_channels(s))
            s, t = self._mapped(p)
            problem = _conflict_reason(p, self.pending) or _overflow_reason(p, s, t, u)
            if problem:
                return problem
        return None

    # ------------------------------------------------------------------ folding
    def _fold(self, fold: _Fold, node: ir.Node) -> None:
        """Rewire every BN of the fold and record its affine once for the weight."""
        g = self.g
        plans, added = self._copy(fold) if fold.copy_weight or fold.copy_bias else (fold.plans, 0)
        first = plans[0]
        weight = first.layer.weight
        folds = self.pending.get(weight)
        if folds is None:
            folds = self.pending[weight] = _LayerFolds({p.layer.node: p.layer for p in plans})
        s, t = self._mapped(first)
        folds.affines.append(_Affine(first.direction, s, t, first.shift_kept))
        for p in plans:
            if p.shift_kept:
                u = self._shift(p).numpy().astype(p.layer.weight_array.dtype)
                _rewire_with_add(p, u, g)
            else:
                _rewire(p, g)
            self.decided[p.bn.node] = FoldDecision(
                name=p.bn.name,
                kind=KIND,
                status=FOLDED,
                into=p.layer.name,
                direction=p.direction,
                channels=p.bn.channels,
                shift_kept=p.shift_kept,
                shared_calls=len(plans),
                bytes_added=added if p.bn.node is node else 0,
            )
        self._plans.clear()

    def _copy(self, fold: _Fold) -> tuple[list[OnnxFoldPlan], int]:
        """Give the fold's calls their own copy of the weight and/or bias; return the plans on
        the copies and the bytes added. Folds already decided for the weight carry over."""
        g = self.g
        layer = fold.plans[0].layer
        weight, bias = layer.weight, layer.bias
        new_weight, new_bias, added = weight, bias, 0
        if fold.copy_weight:
            array = layer.weight_array
            new_weight = _new_initializer(g, weight.name, np.array(array, copy=True))
            added += array.nbytes
            for p in fold.plans:
                _repoint(p.layer.node, weight, new_weight)
        if fold.copy_bias:
            array = g.constant(bias)
            new_bias = _new_initializer(g, bias.name, np.array(array, copy=True))
            added += array.nbytes
            for p in fold.plans:
                _repoint(p.layer.bias_add or p.layer.node, bias, new_bias)
        plans = [
            replace(p, layer=replace(p.layer, weight=new_weight, bias=new_bias)) for p in fold.plans
        ]
        old = self.pending.get(weight)
        if old is not None:
            calls = {p.layer.node: p.layer for p in plans}
            for call in calls:
                old.calls.pop(call, None)
            if new_weight is weight:
                old.calls.update(calls)
            else:
                self.pending[new_weight] = _LayerFolds(calls, list(old.affines))
                if not old.calls:
                    del self.pending[weight]
        _drop_if_unused(weight, g)
        _drop_if_unused(bias, g)
        return plans, added


def _repoint(node: ir.Node, old: ir.Value, new: ir.Value) -> None:
    for use in list(old.uses()):
        if use.node is node:
            node.replace_input_with(use.idx, new)


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


def fold_onnx_model(model: ir.Model, *, duplicate_shared: bool = False) -> FoldReport:
    """Fold every BN of `model` (an onnx_ir model, changed in place) that folds exactly.

    Returns the report: each BatchNormalization node folded (into which layer, which way) or
    left, with its reason. A layer called several times folds a BN once when all its calls
    take the same BN; with `duplicate_shared`, calls that take different BNs (or none) get
    their own copies of the weights. Raises InvalidModelError on NaN/Inf or negative
    variances.
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
    folder = _Folder(g, sites, duplicate_shared)
    for node in bns:
        if node not in folder.decided:  # not already folded with another call of its layer
            folder.decide(node)
    for folds in folder.pending.values():
        _apply_layer(folds, g)
    report.decisions.extend(folder.decided[node] for node in bns)
    for node, reason in _nested_batchnorms(model):
        report.decisions.append(
            FoldDecision(name=node_name(node), kind=KIND, status=LEFT, reason=reason)
        )
    return report


def fold_onnx(model, *, duplicate_shared: bool = False) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold an ONNX model given as a path or an onnx.ModelProto; return the folded
    ModelProto and the report. The input (file or proto) is left unchanged; weights stored as
    external data are read from next to the file. `duplicate_shared` as in
    `fold_onnx_model`."""
    if isinstance(model, (str, os.PathLike)):
        ir_model = ir.load(os.fspath(model))
    elif isinstance(model, onnx.ModelProto):
        ir_model = ir.serde.deserialize_model(model)  # folds write new tensors, never into these
    else:
        raise TypeError(f"fold_onnx() takes a path or an onnx.ModelProto, not {type(model)}")
    report = fold_onnx_model(ir_model, duplicate_shared=duplicate_shared)
    return ir.serde.serialize_model(ir_model), report
