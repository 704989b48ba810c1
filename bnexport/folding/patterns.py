"""The fold patterns: for each BN call, match a neighbour, check it may be folded, plan it.

Two patterns, each a `match_and_check` that returns either a `FoldPlan` or a `Refusal`
carrying a one-sentence reason:

* `IntoPreceding`: conv / transposed conv / linear -> [channel-transparent ops] -> BN.
* `IntoFollowing`: BN -> [channel-transparent ops] -> linear, or conv without zero padding;
  before a zero-padded conv or a transposed conv only the scale folds and the shift stays as
  an Add in the BN's place (`FoldPlan.shift_kept`).

Checks read the graph only; the engine performs the rewrite afterwards, so a refused fold
leaves the graph untouched. Whether the layer's weights serve other calls too is the engine's
question (`torch_engine`), since the answer depends on the BNs of those calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from bnexport.folding.channels import (
    NotTransparent,
    Tracked,
    following_channel_of,
    initial,
    is_homogeneous_op,
    is_transparent_op,
    preceding_channel_of,
    step,
)
from bnexport.folding.math import bn_scale_shift
from bnexport.folding.program_state import ProgramState
from bnexport.folding.sites import (
    BatchNormCall,
    LayerCall,
    data_users,
    is_layer_like,
    match_batchnorm,
    match_layer,
)

aten = torch.ops.aten

# ops whose commuting with a map by numbers depends on their arguments (padding, training)
_SCALAR_CHECKED = {
    aten.pad.default,
    aten.dropout.default,
    aten.feature_dropout.default,
    aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
    aten.avg_pool1d.default,
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
}

PRECEDING = "preceding"
FOLLOWING = "following"

_NONLINEAR = {
    "relu",
    "relu_",
    "relu6",
    "gelu",
    "silu",
    "silu_",
    "sigmoid",
    "tanh",
    "hardtanh",
    "hardtanh_",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "leaky_relu",
    "leaky_relu_",
    "elu",
    "elu_",
    "selu",
    "celu",
    "softplus",
    "mish",
    "prelu",
    "_prelu_kernel",
    "clamp",
    "clamp_min",
    "clamp_max",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool2d_with_indices",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "abs",
    "exp",
    "log",
    "sqrt",
}
_ARITH = {
    "add": "an addition",
    "add_": "an addition",
    "sub": "a subtraction",
    "mul": "a multiplication",
    "cat": "a concatenation",
    "div": "a division",
}


@dataclass
class Refusal:
    direction: str
    reason: str


@dataclass
class FoldPlan:
    """Everything `apply_plan` needs; `channel_of` maps each layer channel to its BN channel."""

    direction: str
    bn: BatchNormCall
    layer: LayerCall
    channel_of: np.ndarray
    shift_kept: bool = False  # only the scale folds; the shift stays as an Add before it


def describe(node: fx.Node, state: ProgramState) -> str:
    """Name a node for a user: `relu_1 (a nonlinearity)`, `add_3 (an addition)`."""
    if node.op == "output":
        return "the model's output"
    if node.op == "placeholder":
        return f"the model input '{node.name}'"
    op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    bn = match_batchnorm(node) if node.op == "call_function" else None
    if bn is not None:
        return f"BatchNorm {bn.name}"
    layer = match_layer(node, state)
    if layer is not None:
        return f"{layer.kind} layer {layer.name}"
    if op in _NONLINEAR:
        return f"{node.name} ({op}, a nonlinearity)"
    if op in _ARITH:
        return f"{node.name} ({_ARITH[op]})"
    return f"{node.name} ({op})"


def _track(chain: list[fx.Node], tr: Tracked, *, scalar: bool = False) -> Tracked:
    """Carry `tr` through `chain`; for a map by numbers (`scalar`), only check that each op
    commutes with it (where the lone label goes does not matter)."""
    for node in chain:
        if scalar and node.target not in _SCALAR_CHECKED:
            continue
        tr = step(node, tr)
    return tr


class IntoPreceding:
    """conv/linear -> [transparent ops] -> BN:  W' = s * W, b' = s * b + t (per out channel).

    Per branch through a concatenation of layers along the channel axis (MixNet's mixed
    convs): each layer takes the slice of the BN's channels its outputs fill."""

    direction = PRECEDING

    def match_and_check(
        self, bn: BatchNormCall, state: ProgramState
    ) -> FoldPlan | list[FoldPlan] | Refusal:
        chain, node = _back_to_layer(bn.input, state)
        if node.op == "call_function" and node.target is aten.cat.default:
            return self._per_branch(bn, node, chain, state)
        found = self._branch(node, chain, bn.op_node, state)
        if isinstance(found, str):
            return self._refuse(found)
        layer, out_channels, tr = found
        channel_of = preceding_channel_of(tr, out_channels, bn.channels, bn.axis)
        if isinstance(channel_of, str):
            return self._refuse(channel_of.replace("the layer", layer.name))
        return FoldPlan(PRECEDING, bn, layer, channel_of)

    def _branch(
        self, node: fx.Node, chain: list[fx.Node], consumer: fx.Node, state: ProgramState
    ) -> tuple[LayerCall, int, Tracked] | str:
        """The layer at `node` whose output reaches `consumer` through `chain` alone, with its
        channels tracked to the end of the chain; or why not."""
        layer = match_layer(node, state)
        if layer is None:
            if is_layer_like(node):
                return f"the weights of {node.name} are computed in forward"
            return f"its input comes from {describe(node, state)}, not a conv or linear"
        for producer in [node, *chain]:
            users = data_users(producer)
            if len(users) != 1:
                other = next((u for u in users if u not in chain and u is not consumer), None)
                if other is None:
                    return f"{describe(consumer, state)} reads {describe(producer, state)} twice"
                return (
                    f"the output of {describe(producer, state)} is also used by "
                    f"{describe(other, state)}"
                )
        out_channels = int(node.meta["val"].shape[layer.out_axis])
        try:
            tr = _track(chain, initial(out_channels, layer.out_axis))
        except NotTransparent as exc:
            return f"an op between {layer.name} and the BN does not commute: {exc}"
        return layer, out_channels, tr

    def _per_branch(
        self, bn: BatchNormCall, cat: fx.Node, chain: list[fx.Node], state: ProgramState
    ) -> list[FoldPlan] | Refusal:
        inputs = list(cat.args[0])
        ndim = cat.meta["val"].dim()
        dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % ndim
        total = int(cat.meta["val"].shape[dim])
        if len(data_users(cat)) != 1 or any(len(data_users(n)) != 1 for n in chain):
            return self._refuse(f"the output of {describe(cat, state)} is also used elsewhere")
        try:
            tr = _track(chain, initial(total, dim))
        except NotTransparent as exc:
            return self._refuse(f"an op between {cat.name} and the BN does not commute: {exc}")
        bn_of_position = preceding_channel_of(tr, total, bn.channels, bn.axis)
        if isinstance(bn_of_position, str):
            return self._refuse(bn_of_position.replace("the layer", cat.name))
        plans, offset = [], 0
        for k, branch_input in enumerate(inputs):
            size = int(branch_input.meta["val"].shape[dim])
            if inputs.count(branch_input) > 1:
                return self._refuse(f"{describe(cat, state)} reads {branch_input.name} twice")
            branch_chain, node = _back_to_layer(branch_input, state)
            found = self._branch(node, branch_chain, cat, state)
            if isinstance(found, str):
                return self._refuse(f"input {k} of {describe(cat, state)}: {found}")
            layer, out_channels, branch_tr = found
            position = preceding_channel_of(branch_tr, out_channels, size, dim)
            if isinstance(position, str):
                return self._refuse(position.replace("the layer", layer.name))
            plans.append(FoldPlan(PRECEDING, bn, layer, bn_of_position[offset + position]))
            offset += size
        return plans

    def _refuse(self, reason: str) -> Refusal:
        return Refusal(PRECEDING, reason)


