"""A Conv followed by a 1x1 Conv with nothing between, merged into one Conv (ONNX graphs),
where that is exact and no larger: the ONNX engine's counterpart of `chains`, on the same
arithmetic (`merge_math.compose_pointwise`). The merged Conv's output keeps the name of the
1x1 Conv's output. Chains that stay are not reported: they are not sums of branches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir
import torch

from bnexport.folding.merge_math import Geometry, MergedParameters, compose_pointwise
from bnexport.folding.onnx_branches import conv_geometry, scope, store_merged
from bnexport.folding.onnx_graph import OnnxGraph, attr, is_onnx_op, node_name
from bnexport.folding.onnx_rewrite import drop_if_unused
from bnexport.folding.onnx_sites import match_layer


@dataclass
class OnnxChainPlan:
    first: ir.Node
    second: ir.Node
    geometry: Geometry
    name: str
    labels: list[str]


def _conv(node: ir.Node, g: OnnxGraph) -> Geometry | None:
    """The Conv's geometry, when it is a Conv of the main graph with constant weights whose
    weights and bias it alone reads."""
    if not is_onnx_op(node, "Conv") or node.graph is not g.graph:
        return None
    if isinstance(match_layer(node, g, with_bias_add=False), str):
        return None
    for value in node.inputs[1:3]:
        if value is None:
            continue
        if not value.is_initializer() or any(u.node is not node for u in value.uses()):
            return None
    geometry = conv_geometry(node, g)
    return None if isinstance(geometry, str) else geometry


def _label(geometry: Geometry) -> str:
    return "conv" + "x".join(str(k) for k in geometry.kernel)


def onnx_chain_weights(g: OnnxGraph) -> set[ir.Value]:
    """The weights a chain may take: of every 1x1 Conv and the Conv before it, so that the
    fold keeps their float64 values for the merge."""
    found: set[ir.Value] = set()
    for node in g.graph:
        if not is_onnx_op(node, "Conv") or len(node.inputs) < 2:
            continue
        weight = g.constant(node.inputs[1])
        if weight is None or any(k != 1 for k in weight.shape[2:]):
            continue
        found.add(node.inputs[1])
        source = node.inputs[0].producer()
        if source is not None and is_onnx_op(source, "Conv") and len(source.inputs) > 1:
            found.add(source.inputs[1])
    return found


def find_onnx_chains(g: OnnxGraph) -> list[OnnxChainPlan]:
    """Every Conv -> 1x1 Conv pair of the main graph that merges into one Conv, in order."""
    plans: list[OnnxChainPlan] = []
    taken: set[ir.Node] = set()
    for node in g.graph:
        second = _conv(node, g)
        if second is None or node in taken:
            continue
        pointwise = (
            second.groups == 1
            and all(k == 1 for k in second.kernel)
            and all(s == 1 for s in second.stride)
            and all(p == (0, 0) for p in second.pads)
        )
        source = node.inputs[0].producer()
        if not pointwise or source is None or source in taken:
            continue
        first = _conv(source, g)
        if first is None or g.sole_consumer(source.outputs[0]) is not node:
            continue
        merged = Geometry(
            first.kernel,
            first.stride,
            first.pads,
            first.dilation,
            1,
            first.in_channels,
            second.out_channels,
        )
        if merged.weights > first.weights + second.weights:
            continue
        name = scope([source, node]) or node_name(node)
        plans.append(OnnxChainPlan(source, node, merged, name, [_label(first), _label(second)]))
        taken.update((source, node))
    return plans


def apply_onnx_chain(
    plan: OnnxChainPlan,
    g: OnnxGraph,
    values: Callable[[ir.Value], torch.Tensor],
    exact: dict | None = None,
    written: MergedParameters | None = None,
) -> int:
    """One Conv in the pair's place (its output keeps the 1x1 Conv's name); returns the bytes
    of initializers this removes. `values(v)`: the float64 value of a weight or bias; pairs
    of equal values share the initializers in `written`."""
    before = sum(
        v.const_value.nbytes for v in g.graph.initializers.values() if v.const_value is not None
    )
    first, second = plan.first, plan.second

    def bias(node: ir.Node) -> torch.Tensor | None:
        value = node.inputs[2] if len(node.inputs) > 2 else None
        return None if value is None else values(value)

    weight, b = compose_pointwise(
        values(first.inputs[1]),
        bias(first),
        int(attr(first, "group", 1)),
        values(second.inputs[1]),
        bias(second),
    )
    dtype = g.constant(first.inputs[1]).dtype
    base = plan.name.replace("/", "_")
    w_value, b_value = store_merged(g, base, weight, b, dtype, exact, written)
    geometry = plan.geometry
    conv = ir.Node(
        "",
        "Conv",
        [first.inputs[0], w_value, b_value],
        attributes=[
            ir.AttrInt64s("kernel_shape", list(geometry.kernel)),
            ir.AttrInt64s("strides", list(geometry.stride)),
            ir.AttrInt64s("pads", [p for p, _ in geometry.pads] + [q for _, q in geometry.pads]),
            ir.AttrInt64s("dilations", list(geometry.dilation)),
            ir.AttrInt64("group", 1),
        ],
        name=g.fresh_name(f"{base}_merged"),
    )
    out = second.outputs[0]
    result = conv.outputs[0]
    g.graph.insert_before(second, conv)
    name, declared_type, declared_shape = out.name, out.type, out.shape
    ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
    params = [v for n in (first, second) for v in n.inputs[1:] if v is not None]
    g.graph.remove(second, safe=True)
    g.graph.remove(first, safe=True)
    for value in params:
        drop_if_unused(value, g)
    result.name = name
    result.type, result.shape = declared_type, declared_shape
    after = sum(
        v.const_value.nbytes for v in g.graph.initializers.values() if v.const_value is not None
    )
    return before - after
