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
    is_transparent_op,
    preceding_channel_of,
    step,
)
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


def _track(chain: list[fx.Node], tr: Tracked) -> Tracked:
    for node in chain:
        tr = step(node, tr)
    return tr


class IntoPreceding:
    """conv/linear -> [transparent ops] -> BN:  W' = s * W, b' = s * b + t (per out channel)."""

    direction = PRECEDING

    def match_and_check(self, bn: BatchNormCall, state: ProgramState) -> FoldPlan | Refusal:
        chain: list[fx.Node] = []
        node = bn.input
        while (
            node.op == "call_function"
            and is_transparent_op(node)
            and match_layer(node, state) is None
        ):
            chain.append(node)
            node = node.args[0]
        layer = match_layer(node, state)
        if layer is None:
            if is_layer_like(node):
                return self._refuse(f"the weights of {node.name} are computed in forward")
            return self._refuse(
                f"its input comes from {describe(node, state)}, not a conv or linear"
            )
        chain.reverse()
        for producer in [node, *chain]:
            users = data_users(producer)
            if len(users) != 1:
                other = next(u for u in users if u not in chain and u is not bn.op_node)
                return self._refuse(
                    f"the output of {describe(producer, state)} is also used by "
                    f"{describe(other, state)}"
                )
        out_channels = int(node.meta["val"].shape[layer.out_axis])
        try:
            tr = _track(chain, initial(out_channels, layer.out_axis))
        except NotTransparent as exc:
            return self._refuse(f"an op between {layer.name} and the BN does not commute: {exc}")
        channel_of = preceding_channel_of(tr, out_channels, bn.channels)
        if isinstance(channel_of, str):
            return self._refuse(channel_of.replace("the layer", layer.name))
        return FoldPlan(PRECEDING, bn, layer, channel_of)

    def _refuse(self, reason: str) -> Refusal:
        return Refusal(PRECEDING, reason)


class IntoFollowing:
    """BN -> [transparent ops] -> linear / unpadded conv: W' = W * s, b' = b + W t (per in ch)."""

    direction = FOLLOWING

    def match_and_check(self, bn: BatchNormCall, state: ProgramState) -> FoldPlan | Refusal:
        chain: list[fx.Node] = []
        node = bn.node
        while True:
            users = data_users(node)
            if len(users) != 1:
                others = ", ".join(describe(u, state) for u in users[:3])
                return self._refuse(f"its output goes to several consumers ({others})")
            nxt = users[0]
            if not nxt.args or nxt.args[0] is not node:
                return self._refuse(f"its output feeds {describe(nxt, state)}")
            layer = match_layer(nxt, state)
            if layer is not None:
                break
            if not is_transparent_op(nxt):
                if is_layer_like(nxt):
                    return self._refuse(f"the weights of {nxt.name} are computed in forward")
                return self._refuse(f"its output feeds {describe(nxt, state)}")
            chain.append(nxt)
            node = nxt
        # a transposed conv adds the shift to a varying number of taps per output, and zero
        # padding never passes through the BN: the shift stays as an Add before the layer
        shift_kept = layer.kind == "conv_transpose" or layer.zero_padded
        try:
            tr = _track(chain, initial(bn.channels, 1))
        except NotTransparent as exc:
            return self._refuse(f"an op between the BN and {layer.name} does not commute: {exc}")
        channel_of = following_channel_of(tr, layer.in_axis)
        if isinstance(channel_of, str):
            return self._refuse(channel_of.replace("the layer", layer.name))
        return FoldPlan(FOLLOWING, bn, layer, channel_of, shift_kept)

    def _refuse(self, reason: str) -> Refusal:
        return Refusal(FOLLOWING, reason)


PATTERNS = (IntoPreceding(), IntoFollowing())
