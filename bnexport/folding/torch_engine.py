"""The PyTorch fold engine: find and apply folds on a torch.export program's own graph.

`fold_program` walks the program's BatchNorm calls in data-flow order, asks each pattern for
a plan and rewires the graph for the first that passes (the BN call disappears, or becomes an
Add of its shift before a zero-padded conv; a bias-less layer gets a bias parameter). A layer
called several times is folded once for all its calls, or not at all, unless its calls are
given their own copies of the weights (`duplicate_shared`). The weight arithmetic is deferred
and done one layer at a time, in row blocks of bounded size: every fold that touches a layer
is applied to a float64 copy of a block of its rows, and the block is cast once to the
layer's dtype. The result is a new
program over the rewritten graph; the input program and its tensors are never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from bnexport.folding.affines import ConstantValues, affine_calls, match_affine
from bnexport.folding.branches import MergePlan, MergeRefusal, apply_merge, find_merges
from bnexport.folding.chains import ChainPlan, apply_chain, chain_weights, find_chains
from bnexport.folding.channels import RESHAPES, is_transparent_op
from bnexport.folding.checks import check_batchnorm_state
from bnexport.folding.math import (
    F64,
    following_bias_delta,
    preceding_bias,
    scale_weight,
    shift_before_scale,
    zero_scale_channels,
)
from bnexport.folding.merge_math import MergedParameters
from bnexport.folding.patterns import (
    PATTERNS,
    PRECEDING,
    FoldPlan,
    Refusal,
    describe,
    map_scale_shift,
)
from bnexport.folding.program_state import ProgramState
from bnexport.folding.shared import note_merged_layers, shared_refusal, zero_scale_refusal
from bnexport.folding.sites import (
    BatchNormCall,
    LayerCall,
    data_users,
    is_layer_like,
    match_batchnorm,
    match_layer,
    module_scope,
)
from bnexport.report import (
    COMPUTED,
    FOLDED,
    LEFT,
    MERGED,
    UNUSED,
    BranchMerge,
    CheckPoint,
    FoldDecision,
    FoldReport,
)

aten = torch.ops.aten

BLOCK_BYTES = 64 * 2**20  # float64 working copy of one block of weight rows


@dataclass
class _Affine:
    direction: str
    s: torch.Tensor
    t: torch.Tensor
    shift_kept: bool = False  # the scale only: the shift stays as an Add before the layer


@dataclass
class _LayerFolds:
    """Every fold into one weight, in the order they were decided (`bias_target` is None
    while no fold changes the bias)."""

    layer: LayerCall
    bias_target: str | None = None
    affines: list[_Affine] = field(default_factory=list)


@dataclass
class _Group:
    """BN calls that fold as one into the weights of a layer: one plan per call of the layer
    that shares them, all with the same affine. `calls` counts the calls the weights serve
    after the fold; `copy` gives the group its own copy of the weights first."""

    plans: list[FoldPlan]
    calls: int
    copy: bool = False
    bytes_added: int = 0
    branches: bool = False  # one BN into several layers, one plan each (see `_branch_group`)


def _layer_affine(plan: FoldPlan, state: ProgramState) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) per layer channel: the BN's affine through the plan's channel mapping."""
    s, t = map_scale_shift(plan.bn, state)
    index = torch.from_numpy(np.asarray(plan.channel_of))
    return s[index], t[index]


# --------------------------------------------------------------------------- shared layers


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plans_into(
    weight: fx.Node, pattern, bns: list[BatchNormCall], state: ProgramState
) -> dict[fx.Node, FoldPlan]:
    """The plans by which `pattern` folds BN calls `bns` into calls of `weight`, keyed by
    the layer call."""
    found: dict[fx.Node, FoldPlan] = {}
    for call in bns:
        call = match_batchnorm(call.op_node)
        if call is None or call.uses_batch_stats:
            continue
        result = pattern.match_and_check(call, state)
        if isinstance(result, FoldPlan) and result.layer.weight is weight:
            found.setdefault(result.layer.node, result)
    return found


