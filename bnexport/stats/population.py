"""Exact population statistics of tensors seen while a program runs, in float64.

For each watched node, per channel (axis 1) over every other axis and every batch:

    mean = sum(x) / n,    var = sum((x - mean)^2) / (n - 1)   (unbiased, PyTorch's running_var)

accumulated batch by batch with Chan's parallel update (counts, means and sums of squared
deviations merged exactly), so the result does not depend on how the data is batched. Each
batch's mean and spread come from torch's one-pass `var_mean` in the tensor's own float32
(relative error about 1e-7 of the spread), a float64 sum replacing the mean where it exceeds
LARGE_MEAN standard deviations; so a pass over large activations costs about one BN.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

F64 = torch.float64
STATISTICS_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
LARGE_MEAN = 10.0  # |mean| / std above which a float32 mean is recomputed in float64


class ChannelMoments:
    """Running count, mean and sum of squared deviations per channel (axis 1), in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.dim() < 2:
            return
        if x.dtype not in (torch.float32, F64):
            x = x.float()
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        # one pass of torch's variance and mean in x's dtype (relative error about 1e-7 of
        # the spread); where the mean is large against the spread, its rounding would matter,
        # and it is taken again from a float64 sum
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        var, mean = var.to(F64), mean.to(F64)
        if bool((mean.abs() > LARGE_MEAN * var.sqrt()).any()):
            mean = x.sum(dim=dims, dtype=F64) / n
        m2 = var * n
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (n - 1)."""
        return self.m2 / max(self.n - 1, 1)


class _Capture(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, watch: dict[str, ChannelMoments]):
        super().__init__(module)
        self.watch = watch

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        moments = self.watch.get(n.name)
        if moments is not None and isinstance(out, torch.Tensor):
            moments.add(out)
        return out


def input_moments(
    module: fx.GraphModule, node_names: list[str], batches: Iterable[tuple]
) -> dict[str, ChannelMoments]:
    """Per-channel moments of the tensors produced by the named nodes of `module` (a graph
    module of an eval-mode program) over every batch."""
    watch = {name: ChannelMoments() for name in node_names}
    capture = _Capture(module, watch)
    with torch.no_grad():
        for batch in batches:
            capture.run(*batch)
    return watch
