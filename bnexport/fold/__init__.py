"""The fold engine: trace a model, fold its BatchNorms exactly, report each decision."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from bnexport.fold.torch_graph import fold_graph, trace
from bnexport.report import FoldReport

__all__ = ["FoldResult", "fold"]


@dataclass
class FoldResult:
    """The folded model (a torch.fx GraphModule, callable on tensors) and its report."""

    module: fx.GraphModule
    report: FoldReport
    example_inputs: tuple

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _batchnorm_modules(model: nn.Module) -> dict[str, str]:
    return {
        name: type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def fold(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    dynamic_batch: bool = True,
) -> FoldResult:
    """Fold every BatchNorm of `model` that folds exactly, leaving `model` untouched.

    `model` is an nn.Module (traced in eval mode with `example_inputs`, a tensor or a tuple of
    forward's positional arguments) or an ExportedProgram (whose own example inputs are used
    when none are given). The batch axis stays dynamic where the model allows it, unless
    `dynamic_batch` is False. Returns the folded GraphModule and the per-BN report.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(model, torch.export.ExportedProgram):
        program = model
        if example_inputs is None:
            stored = getattr(program, "example_inputs", None)
            example_inputs = tuple(stored[0]) if stored else None
        module_names: dict[str, str] = {}
    else:
        if example_inputs is None:
            raise TypeError("fold() needs example_inputs for an nn.Module")
        program = trace(model, tuple(example_inputs), dynamic_batch=dynamic_batch)
        module_names = _batchnorm_modules(model)
        training = [n or "<root>" for n, m in model.named_modules() if m.training]
    gm = program.module()
    report = fold_graph(gm, module_names)
    if not isinstance(model, torch.export.ExportedProgram) and training:
        report.warnings.insert(
            0,
            "the model was in training mode; it was folded from its eval-mode behaviour "
            "(running statistics, dropout off), which is what the export computes",
        )
    return FoldResult(gm, report, tuple(example_inputs or ()))