def _same_fold(a: FoldPlan, b: FoldPlan, state: ProgramState) -> bool:
    """Whether one fold of `a` into the shared weights is also exactly `b`'s fold."""
    if (a.direction, a.shift_kept, a.layer.kind, a.layer.groups, a.layer.bias) != (
        b.direction,
        b.shift_kept,
        b.layer.kind,
        b.layer.groups,
        b.layer.bias,
    ) or not np.array_equal(a.channel_of, b.channel_of):
        return False
    (sa, ta), (sb, tb) = _layer_affine(a, state), _layer_affine(b, state)
    if not (torch.equal(sa, sb) and torch.equal(ta, tb)):
        return False
    return not b.shift_kept or shift_before_scale(*map_scale_shift(b.bn, state)) is not None


def _why_apart(
    plan: FoldPlan, odd: fx.Node, others: dict[fx.Node, FoldPlan], state: ProgramState
) -> str:
    """What keeps the call `odd` of the shared weights from taking `plan`'s fold."""
    side = "followed" if plan.direction == PRECEDING else "preceded"
    if odd in others and others[odd].shift_kept != plan.shift_kept:
        padded = odd.name if others[odd].shift_kept else "this call"
        return (
            f"its call {odd.name} takes the BN's shift another way ({padded} pads with zeros, "
            "so there the shift stays as an Add)"
        )
    if odd in others:
        return f"its call {odd.name} is {side} by a BN with other statistics"
    if match_layer(odd, state) is not None:
        return f"its call {odd.name} has no BN to fold"
    return f"they are also read by {describe(odd, state)}"


def _resolve_sharing(
    plan: FoldPlan,
    pattern,
    others_bns: list[BatchNormCall],
    decided: dict,
    state: ProgramState,
    duplicate_shared: bool,
) -> _Group | Refusal:
    """The calls `plan`'s fold serves. A layer called once: the plan alone. A layer whose
    weights serve several calls: all of them, when each call takes the same fold from a BN
    not yet decided; otherwise a copy of the weights for the calls that do
    (`duplicate_shared`), or a refusal. `others_bns` are the other BN calls still in the
    graph; those in `decided` (left earlier) only explain a refusal."""
    layer = plan.layer
    calls = data_users(layer.weight)
    bias_users = [] if layer.bias is None else data_users(layer.bias)
    if calls == [layer.node] and all(u is layer.node for u in bias_users):
        return _Group([plan], 1)
    others = _plans_into(layer.weight, pattern, others_bns, state)
    others.pop(layer.node, None)
    same = [plan] + [
        others[c]
        for c in calls
        if c in others
        and others[c].bn.op_node not in decided
        and _same_fold(plan, others[c], state)
    ]
    members = {p.layer.node for p in same}
    odd = next((c for c in calls if c not in members), None)
    odd_bias = next((u for u in bias_users if u not in members), None)
    if odd is None and odd_bias is None:
        return _Group(same, len(calls))
    copy_bytes = _nbytes(state.tensor(layer.weight))
    if layer.bias is not None:
        copy_bytes += _nbytes(state.tensor(layer.bias))
    if duplicate_shared:
        return _Group(same, len(same), copy=True, bytes_added=copy_bytes)
    if odd is not None:
        why = _why_apart(plan, odd, others, state)
    else:
        why = f"its bias is also read by {describe(odd_bias, state)}"
    return Refusal(plan.direction, shared_refusal(layer.name, len(calls), why, copy_bytes))


def _give_own_weights(group: _Group, state: ProgramState) -> None:
    """Point the group's layer calls at a copy of their weight (and bias)."""
    layer = group.plans[0].layer
    old_w, old_b = layer.weight, layer.bias
    new_w = state.add_parameter(f"{state.target(old_w)}_copy", state.tensor(old_w).detach().clone())
    new_b = None
    if old_b is not None:
        new_b = state.add_parameter(
            f"{state.target(old_b)}_copy", state.tensor(old_b).detach().clone()
        )
    for plan in group.plans:
        plan.layer.node.replace_input_with(old_w, new_w)
        if old_b is not None:
            plan.layer.node.replace_input_with(old_b, new_b)
        plan.layer.weight, plan.layer.bias = new_w, new_b


