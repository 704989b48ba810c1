"""Finding and applying folds on the ATen graph of a traced model.

`trace` runs `torch.export` (non-strict, batch axis dynamic where the model allows) on the
eval-mode model; `fold_graph` walks its BatchNorm calls in data-flow order, asks each pattern
for a plan, and applies the first that passes. Weights touched by several folds accumulate in
float64 and are cast to the layer's dtype once, at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from bnexport.errors import TraceError
from bnexport.fold.checks import check_batchnorm_state
from bnexport.fold.math import bn_scale_shift, fold_into_following, fold_into_preceding
from bnexport.fold.patterns import PATTERNS, PRECEDING, FoldPlan, Refusal
from bnexport.fold.sites import BatchNormCall, fetch_attr, match_batchnorm
from bnexport.report import FOLDED, LEFT, UNUSED, FoldDecision, FoldReport


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, restoring each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.train(flag)


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
    summary = str(first_error).strip().splitlines()[0] if str(first_error).strip() else ""
    raise TraceError(
        f"Could not trace the model with the given example inputs "
        f"({type(first_error).__name__}: {summary}). Check that the input shapes match what "
        "the model's forward expects (--input-shape), and that forward has no Python control "
        "flow that depends on tensor values."
    ) from first_error


class _WeightStore:
    """Float64 working copies of the weights being folded, written back once."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.f64: dict[str, torch.Tensor] = {}
        self.dtype: dict[str, torch.dtype] = {}

    def get(self, target: str) -> torch.Tensor:
        if target not in self.f64:
            value = fetch_attr(self.gm, target)
            self.dtype[target] = value.dtype
            self.f64[target] = value.detach().to(torch.float64)
        return self.f64[target]

    def put(self, target: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        if dtype is not None:
            self.dtype.setdefault(target, dtype)
        self.f64[target] = value

    def write_back(self) -> None:
        for target, value in self.f64.items():
            _set_attr(self.gm, target, value.to(self.dtype[target]))


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    prefix, _, name = target.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    if name in owner._buffers:
        owner._buffers[name] = value
    else:
        if name in owner._parameters:
            del owner._parameters[name]
        owner.register_parameter(name, nn.Parameter(value, requires_grad=False))


def _free_target(gm: fx.GraphModule, prefix: str, name: str) -> str:
    owner = gm.get_submodule(prefix) if prefix else gm
    candidate, k = name, 1
    while hasattr(owner, candidate):
        candidate, k = f"{name}_folded{'' if k == 1 else k}", k + 1
    return f"{prefix}.{candidate}" if prefix else candidate


def _bias_target(gm: fx.GraphModule, plan: FoldPlan, store: _WeightStore, dtype) -> str:
    layer = plan.layer
    if layer.bias is not None:
        return layer.bias.target
    prefix = layer.weight.target.rpartition(".")[0]
    target = _free_target(gm, prefix, "bias")
    out_channels = store.get(layer.weight.target).shape[1 if layer.transposed else 0]
    if layer.transposed:
        out_channels *= layer.groups
    _set_attr(gm, target, torch.zeros(out_channels, dtype=dtype))
    with gm.graph.inserting_before(layer.node):
        bias_node = gm.graph.get_attr(target)
    args = list(layer.node.args)
    if len(args) > 2:
        args[2] = bias_node
    elif "bias" in layer.node.kwargs:
        layer.node.update_kwarg("bias", bias_node)
    else:
        args.append(bias_node)
    layer.node.args = tuple(args)
    layer.bias = bias_node
    return target


def apply_plan(plan: FoldPlan, gm: fx.GraphModule, store: _WeightStore) -> None:
    """Rewrite the layer's weights for `plan` and remove the BN call from the graph."""
    bn, layer = plan.bn, plan.layer
    s, t = bn_scale_shift(
        fetch_attr(gm, bn.running_mean.target),
        fetch_attr(gm, bn.running_var.target),
        None if bn.weight is None else fetch_attr(gm, bn.weight.target),
        None if bn.bias is None else fetch_attr(gm, bn.bias.target),
        bn.eps,
    )
    index = torch.from_numpy(np.asarray(plan.channel_of))
    s, t = s[index], t[index]
    w_target = layer.weight.target
    dtype = fetch_attr(gm, w_target).dtype
    weight = store.get(w_target)
    b_target = _bias_target(gm, plan, store, dtype)
    bias = store.get(b_target)
    if plan.direction == PRECEDING:
        new_w, new_b = fold_into_preceding(
            weight, bias, s, t, transposed=layer.transposed, groups=layer.groups
        )
    else:
        new_w, new_b = fold_into_following(weight, bias, s, t, groups=layer.groups)
    store.put(w_target, new_w)
    store.put(b_target, new_b, dtype)
    bn.node.replace_all_uses_with(bn.input)
    for node in [bn.node, *reversed(bn.extra_nodes)]:
        if node.graph is gm.graph and not node.users:
            gm.graph.erase_node(node)


def _remove_unused_attributes(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        if name not in used:
            prefix, _, attr = name.rpartition(".")
            owner = gm.get_submodule(prefix) if prefix else gm
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)


def _decide(bn: BatchNormCall, gm: fx.GraphModule) -> FoldPlan | list[Refusal]:
    if bn.uses_batch_stats:
        return [
            Refusal(
                "",
                "it tracks no running statistics, so it normalizes with batch statistics even "
                "in eval mode",
            )
        ]
    refusals = []
    for pattern in PATTERNS:
        result = pattern.match_and_check(bn, gm)
        if isinstance(result, FoldPlan):
            return result
        refusals.append(result)
    return refusals


def _unique_names(calls: list[BatchNormCall]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for call in calls:
        seen[call.name] = seen.get(call.name, 0) + 1
        k = seen[call.name]
        names.append(call.name if k == 1 else f"{call.name} (call {k})")
    return names


def fold_graph(gm: fx.GraphModule, module_names: dict[str, str] | None = None) -> FoldReport:
    """Fold every BN call of `gm` in place that folds exactly; report every BN.

    `module_names` maps qualified names of the BatchNorm modules of the original model to their
    class names, so that modules never called by forward are reported too.
    """
    calls = [c for c in (match_batchnorm(n) for n in gm.graph.nodes) if c is not None]
    names = _unique_names(calls)
    report = FoldReport()
    for call in calls:
        report.warnings.extend(check_batchnorm_state(call, gm))
    store = _WeightStore(gm)
    for call, name in zip(calls, names):
        call = match_batchnorm(call.op_node)  # earlier folds may have rewired its neighbours
        outcome = _decide(call, gm)
        if isinstance(outcome, FoldPlan):
            apply_plan(outcome, gm, store)
            report.decisions.append(
                FoldDecision(
                    name=name,
                    kind=call.kind,
                    status=FOLDED,
                    into=outcome.layer.name,
                    direction=outcome.direction,
                    channels=call.channels,
                )
            )
        else:
            reason = "; ".join(
                (f"{r.direction}: {r.reason}" if r.direction else r.reason) for r in outcome
            )
            report.decisions.append(
                FoldDecision(
                    name=name, kind=call.kind, status=LEFT, reason=reason, channels=call.channels
                )
            )
    store.write_back()
    _remove_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    called = {c.name for c in calls}
    for name, cls in (module_names or {}).items():
        if name not in called:
            report.decisions.append(
                FoldDecision(
                    name=name,
                    kind=cls,
                    status=UNUSED,
                    reason="forward never calls it, so it is not part of the exported model",
                )
            )
    return report
