"""Sums of parallel branches in a torch.export graph, merged into one layer.

Re-parameterisable blocks (RepVGG, MobileOne, ACNet, RepViT, FastViT, RepGhost) train
with parallel branches of one tensor x and add them up: BN(conv3x3(x)) + BN(conv1x1(x)) +
BN(x). After the BN folds each branch is a conv, x itself, or a per-channel map of x, and
their sum is one conv of x (`merge_math`). `find_merges` walks every sum of the graph (a
tree of Adds and Subs, with per-channel maps, eval-mode dropouts and copies on the way)
down to its terms and says, for each sum whose terms read one tensor, how it merges or
why it cannot. `apply_merge` puts the merged conv in the sum's place; the caller folds
the BNs into the branches first and hands over their exact float64 weights.

A sum is a candidate when at least two of its terms are branches of one tensor x (a layer
reading x, x itself, or a nonlinearity right after a layer reading x) and one of them is a
layer; only candidates are reported, so a plain residual `conv2(relu(conv1(x))) + x` is not.
This module reads the graph until `apply_merge` rewrites it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from bnexport.folding.affines import ConstantValues, affine_calls
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
from bnexport.folding.patterns import describe, map_scale_shift
from bnexport.folding.program_state import ProgramState
from bnexport.folding.sites import (
    BatchNormCall,
    LayerCall,
    data_users,
    match_batchnorm,
    match_layer,
    module_scope,
)

aten = torch.ops.aten

# the sign each op gives its second operand
_SUMS = {aten.add.Tensor: 1, aten.add_.Tensor: 1, aten.sub.Tensor: -1, aten.sub_.Tensor: -1}
_IN_PLACE = {aten.add_.Tensor, aten.sub_.Tensor}
_COPIES = {aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default}
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default}
_CONV_OPS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_POOLS = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


@dataclass
class Term:
    """One term of a sum: the value of `node` times `scale` (per channel, or one number).
    `via` is the map applied right on it (an identity branch's BN)."""

    node: fx.Node
    scale: torch.Tensor
    via: BatchNormCall | None = None
    layer: LayerCall | None = None
    base: fx.Node | None = None  # the tensor the branch reads
    problem: str | None = None  # why the term is not a linear branch of `base`
    pool: Geometry | None = None  # an average pooling of `base` (a depthwise conv of 1/k)

    @property
    def identity(self) -> bool:
        return self.layer is None and self.pool is None


@dataclass
class BranchSum:
    """A tree of Adds and Subs (and maps) from `root` down to its terms:
    value(root) = sum_i scale_i * value(term_i) + shift, per channel on the maps' axis."""

    root: fx.Node
    terms: list[Term] = field(default_factory=list)
    shift: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=F64))
    maps: list[BatchNormCall] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)  # the sum's own nodes, maps included
    axes: set[int] = field(default_factory=set)  # the axes of its per-channel maps


@dataclass
class MergePlan:
    """How the sum at `root` becomes one layer reading `input`."""

    sum: BranchSum
    input: fx.Node
    name: str
    kind: str  # "conv" or "linear"
    geometries: list[Geometry]
    merged: MergedGeometry
    labels: list[str]
    axis: int
    bytes_removed: int

    @property
    def layers(self) -> list[LayerCall]:
        return [t.layer for t in self.sum.terms if t.layer is not None]


@dataclass
class MergeRefusal:
    """A sum of branches of one tensor that stays, and why."""

    root: fx.Node
    name: str
    labels: list[str]
    reason: str


# --------------------------------------------------------------------------- finding sums


def _maps_by_output(state: ProgramState, constants: ConstantValues) -> dict:
    """The BN calls and other frozen affine maps of the graph, by the node giving their
    output."""
    maps = {}
    for node in state.graph.nodes:
        call = match_batchnorm(node)
        if call is not None and not call.uses_batch_stats:
            maps[call.node] = call
    for call in affine_calls(state.graph, constants):
        maps[call.node] = call
    return maps


def _is_sum(node: fx.Node) -> bool:
    """An Add or Sub of two tensors of its own shape (no broadcasting), by a number."""
    if node.op != "call_function" or node.target not in _SUMS or len(node.args) != 2:
        return False
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return False
    if node.target in _IN_PLACE and data_users(a) != [node]:
        return False  # it writes into a tensor something else reads
    shapes = [str(tuple(n.meta["val"].shape)) if "val" in n.meta else None for n in (a, b, node)]
    return shapes[0] is not None and len(set(shapes)) == 1