# --------------------------------------------------------------------------- rewiring


def _bias_target(folds: _LayerFolds, nodes: list[fx.Node], state: ProgramState) -> str:
    """The layer's bias target, adding one zero bias parameter for all its calls `nodes` when
    the layer has none."""
    layer = folds.layer
    if folds.bias_target is not None:
        return folds.bias_target
    if layer.bias is not None:
        folds.bias_target = state.target(layer.bias)
        return folds.bias_target
    weight = state.tensor(layer.weight)
    out_channels = weight.shape[1] * layer.groups if layer.transposed else weight.shape[0]
    prefix = state.target(layer.weight).rpartition(".")[0]
    hint = f"{prefix}.bias" if prefix else "bias"
    bias_node = state.add_parameter(hint, torch.zeros(out_channels, dtype=weight.dtype))
    for node in nodes:
        args = list(node.args)
        if len(args) > 2:
            args[2] = bias_node
        elif "bias" in node.kwargs:
            node.update_kwarg("bias", bias_node)
        else:
            args.append(bias_node)
        node.args = tuple(args)
    layer.bias = bias_node
    folds.bias_target = state.target(bias_node)
    return folds.bias_target


def _shift_parameter(
    bn: BatchNormCall, state: ProgramState, shifts: dict, exact: dict | None
) -> fx.Node:
    """u = t / s laid out on the BN input's channel axis, one parameter per set of BN
    parameters (the calls of one BN module share it)."""
    key = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    if bn.affine is not None:
        key = (bn.op_node,)
    if key not in shifts:
        u = shift_before_scale(*map_scale_shift(bn, state))
        val = bn.input.meta["val"]
        shape = (bn.channels,) + (1,) * (val.dim() - 1 - bn.axis) if bn.channels > 1 else (1,)
        prefix = (state.target(bn.running_mean) or bn.name or "bn").rpartition(".")[0]
        hint = f"{prefix}.shift" if prefix else "shift"
        shifts[key] = state.add_parameter(hint, u.to(val.dtype).reshape(shape))
        if exact is not None:
            exact[state.target(shifts[key])] = u.reshape(shape)
    return shifts[key]


def _remove_batchnorm(
    plan: FoldPlan, state: ProgramState, shifts: dict, exact: dict | None = None
) -> None:
    """Take the BN call out of the graph: its users read its input, or for a fold that keeps
    the shift, an Add of its input and u = t / s."""
    bn = plan.bn
    replacement = bn.input
    if plan.shift_kept:
        u = _shift_parameter(bn, state, shifts, exact)
        with state.graph.inserting_before(bn.op_node):
            replacement = state.graph.call_function(aten.add.Tensor, (bn.input, u))
        replacement.meta["val"] = bn.node.meta["val"]
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in bn.node.meta:
                replacement.meta[key] = bn.node.meta[key]
    bn.node.replace_all_uses_with(replacement)
    for node in [bn.node, *reversed(bn.extra_nodes)]:
        if node.graph is state.graph and not node.users:
            state.graph.erase_node(node)


