"""Sums of parallel branches in an ONNX graph, merged into one Conv (the ONNX engine's
counterpart of `branches`, on the same arithmetic, `merge_math`).

A sum is a tree of Add and Sub nodes (with the maps the BN folds left, such as an identity
branch's BatchNormalization or a layer scale's Mul, and Identity / inference Dropout nodes on
the way) whose terms are Conv nodes reading one value x, or x itself. `find_onnx_merges` says
for each such sum how it merges or why not, reading the graph only; `apply_onnx_merge` puts
one Conv in its place, computed from the branches' float64 weights. The merged Conv's output
keeps the name of the sum's output, so a check compares it with the original's tensor of the
same name. A sum is a candidate when at least two of its terms read one x and one is a Conv
(a plain residual `Conv(Relu(Conv(x))) + x` is not).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from bnexport.folding.math import F64
from bnexport.folding.merge_math import (
    Geometry,
    MergedGeometry,
    MergedParameters,
    combine,
    identity_geometry,
    identity_kernel,
    merged_geometry,
    place_kernel,
)
from bnexport.folding.onnx_graph import OnnxGraph, attr, is_onnx_op, node_name
from bnexport.folding.onnx_rewrite import drop_if_unused, new_initializer
from bnexport.folding.onnx_sites import AffineSite, match_layer

_SIGN = {"Add": 1.0, "Sub": -1.0}


@dataclass
class OnnxTerm:
    """One term of a sum: `value` times `scale` (per channel or one number); `via` is the map
    applied right on it."""

    value: ir.Value
    scale: torch.Tensor
    via: AffineSite | None = None
    conv: ir.Node | None = None
    base: ir.Value | None = None
    problem: str | None = None
    pool: Geometry | None = None  # an AveragePool of `base` (a depthwise conv of 1/k)


@dataclass
class OnnxSum:
    root: ir.Value
    terms: list[OnnxTerm] = field(default_factory=list)
    shift: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=F64))
    maps: list[AffineSite] = field(default_factory=list)
    nodes: list[ir.Node] = field(default_factory=list)
    axes: set[int] = field(default_factory=set)


@dataclass
class OnnxMergePlan:
    sum: OnnxSum
    input: ir.Value
    name: str
    merged: MergedGeometry
    labels: list[str]

    @property
    def convs(self) -> list[ir.Node]:
        return [t.conv for t in self.sum.terms if t.conv is not None]


@dataclass
class OnnxMergeRefusal:
    root: ir.Value
    name: str
    labels: list[str]
    reason: str


# --------------------------------------------------------------------------- finding sums


def _sole_reader(value: ir.Value, g: OnnxGraph) -> bool:
    return g.sole_consumer(value) is not None


def _is_sum(node: ir.Node, g: OnnxGraph) -> bool:
    """An Add or Sub of two computed values of its own shape (no broadcasting)."""
    if not is_onnx_op(node, "Add", "Sub") or len(node.inputs) != 2 or node.graph is not g.graph:
        return False
    if any(v is None or g.constant(v) is not None for v in node.inputs):
        return False
    shapes = [g.shape(v) for v in (*node.inputs, node.outputs[0])]
    return shapes[0] is not None and all(s == shapes[0] for s in shapes)


def _is_copy(node: ir.Node, g: OnnxGraph) -> bool:
    if is_onnx_op(node, "Identity"):
        return True
    if not is_onnx_op(node, "Dropout"):
        return False
    training = node.inputs[2] if len(node.inputs) > 2 else None
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        return False
    if training is None:
        return True
    flag = g.constant(training)
    return flag is not None and not np.any(flag)


def _climb(value: ir.Value, maps: dict, g: OnnxGraph) -> ir.Value:
    """Up through the maps and copies that alone read the sum's output."""
    by_first = {site.node: site for site in maps.values()}
    while True:
        user = g.sole_consumer(value)
        if user is None:
            return value
        site = by_first.get(user)
        if site is not None and site.input is value:
            value = site.output
        elif _is_copy(user, g) and user.inputs[0] is value:
            value = user.outputs[0]
        else:
            return value


