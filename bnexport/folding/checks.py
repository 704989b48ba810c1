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
    named = {
        "running_mean": _tensor(state, bn.running_mean),
        "running_var": _tensor(state, bn.running_var),
        "weight": _tensor(state, bn.weight),
        "bias": _tensor(state, bn.bias),
    }
    for what, value in named.items():
        if value is not None and not torch.isfinite(value).all():
            raise InvalidModelError(
                f"BatchNorm '{bn.name}' has NaN or Inf in its {what}, so no export of this model "
                "can be correct. Retrain or repair the checkpoint (for example reset that layer's "
                "statistics by running a few batches in train mode) and try again."
            )
    var = named["running_var"]
    if (var < 0).any():
        raise InvalidModelError(
            f"BatchNorm '{bn.name}' has a negative running_var (min {var.min().item():.4g}); a "
            "variance can never be negative, so the checkpoint is corrupt. Recompute the "
            "statistics or restore the layer from a good checkpoint."
        )
    warnings = []
    mean = named["running_mean"]
    tracked = _num_batches_tracked(state, bn)
    if tracked == 0 and bool((mean == 0).all()) and bool((var == 1).all()):
        warnings.append(
            f"{bn.name}: running statistics were never updated (mean 0, variance 1, "
            "num_batches_tracked 0); the export normalizes with these default statistics"
        )
    s, _ = bn_scale_shift(mean, var, named["weight"], named["bias"], bn.eps)
    largest = float(s.abs().max()) if s.numel() else 0.0
    if largest > FLOAT16_MAX:
        warnings.append(
            f"{bn.name}: fold scale gamma/sqrt(var+eps) reaches {largest:.3g}, beyond float16's "
            f"range ({FLOAT16_MAX:.0f}); a half-precision deployment of the folded weights "
            "will overflow"
        )
    return warnings


def _num_batches_tracked(state: ProgramState, bn: BatchNormCall) -> int | None:
    mean = state.target(bn.running_mean)
    if mean is None or not mean.endswith("running_mean"):
        return None
    value = state.value(mean[: -len("running_mean")] + "num_batches_tracked")
    return None if value is None or value.numel() != 1 else int(value)