def _apply_group(
    group: _Group,
    state: ProgramState,
    pending: dict[str, _LayerFolds],
    shifts: dict,
    exact: dict | None = None,
) -> None:
    """Rewire the group's BN calls and queue its affine, once, for the shared weights. A copy
    of the weights starts with the folds already queued for the weights it copies."""
    plan = group.plans[0]
    if group.copy:
        earlier = pending.get(state.target(plan.layer.weight))
        _give_own_weights(group, state)
        if earlier is not None:
            # the copied bias (the one the calls read) takes the earlier folds too
            bias = None if earlier.bias_target is None else state.target(plan.layer.bias)
            pending[state.target(plan.layer.weight)] = _LayerFolds(
                plan.layer, bias, list(earlier.affines)
            )
    for member in group.plans if group.branches else [plan]:
        w_target = state.target(member.layer.weight)
        folds = pending.setdefault(w_target, _LayerFolds(member.layer))
        s, t = _layer_affine(member, state)
        if member.direction == PRECEDING or (not member.shift_kept and bool(t.any())):
            _bias_target(folds, data_users(member.layer.weight), state)
        folds.affines.append(_Affine(member.direction, s, t, member.shift_kept))
    for member in group.plans[:1] if group.branches else group.plans:
        _remove_batchnorm(member, state, shifts, exact)


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
    folds: _LayerFolds,
    state: ProgramState,
    workspace: _Workspace,
    *,
    in_place: bool,
    exact: dict | None = None,
) -> None:
    """Apply every queued affine to one layer's weight and bias, a block of rows at a time.

    `in_place` writes the folded rows back into the weight tensor itself (only for a program
    the caller owns outright), so the peak memory is the weights plus one float64 block.
    """
    w_target = state.target(folds.layer.weight)
    weight = state.value(w_target)
    bias = None if folds.bias_target is None else state.value(folds.bias_target)
    layout = folds.layer.layout
    rows = weight.shape[0]
    out_channels = 0 if bias is None else bias.shape[0]
    step = _block_rows(weight)
    in_place = in_place and not state.shares_memory(w_target)
    new_weight = weight if in_place else torch.empty_like(weight, requires_grad=False)
    exact_weight = None if exact is None else torch.empty(weight.shape, dtype=F64)
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
                if affine.direction != PRECEDING and not affine.shift_kept and affine.t.any():
                    deltas[k] += following_bias_delta(
                        block, affine.t, layout, out_channels, start, rows
                    )
                block = scale_weight(block, affine.s, axis, layout, start, rows, out=out)
            new_weight[start : start + step].copy_(block)  # the one cast to the weight's dtype
            if exact_weight is not None:
                exact_weight[start : start + step].copy_(block)
    if not in_place:
        state.replace(w_target, new_weight)
    if exact is not None:
        exact[w_target] = exact_weight
    if bias is None:
        return
    with torch.no_grad():
        b = bias.detach().to(F64)
        for affine, delta in zip(folds.affines, deltas):
            b = (
                preceding_bias(b, affine.s, affine.t)
                if affine.direction == PRECEDING
                else b + delta
            )
    state.replace(folds.bias_target, b.to(bias.dtype))
    if exact is not None:
        exact[folds.bias_target] = b


def _overflow_reason(plan: FoldPlan, state: ProgramState) -> str | None:
    """For a weight of 16 bits or fewer: why the folded values (weight, bias, a kept shift)
    would not fit its dtype."""
    layer = plan.layer
    weight = state.tensor(layer.weight)
    if weight.element_size() > 2 or not weight.is_floating_point():
        return None
    finite = float(torch.finfo(weight.dtype).max)
    s, t = _layer_affine(plan, state)
    layout = layer.layout
    bias = None if layer.bias is None else state.tensor(layer.bias)
    if plan.direction == PRECEDING:
        folded = scale_weight(weight, s, layout.out_axis, layout)
        values = {"weights": folded, "bias": preceding_bias(bias, s, t)}
    else:
        values = {"weights": scale_weight(weight, s, layout.in_axis, layout)}
        if plan.shift_kept:
            values["shift kept as an Add"] = shift_before_scale(*map_scale_shift(plan.bn, state))
        elif layout.out_axis == 0 or layout.groups == 1:
            out = bias.shape[0] if bias is not None else None
            out = out or (weight.shape[1] * layout.groups if layout.out_axis else weight.shape[0])
            delta = following_bias_delta(weight, t, layout, out)
            values["bias"] = delta if bias is None else bias.to(F64) + delta
    for what, value in values.items():
        largest = float(value.abs().max()) if value.numel() else 0.0
        if largest > finite:
            dtype = str(weight.dtype).removeprefix("torch.")
            return (
                f"folding it into {layer.name} would give {dtype} {what} of {largest:.3g}, "
                f"beyond the largest finite {dtype} ({finite:.0f})"
            )
    return None


