"""Fold arithmetic: pure float64 tensor functions, no graph knowledge.

An eval-mode BatchNorm is the per-channel affine map

    y = gamma * (x - mu) / sqrt(var + eps) + beta = s * x + t,
    s = gamma / sqrt(var + eps),   t = beta - s * mu.

Into the preceding layer (output channel o carries BN channel c(o)):

    W'[o] = s[c(o)] * W[o],   b'[o] = s[c(o)] * b[o] + t[c(o)]

Into the following layer (input channel i receives BN channel c(i)), for a layer that is
linear in its input with no zero padding, L(s * x + t) = L_{W * s}(x) + L_W(t):

    W'[:, i] = W[:, i] * s[c(i)],   b' = b + sum_i W[:, i] * t[c(i)]   (summed over kernel taps)

All functions take and return float64 tensors; callers cast once to the layer's dtype.
"""

from __future__ import annotations

import torch

F64 = torch.float64


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


def _out_channel_view(scale: torch.Tensor, weight: torch.Tensor, transposed: bool, groups: int):
    """Reshape a per-output-channel vector so it broadcasts against `weight`."""
    if not transposed:
        return scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    # ConvTranspose weight is (C_in, C_out / groups, *k); output channel o = g * C_out/g + j
    # lives at rows of group g, column j.
    c_in, c_out_g = weight.shape[0], weight.shape[1]
    per_group = scale.reshape(groups, 1, c_out_g)
    return per_group.expand(groups, c_in // groups, c_out_g).reshape(
        (c_in, c_out_g) + (1,) * (weight.dim() - 2)
    )


def fold_into_preceding(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-output-channel affine (s, t) applied after a conv/linear layer.

    `s` and `t` have one entry per output channel of the layer. `weight` is laid out as
    PyTorch stores it: (C_out, C_in/groups, *k) for conv and linear, (C_in, C_out/groups, *k)
    for transposed conv. Returns float64 (W', b').
    """
    w = weight.detach().to(F64)
    b = torch.zeros_like(s) if bias is None else bias.detach().to(F64)
    return w * _out_channel_view(s, w, transposed, groups), s * b + t


def fold_into_following(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-input-channel affine (s, t) applied before a conv (no zero padding) or linear.

    `s` and `t` have one entry per input channel of the layer (C_in). `weight` is
    (C_out, C_in/groups, *k). Returns float64 (W', b').
    """
    w = weight.detach().to(F64)
    c_out, c_in_g = w.shape[0], w.shape[1]
    out_per_group = c_out // groups
    # Input channel seen by weight[o, j] is group(o) * C_in/groups + j.
    s_rows = (
        s.reshape(groups, 1, c_in_g).expand(groups, out_per_group, c_in_g).reshape(c_out, c_in_g)
    )
    t_rows = (
        t.reshape(groups, 1, c_in_g).expand(groups, out_per_group, c_in_g).reshape(c_out, c_in_g)
    )
    tail = (1,) * (w.dim() - 2)
    b = torch.zeros(c_out, dtype=F64) if bias is None else bias.detach().to(F64)
    w_new = w * s_rows.reshape((c_out, c_in_g) + tail)
    b_new = b + (w * t_rows.reshape((c_out, c_in_g) + tail)).reshape(c_out, -1).sum(dim=1)
    return w_new, b_new
