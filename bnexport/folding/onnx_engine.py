"""The ONNX fold engine: fold every BatchNormalization of an ONNX model that folds exactly.

Patterns (the same as the PyTorch engine's, on ONNX ops):

* into the preceding layer: Conv / ConvTranspose / Gemm / MatMul (+ bias Add)
  -> [channel-transparent ops] -> BN, with  W' = s * W,  b' = s * b + t  per output channel;
* into the following layer: BN -> [channel-transparent ops] -> Gemm / MatMul (+ Add) / Conv
  without zero padding, with  W' = W * s,  b' = b + W t  per input channel;
* into a following Conv that pads with zeros, or any following ConvTranspose: the scale only,
  W' = W * s per input channel, and the BN becomes Add(x, u) with u = t / s on its channels
  (`shift_kept`). Zero padding commutes with the scale, conv_W(pad0(s x + t)) =
  conv_{W s}(pad0(x + u)), and a transposed conv is linear in its input. Refused when a
  channel has s = 0.

For Gemm (Y = alpha * A B + beta * C) the bias written is the whole additive term, so the
folded node has beta = 1: C' = s * (beta * C) + t, or C' = beta * C + alpha * (W t).

A layer called several times (one weight read by several nodes: a Siamese encoder, a block
applied in a loop) folds once when every call has a BN on the same side with the same scale
and shift: the weight and bias change once and every one of those BNs goes. Otherwise, with
`duplicate_shared`, the calls that share this BN's values get their own copy of the weight
(and of the bias) to fold into; without it the BN is left, with the size such a copy adds.

Every BN is first checked against the graph as it stands (check, then rewire; a refused BN
leaves the graph untouched). Rewiring removes the BN node at once; the weight arithmetic is
collected per weight and done at the end in float64 (`bnexport.folding.math`), each weight and
bias cast once to its own dtype. BNs inside If/Loop/Scan bodies and local functions stay, with
their reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
import torch

from bnexport.folding import math as fm
from bnexport.folding.checks import check_statistics
from bnexport.folding.merge_math import MergedParameters
from bnexport.folding.onnx_affines import match_affine_chains
from bnexport.folding.onnx_branches import (
    OnnxMergePlan,
    OnnxMergeRefusal,
    apply_onnx_merge,
    find_onnx_merges,
)
from bnexport.folding.onnx_chains import (
    OnnxChainPlan,
    apply_onnx_chain,
    find_onnx_chains,
    onnx_chain_weights,
)
from bnexport.folding.onnx_graph import OnnxGraph, attr, is_onnx_op, node_name
from bnexport.folding.onnx_patterns import (
    PATTERNS,
    OnnxFoldPlan,
    conflict_reason,
    overflow_reason,
    reads_twice,
    same_call,
    shared_reason,
    weight_calls,
)
from bnexport.folding.onnx_rewrite import (
    Affine,
    LayerFolds,
    apply_layer,
    drop_if_unused,
    new_initializer,
    repoint,
    rewire,
    rewire_with_add,
)
from bnexport.folding.onnx_sites import BN_OP, AffineSite, LayerSite, match_batchnorm, match_layer
from bnexport.folding.patterns import FOLLOWING, PRECEDING, Refusal
from bnexport.folding.shared import note_merged_layers, shared_refusal, zero_scale_refusal
from bnexport.report import (
    COMPUTED,
    FOLDED,
    LEFT,
    MERGED,
    BranchMerge,
    CheckPoint,
    FoldDecision,
    FoldReport,
)

KIND = "BatchNormalization"


# --------------------------------------------------------------------------- the engine


@dataclass
class _Fold:
    """What one decision folds: a plan per call of one weight (one plan unless the layer is
    called several times), and which of weight and bias those calls get a copy of first."""

    plans: list[OnnxFoldPlan]
    copy_weight: bool = False
    copy_bias: bool = False
    branches: bool = False  # one map into several layers (a plan each), removed once


class _Folder:
    """Decides the BNs one by one (check, then rewire), collecting the weight arithmetic."""

    def __init__(
        self,
        g: OnnxGraph,
        sites: dict,
        duplicate_shared: bool,
        exact: dict | None,
        report: FoldReport,
    ):
        self.g = g
        self.report = report
        self.exact = exact
        self.sites = sites
        self.duplicate_shared = duplicate_shared
        self.affine = {
            node: (site.s, site.t) for node, site in sites.items() if isinstance(site, AffineSite)
        }
        self.pending: dict[ir.Value, LayerFolds] = {}
        self.decided: dict[ir.Node, FoldDecision] = {}
        self._plans: dict[tuple[ir.Node, str], OnnxFoldPlan | Refusal] = {}

    # ------------------------------------------------------------------ deciding
    def decide(self, node: ir.Node) -> None:
        site = self.sites[node]
        if isinstance(site, str):
            self.decided[node] = FoldDecision(
                name=node_name(node), kind=KIND, status=LEFT, reason=site
            )
            return
        refusals = []
        for direction in (PRECEDING, FOLLOWING):
            outcome = self._plan(site, direction)
            if isinstance(outcome, list):
                fold = self._resolve_branches(outcome)
                if isinstance(fold, _Fold):
                    self._fold(fold, node)
                    return
                outcome = Refusal(direction, fold)
            if isinstance(outcome, OnnxFoldPlan):
                fold = self._resolve(outcome)
                if isinstance(fold, _Fold):
                    self._fold(fold, node)
                    return
                outcome = Refusal(direction, fold)
            refusals.append(outcome)
        reason = "; ".join(f"{r.direction}: {r.reason}" for r in refusals)
        self.decided[node] = FoldDecision(
            name=site.name,
            kind=site.kind,
            status=LEFT,
            reason=reason,
            channels=site.channels,
            batchnorm=site.is_batchnorm,
        )

    def _plan(self, site: AffineSite, direction: str) -> OnnxFoldPlan | Refusal:
        """The pattern's outcome on the graph as it stands (kept until the graph changes)."""
        key = (site.node, direction)
        if key not in self._plans:
            self._plans[key] = PATTERNS[direction](site, self.g)
        return self._plans[key]

    def _mapped(self, plan: OnnxFoldPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN's (s, t) on the layer's channels."""
        s, t = self.affine[plan.bn.node]
        index = torch.from_numpy(plan.channel_of)
        return s[index], t[index]

    def _resolve(self, plan: OnnxFoldPlan) -> _Fold | str:
        """The fold `plan` makes, with the plans of the other calls of its layer, or why not."""
        layer = plan.layer
        calls = weight_calls(layer.weight)
        if (
            len(calls) <= 1
            or layer.weight.is_graph_output()
            or reads_twice(layer.node, layer.weight)
        ):
            reason = shared_reason(layer, self.g)
            fold = _Fold([plan]) if reason is None else reason
        else:
            fold = self._shared_fold(plan, calls)
        if isinstance(fold, str):
            return fold
        return self._check(fold.plans) or fold

    def _resolve_branches(self, plans: list[OnnxFoldPlan]) -> _Fold | str:
        """One map into several layers, each called once; or why not."""
        for plan in plans:
            layer = plan.layer
            if len(weight_calls(layer.weight)) > 1 or reads_twice(layer.node, layer.weight):
                return (
                    f"the weight of {layer.name} serves several calls, and a fold into several "
                    "layers at once takes layers called once"
                )
            reason = shared_reason(layer, self.g)
            if reason:
                return reason
        return self._check(plans) or _Fold(plans, branches=True)

    def _shared_fold(self, plan: OnnxFoldPlan, calls: list[ir.Node]) -> _Fold | str:
        """A weight read by several nodes: one fold for every call when each has a BN on the
        same side with the same values; else a copy for the calls alike to this one."""
        g, layer = self.g, plan.layer
        found = self._sibling_plans(plan, calls)
        side = "followed" if plan.direction == PRECEDING else "preceded"
        members: list[OnnxFoldPlan] = []
        why = None
        for call in calls:
            plans = found[call]
            site = plans[0].layer if plans else match_layer(call, g)
            if isinstance(site, str) or site.weight is not layer.weight:
                problem = f"the weight is also read by {g.describe(call)}"
            elif not same_call(site, layer, g):
                problem = f"{g.describe(call)} uses them with another bias or other attributes"
            elif not plans:
                problem = f"{g.describe(call)} has no BN to fold"
            elif any(p.bn.node in self.decided for p in plans):
                problem = f"{g.describe(call)} is {side} by a BN that stays"
            elif len(plans) > 1 or not self._same_affine(plan, plans[0]):
                problem = f"{g.describe(call)} is {side} by another BN"
            else:
                members.append(plans[0])
                continue
            why = why or problem
        if not any(p is plan for p in members):
            return why or "its layer's calls could not be matched"
        copy_weight = len(members) < len(calls)
        copy_bias = False
        if layer.bias is not None:
            readers = {p.layer.bias_add or p.layer.node for p in members}
            others = [u.node for u in layer.bias.uses() if u.node not in readers]
            if others or layer.bias.is_graph_output():
                copy_bias = True
                why = why or (
                    f"the bias is also read by {g.describe(others[0])}"
                    if others
                    else "the bias is also an output of the model"
                )
        if why is None:
            return _Fold(members)
        if not self.duplicate_shared:
            size = (layer.weight_array.nbytes if copy_weight else 0) + (
                g.constant(layer.bias).nbytes if copy_bias else 0
            )
            return shared_refusal(layer.name, len(calls), why, size)
        return _Fold(members, copy_weight, copy_bias)

    def _sibling_plans(
        self, plan: OnnxFoldPlan, calls: list[ir.Node]
    ) -> dict[ir.Node, list[OnnxFoldPlan]]:
        """For each call, the BNs still in the graph that would fold into it on the plan's
        side (those left earlier only explain a refusal)."""
        found: dict[ir.Node, list[OnnxFoldPlan]] = {call: [] for call in calls}
        found.setdefault(plan.layer.node, []).append(plan)
        for node, site in self.sites.items():
            folded = node in self.decided and self.decided[node].folded
            if node is plan.bn.node or folded or isinstance(site, str):
                continue
            other = self._plan(site, plan.direction)
            if (
                isinstance(other, OnnxFoldPlan)
                and other.layer.weight is plan.layer.weight
                and other.layer.node in found
            ):
                found[other.layer.node].append(other)
        return found

    def _same_affine(self, plan: OnnxFoldPlan, other: OnnxFoldPlan) -> bool:
        if other.direction != plan.direction or other.shift_kept != plan.shift_kept:
            return False
        if not np.array_equal(other.channel_of, plan.channel_of):
            return False
        (s, t), (s2, t2) = self._mapped(plan), self._mapped(other)
        return torch.equal(s, s2) and torch.equal(t, t2)

    def _shift(self, plan: OnnxFoldPlan) -> torch.Tensor | None:
        """u = t / s on the BN's channels, for a plan that keeps the shift."""
        return fm.shift_before_scale(*self.affine[plan.bn.node]) if plan.shift_kept else None

    def _check(self, plans: list[OnnxFoldPlan]) -> str | None:
        """Why one of the plans cannot fold into the weight as it stands."""
        for p in plans:
            u = self._shift(p)
            if p.shift_kept and u is None:
                s = self.affine[p.bn.node][0]
                return zero_scale_refusal(p.layer.name, fm.zero_scale_channels(s))
            s, t = self._mapped(p)
            problem = conflict_reason(p, self.pending) or overflow_reason(p, s, t, u)
            if problem:
                return problem
        return None

    # ------------------------------------------------------------------ folding
    def _fold(self, fold: _Fold, node: ir.Node) -> None:
        """Rewire every map of the fold and record its affine once for each weight."""
        g = self.g
        plans, added = self._copy(fold) if fold.copy_weight or fold.copy_bias else (fold.plans, 0)
        for member in plans if fold.branches else plans[:1]:
            folds = self.pending.get(member.layer.weight)
            if folds is None:
                calls = plans if not fold.branches else [member]
                folds = self.pending[member.layer.weight] = LayerFolds(
                    {p.layer.node: p.layer for p in calls}
                )
            s, t = self._mapped(member)
            folds.affines.append(Affine(member.direction, s, t, member.shift_kept))
        for p in plans[:1] if fold.branches else plans:
            check = self._check_point(p, [q.layer for q in plans] if fold.branches else None)
            if p.shift_kept:
                u64 = self._shift(p).numpy()
                shift = rewire_with_add(p, u64.astype(p.layer.weight_array.dtype), g)
                if self.exact is not None:
                    self.exact[shift.name] = u64.reshape(shift.const_value.shape.dims)
            else:
                rewire(p, g)
            into = ", ".join(q.layer.name for q in plans) if fold.branches else p.layer.name
            self.decided[p.bn.node] = FoldDecision(
                name=p.bn.name,
                kind=p.bn.kind,
                batchnorm=p.bn.is_batchnorm,
                status=FOLDED,
                into=into,
                direction=p.direction,
                channels=p.bn.channels,
                shift_kept=p.shift_kept,
                shared_calls=1 if fold.branches else len(plans),
                bytes_added=added if p.bn.node is node else 0,
                check=check,
            )
        self._plans.clear()

    def _check_point(self, p: OnnxFoldPlan, layers: list[LayerSite] | None = None) -> CheckPoint:
        """Where the fold of `p` is checked, by the graph's value names, recorded before the
        graph is rewired; notes in the report what the fold makes the names mean. `layers`:
        every layer the map folds into (`p`'s by default)."""
        x, y = p.bn.input, p.bn.output
        out = p.layer.output.name
        if p.direction != PRECEDING:
            if p.shift_kept:
                self.report.changed.add(y.name)  # the Add of the shift takes the BN's name
            # the ops between the map and the layers now carry values without the map
            ends = {layer.node for layer in layers or [p.layer]}
            todo = [y]
            while todo:
                for user in self.g.consumers(todo.pop()):
                    if user in ends or user.graph is not self.g.graph:
                        continue
                    for o in user.outputs:
                        if o is not None and o.name not in self.report.changed:
                            self.report.changed.add(o.name)
                            todo.append(o)
            return CheckPoint(out, out, p.layer.out_axis)
        if y.is_graph_output():
            kept = y.name  # the BN's input takes over the output's name
        else:
            kept = x.name
            self.report.aliases[x.name] = y.name
        # what lies between the layers and the map holds values the original never had
        outputs = {layer.output.name for layer in layers or [p.layer]}
        between: set[str] = set()
        todo = [x]
        while todo and len(between) < 256:
            value = todo.pop()
            producer = value.producer()
            if value.name in outputs or producer is None or producer.graph is not self.g.graph:
                continue
            for v in producer.inputs:
                if v is not None and v.producer() is not None and v.name not in between:
                    between.add(v.name)
                    todo.append(v)
        if outputs <= between:
            self.report.changed.update(between)
        return CheckPoint(kept, y.name, p.bn.axis)

    def _copy(self, fold: _Fold) -> tuple[list[OnnxFoldPlan], int]:
        """Give the fold's calls their own copy of the weight and/or bias; return the plans on
        the copies and the bytes added. Folds already decided for the weight carry over."""
        g = self.g
        layer = fold.plans[0].layer
        weight, bias = layer.weight, layer.bias
        new_weight, new_bias, added = weight, bias, 0
        if fold.copy_weight:
            array = layer.weight_array
            new_weight = new_initializer(g, weight.name, np.array(array, copy=True))
            added += array.nbytes
            for p in fold.plans:
                repoint(p.layer.node, weight, new_weight)
        if fold.copy_bias:
            array = g.constant(bias)
            new_bias = new_initializer(g, bias.name, np.array(array, copy=True))
            added += array.nbytes
            for p in fold.plans:
                repoint(p.layer.bias_add or p.layer.node, bias, new_bias)
        plans = [
            replace(
                p,
                layer=replace(
                    p.layer, weight=new_weight, bias=new_bias if fold.copy_bias else p.layer.bias
                ),
            )
            for p in fold.plans
        ]
        old = self.pending.get(weight)
        if old is not None:
            calls = {p.layer.node: p.layer for p in plans}
            for call in calls:
                old.calls.pop(call, None)
            if new_weight is weight:
                old.calls.update(calls)
            else:
                self.pending[new_weight] = LayerFolds(calls, list(old.affines))
                if not old.calls:
                    del self.pending[weight]
        drop_if_unused(weight, g)
        drop_if_unused(bias, g)
        return plans, added


def _note_merged_decisions(
    plans: list[OnnxMergePlan], decided: dict[ir.Node, FoldDecision], g: OnnxGraph
) -> None:
    """A map a merge takes in (an identity branch's BN) is folded into the merged Conv; a fold
    into a Conv that is merged is checked as part of the merged Conv."""
    for plan in plans:
        for site in plan.sum.maps:
            d = decided.get(site.node)
            if d is not None and not d.folded:
                d.status, d.direction, d.into, d.reason = FOLDED, MERGED, plan.name, None
                d.merged_into = plan.name
    merged_into = {node_name(conv): plan.name for plan in plans for conv in plan.convs}
    note_merged_layers(merged_into, decided)


def _float64_values(g: OnnxGraph, folded64: dict):
    """The float64 value of an initializer: as a fold or merge wrote it, before its cast."""

    def values(value: ir.Value) -> torch.Tensor:
        if value.name in folded64:
            return torch.from_numpy(np.asarray(folded64[value.name], dtype=np.float64))
        return fm.array_f64(g.constant(value))

    return values


def _apply_merges(
    merges: list[OnnxMergePlan | OnnxMergeRefusal],
    g: OnnxGraph,
    folded64: dict,
    report: FoldReport,
    written: MergedParameters,
) -> None:
    """Merge each planned sum into one Conv (from the folded float64 weights, its own kept in
    `folded64`) and record every sum, merged or left, with where the merged Conv is checked
    (the sum's own name)."""
    values = _float64_values(g, folded64)
    for found in merges:
        if isinstance(found, OnnxMergeRefusal):
            report.merges.append(BranchMerge(found.name, found.labels, False, reason=found.reason))
            continue
        names = [node_name(conv) for conv in found.convs]
        root = found.sum.root.name
        removed = apply_onnx_merge(found, g, values, folded64, written)
        report.merges.append(
            BranchMerge(
                found.name,
                found.labels,
                True,
                layers=names,
                convs_removed=len(names) - 1,
                bytes_removed=max(removed, 0),
                check=CheckPoint(root, root, 1),
            )
        )


def _apply_chains(
    chains: list[OnnxChainPlan],
    g: OnnxGraph,
    folded64: dict,
    report: FoldReport,
    decided: dict[ir.Node, FoldDecision],
    written: MergedParameters,
) -> None:
    """Merge each Conv -> 1x1 Conv pair into one Conv, checked where the 1x1 Conv's output was
    (its name); a merge checked at the first Conv's output is checked there instead."""
    values = _float64_values(g, folded64)
    names = {node_name(n): plan.name for plan in chains for n in (plan.first, plan.second)}
    note_merged_layers(names, decided)
    for plan in chains:
        gone = plan.first.outputs[0].name
        for earlier in report.merges:
            if earlier.check is not None and earlier.check.export_value == gone:
                earlier.check = None
        out = plan.second.outputs[0].name
        layers = [node_name(plan.first), node_name(plan.second)]
        removed = apply_onnx_chain(plan, g, values, folded64, written)
        report.merges.append(
            BranchMerge(
                plan.name,
                plan.labels,
                True,
                layers=layers,
                convs_removed=1,
                bytes_removed=max(removed, 0),
                check=CheckPoint(out, out, 1),
                chain=True,
            )
        )


def _nested_batchnorms(model: ir.Model) -> list[tuple[ir.Node, str]]:
    """BNs the engine does not fold: in subgraph bodies and local functions."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if is_onnx_op(node, BN_OP) and node.graph is not model.graph:
            owner = node.graph.name or "a subgraph"
            found.append(
                (
                    node,
                    f"it is inside the subgraph '{owner}' (an If/Loop/Scan body); bnexport "
                    "folds BNs of the main graph",
                )
            )
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            if is_onnx_op(node, BN_OP):
                found.append(
                    (
                        node,
                        f"it is inside the local function '{function.domain}::{function.name}'; "
                        "bnexport folds BNs of the main graph",
                    )
                )
    return found


def _statistics_warnings(site: AffineSite) -> list[str]:
    if site.stats is None:
        return []
    t, st = torch.from_numpy, site.stats
    return check_statistics(
        site.name,
        t(st.mean.astype(np.float64)),
        t(st.var.astype(np.float64)),
        t(st.scale.astype(np.float64)),
        t(st.bias.astype(np.float64)),
        st.eps,
    )


def fold_onnx_model(
    model: ir.Model,
    *,
    duplicate_shared: bool = False,
    exact: dict | None = None,
    merge_branches: bool = True,
) -> FoldReport:
    """Fold every BN of `model` (an onnx_ir model, changed in place) that folds exactly.

    Returns the report: each BatchNormalization node folded (into which layer, which way) or
    left, with its reason. A layer called several times folds a BN once when all its calls
    take the same BN; with `duplicate_shared`, calls that take different BNs (or none) get
    their own copies of the weights. Raises InvalidModelError on NaN/Inf or negative
    variances. `exact`, a dict, receives the float64 value of every initializer the fold
    writes, by name, before its one cast (for a float16 export that rounds them once).

    After the folds, every sum of parallel branches of one value (Conv branches and the value
    itself, RepVGG's BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)) becomes one Conv, computed from
    the branches' folded float64 weights (`onnx_branches`), unless `merge_branches` is False.
    """
    g = OnnxGraph(model)
    report = FoldReport()
    computed = _compute_constant_batchnorms(g)
    sites: dict[ir.Node, AffineSite | str] = {}
    for node in g.graph:
        if is_onnx_op(node, BN_OP):
            sites[node] = match_batchnorm(node, g)
            if isinstance(sites[node], AffineSite):
                report.warnings.extend(_statistics_warnings(sites[node]))
    for chain in match_affine_chains(g):
        sites[chain.node] = chain
    order = [node for node in g.graph if node in sites]
    folder = _Folder(g, sites, duplicate_shared, exact, report)
    for node in order:
        if node not in folder.decided:  # not already folded with another call of its layer
            folder.decide(node)
    left = {
        site.output: site
        for node, site in sites.items()
        if isinstance(site, AffineSite) and not folder.decided[node].folded
    }
    merges = find_onnx_merges(g, left) if merge_branches else []
    plans = [m for m in merges if isinstance(m, OnnxMergePlan)]
    _note_merged_decisions(plans, folder.decided, g)
    # the merges sum the branches' folded weights in float64, before their one cast
    branch_weights = {conv.inputs[1] for plan in plans for conv in plan.convs}
    if merge_branches:
        branch_weights |= onnx_chain_weights(g)
    folded64: dict = {} if exact is None else exact
    for weight, folds in folder.pending.items():
        apply_layer(folds, g, folded64 if weight in branch_weights else exact)
    written = MergedParameters()  # calls of shared weights merge into one copy
    _apply_merges(merges, g, folded64, report, written)
    if merge_branches:
        _apply_chains(find_onnx_chains(g), g, folded64, report, folder.decided, written)
    report.decisions.extend(
        folder.decided[node]
        for node in order
        if not _scalar_arithmetic(sites[node])
        or (folder.decided[node].folded and folder.decided[node].direction != MERGED)
    )
    report.decisions.extend(computed)
    for node, reason in _nested_batchnorms(model):
        report.decisions.append(
            FoldDecision(name=node_name(node), kind=KIND, status=LEFT, reason=reason)
        )
    return report


def _batchnorm_of_constants(node: ir.Node, g: OnnxGraph) -> np.ndarray | None:
    """A BatchNormalization's output when its input and parameters are constants, in float64
    cast once to the input's dtype: y = scale (x - mean) / sqrt(var + eps) + bias on axis 1,
    with the statistics of x itself (biased variance) in training mode."""
    arrays = [g.constant(v) for v in node.inputs[:5]]
    if any(a is None for a in arrays) or not np.issubdtype(arrays[0].dtype, np.floating):
        return None
    x, scale, bias, mean, var = (a.astype(np.float64) for a in arrays)
    if x.ndim < 2 or any(a.shape != (x.shape[1],) for a in (scale, bias, mean, var)):
        return None
    axes = tuple(a for a in range(x.ndim) if a != 1)
    if int(attr(node, "training_mode", 0)):
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    shape = (-1,) + (1,) * (x.ndim - 2)
    eps = float(attr(node, "epsilon", 1e-5))
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return (y * scale.reshape(shape) + bias.reshape(shape)).astype(arrays[0].dtype)


def _compute_constant_batchnorms(g: OnnxGraph) -> list[FoldDecision]:
    """Replace every BatchNormalization whose input is constant (a weight standardized in the
    graph, as NF-ResNet's ScaledStdConv2d does) by its value, computed once."""
    decisions = []
    for node in [n for n in g.graph if is_onnx_op(n, BN_OP)]:
        y = node.outputs[0]
        if g.constant(node.inputs[0]) is None or y.is_graph_output():
            continue
        if any(o is not None and (o.uses() or o.is_graph_output()) for o in node.outputs[1:]):
            continue
        value = _batchnorm_of_constants(node, g)
        if value is None:
            continue
        init = new_initializer(g, f"{node_name(node)}_computed", value)
        ir.convenience.replace_all_uses_with(y, init)
        inputs = list(node.inputs)
        g.graph.remove(node, safe=True)
        for v in inputs:
            drop_if_unused(v, g)
        decisions.append(
            FoldDecision(
                name=node_name(node),
                kind=KIND,
                status=FOLDED,
                direction=COMPUTED,
                channels=int(value.shape[1]) if value.ndim > 1 else None,
            )
        )
    return decisions


def _scalar_arithmetic(site: AffineSite | str) -> bool:
    """Arithmetic by scalars (a GELU's x * 0.5): reported when it folds, and otherwise not
    counted among the maps left, which are per-channel."""
    return isinstance(site, AffineSite) and not site.is_batchnorm and site.channels == 1


def fold_onnx(model, *, duplicate_shared: bool = False) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold an ONNX model given as a path or an onnx.ModelProto; return the folded
    ModelProto and the report. The input (file or proto) is left unchanged; weights stored as
    external data are read from next to the file. `duplicate_shared` as in
    `fold_onnx_model`."""
    if isinstance(model, (str, os.PathLike)):
        ir_model = ir.load(os.fspath(model))
    elif isinstance(model, onnx.ModelProto):
        ir_model = ir.serde.deserialize_model(model)  # folds write new tensors, never into these
    else:
        raise TypeError(f"fold_onnx() takes a path or an onnx.ModelProto, not {type(model)}")
    report = fold_onnx_model(ir_model, duplicate_shared=duplicate_shared)
    return ir.serde.serialize_model(ir_model), report
