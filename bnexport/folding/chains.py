"""A conv followed by a 1x1 conv with nothing between, merged into one conv (torch.export
graphs), where that is exact and no larger.

After the BN folds, a kxk conv -> BN -> 1x1 conv is a kxk conv -> 1x1 conv: the 1x1 conv
(stride 1, no padding, one group) mixes the channels of each position, so the pair is one
kxk conv of the first's geometry (`merge_math.compose_pointwise`). It merges only when the
merged weight holds no more elements than the two (a depthwise kxk before a dense 1x1, as in
ShuffleNet, stays: the merged conv would be a dense kxk), and when each conv's weights serve
that call alone. Chains that stay are not reported: they are not sums of branches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from bnexport.folding.branches import common_scope, conv_geometry, store_merged
from bnexport.folding.merge_math import Geometry, MergedParameters, compose_pointwise
from bnexport.folding.program_state import ProgramState
from bnexport.folding.sites import LayerCall, data_users, match_layer

aten = torch.ops.aten

_CONV_OPS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}


@dataclass
class ChainPlan:
    """`first` (a conv) then `second` (a 1x1 conv reading only it), as one conv `geometry`."""

    first: LayerCall
    second: LayerCall
    geometry: Geometry
    name: str
    labels: list[str]
    bytes_removed: int


def _own_weights(layer: LayerCall) -> bool:
    readers = data_users(layer.weight) + ([] if layer.bias is None else data_users(layer.bias))
    return all(r is layer.node for r in readers)


def _pointwise(layer: LayerCall) -> bool:
    geometry = conv_geometry(layer)
    return (
        not isinstance(geometry, str)
        and geometry.groups == 1
        and all(k == 1 for k in geometry.kernel)
        and all(s == 1 for s in geometry.stride)
        and all(p == (0, 0) for p in geometry.pads)
    )


def _label(geometry: Geometry) -> str:
    return "conv" + "x".join(str(k) for k in geometry.kernel)


def chain_weights(state: ProgramState) -> set[str]:
    """The weights and biases (by target) that a chain may take: of every 1x1 conv and the
    conv before it, so that the fold keeps their float64 values for the merge."""
    found: set[str] = set()
    for node in state.graph.nodes:
        second = match_layer(node, state)
        if second is None or second.kind != "conv" or not _pointwise(second):
            continue
        source = node.args[0]
        first = match_layer(source, state) if isinstance(source, fx.Node) else None
        for layer in (second, first):
            if layer is not None:
                found.update(state.target(v) for v in (layer.weight, layer.bias) if v is not None)
    return found


def find_chains(state: ProgramState) -> list[ChainPlan]:
    """Every conv -> 1x1 conv pair of the graph that merges into one conv, in graph order."""
    plans: list[ChainPlan] = []
    taken: set[fx.Node] = set()
    for node in state.graph.nodes:
        second = match_layer(node, state)
        if second is None or second.kind != "conv" or node in taken or not _pointwise(second):
            continue
        source = node.args[0]
        first = match_layer(source, state) if isinstance(source, fx.Node) else None
        if first is None or first.kind != "conv" or source in taken:
            continue
        if data_users(source) != [node] or not (_own_weights(first) and _own_weights(second)):
            continue
        geometry = conv_geometry(first)
        if isinstance(geometry, str) or any(b != e for b, e in geometry.pads):
            continue
        out_channels = int(second.weight.meta["val"].shape[0])
        merged = Geometry(
            geometry.kernel,
            geometry.stride,
            geometry.pads,
            geometry.dilation,
            1,
            geometry.in_channels,
            out_channels,
        )
        second_weights = out_channels * geometry.out_channels
        if merged.weights > geometry.weights + second_weights:
            continue
        elem = first.weight.meta["val"].element_size()
        before = (geometry.weights + second_weights + geometry.out_channels + out_channels) * elem
        removed = before - (merged.weights + out_channels) * elem
        name = common_scope([source, node]) or second.name
        labels = [_label(geometry), _label(conv_geometry(second))]
        plans.append(ChainPlan(first, second, merged, name, labels, max(removed, 0)))
        taken.update((source, node))
    return plans


def apply_chain(
    plan: ChainPlan,
    state: ProgramState,
    values: Callable[[fx.Node], torch.Tensor],
    exact: dict | None = None,
    written: MergedParameters | None = None,
) -> fx.Node:
    """One conv in the pair's place; returns its node. `values(node)`: the float64 value of a
    stored weight or bias (with the folds and merges into it applied); `exact` receives the
    merged weight and bias in float64; pairs of equal values share the parameters in
    `written`."""
    first, second = plan.first, plan.second
    weight, bias = compose_pointwise(
        values(first.weight),
        None if first.bias is None else values(first.bias),
        first.groups,
        values(second.weight),
        None if second.bias is None else values(second.bias),
    )
    w_node, b_node = store_merged(state, plan.name, weight, bias, first, exact, written)
    g = plan.geometry
    args = (
        first.node.args[0],
        w_node,
        b_node,
        list(g.stride),
        [b for b, _ in g.pads],
        list(g.dilation),
        1,
    )
    with state.graph.inserting_before(second.node):
        layer = state.graph.call_function(_CONV_OPS[len(g.kernel)], args)
    layer.meta["val"] = second.node.meta["val"]
    for key in ("nn_module_stack", "stack_trace"):
        if key in second.node.meta:
            layer.meta[key] = second.node.meta[key]
    second.node.replace_all_uses_with(layer)
    state.graph.erase_node(second.node)
    state.graph.erase_node(first.node)
    return layer
