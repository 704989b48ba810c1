"""The PyTorch fold engine: find and apply folds on a torch.export program's own graph.

`fold_program` walks the program's BatchNorm calls in data-flow order, asks each pattern for
a plan and rewires the graph for the first that passes (the BN call disappears; a bias-less
layer gets a bias parameter). The weight arithmetic is deferred and done one layer at a time,
in row blocks of bounded size: every fold that touches a layer is applied to a float64 copy
of a block of its rows, and the block is cast once to the layer's dtype. The result is a new
program over the rewritten graph; the input program and its tensors are never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from bnexport.folding.checks import check_batchnorm_state
from bnexport.folding.math import (
    F64,
    bn_scale_shift,
    following_bias_delta,
    preceding_bias,
    scale_weight,
)
from bnexport.folding.patterns import PATTERNS, PRECEDING, FoldPlan, Refusal
from bnexport.folding.program_state import ProgramState
from bnexport.folding.sites import BatchNormCall, LayerCall, match_batchnorm
from bnexport.report import FOLDED, LEFT, UNUSED, FoldDecision, FoldReport

BLOCK_BYTES = 64 * 2**20  # float64 working copy of one block of weight rows


@dataclass
class _Affine:
    direction: str
    s: torch.Tensor
    t: torch.Tensor


@dataclass
class _LayerFolds:
    """Every fold into one layer, in the order they were decided."""

    layer: LayerCall
    bias_target: str
    affines: list[_Affine] = field(default_factory=list)


def _bias_target(plan: FoldPlan, state: ProgramState) -> str:
    """The layer's bias target, adding a zero bias parameter when the layer has none."""
    layer = plan.layer
    if layer.bias is not None:
        return state.target(layer.bias)
    weight = state.tensor(layer.weight)
    out_channels = weight.shape[1] * layer.groups if layer.transposed else weight.shape[0]
    prefix = state.target(layer.weight).rpartition(".")[0]
    hint = f"{prefix}.bias" if prefix else "bias"
    bias_node = state.add_parameter(hint, torch.zeros(out_channels, dtype=weight.dtype))
    args = list(layer.node.args)
    if len(args) > 2:
        args[2] = bias_node
    elif "bias" in layer.node.kwargs:
        layer.node.update_kwarg("bias", bias_node)
    else:
        args.append(bias_node)
    layer.node.args = tuple(args)
    layer.bias = bias_node
    return state.target(bias_node)


def _rewire(plan: FoldPlan, state: ProgramState, pending: dict[str, _LayerFolds]) -> None:
    """Remove the BN call from the graph and queue its affine for the layer's weights."""
    bn, layer = plan.bn, plan.layer
    s, t = bn_scale_shift(
        state.tensor(bn.running_mean),
        state.tensor(bn.running_var),
        None if bn.weight is None else state.tensor(bn.weight),
        None if bn.bias is None else state.tensor(bn.bias),
        bn.eps,
    )
    index = torch.from_numpy(np.asarray(plan.channel_of))
    w_target = state.target(layer.weight)
    if w_target not in pending:
        pending[w_target] = _LayerFolds(layer, _bias_target(plan, state))
    pending[w_target].affines.append(_Affine(plan.direction, s[index], t[index]))
    bn.node.replace_all_uses_with(bn.input)
    for node in [bn.node, *reversed(bn.extra_nodes)]:
        if node.graph is state.graph and not node.users:
            state.graph.erase_node(node)


class _Workspace:
    """One float64 buffer reused for every block of every layer (fresh memory for each block
    would cost a page fault per page, more than the arithmetic itself)."""

    def __init__(self, numel: int = 0):
        self.buffer = torch.empty(numel, dtype=F64)

    def like(self, block: torch.Tensor) -> torch.Tensor:
        if self.buffer.numel() < block.numel():
            self.buffer = torch.empty(block.numel(), dtype=F64)
        return self.buffer[: block.numel()].view(block.shape)


