"""What random test inputs should look like for a model, and how many it can afford.

* Where the model begins with a BatchNorm (its input goes straight into one), the inputs are
  drawn per channel from that BN's running statistics, N(mu_c, var_c), instead of N(0, 1):
  those are the inputs it was trained on, and they reach the units that N(0, 1) leaves below
  a ReLU.
* The cost of one sample is the multiply-accumulates of its conv and linear layers; the
  random batches after the first two hold SAMPLE_MACS_BUDGET / cost samples (between
  LARGE_BATCH and MAX_RANDOM_BATCH): hundreds of rows for a small MLP, a handful for a
  ResNet-50 at 224 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bnexport.defaults import LARGE_BATCH, MAX_RANDOM_BATCH, SAMPLE_MACS_BUDGET


@dataclass
class InputProfile:
    """Per-input (mean, std) per channel, where they come from, and the cost of a sample."""

    moments: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    source: str = "standard normal"
    macs: int | None = None  # per sample; None when unknown
    max_batch: int | None = None  # the largest batch the model accepts, when it sets one

    def batch_size(self) -> int:
        """The size of the random batches after the first two."""
        size = LARGE_BATCH
        if self.macs:
            size = int(min(MAX_RANDOM_BATCH, max(LARGE_BATCH, SAMPLE_MACS_BUDGET // self.macs)))
        if self.max_batch is not None:
            size = min(size, max(self.max_batch, 1))
        return size


def _std(var: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(np.asarray(var, dtype=np.float64), 0.0))


def program_profile(program) -> InputProfile:
    """The profile of a torch.export program (eval mode)."""
    import torch

    from bnexport.folding.program_state import ProgramState
    from bnexport.folding.sites import match_layer
    from bnexport.folding.torch_engine import batchnorm_calls, call_names

    state = ProgramState(program, copy_graph=False)
    user_inputs = set(program.graph_signature.user_inputs)
    profile = InputProfile()
    calls = batchnorm_calls(state.graph)
    for call, name in zip(calls, call_names(calls)):
        x = call.input
        if x.op != "placeholder" or x.name not in user_inputs or x.name in profile.moments:
            continue
        if call.uses_batch_stats or call.running_mean is None or call.running_var is None:
            continue
        mean = state.tensor(call.running_mean).double().numpy()
        var = state.tensor(call.running_var).double().numpy()
        if np.isfinite(mean).all() and np.isfinite(var).all():
            profile.moments[x.name] = (mean, _std(var))
            profile.source = f"the running statistics of {name}"
    macs = 0
    for node in state.graph.nodes:
        layer = match_layer(node, state) if node.op == "call_function" else None
        val = node.meta.get("val")
        if layer is None or not isinstance(val, torch.Tensor) or val.dim() < 1:
            continue
        weight = state.tensor(layer.weight)
        per_output = weight[0].numel() if layer.kind != "linear" else weight.shape[-1]
        if layer.kind == "conv_transpose":
            per_output = weight.numel() // weight.shape[1] // max(layer.groups, 1)
        outputs = math.prod(_size(d) for d in val.shape[1:])
        macs += outputs * per_output
    profile.macs = macs or None
    profile.max_batch = _max_batch(program, user_inputs)
    return profile


def _max_batch(program, user_inputs: set[str]) -> int | None:
    """The upper bound the program sets on its batch axis, if any."""
    import torch

    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        if not isinstance(val, torch.Tensor) or not val.dim():
            continue
        batch = val.shape[0]
        if not isinstance(batch, torch.SymInt):
            return None
        bound = program.range_constraints.get(batch.node.expr)
        upper = getattr(bound, "upper", None)
        if upper is None or getattr(upper, "is_finite", True) is False:
            return None  # unbounded
        try:
            return int(upper)
        except Exception:  # noqa: BLE001 - a bound sympy cannot give as an int: unbounded
            return None
    return None


def _size(d) -> int:
    try:
        return int(d)
    except (TypeError, ValueError):
        return 1  # a symbolic axis other than the batch: count it once


def onnx_profile(model, path: str | None = None, specs: list | None = None) -> InputProfile:
    """The profile of an onnx_ir model; its cost is estimated from the file at `path` with
    its inputs set to `specs` (batch 1) and shapes inferred by onnx."""
    inputs = {v.name for v in model.graph.inputs}
    profile = InputProfile()
    for node in model.graph:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        if x is None or x.name not in inputs or x.name in profile.moments or len(node.inputs) < 5:
            continue
        mean, var = node.inputs[3], node.inputs[4]
        if mean is None or var is None or mean.const_value is None or var.const_value is None:
            continue
        m = np.asarray(mean.const_value.numpy(), dtype=np.float64)
        v = np.asarray(var.const_value.numpy(), dtype=np.float64)
        if np.isfinite(m).all() and np.isfinite(v).all():
            profile.moments[x.name] = (m, _std(v))
            profile.source = f"the running statistics of {node.name or node.outputs[0].name}"
    if path is not None and specs:
        try:
            profile.macs = onnx_macs(path, specs) or None
        except Exception:  # noqa: BLE001 - a file onnx cannot infer: the default batch sizes
            profile.macs = None
    return profile


ONNX_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def onnx_macs(path: str, specs: list) -> int:
    """Multiply-accumulates of one sample through the conv and linear nodes of the main graph
    of the ONNX file at `path`, its inputs given the shapes of `specs` at batch 1. Nodes whose
    shapes onnx cannot infer count nothing."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    shapes = {s.name: s.with_batch(1) for s in specs}
    for value in proto.graph.input:
        if value.name in shapes and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[value.name]:
                dims.add().dim_value = int(d)
    weights = {t.name: list(t.dims) for t in proto.graph.initializer}
    del proto.graph.initializer[:]  # shapes need the dims only, which `weights` keeps
    for name, dims in weights.items():
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, 1, dims))
    inferred = onnx.shape_inference.infer_shapes(proto)
    known = {}
    for info in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = [
                d.dim_value if d.HasField("dim_value") else 1
                for d in info.type.tensor_type.shape.dim
            ]
            known[info.name] = dims
    macs = 0
    for node in inferred.graph.node:
        if node.op_type not in ONNX_LAYERS or node.output[0] not in known or len(node.input) < 2:
            continue
        out, weight = known[node.output[0]], weights.get(node.input[1]) or known.get(node.input[1])
        if not out or not weight:
            continue
        if node.op_type == "Conv":
            per_output = math.prod(weight[1:])
        elif node.op_type == "ConvTranspose":
            per_output = math.prod(weight) // max(weight[1], 1)
        else:
            per_output = weight[0] if node.op_type == "MatMul" or len(weight) < 2 else weight[-1]
        macs += math.prod(out[1:]) * per_output
    return macs