def _expand(top: ir.Value, maps: dict, g: OnnxGraph) -> OnnxSum:
    found = OnnxSum(top)

    def visit(value: ir.Value, scale: torch.Tensor, via, root: bool) -> None:
        if not root and not _sole_reader(value, g):
            found.terms.append(OnnxTerm(value, scale, via))
            return
        site = maps.get(value)
        node = value.producer()
        if site is not None and all(_sole_reader(n.outputs[0], g) for n in site.nodes[:-1]):
            if site.channels > 1:
                found.axes.add(site.axis)
            found.shift = found.shift + scale * site.t
            found.maps.append(site)
            found.nodes += site.nodes
            visit(site.input, scale * site.s, site, False)
        elif node is not None and _is_sum(node, g):
            found.nodes.append(node)
            visit(node.inputs[0], scale, None, False)
            visit(node.inputs[1], scale * _SIGN[node.op_type], None, False)
        elif node is not None and _is_copy(node, g):
            found.nodes.append(node)
            visit(node.inputs[0], scale, via, False)
        else:
            found.terms.append(OnnxTerm(value, scale, via))

    visit(top, torch.ones(1, dtype=F64), None, True)
    found.nodes = list(dict.fromkeys(found.nodes))
    return found


def _conv_of(value: ir.Value, g: OnnxGraph) -> ir.Node | None:
    node = value.producer()
    if node is None or not is_onnx_op(node, "Conv"):
        return None
    site = match_layer(node, g, with_bias_add=False)
    return None if isinstance(site, str) else node


def _candidate(found: OnnxSum, g: OnnxGraph) -> ir.Value | None:
    """The value most terms read, when at least two do and one of them is a Conv."""
    inside = set(found.nodes)
    for term in found.terms:
        conv = _conv_of(term.value, g)
        if conv is None:
            continue
        term.conv, term.base = conv, conv.inputs[0]
        others = [n for n in g.consumers(term.value) if n not in inside]
        if others or term.value.is_graph_output():
            other = g.describe(others[0]) if others else "the model's output"
            term.problem = (
                f"the output of {g.describe(conv)} is also used by {other}, so the layer has "
                "to stay"
            )
    inputs = {t.base for t in found.terms if t.conv is not None}
    for term in found.terms:
        if term.conv is not None:
            continue
        node = term.value.producer()
        term.pool = _average(node, g) if node is not None else None
        if term.pool is not None:
            term.base = node.inputs[0]
            continue
        inner = _conv_of(node.inputs[0], g) if node is not None and node.inputs else None
        if term.value not in inputs and inner is not None:
            term.conv, term.base = inner, inner.inputs[0]
            term.problem = (
                f"the branch through {g.describe(node)} after {g.describe(inner)} is not linear"
            )
        else:
            term.base = term.value
    counts: dict[ir.Value, int] = {}
    for term in found.terms:
        counts[term.base] = counts.get(term.base, 0) + 1
    bases = [
        b
        for b, n in counts.items()
        if n >= 2 and any(t.conv is not None and t.base is b for t in found.terms)
    ]
    return max(bases, key=lambda b: counts[b]) if bases else None


def find_onnx_merges(g: OnnxGraph, maps: dict) -> list[OnnxMergePlan | OnnxMergeRefusal]:
    """Every sum of branches of one value in the main graph, in graph order: a plan to merge
    it, or why not (found from the last node up, so that a sum is taken whole). `maps`: the
    maps left in the graph, by their output value."""
    claimed: set[ir.Node] = set()
    refused: set[ir.Node] = set()
    found: list[OnnxMergePlan | OnnxMergeRefusal] = []
    for node in reversed(list(g.graph)):
        if node in claimed or not _is_sum(node, g):
            continue
        branch_sum = _expand(_climb(node.outputs[0], maps, g), maps, g)
        result = _plan(branch_sum, g)
        if isinstance(result, OnnxMergePlan):
            claimed.update(branch_sum.nodes)
            found.append(result)
        elif isinstance(result, OnnxMergeRefusal) and node not in refused:
            found.append(result)
        if result is not None:
            refused.update(branch_sum.nodes)
    return found[::-1]  # in graph order


# --------------------------------------------------------------------------- the plan


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    value = attr(node, name, None)
    return default if value is None else [int(v) for v in value]