def _decide(
    bn: BatchNormCall,
    state: ProgramState,
    others: list[BatchNormCall],
    decided: dict,
    duplicate_shared: bool,
) -> _Group | list[Refusal]:
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
        if isinstance(result, list):
            result = _branch_group(result, state)
        if isinstance(result, FoldPlan) and result.shift_kept:
            s, _ = map_scale_shift(bn, state)
            if bool((s == 0).any()):
                result = Refusal(
                    result.direction, zero_scale_refusal(result.layer.name, zero_scale_channels(s))
                )
        if isinstance(result, FoldPlan):
            problem = _overflow_reason(result, state)
            if problem is not None:
                result = Refusal(result.direction, problem)
        if isinstance(result, FoldPlan):
            result = _resolve_sharing(result, pattern, others, decided, state, duplicate_shared)
        if isinstance(result, _Group):
            return result
        refusals.append(result)
    return refusals


def _branch_group(plans: list[FoldPlan], state: ProgramState) -> _Group | Refusal:
    """One BN folded into several layers at once (the branches of a concatenation before it,
    or the layers its output reaches after it), each layer called once; or why not."""
    direction = plans[0].direction
    if plans[0].shift_kept:
        s, _ = map_scale_shift(plans[0].bn, state)
        if bool((s == 0).any()):
            return Refusal(
                direction, zero_scale_refusal(plans[0].layer.name, zero_scale_channels(s))
            )
    for plan in plans:
        layer = plan.layer
        readers = data_users(layer.weight) + ([] if layer.bias is None else data_users(layer.bias))
        if any(r is not layer.node for r in readers):
            return Refusal(
                direction,
                f"the weights of {layer.name} serve several calls, and a fold into several "
                "layers at once takes layers called once",
            )
        problem = _overflow_reason(plan, state)
        if problem is not None:
            return Refusal(direction, problem)
    return _Group(plans, 1, branches=True)


def call_names(calls: list[BatchNormCall]) -> list[str]:
    """Each call's name for the report: its module path, then `NAME (call k)` for the k-th
    call of a module called more than once."""
    seen: dict[str, int] = {}
    names = []
    for call in calls:
        seen[call.name] = seen.get(call.name, 0) + 1
        k = seen[call.name]
        names.append(call.name if k == 1 else f"{call.name} (call {k})")
    return names


def _check_point(
    plan: FoldPlan, report: FoldReport, layers: list[fx.Node] | None = None
) -> CheckPoint:
    """Where the fold of `plan` is checked (by the graph's node names, which the ONNX export
    keeps), recorded before the graph is rewired; notes in `report` what the fold makes the
    names of the graph mean. `layers`: every layer the BN folds into (one by default)."""
    bn = plan.bn
    layers = layers or [plan.layer.node]
    if plan.direction != PRECEDING:
        # the ops between the BN and the layers now carry values without the BN
        todo = [bn.node]
        while todo:
            for user in data_users(todo.pop()):
                if (
                    user not in layers
                    and user.op == "call_function"
                    and user.name not in report.changed
                ):
                    report.changed.add(user.name)
                    todo.append(user)
        return CheckPoint(layers[0].name, layers[0].name, plan.layer.out_axis)
    # the BN's input (the layer's output, a reshape or a concatenation of layer outputs) now
    # stands for the BN's output, and what lies between the layers and it holds values the
    # original never had
    report.aliases[bn.input.name] = bn.node.name
    between: set[str] = set()
    todo = [bn.input]
    while todo and len(between) < 256:
        node = todo.pop()
        if node in layers or node.op != "call_function":
            continue
        for arg in node.all_input_nodes:
            if arg.op == "call_function" and arg.name not in between:
                between.add(arg.name)
                todo.append(arg)
    if all(layer.name in between for layer in layers):
        report.changed.update(between)
    layer_value = None
    node = bn.input
    while node is not plan.layer.node and node.op == "call_function":
        if node.target in RESHAPES:
            node = node.args[0]
        elif node.target is aten.cat.default and len(node.args[0]) == 1:
            node = node.args[0][0]  # a concatenation of one tensor: exporters drop it
        else:
            break
    if node is plan.layer.node and node is not bn.input and len(layers) == 1:
        layer_value = node.name
    return CheckPoint(bn.input.name, bn.node.name, bn.axis, layer_value)