def _is_copy(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in _COPIES:
        return True
    return node.target in _DROPOUTS and len(node.args) > 2 and node.args[2] is False


def _climb(node: fx.Node, maps: dict) -> fx.Node:
    """The top of the sum at `node`: up through the maps and copies that alone read it (the
    BN after a RepViT block's sum)."""
    by_op = {m.op_node: m for m in maps.values()}
    while True:
        users = data_users(node)
        if len(users) != 1:
            return node
        user = users[0]
        if user in by_op and by_op[user].input is node:
            node = by_op[user].node
        elif _is_copy(user) and user.args[0] is node:
            node = user
        else:
            return node


def _expand(top: fx.Node, maps: dict, state: ProgramState) -> BranchSum:
    found = BranchSum(top)

    def visit(node: fx.Node, scale: torch.Tensor, via: BatchNormCall | None, root: bool):
        if not root and len(data_users(node)) != 1:
            found.terms.append(Term(node, scale, via))
            return
        call = maps.get(node)
        if call is not None:
            s, t = map_scale_shift(call, state)
            if s.numel() > 1:
                found.axes.add(call.axis)
            found.shift = found.shift + scale * t
            found.maps.append(call)
            found.nodes += [call.op_node, *call.extra_nodes, call.node]
            visit(call.input, scale * s, call, False)
        elif _is_sum(node):
            found.nodes.append(node)
            alpha = float(node.kwargs.get("alpha", 1)) * _SUMS[node.target]
            visit(node.args[0], scale, None, False)
            visit(node.args[1], scale * alpha, None, False)
        elif _is_copy(node):
            found.nodes.append(node)
            visit(node.args[0], scale, via, False)
        else:
            found.terms.append(Term(node, scale, via))

    visit(top, torch.ones(1, dtype=F64), None, True)
    found.nodes = list(dict.fromkeys(found.nodes))
    return found


def _classify_layer(term: Term, inside: set[fx.Node], state: ProgramState) -> None:
    """A term that is a conv or linear layer reads the layer's input; it has to stay when
    something outside the sum (`inside`) reads its output too."""
    node = term.node
    layer = match_layer(node, state)
    if layer is None or layer.kind not in ("conv", "linear"):
        return
    term.layer, term.base = layer, node.args[0]
    others = [u for u in data_users(node) if u not in inside]
    if others:
        term.problem = (
            f"the output of {layer.name} is also used by {describe(others[0], state)}, so the "
            "layer has to stay"
        )


def _classify_other(term: Term, inputs: set[fx.Node], state: ProgramState) -> None:
    """A term that is no layer: the tensor some layer of the sum reads (`inputs`) itself, or
    a nonlinearity right after a layer (a branch that is not linear), or another tensor."""
    node = term.node
    first = node.args[0] if node.op == "call_function" and node.args else None
    pool = _average(node)
    if pool is not None:
        term.pool, term.base = pool, first
        return
    inner = match_layer(first, state) if isinstance(first, fx.Node) else None
    if node not in inputs and inner is not None and inner.kind in ("conv", "linear"):
        term.layer, term.base = inner, first.args[0]
        term.problem = (
            f"the branch through {describe(node, state)} after {inner.name} is not linear"
        )
        return
    term.base = node


def _average(node: fx.Node) -> Geometry | None:
    """An average pooling as a depthwise conv with every weight 1 / k (DBB's average branch),
    when it is one exactly: the padding counted in the average (or none), floor mode."""
    if node.op != "call_function" or node.target not in _POOLS:
        return None
    rank = _POOLS[node.target]
    args = list(node.args) + [None] * (7 - len(node.args))

    def per_axis(v, default) -> tuple[int, ...]:
        v = default if v is None or v == [] else v
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return tuple(int(x) for x in (v * rank if len(v) == 1 else v))

    kernel = per_axis(args[1], 1)
    stride = per_axis(args[2], kernel)
    padding = per_axis(args[3], 0)
    ceil_mode, count_pad, divisor = args[4] or False, args[5], args[6]
    if ceil_mode or divisor is not None or (count_pad is False and any(padding)):
        return None
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if val is None or val.dim() != rank + 2:
        return None
    channels = int(val.shape[1])
    pads = tuple((p, p) for p in padding)
    return Geometry(kernel, stride, pads, (1,) * rank, channels, channels, channels, True)


def _label(term: Term) -> str:
    if term.pool is not None:
        return "avgpool" + "x".join(str(k) for k in term.pool.kernel)
    if term.identity:
        if term.via is None:
            return "identity"
        return "identity BN" if term.via.batchnorm else f"identity {term.via.kind}"
    layer = term.layer
    if layer.kind == "linear":
        return "linear"
    kernel = tuple(layer.weight.meta["val"].shape[2:])
    return "conv" + "x".join(str(k) for k in kernel)


def find_merges(state: ProgramState, constants: ConstantValues) -> list[MergePlan | MergeRefusal]:
    """Every sum of branches of one tensor in the graph, in graph order: a plan to merge it,
    or why not. The sums are found from the last node up, so that a sum is taken whole; one
    inside a sum that cannot merge is tried on its own (reported only when it merges)."""
    maps = _maps_by_output(state, constants)
    claimed: set[fx.Node] = set()
    refused: set[fx.Node] = set()
    found: list[MergePlan | MergeRefusal] = []
    for node in reversed(list(state.graph.nodes)):
        if node in claimed or not _is_sum(node):
            continue
        branch_sum = _expand(_climb(node, maps), maps, state)
        result = _plan(branch_sum, state)
        if isinstance(result, MergePlan):
            claimed.update(branch_sum.nodes)
            found.append(result)
        elif isinstance(result, MergeRefusal) and node not in refused:
            found.append(result)
        if result is not None:
            refused.update(branch_sum.nodes)
    return found[::-1]  # in graph order


def sum_outputs(state: ProgramState, constants: ConstantValues) -> set[str]:
    """The names of the nodes that may hold a merged sum's value once its maps fold: each
    sum of branches of one tensor, and the maps and copies above it (read from a program
    before its fold, to record the original's values there)."""
    maps = _maps_by_output(state, constants)
    names: set[str] = set()
    for node in state.graph.nodes:
        if not _is_sum(node):
            continue
        top = _climb(node, maps)
        if _candidate(_expand(top, maps, state), state) is None:
            continue
        names.add(node.name)
        while node is not top:
            node = data_users(node)[0]
            names.add(node.name)
    return names


# --------------------------------------------------------------------------- the plan


def _candidate(branch_sum: BranchSum, state: ProgramState) -> fx.Node | None:
    """The tensor x most of the sum's terms read, when at least two do and one is a layer."""
    inside = set(branch_sum.nodes)
    for term in branch_sum.terms:
        _classify_layer(term, inside, state)
    inputs = {t.base for t in branch_sum.terms if t.layer is not None}
    for term in branch_sum.terms:
        if term.layer is None:
            _classify_other(term, inputs, state)
    counts: dict[fx.Node, int] = {}
    for term in branch_sum.terms:
        counts[term.base] = counts.get(term.base, 0) + 1
    bases = [b for b, n in counts.items() if n >= 2]
    bases = [b for b in bases if any(t.layer is not None and t.base is b for t in branch_sum.terms)]
    if not bases:
        return None
    return max(bases, key=lambda b: counts[b])


def conv_geometry(layer: LayerCall) -> Geometry | str:
    """How a conv call reads its input (kernel, stride, paddings, dilation, groups), or why it
    cannot be said (a padding mode other than numbers, "same" or "valid")."""
    node = layer.node
    weight = layer.weight.meta["val"]
    rank = weight.dim() - 2
    if node.target is aten.convolution.default:
        stride, padding, dilation = node.args[3], node.args[4], node.args[5]
    else:
        args = list(node.args) + [None] * (7 - len(node.args))
        stride = args[3] if args[3] is not None else node.kwargs.get("stride", 1)
        padding = args[4] if args[4] is not None else node.kwargs.get("padding", 0)
        dilation = args[5] if args[5] is not None else node.kwargs.get("dilation", 1)

    def per_axis(v) -> tuple[int, ...]:
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return tuple(int(x) for x in (v * rank if len(v) == 1 else v))

    kernel = tuple(int(k) for k in weight.shape[2:])
    dilation = per_axis(dilation)
    if padding == "valid":
        pads = ((0, 0),) * rank
    elif padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        pads = tuple((t // 2, t - t // 2) for t in totals)
    elif isinstance(padding, str):
        return f"{layer.name} pads with {padding!r}"
    else:
        pads = tuple((p, p) for p in per_axis(padding))
    return Geometry(
        kernel=kernel,
        stride=per_axis(stride),
        pads=pads,
        dilation=dilation,
        groups=layer.groups,
        in_channels=int(weight.shape[1]) * layer.groups,
        out_channels=int(weight.shape[0]),
    )


def _linear_geometry(layer: LayerCall) -> Geometry:
    n, k = (int(v) for v in layer.weight.meta["val"].shape)
    return Geometry((), (), (), (), 1, k, n)


def common_scope(nodes: list[fx.Node]) -> str:
    """The module path every node was called in (`stages.2`), or "" when they share none."""
    paths = [module_scope(n)[0].split(".") for n in nodes if module_scope(n)[0]]
    if len(paths) != len(nodes) or not paths:
        return ""
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _stored_bytes(nodes: list[fx.Node], state: ProgramState) -> int:
    """Bytes of the stored tensors that only `nodes` read."""
    inside = set(nodes)
    total = 0
    for placeholder in {a for n in nodes for a in n.all_input_nodes}:
        if state.target(placeholder) is None:
            continue
        if all(u in inside for u in placeholder.users):
            value = state.tensor(placeholder)
            total += value.numel() * value.element_size()
    return total


def _plan(branch_sum: BranchSum, state: ProgramState) -> MergePlan | MergeRefusal | None:
    x = _candidate(branch_sum, state)
    if x is None:
        return None
    terms = branch_sum.terms
    labels = [_label(t) for t in terms]
    layer_nodes = [t.layer.node for t in terms if t.layer is not None]
    name = common_scope(branch_sum.nodes + layer_nodes) or terms_name(terms)

    def refuse(reason: str) -> MergeRefusal:
        return MergeRefusal(branch_sum.root, name, labels, reason)

    problem = next((t.problem for t in terms if t.base is x and t.problem), None)
    if problem is not None:
        return refuse(problem)
    odd = next((t for t in terms if t.base is not x), None)
    if odd is not None:
        return None  # other tensors are summed in too: a part of the sum may merge on its own
    kinds = {t.layer.kind for t in terms if t.layer is not None}
    kinds |= {"conv" for t in terms if t.pool is not None}
    if len(kinds) != 1:
        return refuse("its branches are layers of different kinds")
    kind = kinds.pop()
    out_axis = terms[0].node.meta["val"].dim() - 1 if kind == "linear" else 1
    if any(axis != out_axis for axis in branch_sum.axes):
        return refuse("a map in the sum scales another axis than the layers' channels")
    dtypes = {t.layer.weight.meta["val"].dtype for t in terms if t.layer is not None}
    if len(dtypes) != 1 or not x.meta["val"].is_floating_point():
        return refuse("its branches hold weights of different dtypes")
    geometries: list[Geometry] = []
    for t in terms:
        if t.pool is not None:
            geometries.append(t.pool)
            continue
        if t.layer is None:
            rank = 0 if kind == "linear" else x.meta["val"].dim() - 2
            geometries.append(identity_geometry(int(x.meta["val"].shape[out_axis]), rank))
            continue
        geometry = _linear_geometry(t.layer) if kind == "linear" else conv_geometry(t.layer)
        if isinstance(geometry, str):
            return refuse(geometry)
        geometries.append(geometry)
    if kind == "linear":  # a linear's identity is the full identity matrix
        geometries = [
            Geometry((), (), (), (), 1, g.in_channels, g.out_channels, g.identity)
            for g in geometries
        ]
    merged = merged_geometry(geometries, labels)
    if isinstance(merged, str):
        return refuse(merged)
    if any(begin != end for begin, end in merged.geometry.pads):
        return refuse("the merged conv would pad more on one side than the other")
    elem = _element_size(terms)
    new_bytes = (merged.geometry.weights + merged.geometry.out_channels) * elem
    removed = _stored_bytes(branch_sum.nodes + layer_nodes, state) - new_bytes
    return MergePlan(
        branch_sum, x, name, kind, geometries, merged, labels, out_axis, max(removed, 0)
    )


def _element_size(terms: list[Term]) -> int:
    layer = next(t.layer for t in terms if t.layer is not None)
    return layer.weight.meta["val"].element_size()


def terms_name(terms: list[Term]) -> str:
    """A name for a sum outside any module: its largest layer's."""
    layers = [t.layer for t in terms if t.layer is not None]
    largest = max(layers, key=lambda layer: layer.weight.meta["val"].numel())
    return largest.name


# --------------------------------------------------------------------------- the rewrite


def store_merged(
    state: ProgramState,
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    like: LayerCall,
    exact: dict | None,
    written: MergedParameters | None,
) -> tuple[fx.Node, fx.Node]:
    """New parameters `name.weight` and `name.bias` holding a merged layer's float64 values
    cast once to the dtype of `like`'s weight; or those of an earlier merge of the same values
    (another call of a block whose weights serve several calls)."""
    found = written.find(weight, bias) if written is not None else None
    if found is not None:
        return found
    dtype = like.weight.meta["val"].dtype
    w_node = state.add_parameter(f"{name}.weight", weight.to(dtype))
    b_node = state.add_parameter(f"{name}.bias", bias.to(dtype))
    if exact is not None:
        exact[state.target(w_node)] = weight
        exact[state.target(b_node)] = bias
    if written is not None:
        written.remember(weight, bias, (w_node, b_node))
    return w_node, b_node


def apply_merge(
    plan: MergePlan,
    state: ProgramState,
    values: Callable[[fx.Node], torch.Tensor],
    exact: dict | None = None,
    written: MergedParameters | None = None,
) -> fx.Node:
    """Put one layer computing the sum in its place, and take the sum's nodes out; returns
    the new layer's node. `values(node)` is the float64 value of a stored weight or bias
    (with the folds into it applied). `exact` receives the merged weight and bias in float64
    before their one cast; merges of equal values share the parameters in `written`."""
    geometry = plan.merged.geometry
    kernels, biases, scales = [], [], []
    for term, offset in zip(plan.sum.terms, plan.merged.offsets):
        if term.pool is not None:
            taps = term.pool.kernel
            shape = (geometry.out_channels, 1, *taps)
            average = torch.full(shape, 1.0 / math.prod(taps), dtype=F64)
            kernels.append(place_kernel(average, geometry.out_channels, geometry, offset))
            biases.append(None)
        elif term.layer is None:
            kernel = (
                torch.eye(geometry.out_channels, dtype=F64)
                if plan.kind == "linear"
                else identity_kernel(geometry, offset)
            )
            kernels.append(kernel)
            biases.append(None)
        else:
            weight = values(term.layer.weight)
            kernels.append(
                weight.to(F64)
                if plan.kind == "linear"
                else place_kernel(weight, term.layer.groups, geometry, offset)
            )
            biases.append(None if term.layer.bias is None else values(term.layer.bias))
        scales.append(term.scale)
    weight, bias = combine(kernels, biases, scales, plan.sum.shift)
    w_node, b_node = store_merged(state, plan.name, weight, bias, plan.layers[0], exact, written)
    root = plan.sum.root
    # an earlier merge may have put its layer where x was computed: read x as the layers do now
    x = plan.layers[0].node.args[0]
    if plan.kind == "linear":
        target, args = aten.linear.default, (x, w_node, b_node)
    else:
        target = _CONV_OPS[len(geometry.kernel)]
        args = (
            x,
            w_node,
            b_node,
            list(geometry.stride),
            [begin for begin, _ in geometry.pads],
            list(geometry.dilation),
            geometry.groups,
        )
    with state.graph.inserting_before(root):
        layer = state.graph.call_function(target, args)
    layer.meta["val"] = root.meta["val"]
    for key in ("nn_module_stack", "stack_trace"):
        if key in root.meta:
            layer.meta[key] = root.meta[key]
    root.replace_all_uses_with(layer)
    doomed = set(plan.sum.nodes) | {t.layer.node for t in plan.sum.terms if t.layer is not None}
    for node in reversed(list(state.graph.nodes)):
        if node in doomed and not node.users:
            state.graph.erase_node(node)
    return layer