def conv_geometry(conv: ir.Node, g: OnnxGraph) -> Geometry | str:
    """How a Conv reads its input (kernel, strides, pads, dilations, group), or why not."""
    weight = g.constant(conv.inputs[1])
    kernel = tuple(int(k) for k in weight.shape[2:])
    rank = len(kernel)
    strides = tuple(_ints(conv, "strides", [1] * rank))
    dilations = tuple(_ints(conv, "dilations", [1] * rank))
    auto_pad = attr(conv, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            return f"{g.describe(conv)} pads with {auto_pad} and a stride"
        totals = [d * (k - 1) for k, d in zip(kernel, dilations)]
        low = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        pads = tuple((lo, t - lo) for lo, t in zip(low, totals))
    elif auto_pad == "VALID":
        pads = ((0, 0),) * rank
    else:
        flat = _ints(conv, "pads", [0] * 2 * rank)
        pads = tuple((flat[a], flat[a + rank]) for a in range(rank))
    groups = int(attr(conv, "group", 1))
    channels = (int(weight.shape[1]) * groups, int(weight.shape[0]))
    return Geometry(kernel, strides, pads, dilations, groups, *channels)


def _average(node: ir.Node, g: OnnxGraph) -> Geometry | None:
    """An AveragePool as a depthwise conv with every weight 1 / k, when it is one exactly:
    explicit padding counted in the average (or none), no ceil mode, no dilation."""
    if not is_onnx_op(node, "AveragePool"):
        return None
    shape = g.shape(node.inputs[0])
    kernel = _ints(node, "kernel_shape", [])
    if shape is None or not shape[1].is_Integer or len(kernel) != len(shape) - 2:
        return None
    rank = len(kernel)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    flat = _ints(node, "pads", [0] * 2 * rank)
    counted = int(attr(node, "count_include_pad", 0)) or not any(flat)
    if auto_pad not in ("NOTSET", "VALID") or int(attr(node, "ceil_mode", 0)) or not counted:
        return None
    if any(d != 1 for d in _ints(node, "dilations", [1] * rank)):
        return None
    pads = tuple((flat[a], flat[a + rank]) for a in range(rank)) if auto_pad == "NOTSET" else None
    channels = int(shape[1])
    return Geometry(
        tuple(kernel),
        tuple(_ints(node, "strides", [1] * rank)),
        pads or ((0, 0),) * rank,
        (1,) * rank,
        channels,
        channels,
        channels,
        True,
    )


def _label(term: OnnxTerm, g: OnnxGraph) -> str:
    if term.pool is not None:
        return "avgpool" + "x".join(str(k) for k in term.pool.kernel)
    if term.conv is None:
        if term.via is None:
            return "identity"
        return "identity BN" if term.via.is_batchnorm else f"identity {term.via.kind}"
    kernel = g.constant(term.conv.inputs[1]).shape[2:]
    return "conv" + "x".join(str(k) for k in kernel)


def _path(node: ir.Node) -> list[str] | None:
    """The modules a node lies in, outermost first: from the exporter's name scopes (torch.onnx
    records `['', 'stages', 'stages.2', 'stages.2.rbr_dense', ..., 'conv2d']`), or from a name
    such as `/stages/stages.2/rbr_dense/conv/Conv`; None when it has neither."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            return [str(p) for p in ast.literal_eval(scopes)[:-1] if p]
        except (ValueError, SyntaxError, TypeError):
            return None
    name = node_name(node)
    return name.strip("/").split("/")[:-1] if "/" in name else None


def scope(nodes: list[ir.Node]) -> str:
    """The innermost module the nodes share (`stages.2`), or "" when none is known."""
    paths = [_path(n) for n in nodes]
    if not paths or any(p is None for p in paths):
        return ""
    common = ""
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common = parts[0]
    return common


def _initializer_bytes(g: OnnxGraph) -> int:
    return sum(
        v.const_value.nbytes for v in g.graph.initializers.values() if v.const_value is not None
    )


def _plan(found: OnnxSum, g: OnnxGraph) -> OnnxMergePlan | OnnxMergeRefusal | None:
    x = _candidate(found, g)
    if x is None:
        return None
    terms = found.terms
    labels = [_label(t, g) for t in terms]
    convs = [t.conv for t in terms if t.conv is not None]
    largest = max(convs, key=lambda c: g.constant(c.inputs[1]).size)
    name = scope(found.nodes + convs) or node_name(largest)

    def refuse(reason: str) -> OnnxMergeRefusal:
        return OnnxMergeRefusal(found.root, name, labels, reason)

    problem = next((t.problem for t in terms if t.base is x and t.problem), None)
    if problem is not None:
        return refuse(problem)
    if any(t.base is not x for t in terms):
        return None  # other values are summed in too: a part of the sum may merge on its own
    if any(axis != 1 for axis in found.axes):
        return refuse("a map in the sum scales another axis than the convs' channels")
    dtypes = {g.constant(c.inputs[1]).dtype for c in convs}
    if len(dtypes) != 1:
        return refuse("its branches hold weights of different dtypes")
    shape = g.shape(x)
    rank = len(shape) - 2 if shape is not None else None
    geometries = []
    for t in terms:
        if t.pool is not None:
            geometries.append(t.pool)
            continue
        if t.conv is None:
            if shape is None or not shape[1].is_Integer:
                return refuse(f"the channels of '{x.name}' are unknown")
            geometries.append(identity_geometry(int(shape[1]), rank))
            continue
        geometry = conv_geometry(t.conv, g)
        if isinstance(geometry, str):
            return refuse(geometry)
        geometries.append(geometry)
    merged = merged_geometry(geometries, labels)
    if isinstance(merged, str):
        return refuse(merged)
    return OnnxMergePlan(found, x, name, merged, labels)


# --------------------------------------------------------------------------- the rewrite


def store_merged(
    g: OnnxGraph,
    base: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    dtype: np.dtype,
    exact: dict | None,
    written: MergedParameters | None,
) -> tuple[ir.Value, ir.Value]:
    """New initializers holding a merged Conv's float64 weight and bias cast once to `dtype`;
    or those of an earlier merge of the same values (another call of shared weights)."""
    found = written.find(weight, bias) if written is not None else None
    if found is not None:
        return found
    w_value = new_initializer(g, f"{base}_merged_weight", weight.numpy().astype(dtype))
    b_value = new_initializer(g, f"{base}_merged_bias", bias.numpy().astype(dtype))
    if exact is not None:
        exact[w_value.name] = weight.numpy()
        exact[b_value.name] = bias.numpy()
    if written is not None:
        written.remember(weight, bias, (w_value, b_value))
    return w_value, b_value


def apply_onnx_merge(
    plan: OnnxMergePlan,
    g: OnnxGraph,
    values: Callable[[ir.Value], torch.Tensor],
    exact: dict | None = None,
    written: MergedParameters | None = None,
) -> int:
    """Put one Conv computing the sum in its place (its output keeps the sum's name) and take
    the sum's nodes and the constants only they read out; returns the bytes of initializers
    this removes. `values(v)`: the float64 value of a weight or bias initializer (with the
    folds into it applied); merges of equal values share the initializers in `written`."""
    before = _initializer_bytes(g)
    geometry = plan.merged.geometry
    kernels, biases, scales = [], [], []
    for term, offset in zip(plan.sum.terms, plan.merged.offsets):
        if term.pool is not None:
            taps = term.pool.kernel
            shape = (geometry.out_channels, 1, *taps)
            average = torch.full(shape, 1.0 / math.prod(taps), dtype=F64)
            kernels.append(place_kernel(average, geometry.out_channels, geometry, offset))
            biases.append(None)
        elif term.conv is None:
            kernels.append(identity_kernel(geometry, offset))
            biases.append(None)
        else:
            groups = int(attr(term.conv, "group", 1))
            kernels.append(place_kernel(values(term.conv.inputs[1]), groups, geometry, offset))
            bias = term.conv.inputs[2] if len(term.conv.inputs) > 2 else None
            biases.append(None if bias is None else values(bias))
        scales.append(term.scale)
    weight, bias = combine(kernels, biases, scales, plan.sum.shift)
    dtype = g.constant(plan.convs[0].inputs[1]).dtype
    base = plan.name.replace("/", "_")
    w_value, b_value = store_merged(g, base, weight, bias, dtype, exact, written)
    # an earlier merge may have put its Conv where x was computed: read x as the convs do now
    x = plan.convs[0].inputs[0]
    conv = ir.Node(
        "",
        "Conv",
        [x, w_value, b_value],
        attributes=[
            ir.AttrInt64s("kernel_shape", list(geometry.kernel)),
            ir.AttrInt64s("strides", list(geometry.stride)),
            ir.AttrInt64s("pads", [b for b, _ in geometry.pads] + [e for _, e in geometry.pads]),
            ir.AttrInt64s("dilations", list(geometry.dilation)),
            ir.AttrInt64("group", geometry.groups),
        ],
        name=g.fresh_name(f"{base}_merged"),
    )
    root = plan.sum.root
    result = conv.outputs[0]
    g.graph.insert_before(root.producer(), conv)
    name, declared_type, declared_shape = root.name, root.type, root.shape
    ir.convenience.replace_all_uses_with(root, result, replace_graph_outputs=True)
    doomed = set(plan.sum.nodes) | set(plan.convs)
    params = [v for n in doomed for v in n.inputs if v is not None]
    for node in reversed(list(g.graph)):
        if node in doomed:
            g.graph.remove(node, safe=True)
    for value in params:
        drop_if_unused(value, g)
    result.name = name
    result.type, result.shape = declared_type or x.type, declared_shape
    return before - _initializer_bytes(g)