def _note_merged_decisions(plans: list[MergePlan], decided: dict[fx.Node, FoldDecision]) -> None:
    """A map that a merge takes in (an identity branch's BN) is folded into the merged layer;
    a fold into a layer that is merged is checked as part of the merged layer."""
    for plan in plans:
        for call in plan.sum.maps:
            d = decided.get(call.op_node)
            if d is not None and not d.folded:
                d.status, d.direction, d.into, d.reason = FOLDED, MERGED, plan.name, None
                d.merged_into = plan.name
    note_merged_layers({layer.name: plan.name for plan in plans for layer in plan.layers}, decided)


def _float64_values(state: ProgramState, folded64: dict[str, torch.Tensor]):
    """The float64 value of a stored tensor: as a fold or merge wrote it, before its cast."""

    def values(node: fx.Node) -> torch.Tensor:
        target = state.target(node)
        if target in folded64:
            return folded64[target]
        return state.tensor(node).detach().to(F64)

    return values


def _apply_merges(
    merges: list[MergePlan | MergeRefusal],
    state: ProgramState,
    folded64: dict[str, torch.Tensor],
    report: FoldReport,
    written: MergedParameters,
) -> None:
    """Merge each planned sum into one layer (from the folded float64 weights, its own kept in
    `folded64`) and record every sum, merged or left, with where the merged layer is
    checked."""
    values = _float64_values(state, folded64)
    for found in merges:
        if isinstance(found, MergeRefusal):
            report.merges.append(BranchMerge(found.name, found.labels, False, reason=found.reason))
            continue
        node = apply_merge(found, state, values, folded64, written)
        root = found.sum.root.name
        report.aliases[node.name] = report.aliases.get(root, root)
        report.merges.append(
            BranchMerge(
                found.name,
                found.labels,
                True,
                layers=[layer.name for layer in found.layers],
                convs_removed=len(found.layers) - 1,
                bytes_removed=found.bytes_removed,
                check=CheckPoint(node.name, report.aliases[node.name], found.axis),
            )
        )


def _apply_chains(
    chains: list[ChainPlan],
    state: ProgramState,
    folded64: dict[str, torch.Tensor],
    report: FoldReport,
    decided: dict,
    written: MergedParameters,
) -> None:
    """Merge each conv -> 1x1 conv pair into one conv, checked where the 1x1 conv's output
    was; a merge or fold checked at either conv is checked there instead."""
    values = _float64_values(state, folded64)
    note_merged_layers(
        {layer.name: plan.name for plan in chains for layer in (plan.first, plan.second)},
        decided,
    )
    for plan in chains:
        gone = {plan.first.node.name, plan.second.node.name}
        for earlier in report.merges:
            if earlier.check is not None and earlier.check.export_value in gone:
                earlier.check = None
        second = plan.second.node.name
        node = apply_chain(plan, state, values, folded64, written)
        report.aliases[node.name] = report.aliases.get(second, second)
        report.merges.append(
            BranchMerge(
                plan.name,
                plan.labels,
                True,
                layers=[plan.first.name, plan.second.name],
                convs_removed=1,
                bytes_removed=plan.bytes_removed,
                check=CheckPoint(node.name, report.aliases[node.name], 1),
                chain=True,
            )
        )


def batchnorm_calls(graph: fx.Graph) -> list[BatchNormCall]:
    """The BatchNorm calls of a graph, in data-flow order."""
    return [c for c in (match_batchnorm(n) for n in graph.nodes) if c is not None]


def _compute_constant_batchnorms(
    state: ProgramState, constants: ConstantValues, exact: dict | None
) -> list[FoldDecision]:
    """Replace every BN call whose input is constant (NF-ResNet's ScaledStdConv2d standardizes
    its weight with `F.batch_norm(weight, training=True)` in forward) by its value, computed
    once as the program computes it, as a new parameter."""
    decisions = []
    calls = batchnorm_calls(state.graph)
    for call, name in zip(calls, call_names(calls)):
        tuple_outputs = [] if call.op_node is call.node else list(call.op_node.users)
        if constants(call.input) is None or any(
            u is not call.node and u.users for u in tuple_outputs
        ):
            continue
        value = constants(call.node)
        if value is None:
            continue
        path = module_scope(call.node)[0]
        param = state.add_parameter(f"{path}.standardized" if path else "standardized", value)
        if exact is not None:
            exact[state.target(param)] = value.to(F64)
        call.node.replace_all_uses_with(param)
        for node in [call.node, *reversed(call.extra_nodes)]:
            if not node.users:
                state.graph.erase_node(node)
        decisions.append(
            FoldDecision(
                name=name,
                kind=call.kind,
                status=FOLDED,
                direction=COMPUTED,
                channels=call.channels,
            )
        )
    return decisions