def _back_to_layer(node: fx.Node, state: ProgramState) -> tuple[list[fx.Node], fx.Node]:
    """Walk up from `node` through transparent ops: (the ops in data order, the first node
    that is not one)."""
    chain: list[fx.Node] = []
    while (
        node.op == "call_function" and is_transparent_op(node) and match_layer(node, state) is None
    ):
        chain.append(node)
        node = node.args[0]
    chain.reverse()
    return chain, node


class IntoFollowing:
    """BN -> [transparent ops] -> linear / unpadded conv: W' = W * s, b' = b + W t (per in ch).

    Through positively homogeneous ops (ReLU, LeakyReLU, PReLU, max pooling) only a positive
    scale passes: W' = W * s, and the shift stays as an Add of t / s where the BN was. When
    the BN's output reaches several layers (a pre-activation block's conv and shortcut conv),
    each takes the fold."""

    direction = FOLLOWING

    def match_and_check(
        self, bn: BatchNormCall, state: ProgramState
    ) -> FoldPlan | list[FoldPlan] | Refusal:
        branches = _forward_to_layers(bn.node, state)
        if isinstance(branches, str):
            return self._refuse(branches)
        # a transposed conv adds the shift to a varying number of taps per output, zero
        # padding never passes through the BN, and a ReLU passes the scale only: the shift
        # stays as an Add before the layers
        nonlinear = [n for chain, _ in branches for n in chain if is_homogeneous_op(n)]
        shift_kept = bool(nonlinear) or any(
            layer.kind == "conv_transpose" or layer.zero_padded for _, layer in branches
        )
        s, t = map_scale_shift(bn, state)
        if shift_kept and not bool(t.any()):
            shift_kept = False  # no shift to keep (a layer scale): the scale alone folds
        if nonlinear:
            bad = [int(i) for i in torch.nonzero(s <= 0).flatten()]
            if bad:
                return self._refuse(
                    f"{len(bad)} of its {bn.channels} channels have a scale <= 0 (channel "
                    f"{_listed(bad)}), and only a positive scale passes "
                    f"{describe(nonlinear[0], state)}"
                )
        plans = []
        for chain, layer in branches:
            try:
                if bn.channels == 1:  # a map by numbers: every channel of the layer takes it
                    _track(chain, initial(1, 0), scalar=True)  # the batch axis: no op here pools it
                    channel_of = np.zeros(_in_channels(layer, state), dtype=np.int64)
                else:
                    tr = _track(chain, initial(bn.channels, bn.axis))
                    channel_of = following_channel_of(tr, layer.in_axis)
            except NotTransparent as exc:
                return self._refuse(
                    f"an op between the BN and {layer.name} does not commute: {exc}"
                )
            if isinstance(channel_of, str):
                return self._refuse(channel_of.replace("the layer", layer.name))
            plans.append(FoldPlan(FOLLOWING, bn, layer, channel_of, shift_kept))
        return plans[0] if len(plans) == 1 else plans

    def _refuse(self, reason: str) -> Refusal:
        return Refusal(FOLLOWING, reason)


