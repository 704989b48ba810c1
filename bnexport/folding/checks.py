"""Model-state checks on BatchNorm statistics, run before anything is folded or written."""

from __future__ import annotations

import torch
from torch import fx

from bnexport.errors import InvalidModelError
from bnexport.folding.math import bn_scale_shift
from bnexport.folding.program_state import ProgramState
from bnexport.folding.sites import BatchNormCall

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def _tensor(state: ProgramState, node: fx.Node | None) -> torch.Tensor | None:
    return None if node is None else state.tensor(node)


def check_batchnorm_state(bn: BatchNormCall, state: ProgramState) -> list[str]:
    """Raise InvalidModelError on NaN/Inf or negative variance; return warnings otherwise."""
    if bn.uses_batch_stats:
        return []
    return check_statistics(
        bn.name,
        _tensor(state, bn.running_mean),
        _tensor(state, bn.running_var),
        _tensor(state, bn.weight),
        _tensor(state, bn.bias),
        bn.eps,
        num_batches_tracked(state, bn),
    )


def check_statistics(
    name: str,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    num_batches_tracked: int | None = None,
) -> list[str]:
    """The checks of one BN's parameters, for any engine: raise InvalidModelError on NaN/Inf
    or a negative variance; return warnings (never-updated statistics, fold scales beyond
    float16) otherwise."""
    named = {"running_mean": mean, "running_var": var, "weight": weight, "bias": bias}
    for what, value in named.items():
        if value is not None and not torch.isfinite(value).all():
            raise InvalidModelError(
                f"BatchNorm '{name}' has NaN or Inf in its {what}, so no export of this model "
                "can be correct. Retrain or repair the checkpoint (for example reset that layer's "
                "statistics by running a few batches in train mode) and try again."
            )
    if (var < 0).any():
        raise InvalidModelError(
            f"BatchNorm '{name}' has a negative running_var (min {var.min().item():.4g}); a "
            "variance can never be negative, so the checkpoint is corrupt. Recompute the "
            "statistics or restore the layer from a good checkpoint."
        )
    warnings = []
    if num_batches_tracked == 0 and bool((mean == 0).all()) and bool((var == 1).all()):
        warnings.append(
            f"{name}: running statistics were never updated (mean 0, variance 1, "
            "num_batches_tracked 0); the export normalizes with these default statistics"
        )
    s, _ = bn_scale_shift(mean, var, weight, bias, eps)
    largest = float(s.abs().max()) if s.numel() else 0.0
    if largest > FLOAT16_MAX:
        warnings.append(
            f"{name}: fold scale gamma/sqrt(var+eps) reaches {largest:.3g}, beyond float16's "
            f"range ({FLOAT16_MAX:.0f}); a half-precision deployment of the folded weights "
            "will overflow"
        )
    return warnings


def num_batches_tracked(state: ProgramState, bn: BatchNormCall) -> int | None:
    mean = state.target(bn.running_mean)
    if mean is None or not mean.endswith("running_mean"):
        return None
    value = state.value(mean[: -len("running_mean")] + "num_batches_tracked")
    return None if value is None or value.numel() != 1 else int(value)
