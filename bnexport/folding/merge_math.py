"""Merge arithmetic: parallel linear branches of one input become one layer, in float64.

A sum of branches that all read the same tensor x, each a conv (or linear) layer or x
itself, with per-channel affine maps anywhere in the sum (a BN on a branch, a layer scale
on a partial sum, a subtraction), is one linear map of x:

    y = sum_i a_i * L_i(x) + c,   a_i, c per output channel

where L_i is branch i (the identity for x itself) and a_i, c collect the maps on the way
from the branch to the sum: an affine map (s, t) on a node turns its terms' (a, c) into
(s a, s c + t); a subtraction negates its right side. When the branches' outputs align
position by position (same stride; each kernel sits inside one larger kernel, see
`merged_geometry`), the sum is the one conv

    W = sum_i a_i * place(W_i),   b = sum_i a_i * b_i + c,

where `place` pads W_i with zeros to the merged kernel at the branch's offset (the kernel
centred, for symmetric padding) and spreads a grouped kernel over fewer groups with zeros
off its blocks. The identity is the kernel with 1 on the centre tap of each output channel's
own input channel (a depthwise 1x1 conv). All sums are float64; callers cast once.

Weights are in the conv layout (C_out, C_in / groups, *kernel), output channels on axis 0;
a linear layer's (N, K) is a conv with no kernel axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass(frozen=True)
class Geometry:
    """How a conv branch reads its input, per spatial axis: output position o reads input
    positions o * stride - pads[a][0] + j * dilation, j < kernel; the input is padded by
    pads[a] = (begin, end) zeros. A linear layer has no spatial axes."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    in_channels: int
    out_channels: int
    identity: bool = False  # x itself, or an average of it: no weight of its own

    @property
    def weights(self) -> int:
        """Elements of the weight (none for the identity or an average)."""
        if self.identity:
            return 0
        return self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel)


def identity_geometry(channels: int, rank: int) -> Geometry:
    """x itself, as a conv: a depthwise 1x1 conv with stride 1 and no padding."""
    return Geometry(
        kernel=(1,) * rank,
        stride=(1,) * rank,
        pads=((0, 0),) * rank,
        dilation=(1,) * rank,
        groups=channels,
        in_channels=channels,
        out_channels=channels,
        identity=True,
    )


@dataclass(frozen=True)
class MergedGeometry:
    """The one conv a sum of branches becomes, and where each branch's kernel sits in it."""

    geometry: Geometry
    offsets: tuple[tuple[int, ...], ...]


