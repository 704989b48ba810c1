"""Recognising BatchNorm calls and conv/linear layers in an ATen-level torch.fx graph.

The graph is an `ExportedProgram`'s own graph: parameters and buffers are placeholders that
a `ProgramState` maps to their stored tensors, and layers are `call_function` nodes on ATen
ops. This module only reads the graph; it never changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from bnexport.folding.math import Layout
from bnexport.folding.program_state import ProgramState

aten = torch.ops.aten

_ASSERT_PREFIXES = ("_assert", "sym_constrain_range")


def is_assertion(node: fx.Node) -> bool:
    """Nodes that only check metadata and never change data (ignored as users)."""
    name = getattr(node.target, "__name__", str(node.target))
    return node.op == "call_function" and (name.startswith(_ASSERT_PREFIXES) or "_check" in name)


_SHAPE_OF_SECOND = {aten.reshape_as.default, aten.view_as.default, aten.expand_as.default}
_SHAPE_READERS = {
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_storage_offset.default,
}


def reads_shape_only(user: fx.Node, node: fx.Node) -> bool:
    """`user` reads only the shape of `node` (LeViT's `bn(x.flatten(0, 1)).reshape_as(x)`
    reads x for its shape), which no fold changes."""
    if user.op != "call_function":
        return False
    if user.target in _SHAPE_READERS:
        return True
    return user.target in _SHAPE_OF_SECOND and user.args[0] is not node


def data_users(node: fx.Node) -> list[fx.Node]:
    """Users of `node` that consume its value (assertions and shape reads excluded)."""
    return [u for u in node.users if not is_assertion(u) and not reads_shape_only(u, node)]


def module_scope(node: fx.Node) -> tuple[str, str]:
    """(qualified path, class name) of the innermost module that issued `node`."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def owner_name(target: str) -> str:
    """`features.0.weight` -> `features.0`."""
    return target.rsplit(".", 1)[0] if "." in target else "<root>"


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# --------------------------------------------------------------------------- BatchNorm


@dataclass
class BatchNormCall:
    """One call of an eval-mode (or batch-statistics) BatchNorm in the graph, or another
    frozen per-channel affine map y = s * x + t (`affine`, on `axis`; see `affines`)."""

    node: fx.Node  # the node producing the normalized tensor
    input: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    running_mean: fx.Node | None
    running_var: fx.Node | None
    eps: float
    uses_batch_stats: bool
    name: str
    kind: str  # module class name, or "F.batch_norm"
    op_node: fx.Node | None = None  # the BN op itself (differs from `node` for tuple ops)
    extra_nodes: list[fx.Node] = field(default_factory=list)  # erased with `node`
    # another frozen affine map (arithmetic by constants): its float64 (s, t) on `axis`
    affine: tuple | None = None
    axis: int = 1

    @property
    def channels(self) -> int:
        if self.affine is not None:
            return int(self.affine[0].numel())
        return int(self.input.meta["val"].shape[1])

    @property
    def batchnorm(self) -> bool:
        return self.affine is None


def match_batchnorm(node: fx.Node) -> BatchNormCall | None:
    """Return the BN call rooted at `node`, or None when `node` is not a BatchNorm."""
    if node.op != "call_function":
        return None
    if node.target is aten.batch_norm.default:
        x, w, b, mean, var = node.args[:5]
        training = bool(_arg(node, 5, "training", False))
        eps = float(_arg(node, 7, "eps", 1e-5))
        out, extra = node, []
    elif node.target is aten._native_batch_norm_legit_no_training.default:
        x, w, b, mean, var = node.args[:5]
        training = False
        eps = float(_arg(node, 6, "eps", 1e-5))
        getitems = list(node.users)
        first = [u for u in getitems if u.args[1] == 0]
        if len(first) != 1 or any(u.users for u in getitems if u.args[1] != 0):
            return None
        out, extra = first[0], [node] + [u for u in getitems if u is not first[0]]
    elif node.target in (
        aten._native_batch_norm_legit.default,
        aten._native_batch_norm_legit.no_stats,
        aten._native_batch_norm_legit_functional.default,
    ):
        x, w, b = node.args[:3]
        mean = var = None
        training, eps = True, float(node.args[-1])
        first = [u for u in node.users if u.args[1] == 0]
        if len(first) != 1:
            return None
        out, extra = first[0], [node]
    else:
        return None
    uses_batch_stats = training or mean is None or var is None
    path, cls = module_scope(node)
    if "BatchNorm" in cls:
        name, kind = path, cls
    else:
        name = f"{path}.{node.name}" if path else node.name
        kind = "F.batch_norm"
    return BatchNormCall(
        node=out,
        input=x,
        weight=w,
        bias=b,
        running_mean=mean,
        running_var=var,
        eps=eps,
        uses_batch_stats=uses_batch_stats,
        name=name,
        kind=kind,
        op_node=node,
        extra_nodes=extra,
    )


