"""A loaded model, whatever its file format: a `Source` knows its format, its input specs and
an eval-mode reference callable, and gives the later stages one torch.export program (a
PyTorch model) or its onnx_ir model (an ONNX file).

The loaders (`bnexport.load` for checkpoints, `bnexport.load_onnx` for ONNX files) both make a
Source; this module holds what they share.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from bnexport.inputs import InputSpec
from bnexport.onnx_runtime import OnnxReference
from bnexport.trace import batchnorm_modules, trace

ONNX = "ONNX model"


@dataclass
class Source:
    """A loaded checkpoint: an nn.Module (or TorchScript module) or an ExportedProgram.

    `input_specs` are the forward inputs (from the program, or from --input-shape);
    `reference()` is the eval-mode original as a callable; `to_program()` gives the one
    torch.export program that the fold and export stages work on.
    """

    model: nn.Module | torch.export.ExportedProgram
    format: str
    path: str
    input_specs: list[InputSpec] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        if isinstance(self.model, torch.export.ExportedProgram):
            return [s.name for s in program_input_specs(self.model)]
        return forward_input_names(self.model)

    @property
    def dynamic_batch(self) -> bool:
        """False when the checkpoint itself fixes the batch size."""
        return not any(s.dynamic_batch is False for s in self.input_specs or [] if s.batched)

    @property
    def is_onnx(self) -> bool:
        return self.format == ONNX

    def reference(self) -> Callable:
        """The eval-mode original (an nn.Module is put in eval mode when called); for an ONNX
        model, onnxruntime on the original file."""
        if self.is_onnx:
            return OnnxReference(self.path)
        if isinstance(self.model, torch.export.ExportedProgram):
            return self.model.module()
        return self.model

    def model_dtype(self) -> torch.dtype | None:
        """float16 or bfloat16 when the model computes in half precision (its floating
        parameters and buffers are of that type, or, without any, its floating inputs); None
        for a float32 model and for an ONNX model."""
        if self.is_onnx:
            return None
        if isinstance(self.model, torch.export.ExportedProgram):
            tensors = [*self.model.state_dict.values(), *self.model.constants.values()]
        else:
            tensors = [*self.model.parameters(), *self.model.buffers()]
        dtypes = [t.dtype for t in tensors if isinstance(t, torch.Tensor)]
        dtypes = [d for d in dtypes if d.is_floating_point] or [
            s.dtype for s in self.input_specs or [] if s.dtype.is_floating_point
        ]
        half = [d for d in dtypes if d in HALF_DTYPES]
        return max(set(half), key=half.count) if half else None

    def float32_reference(self) -> Callable:
        """The eval-mode original's float32 twin (see `float32_twin`)."""
        return float32_twin(self.reference())

    def batchnorm_modules(self) -> dict[str, str]:
        """Qualified name -> class name of every BatchNorm module (empty for a program)."""
        if not isinstance(self.model, nn.Module):
            return {}
        return batchnorm_modules(self.model)

    def to_program(
        self, args: tuple, *, dynamic_batch: bool = True
    ) -> torch.export.ExportedProgram:
        """The program to fold: the loaded one, or the module traced once in eval mode.

        A loaded program with a dynamic batch axis is traced again, with a fixed batch, only
        when a static batch is asked for (--static-batch).
        """
        if isinstance(self.model, torch.export.ExportedProgram):
            recorded = program_input_specs(self.model)
            if dynamic_batch or not any(s.dynamic_batch for s in recorded):
                return self.model
            return trace(self.model.module(), args, dynamic_batch=False)
        return trace(self.model, args, dynamic_batch=dynamic_batch)


LoadedModel = Source  # the name of earlier releases

HALF_DTYPES = (torch.float16, torch.bfloat16)


def float32_twin(model: nn.Module) -> nn.Module:
    """A float32 copy of a half-precision module (see `wider_twin`): the reference a float16
    or bfloat16 model's errors are measured against."""
    return wider_twin(model, torch.float32)


def float64_twin(model: nn.Module) -> nn.Module:
    """A float64 copy of a float32 (or half-precision) module (see `wider_twin`): the
    reference a float32 model's own rounding is measured against."""
    return wider_twin(model, torch.float64)


def _narrower(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    return HALF_DTYPES if dtype == torch.float32 else (*HALF_DTYPES, torch.float32)


def wider_twin(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` computing in `dtype`: its parameters, buffers and tensor attributes
    of a narrower floating type cast to `dtype` (exact), and, in a graph module (a program's
    `.module()`), the narrower dtypes its ops name (casts, tensor factories) replaced by
    `dtype`. The copy casts floating inputs to `dtype` and refuses to return a narrower
    output, so that it is never taken for a `dtype` reference when some part of the model
    still computes in a narrower type."""
    import copy
    import warnings

    narrower = _narrower(dtype)
    # a copy: `.to()` converts parameters in place, and a program's `.module()` shares
    # them with the program
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own, copying a graph module
        twin = copy.deepcopy(model)
    twin = twin.to(dtype)
    for module in twin.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.dtype in narrower:
                setattr(module, name, value.to(dtype))
        if isinstance(module, torch.fx.GraphModule) and _widen_dtypes(module.graph, dtype):
            module.recompile()
    return _WideOnly(twin, dtype)


def _widened(value, dtype: torch.dtype):
    if isinstance(value, torch.dtype) and value in _narrower(dtype):
        return dtype
    if isinstance(value, (tuple, list)):
        return type(value)(_widened(v, dtype) for v in value)
    return value


def _widen_dtypes(graph, dtype: torch.dtype) -> bool:
    """Replace the narrower floating dtypes named by the nodes of an fx graph; True if any."""
    changed = False
    for node in graph.nodes:
        args = _widened(node.args, dtype)
        kwargs = {k: _widened(v, dtype) for k, v in node.kwargs.items()}
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = tuple(args), kwargs
            changed = True
    return changed


class _WideOnly(nn.Module):
    """Calls the twin on inputs widened to its dtype; a narrower output means the twin does
    not compute in its dtype after all."""

    def __init__(self, twin: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.twin = twin
        self.dtype = dtype

    def forward(self, *args):
        from torch.utils import _pytree as pytree

        narrower = _narrower(self.dtype)
        args = tuple(
            a.to(self.dtype) if isinstance(a, torch.Tensor) and a.dtype in narrower else a
            for a in args
        )
        out = self.twin(*args)
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.dtype in narrower:
                raise TypeError(
                    f"the {self.dtype} copy of the model still returns {leaf.dtype} (the model "
                    "casts to a narrower type itself)"
                )
        return out


def forward_input_names(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
    ]


def program_input_specs(program: torch.export.ExportedProgram) -> list[InputSpec]:
    """The user inputs of an exported program with their example shapes (batch first)."""
    user_inputs = set(program.graph_signature.user_inputs)
    stored = getattr(program, "example_inputs", None)
    example = list(stored[0]) if stored else []
    specs = []
    placeholders = [
        n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs
    ]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        if i < len(example) and isinstance(example[i], torch.Tensor):
            shape = tuple(example[i].shape)
        else:
            shape = tuple(d if isinstance(d, int) else 2 for d in val.shape)
        dynamic = bool(val.shape) and isinstance(val.shape[0], torch.SymInt)
        specs.append(InputSpec(node.name, shape, val.dtype, dynamic_batch=dynamic))
    if any(s.dynamic_batch for s in specs):
        # beside a dynamic batch, an input whose axis 0 is fixed has no batch axis
        specs = [s if s.dynamic_batch else replace(s, batched=False) for s in specs]
    return specs
