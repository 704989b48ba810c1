"""Fold arithmetic: pure float64 tensor functions, no graph knowledge.

An eval-mode BatchNorm is the per-channel affine map

    y = gamma * (x - mu) / sqrt(var + eps) + beta = s * x + t,
    s = gamma / sqrt(var + eps),   t = beta - s * mu.

Into the preceding layer (output channel o carries BN channel c(o)):

    W'[o] = s[c(o)] * W[o],   b'[o] = s[c(o)] * b[o] + t[c(o)]

Into the following layer (input channel i receives BN channel c(i)), for a layer that is
linear in its input with no zero padding, L(s * x + t) = L_{W * s}(x) + L_W(t):

    W'[:, i] = W[:, i] * s[c(i)],   b' = b + sum_i W[:, i] * t[c(i)]   (summed over kernel taps)

Into a following layer that pads its input with zeros (the zeros never pass through the BN),
only the scale folds: zero padding commutes with a per-channel scale, so with no s = 0,

    L_W(pad0(s * x + t)) = L_{W * s}(pad0(x + t / s)),

and the shift u = t / s stays as a per-channel Add before the layer (`shift_before_scale`).

Where a weight keeps its channels is a `Layout`, so the same functions serve PyTorch's and
ONNX's weight layouts. The weight functions take a block of rows (axis 0) so that a caller can
fold a large weight a slice at a time; `start` is the block's first row and `rows` the full
length of axis 0. All functions return float64; callers cast once to the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

F64 = torch.float64


@dataclass(frozen=True)
class Layout:
    """Where a weight tensor holds its channels.

    Axis 0 is split into `groups` equal blocks; axis 1 holds one group's channels of the other
    side; further axes are kernel taps. `out_axis` (0 or 1) holds the output channels:

        conv (C_out, C_in/g, *k) and linear / Gemm transB=1 (N, K):   out_axis 0
        transposed conv (C_in, C_out/g, *k), MatMul / Gemm transB=0 (K, N):   out_axis 1
    """

    out_axis: int = 0
    groups: int = 1

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis


def array_f64(a) -> torch.Tensor:
    """A float64 tensor holding a copy of the array `a` (a numpy array of any float dtype)."""
    return torch.from_numpy(np.asarray(a, dtype=np.float64).copy())


def bn_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (s, t) with BN(x) = s * x + t per channel, in float64."""
    mean = running_mean.detach().to(F64)
    var = running_var.detach().to(F64)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(F64)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(F64)
    s = gamma / torch.sqrt(var + eps)
    return s, beta - s * mean


def shift_before_scale(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """u = t / s, so that s * x + t = s * (x + u); None when a channel has s = 0."""
    s, t = s.to(F64), t.to(F64)
    if bool((s == 0).any()):
        return None
    return t / s


def zero_scale_channels(s: torch.Tensor) -> list[int]:
    """The channels whose scale is 0 (gamma = 0: a pruned or dead channel)."""
    return [int(i) for i in torch.nonzero(s == 0).flatten()]


def channel_grid(
    v: torch.Tensor,
    shape: tuple[int, ...],
    axis: int,
    layout: Layout,
    start: int = 0,
    rows: int | None = None,
) -> torch.Tensor:
    """`v` (one entry per channel of the side held on `axis`) laid out to broadcast against a
    weight block of `shape` whose first row is row `start` of a weight with `rows` rows."""
    count = shape[0]
    tail = (1,) * (len(shape) - 2)
    if axis == 0:
        return v[start : start + count].reshape((count, 1, *tail))
    rows = shape[0] if rows is None else rows
    inner = shape[1]
    per_group = rows // layout.groups
    group = torch.div(torch.arange(start, start + count), per_group, rounding_mode="floor")
    index = group[:, None] * inner + torch.arange(inner)[None, :]
    return v[index].reshape((count, inner, *tail))


def scale_weight(
    weight: torch.Tensor,
    v: torch.Tensor,
    axis: int,
    layout: Layout,
    start: int = 0,
    rows: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W * v along the channels held on `axis`: `layout.out_axis` folds a following affine
    (W' = s * W, into the preceding layer), `layout.in_axis` a preceding one (W' = W * s).

    `out`, a tensor of the weight's shape (it may be `weight` itself), receives the result
    when given: each element is computed in float64 and rounded once to `out`'s dtype."""
    # float64 grid times a lower-precision weight promotes to float64 exactly, in one pass
    w = weight.detach()
    grid = channel_grid(v.to(F64), tuple(w.shape), axis, layout, start, rows)
    return torch.mul(w, grid) if out is None else torch.mul(w, grid, out=out)


def preceding_bias(bias: torch.Tensor | None, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """b' = s * b + t (per output channel)."""
    b = torch.zeros_like(s) if bias is None else bias.detach().to(F64)
    return s * b + t


def following_bias_delta(
    weight: torch.Tensor,
    t: torch.Tensor,
    layout: Layout,
    out_channels: int,
    start: int = 0,
    rows: int | None = None,
) -> torch.Tensor:
    """This block's share of W t: the output bias change from an input shift t.

    Returns a full-length (out_channels) vector; the shares of all row blocks sum to W t.
    Needs the output channels on axis 0, or a single group.
    """
    w = weight.detach()
    spread = w * channel_grid(t.to(F64), tuple(w.shape), layout.in_axis, layout, start, rows)
    delta = torch.zeros(out_channels, dtype=F64)
    if layout.out_axis == 0:
        delta[start : start + w.shape[0]] = spread.reshape(w.shape[0], -1).sum(dim=1)
    elif layout.groups == 1:
        delta += spread.transpose(0, 1).reshape(w.shape[1], -1).sum(dim=1)
    else:
        raise ValueError("a grouped weight with its output channels on axis 1 has no W t here")
    return delta


def fold_into_preceding(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    layout: Layout = Layout(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-weight fold of a per-output-channel affine (s, t) applied after the layer."""
    return scale_weight(weight, s, layout.out_axis, layout), preceding_bias(bias, s, t)


def fold_into_following(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    layout: Layout = Layout(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-weight fold of a per-input-channel affine (s, t) applied before the layer."""
    w = weight.detach()
    out_channels = w.shape[layout.out_axis] * (layout.groups if layout.out_axis == 1 else 1)
    b = torch.zeros(out_channels, dtype=F64) if bias is None else bias.detach().to(F64)
    w_new = scale_weight(w, s, layout.in_axis, layout)
    return w_new, b + following_bias_delta(w, t, layout, out_channels)