# --------------------------------------------------------------------------- layers

_CONV = {
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
}
_CONV_T = {
    aten.conv_transpose1d.default: 1,
    aten.conv_transpose2d.input: 2,
    aten.conv_transpose3d.input: 3,
}


@dataclass
class LayerCall:
    """A conv, transposed conv or linear call whose weight is a stored parameter."""

    node: fx.Node
    kind: str  # "conv", "conv_transpose" or "linear"
    weight: fx.Node
    bias: fx.Node | None
    groups: int
    zero_padded: bool
    name: str

    @property
    def transposed(self) -> bool:
        return self.kind == "conv_transpose"

    @property
    def in_axis(self) -> int:
        """Axis of the layer's input that holds its input channels/features."""
        return self.node.args[0].meta["val"].dim() - 1 if self.kind == "linear" else 1

    @property
    def out_axis(self) -> int:
        return self.node.meta["val"].dim() - 1 if self.kind == "linear" else 1

    @property
    def layout(self) -> Layout:
        """PyTorch's weight layout: (C_out, C_in/g, *k), transposed (C_in, C_out/g, *k)."""
        return Layout(out_axis=1 if self.transposed else 0, groups=self.groups)


def _padding_is_zero(padding, kernel: tuple[int, ...], dilation) -> bool:
    if isinstance(padding, str):
        if padding == "valid":
            return True
        dil = list(dilation) if isinstance(dilation, (list, tuple)) else [dilation] * len(kernel)
        return all(d * (k - 1) == 0 for k, d in zip(kernel, dil))
    pads = list(padding) if isinstance(padding, (list, tuple)) else [padding]
    return all(int(p) == 0 for p in pads)


def match_layer(node: fx.Node, state: ProgramState) -> LayerCall | None:
    """Return the layer call at `node`, or None when it is not a conv/linear layer."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is aten.linear.default:
        kind, groups, zero_padded = "linear", 1, False
    elif t in _CONV:
        kind = "conv"
        nd = _CONV[t]
        groups = int(_arg(node, 6, "groups", 1))
        weight_val = node.args[1].meta["val"] if isinstance(node.args[1], fx.Node) else None
        kernel = tuple(weight_val.shape[2:]) if weight_val is not None else (2,) * nd
        default_pad = "valid" if t._overloadname == "padding" else [0] * nd
        padding = _arg(node, 4, "padding", default_pad)
        zero_padded = not _padding_is_zero(padding, kernel, _arg(node, 5, "dilation", [1] * nd))
    elif t in _CONV_T:
        kind = "conv_transpose"
        groups = int(_arg(node, 6, "groups", 1))
        zero_padded = False
    elif t is aten.convolution.default:
        transposed = bool(node.args[6])
        kind = "conv_transpose" if transposed else "conv"
        groups = int(node.args[8])
        zero_padded = not transposed and not _padding_is_zero(node.args[4], (), node.args[5])
    else:
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = _arg(node, 2, "bias", None)
    if state.target(weight) is None:
        return None
    if bias is not None and state.target(bias) is None:
        return None
    return LayerCall(
        node=node,
        kind=kind,
        weight=weight,
        bias=bias,
        groups=groups,
        zero_padded=zero_padded,
        name=owner_name(state.target(weight)),
    )


def is_layer_like(node: fx.Node) -> bool:
    """A conv/linear op whose weight is computed rather than stored."""
    return node.op == "call_function" and (
        node.target in _CONV
        or node.target in _CONV_T
        or node.target in (aten.linear.default, aten.convolution.default)
    )
