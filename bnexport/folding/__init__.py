"""The fold stage: a model or program in, a folded torch.export program and its report out.

Two engines share the fold arithmetic (`math.py`), the channel tracking (`channels.py`) and the
report types: `torch_engine` on torch.export graphs, `onnx_engine` on ONNX graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from bnexport.folding.torch_engine import fold_program
from bnexport.report import FoldReport
from bnexport.trace import TRAINING_MODE_WARNING, batchnorm_modules, in_training_mode, trace

__all__ = ["FoldResult", "fold", "fold_program"]


@dataclass
class FoldResult:
    """The folded program, its report and the example inputs it was traced with.

    `module` is the folded program as a callable GraphModule (built on first use).
    """

    program: torch.export.ExportedProgram
    report: FoldReport
    example_inputs: tuple
    _module: fx.GraphModule | None = field(default=None, repr=False)

    @property
    def module(self) -> fx.GraphModule:
        if self._module is None:
            self._module = self.program.module()
        return self._module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _stored_example(program: torch.export.ExportedProgram) -> tuple | None:
    stored = getattr(program, "example_inputs", None)
    return tuple(stored[0]) if stored else None


def fold(
    model: nn.Module | torch.export.ExportedProgram | FoldResult,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    dynamic_batch: bool = True,
    duplicate_shared: bool = False,
) -> FoldResult:
    """Fold every BatchNorm of `model` that folds exactly, leaving `model` untouched.

    `model` is an nn.Module (traced once in eval mode with `example_inputs`, a tensor or a
    tuple of forward's positional arguments), an ExportedProgram (folded as it is; its own
    example inputs are used when none are given) or an earlier FoldResult. The batch axis
    stays dynamic where the model allows it, unless `dynamic_batch` is False.

    A layer called several times folds a BN once when all its calls take the same BN; with
    `duplicate_shared`, calls that take different BNs (or none) get their own weight copies.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(model, FoldResult):
        example_inputs = example_inputs or model.example_inputs
        model = model.program
    warnings: list[str] = []
    module_names: dict[str, str] = {}
    if isinstance(model, torch.export.ExportedProgram):
        program = model
        example_inputs = example_inputs or _stored_example(program)
    else:
        if example_inputs is None:
            raise TypeError("fold() needs example_inputs for an nn.Module")
        module_names = batchnorm_modules(model)
        if in_training_mode(model) and not isinstance(model, fx.GraphModule):
            warnings.append(TRAINING_MODE_WARNING)
        program = trace(model, tuple(example_inputs), dynamic_batch=dynamic_batch)
    folded, report = fold_program(
        program, module_names, copy_graph=program is model, duplicate_shared=duplicate_shared
    )
    report.warnings[:0] = warnings
    return FoldResult(folded, report, tuple(example_inputs or ()))