def merged_geometry(branches: list[Geometry], labels: list[str]) -> MergedGeometry | str:
    """The conv computing every branch at once, or why there is none.

    Per axis, branch i's tap j reads input o * s - p_i + j * d; in a kernel padded by
    P = max p_i it is tap j + (P - p_i) / d, so the shift must be a whole number of taps.
    The outputs have the same length for every input length when every branch has the same
    stride and the same p_i + q_i - d (k_i - 1) (q_i the end padding). The identity (k = 1)
    matches any dilation. `labels` name the branches in the reasons."""
    first = branches[0]
    rank = len(first.kernel)
    if any(len(b.kernel) != rank for b in branches):
        return "its branches are layers of different kinds"
    out_channels = {b.out_channels for b in branches}
    in_channels = {b.in_channels for b in branches}
    if len(out_channels) != 1 or len(in_channels) != 1:
        return "its branches have different numbers of channels"
    for i, b in enumerate(branches[1:], 1):
        if b.stride != first.stride:
            return (
                f"{labels[i]} has stride {_shown(b.stride)} and {labels[0]} stride "
                f"{_shown(first.stride)}, so their outputs do not align"
            )
    kernel, pads, dilation, offsets = [], [], [], [[] for _ in branches]
    for a in range(rank):
        dilations = {b.dilation[a] for b in branches if b.kernel[a] > 1}
        if len(dilations) > 1:
            return f"its branches have different dilations ({', '.join(map(str, dilations))})"
        d = dilations.pop() if dilations else 1
        extents = {b.pads[a][0] + b.pads[a][1] - d * (b.kernel[a] - 1) for b in branches}
        begin = max(b.pads[a][0] for b in branches)
        shifts = [begin - b.pads[a][0] for b in branches]
        if len(extents) != 1 or any(s % d for s in shifts):
            odd = next(
                i
                for i, b in enumerate(branches)
                if b.pads[a][0] + b.pads[a][1] - d * (b.kernel[a] - 1) != min(extents)
                or shifts[i] % d
            )
            return (
                f"the outputs of {labels[odd]} and {labels[0 if odd else 1]} do not align "
                "(their kernels and paddings are not centred alike)"
            )
        size = max(s // d + b.kernel[a] for s, b in zip(shifts, branches))
        end = extents.pop() + d * (size - 1) - begin
        if end < 0:
            return "the merged kernel would need negative padding"
        kernel.append(size)
        pads.append((begin, end))
        dilation.append(d)
        for i, s in enumerate(shifts):
            offsets[i].append(s // d)
    groups = 0
    for b in branches:
        groups = math.gcd(groups, b.groups)
    geometry = Geometry(
        kernel=tuple(kernel),
        stride=first.stride,
        pads=tuple(pads),
        dilation=tuple(dilation),
        groups=groups,
        in_channels=first.in_channels,
        out_channels=first.out_channels,
    )
    branch_weights = sum(b.weights for b in branches)
    if geometry.weights > branch_weights:
        return (
            f"the merged layer would hold {geometry.weights} weights, more than its branches' "
            f"{branch_weights}"
        )
    return MergedGeometry(geometry, tuple(tuple(o) for o in offsets))


def _shown(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def place_kernel(
    weight: torch.Tensor, groups: int, merged: Geometry, offset: tuple[int, ...]
) -> torch.Tensor:
    """`weight` (C_out, C_in / groups, *k) as a float64 kernel of the merged conv
    (C_out, C_in / merged.groups, *K): zeros outside its taps (at `offset`) and, for a
    kernel of more groups, outside the blocks its groups read."""
    w = weight.detach().to(F64)
    out_ch, per_group = w.shape[0], w.shape[1]
    merged_per_group = merged.in_channels // merged.groups
    placed = torch.zeros((out_ch, merged_per_group, *merged.kernel), dtype=F64)
    taps = tuple(slice(o, o + k) for o, k in zip(offset, w.shape[2:]))
    out_per_group = out_ch // groups
    ratio = groups // merged.groups  # groups of the branch per group of the merged layer
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        first = (g % ratio) * per_group  # its input block inside the merged group
        placed[(rows, slice(first, first + per_group), *taps)] = w[rows]
    return placed


def identity_kernel(merged: Geometry, offset: tuple[int, ...]) -> torch.Tensor:
    """x itself as a float64 kernel of the merged conv: output channel o reads input channel
    o on one tap (`offset`, the centre for a centred kernel)."""
    channels = merged.out_channels
    eye = torch.ones((channels, 1, *(1,) * len(merged.kernel)), dtype=F64)
    return place_kernel(eye, channels, merged, offset)


def combine(
    kernels: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    scales: list[torch.Tensor],
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W = sum_i a_i * W_i, b = sum_i a_i * b_i + c, in float64 (a_i per output channel)."""
    out_ch = kernels[0].shape[0]
    weight = torch.zeros_like(kernels[0], dtype=F64)
    bias = torch.zeros(out_ch, dtype=F64) + shift.to(F64)
    for w, b, a in zip(kernels, biases, scales):
        a = a.to(F64).expand(out_ch)
        weight += a.reshape((out_ch,) + (1,) * (w.dim() - 1)) * w
        if b is not None:
            bias += a * b.detach().to(F64)
    return weight, bias


def compose_pointwise(
    first: torch.Tensor,
    first_bias: torch.Tensor | None,
    groups: int,
    second: torch.Tensor,
    second_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv followed by a 1x1 conv (stride 1, no padding, one group) with nothing between,
    as one conv of the first's geometry and one group, in float64:

        W[o, i] = sum_m W2[o, m] * W1[m, i],   b = W2 b1 + b2

    exact for any padding of the first: the 1x1 conv reads every position of its input once
    and pads nothing. `first` (C_mid, C_in / groups, *k); `second` (C_out, C_mid, 1, ...)."""
    mid = first.shape[0]
    in_channels = first.shape[1] * groups
    dense = Geometry(tuple(first.shape[2:]), (), (), (), 1, in_channels, mid)
    w1 = place_kernel(first, groups, dense, (0,) * (first.dim() - 2))
    w2 = second.detach().to(F64).reshape(second.shape[0], mid)
    weight = torch.tensordot(w2, w1, dims=([1], [0]))
    b1 = torch.zeros(mid, dtype=F64) if first_bias is None else first_bias.detach().to(F64)
    bias = w2 @ b1
    if second_bias is not None:
        bias = bias + second_bias.detach().to(F64)
    return weight, bias


class MergedParameters:
    """The merged weights and biases written so far, so that merges computing the same
    values (the calls of a block whose weights serve several calls) share one copy."""

    def __init__(self):
        self._written: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def find(self, weight: torch.Tensor, bias: torch.Tensor):
        """What was stored for equal float64 values (`remember`), or None."""
        for w, b, stored in self._written:
            if w.shape == weight.shape and torch.equal(w, weight) and torch.equal(b, bias):
                return stored
        return None

    def remember(self, weight: torch.Tensor, bias: torch.Tensor, stored) -> None:
        self._written.append((weight, bias, stored))