def _store_computed_weights(
    state: ProgramState, constants: ConstantValues, exact: dict | None
) -> None:
    """Give each conv or linear whose weight or bias is computed from stored tensors alone (a
    standardized or reshaped weight) that value as a parameter of its own, so that maps fold
    into it."""
    for node in list(state.graph.nodes):
        if not is_layer_like(node):
            continue
        for index, key in ((1, "weight"), (2, "bias")):
            arg = node.args[index] if len(node.args) > index else node.kwargs.get(key)
            if not isinstance(arg, fx.Node) or state.target(arg) is not None:
                continue
            value = constants(arg)
            if value is None or _view_of_shared(arg):
                continue  # a view of a tensor used elsewhere too (a tied weight) stays one
            path = module_scope(node)[0]
            param = state.add_parameter(f"{path}.{key}" if path else key, value.clone())
            if exact is not None:
                exact[state.target(param)] = value.to(F64)
            node.replace_input_with(arg, param)


def _view_of_shared(node: fx.Node) -> bool:
    """Whether `node` is a stored tensor seen through reshapes, transposes and copies only,
    which something else reads too (storing the view would copy the tensor)."""
    while node.op == "call_function":
        if not is_transparent_op(node) and node.target is not aten.expand.default:
            return False
        if len(data_users(node.args[0])) > 1:
            return True
        node = node.args[0]
    return False


def _map_calls(graph: fx.Graph, constants: ConstantValues) -> list[BatchNormCall]:
    """The BatchNorm calls and the other frozen affine maps of a graph, in data-flow order."""
    calls = batchnorm_calls(graph) + affine_calls(graph, constants)
    position = {node: k for k, node in enumerate(graph.nodes)}
    return sorted(calls, key=lambda c: position[c.op_node])


