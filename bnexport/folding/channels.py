"""Following a channel axis through ops that are exact identities on per-channel affines.

An op is *channel-transparent* when applying a per-channel affine before it equals applying
the same affine after it, channel by channel: eval-mode dropout, copies, reshapes that keep
or merge/split the channel axis, permutes, non-zero padding (reflect, replicate, circular)
that leaves the channel axis alone, and averages over other axes.

Which source channel each position of the tracked axis carries is a label matrix
`labels[p, :]`: position p holds the source channels listed in row p. A reshape that merges
the channel axis with k trailing axes repeats each row k times; one that splits it groups k
rows into one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy
import torch
from torch import fx

aten = torch.ops.aten

_IDENTITY = {
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
}
_DROPOUT = {
    aten.dropout.default,
    aten.feature_dropout.default,
    aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
}
_RESHAPE = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.reshape_as.default,
    aten.view_as.default,
}
_COPYING_PADS = {
    aten.reflection_pad1d.default,
    aten.reflection_pad2d.default,
    aten.reflection_pad3d.default,
    aten.replication_pad1d.default,
    aten.replication_pad2d.default,
    aten.replication_pad3d.default,
    aten._pad_circular.default,
}
_ADAPTIVE_AVG = {
    aten.adaptive_avg_pool1d.default: 1,
    aten.adaptive_avg_pool2d.default: 2,
    aten.adaptive_avg_pool3d.default: 3,
    aten._adaptive_avg_pool2d.default: 2,
    aten._adaptive_avg_pool3d.default: 3,
}
_AVG_POOL = {
    aten.avg_pool1d.default: 1,
    aten.avg_pool2d.default: 2,
    aten.avg_pool3d.default: 3,
}


# positively homogeneous, f(a x) = a f(x) for a > 0: a positive per-channel scale passes them
_HOMOGENEOUS = {
    aten.relu.default,
    aten.relu_.default,
    aten.leaky_relu.default,
    aten.leaky_relu_.default,
    aten.prelu.default,
    aten._prelu_kernel.default,
}
_MAX_POOL = {
    aten.max_pool1d.default: 1,
    aten.max_pool2d.default: 2,
    aten.max_pool3d.default: 3,
}


def is_homogeneous_op(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _HOMOGENEOUS or node.target in _MAX_POOL)


@dataclass
class Tracked:
    """A channel axis being followed: its position and the label matrix along it."""

    axis: int
    labels: np.ndarray  # (size of axis, m) source-channel indices


class NotTransparent(Exception):
    """Raised with a user-facing reason when an op does not commute with the affine."""


def _expr(d) -> sympy.Expr:
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))


def _same(a, b) -> bool:
    return sympy.simplify(a - b) == 0


def _prefix_expr(shape: tuple, axis: int) -> sympy.Expr:
    return sympy.Mul(*shape[:axis]) if axis else sympy.Integer(1)


def _shape(node: fx.Node):
    return tuple(node.meta["val"].shape)


def is_transparent_op(node: fx.Node) -> bool:
    t = node.target
    return node.op == "call_function" and (
        t in _IDENTITY
        or t in _DROPOUT
        or t in _RESHAPE
        or t in _COPYING_PADS
        or t in _ADAPTIVE_AVG
        or t in _AVG_POOL
        or t
        in (
            aten.pad.default,
            aten.permute.default,
            aten.transpose.int,
            aten.t.default,
            aten.mean.dim,
        )
    )


def _reshape(src: tuple, dst: tuple, tr: Tracked) -> Tracked:
    return track_reshape(tuple(map(_expr, src)), tuple(map(_expr, dst)), tr)


def track_reshape(src: tuple, dst: tuple, tr: Tracked) -> Tracked:
    """Carry `tr` through a reshape from `src` to `dst` (dims as sympy expressions).

    The tracked axis lands on the output axis whose leading dims multiply to the same product
    as the input's leading dims (so the row-major order of the channel axis is kept); it may
    keep its size, be merged with trailing axes (rows repeat) or split (rows group).
    """
    size = int(tr.labels.shape[0])
    pre = _prefix_expr(src, tr.axis)
    candidates = [a for a in range(len(dst)) if _same(_prefix_expr(dst, a), pre)]
    sizes = {a: int(dst[a]) for a in candidates if dst[a].is_Integer}
    for a, n in sizes.items():
        if n == size:
            return Tracked(a, tr.labels)
    for a, n in sizes.items():
        if n > size and n % size == 0:
            return Tracked(a, np.repeat(tr.labels, n // size, axis=0))
    for a, n in sizes.items():
        if 1 < n < size and size % n == 0:
            return Tracked(a, tr.labels.reshape(n, -1))
    raise NotTransparent("it reshapes the channel axis into other axes")


def track_permute(perm: list[int], tr: Tracked) -> Tracked:
    """Output axis i is input axis perm[i]."""
    return Tracked(list(perm).index(tr.axis), tr.labels)


def track_reduce(axes: list[int], keepdims: bool, tr: Tracked, what: str = "averages") -> Tracked:
    """Carry `tr` through an average over `axes` (normalized), which must miss the channel."""
    if tr.axis in axes:
        raise NotTransparent(f"it {what} over the channel axis")
    return Tracked(tr.axis - (0 if keepdims else sum(a < tr.axis for a in axes)), tr.labels)


def preceding_channel_of(
    tr: Tracked, out_channels: int, bn_channels: int, bn_axis: int = 1
) -> np.ndarray | str:
    """Map each layer output channel to its BN channel, from the labels tracked to the BN's
    input (whose channels are on `bn_axis`); or say why the BN channels are not a function of
    the layer channels."""
    if bn_channels == 1:
        return np.zeros(out_channels, dtype=np.int64)  # one affine for every element
    if tr.axis != bn_axis:
        return f"the BN normalizes axis {bn_axis} but the layer's channels arrive on axis {tr.axis}"
    flat = tr.labels.ravel()
    if tr.labels.shape[0] != bn_channels or not np.array_equal(
        np.sort(flat), np.arange(out_channels)
    ):
        return (
            "a reshape between the layer and the BN spreads a layer channel over several BN "
            "channels"
        )
    # row c of the labels lists the layer channels that BN channel c normalizes
    channel_of = np.empty(out_channels, dtype=np.int64)
    channel_of[flat] = np.repeat(np.arange(tr.labels.shape[0]), tr.labels.shape[1])
    return channel_of


def following_channel_of(tr: Tracked, in_axis: int) -> np.ndarray | str:
    """Map each layer input channel to its BN channel, from the labels tracked to the layer's
    input; or say why not."""
    if tr.axis != in_axis:
        return (
            f"the BN channels reach the layer on axis {tr.axis}, not on its input channel "
            f"axis {in_axis}"
        )
    if tr.labels.shape[1] != 1:
        return (
            "a reshape between the BN and the layer mixes several BN channels into one input "
            "channel"
        )
    return tr.labels[:, 0].copy()


def _padded_axes(ndim: int, pad: list) -> set[int]:
    return set(range(ndim - len(pad) // 2, ndim))


def step(node: fx.Node, tr: Tracked) -> Tracked:
    """Carry `tr` (on node.args[0]) through `node`, or raise NotTransparent with a reason."""
    t = node.target
    src = _shape(node.args[0])
    dst = _shape(node)
    ndim = len(src)
    if t in _IDENTITY or t in _HOMOGENEOUS:
        return tr
    if t in _MAX_POOL:
        if tr.axis >= ndim - _MAX_POOL[t]:
            raise NotTransparent("it pools over the channel axis")
        return tr
    if t in _DROPOUT:
        if node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False):
            raise NotTransparent("dropout is active (training mode)")
        return tr
    if t in _RESHAPE:
        return _reshape(src, dst, tr)
    if t is aten.permute.default:
        return track_permute([d % ndim for d in node.args[1]], tr)
    if t in (aten.transpose.int, aten.t.default):
        d0, d1 = (node.args[1] % ndim, node.args[2] % ndim) if t is aten.transpose.int else (0, 1)
        axis = d1 if tr.axis == d0 else d0 if tr.axis == d1 else tr.axis
        return Tracked(axis, tr.labels)
    if t is aten.pad.default or t in _COPYING_PADS:
        mode = node.args[2] if t is aten.pad.default and len(node.args) > 2 else "constant"
        if t in _COPYING_PADS:
            mode = "copy"
        if mode == "constant":
            raise NotTransparent("it pads with constants that do not pass through the BN")
        if tr.axis in _padded_axes(ndim, list(node.args[1])):
            raise NotTransparent("it pads the channel axis")
        return tr
    if t is aten.mean.dim:
        dims = node.args[1]
        dims = [d % ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        keepdim = bool(node.args[2]) if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return track_reduce(dims or list(range(ndim)), keepdim, tr)
    if t in _ADAPTIVE_AVG or t in _AVG_POOL:
        k = _ADAPTIVE_AVG.get(t) or _AVG_POOL[t]
        if tr.axis >= ndim - k:
            raise NotTransparent("it pools over the channel axis")
        if t in _AVG_POOL:
            padding = node.args[3] if len(node.args) > 3 else 0
            count_include_pad = node.args[5] if len(node.args) > 5 else True
            divisor = node.args[6] if len(node.args) > 6 else None
            pads = padding if isinstance(padding, (list, tuple)) else [padding]
            if divisor is not None or (count_include_pad and any(int(p) for p in pads)):
                raise NotTransparent("its average counts zero padding")
        return tr
    raise NotTransparent(f"{node.name} is not an identity on channels")


def initial(channels: int, axis: int) -> Tracked:
    return Tracked(axis, np.arange(channels).reshape(channels, 1))
