"""Tracing: an nn.Module in eval mode becomes a torch.export program, once per run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bnexport.errors import TraceError, summarize_exception

TRAINING_MODE_WARNING = (
    "the model was in training mode; it was folded from its eval-mode behaviour "
    "(running statistics, dropout off), which is what the export computes"
)


def in_training_mode(model: nn.Module) -> bool:
    return any(m.training for m in model.modules())


def batchnorm_modules(model: nn.Module) -> dict[str, str]:
    """Qualified name -> class name of every BatchNorm module of `model`."""
    return {
        name: type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, restoring each one's own flag afterwards.

    Modules that cannot switch mode (a program's `.module()` is always in eval mode and
    raises on `.train()`) are left as they are.
    """
    flags = [(m, m.training) for m in model.modules()]
    switched = []
    try:
        for m, flag in flags:
            if flag:
                try:
                    m.training = False
                    switched.append(m)
                except (NotImplementedError, AttributeError):
                    pass
        yield model
    finally:
        for m in switched:
            m.training = True


def batch_dynamic_shapes(args: tuple) -> tuple:
    """A dynamic_shapes spec marking axis 0 of every tensor input as AUTO (dynamic if possible)."""

    def spec(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return {0: torch.export.Dim.AUTO}
        return None

    return tuple(pytree.tree_map(spec, a) for a in args)


def trace(
    model: nn.Module, args: tuple, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """Export the eval-mode model to an ATen graph without changing the caller's module."""
    attempts = [batch_dynamic_shapes(args)] if dynamic_batch else []
    attempts.append(None)
    first_error: Exception | None = None
    with eval_mode(model):
        for dynamic_shapes in attempts:
            try:
                return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)
            except Exception as exc:  # noqa: BLE001 - reported below with the first cause
                first_error = first_error or exc
    raise TraceError(
        f"Could not trace the model with the given example inputs "
        f"({summarize_exception(first_error)}). Check that the input shapes match what "
        "the model's forward expects (--input-shape), and that forward has no Python control "
        "flow that depends on tensor values."
    ) from first_error