def fold_program(
    program: torch.export.ExportedProgram,
    module_names: dict[str, str] | None = None,
    *,
    copy_graph: bool = True,
    in_place: bool = False,
    duplicate_shared: bool = False,
    exact: dict[str, torch.Tensor] | None = None,
    merge_branches: bool = True,
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold every BN call of `program` that folds exactly; report every BN.

    Returns the folded program and the report. `module_names` maps qualified names of the
    BatchNorm modules of the original model to their class names, so that modules never
    called by forward are reported too. With `copy_graph=False` the input program's graph
    module is rewritten (cheaper), and with `in_place=True` its weight tensors too (for a
    program that nothing else shares, such as one loaded from a file for this run); either
    way the input program must not be used afterwards. By default nothing of the input
    program, its graph or its tensors changes.

    A layer called several times (its weights read by several calls) takes a BN's fold once
    when every call is followed (or preceded) by a BN with the same affine; otherwise, with
    `duplicate_shared=True`, the calls that take the fold get their own copy of the weights.

    `exact`, a dict, receives the float64 value of every tensor the fold writes (folded
    weights and biases, kept shifts) by state name, before its one cast: a float16 export
    rounds each of them once from there.

    After the folds, every sum of parallel branches of one tensor (RepVGG's
    BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)) becomes one layer, computed from the branches'
    folded float64 weights (`branches`), unless `merge_branches` is False.
    """
    state = ProgramState(program, copy_graph=copy_graph)
    constants = ConstantValues(state)
    report = FoldReport()
    computed = _compute_constant_batchnorms(state, constants, exact)
    _store_computed_weights(state, constants, exact)
    calls = _map_calls(state.graph, constants)
    names = call_names(calls)
    name_of = {c.op_node: n for c, n in zip(calls, names)}
    for call in calls:
        if call.batchnorm:
            report.warnings.extend(check_batchnorm_state(call, state))
    pending: dict[str, _LayerFolds] = {}
    shifts: dict = {}
    decided: dict[fx.Node, FoldDecision] = {}

    def _folded(c: BatchNormCall) -> bool:
        return c.op_node in decided and decided[c.op_node].folded

    for call, name in zip(calls, names):
        if call.op_node in decided:
            continue  # folded with an earlier call of the same shared layer
        # earlier folds may have rewired its neighbours
        call = (
            match_batchnorm(call.op_node)
            if call.batchnorm
            else match_affine(call.op_node, constants)
        )
        # BN calls still in the graph: those after this one, and those left before it
        others = [c for c in calls if c.op_node is not call.op_node and not _folded(c)]
        outcome = _decide(call, state, others, decided, duplicate_shared)
        if isinstance(outcome, _Group) and outcome.branches:
            plan = outcome.plans[0]
            check = _check_point(plan, report, [p.layer.node for p in outcome.plans])
            _apply_group(outcome, state, pending, shifts, exact)
            decided[plan.bn.op_node] = FoldDecision(
                name=name_of[plan.bn.op_node],
                kind=plan.bn.kind,
                batchnorm=plan.bn.batchnorm,
                status=FOLDED,
                into=", ".join(p.layer.name for p in outcome.plans),
                direction=plan.direction,
                channels=plan.bn.channels,
                shift_kept=plan.shift_kept,
                check=check,
            )
        elif isinstance(outcome, _Group):
            checks = [_check_point(plan, report) for plan in outcome.plans]
            _apply_group(outcome, state, pending, shifts, exact)
            for k, plan in enumerate(outcome.plans):
                decided[plan.bn.op_node] = FoldDecision(
                    name=name_of[plan.bn.op_node],
                    kind=plan.bn.kind,
                    batchnorm=plan.bn.batchnorm,
                    status=FOLDED,
                    into=plan.layer.name,
                    direction=plan.direction,
                    channels=plan.bn.channels,
                    shift_kept=plan.shift_kept,
                    shared_calls=outcome.calls,
                    bytes_added=outcome.bytes_added if k == 0 else 0,
                    check=checks[k],
                )
        else:
            reason = "; ".join(
                (f"{r.direction}: {r.reason}" if r.direction else r.reason) for r in outcome
            )
            decided[call.op_node] = FoldDecision(
                name=name,
                kind=call.kind,
                status=LEFT,
                reason=reason,
                channels=call.channels,
                batchnorm=call.batchnorm,
            )
    merges = find_merges(state, constants) if merge_branches else []
    plans = [m for m in merges if isinstance(m, MergePlan)]
    _note_merged_decisions(plans, decided)
    # arithmetic by numbers (an attention's q * scale) is reported when it folds into a
    # layer; left, or taken into a merged sum (MobileOne's `0 + identity`), it is not counted
    # among the per-channel maps
    report.decisions.extend(
        decided[c.op_node]
        for c in calls
        if c.batchnorm
        or c.channels > 1
        or (decided[c.op_node].folded and decided[c.op_node].direction != MERGED)
    )
    report.decisions.extend(computed)
    weights = [state.value(state.target(f.layer.weight)) for f in pending.values()]
    largest = max((min(_block_rows(w), w.shape[0]) * w[0].numel() for w in weights), default=0)
    workspace = _Workspace(largest)  # allocated once, at the size of the largest block
    # the merges sum the branches' folded weights before their one cast
    branch_targets = {state.target(layer.weight) for plan in plans for layer in plan.layers}
    if merge_branches:
        branch_targets |= chain_weights(state)
    folded64: dict[str, torch.Tensor] = {} if exact is None else exact
    for target, folds in pending.items():
        into = folded64 if target in branch_targets else exact
        _fold_layer(folds, state, workspace, in_place=in_place, exact=into)
    written = MergedParameters()  # calls of a shared block merge into one copy
    _apply_merges(merges, state, folded64, report, written)
    if merge_branches:
        _apply_chains(find_chains(state), state, folded64, report, decided, written)
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