MAX_BRANCHES = 16


def _forward_to_layers(
    start: fx.Node, state: ProgramState
) -> list[tuple[list[fx.Node], LayerCall]] | str:
    """Every path from `start` through transparent or positively homogeneous ops to a layer
    that reads it as its input, when every path ends at one; else why not."""
    found: list[tuple[list[fx.Node], LayerCall]] = []
    stack: list[tuple[fx.Node, list[fx.Node]]] = [(start, [])]
    while stack:
        node, chain = stack.pop()
        users = data_users(node)
        if not users:
            return f"the output of {node.name} is not used"
        for nxt in users:
            reads = [a for a in nxt.args if a is node] + [
                v for v in nxt.kwargs.values() if v is node
            ]
            if not nxt.args or nxt.args[0] is not node or len(reads) != 1:
                return f"its output feeds {describe(nxt, state)}"
            layer = match_layer(nxt, state)
            if layer is not None:
                found.append((chain, layer))
            elif is_transparent_op(nxt) or is_homogeneous_op(nxt):
                stack.append((nxt, [*chain, nxt]))
            elif is_layer_like(nxt):
                return f"the weights of {nxt.name} are computed in forward"
            else:
                return f"its output feeds {describe(nxt, state)}"
        if len(found) + len(stack) > MAX_BRANCHES:
            return f"its output reaches more than {MAX_BRANCHES} layers"
    return found


def map_scale_shift(bn: BatchNormCall, state: ProgramState) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the map in float64: y = s * x + t per channel."""
    if bn.affine is not None:
        return bn.affine
    return bn_scale_shift(
        state.tensor(bn.running_mean),
        state.tensor(bn.running_var),
        None if bn.weight is None else state.tensor(bn.weight),
        None if bn.bias is None else state.tensor(bn.bias),
        bn.eps,
    )


def _listed(channels: list[int]) -> str:
    return ", ".join(str(c) for c in channels[:5]) + (", ..." if len(channels) > 5 else "")


def _in_channels(layer: LayerCall, state: ProgramState) -> int:
    return int(layer.node.args[0].meta["val"].shape[layer.in_axis])


PATTERNS = (IntoPreceding(), IntoFollowing())