def _block_rows(weight: torch.Tensor) -> int:
    """Rows of `weight` per block, so that a float64 block stays within BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (max(weight[0].numel(), 1) * 8))


def _fold_layer(
    folds: _LayerFolds, state: ProgramState, workspace: _Workspace, *, in_place: bool
) -> None:
    """Apply every queued affine to one layer's weight and bias, a block of rows at a time.

    `in_place` writes the folded rows back into the weight tensor itself (only for a program
    the caller owns outright), so the peak memory is the weights plus one float64 block.
    """
    w_target = state.target(folds.layer.weight)
    weight = state.value(w_target)
    bias = state.value(folds.bias_target)
    layout = folds.layer.layout
    rows = weight.shape[0]
    out_channels = bias.shape[0]
    step = _block_rows(weight)
    in_place = in_place and not state.shares_memory(w_target)
    new_weight = weight if in_place else torch.empty_like(weight, requires_grad=False)
    deltas = [torch.zeros(out_channels, dtype=F64) for _ in folds.affines]
    with torch.no_grad():
        for start in range(0, rows, step):
            block = weight[start : start + step].detach()  # promoted to float64 by the math
            # float64 into a reused buffer, then one cast into the weight: two vectorised passes
            # (a mixed-dtype multiply straight into the weight is three times slower)
            out = workspace.like(block)
            for k, affine in enumerate(folds.affines):
                axis = layout.out_axis
                if affine.direction != PRECEDING:
                    axis = layout.in_axis
                    deltas[k] += following_bias_delta(
                        block, affine.t, layout, out_channels, start, rows
                    )
                block = scale_weight(block, affine.s, axis, layout, start, rows, out=out)
            new_weight[start : start + step].copy_(block)  # the one cast to the weight's dtype
        b = bias.detach().to(F64)
        for affine, delta in zip(folds.affines, deltas):
            b = (
                preceding_bias(b, affine.s, affine.t)
                if affine.direction == PRECEDING
                else b + delta
            )
    if not in_place:
        state.replace(w_target, new_weight)
    state.replace(folds.bias_target, b.to(bias.dtype))


def _decide(bn: BatchNormCall, state: ProgramState) -> FoldPlan | list[Refusal]:
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
        result = pattern.match_and_check(bn, state)
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


def batchnorm_calls(graph: fx.Graph) -> list[BatchNormCall]:
    """The BatchNorm calls of a graph, in data-flow order."""
    return [c for c in (match_batchnorm(n) for n in graph.nodes) if c is not None]


def fold_program(
    program: torch.export.ExportedProgram,
    module_names: dict[str, str] | None = None,
    *,
    copy_graph: bool = True,
    in_place: bool = False,
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold every BN call of `program` that folds exactly; report every BN.

    Returns the folded program and the report. `module_names` maps qualified names of the
    BatchNorm modules of the original model to their class names, so that modules never
    called by forward are reported too. With `copy_graph=False` the input program's graph
    module is rewritten (cheaper), and with `in_place=True` its weight tensors too (for a
    program that nothing else shares, such as one loaded from a file for this run); either
    way the input program must not be used afterwards. By default nothing of the input
    program, its graph or its tensors changes.
    """
    state = ProgramState(program, copy_graph=copy_graph)
    calls = batchnorm_calls(state.graph)
    names = _unique_names(calls)
    report = FoldReport()
    for call in calls:
        report.warnings.extend(check_batchnorm_state(call, state))
    pending: dict[str, _LayerFolds] = {}
    for call, name in zip(calls, names):
        call = match_batchnorm(call.op_node)  # earlier folds may have rewired its neighbours
        outcome = _decide(call, state)
        if isinstance(outcome, FoldPlan):
            _rewire(outcome, state, pending)
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
    weights = [state.value(state.target(f.layer.weight)) for f in pending.values()]
    largest = max((min(_block_rows(w), w.shape[0]) * w[0].numel() for w in weights), default=0)
    workspace = _Workspace(largest)  # allocated once, at the size of the largest block
    for folds in pending.values():
        _fold_layer(folds, state, workspace, in_place=in_place)
    state.remove_unused()
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
    return state.build(), report
