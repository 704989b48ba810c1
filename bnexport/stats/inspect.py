"""`inspect`: every BatchNorm's statistics, what is wrong with them, what `fold` would do with
it, and (with data) how far its running averages are from the data.

Drift, per BN, against the exact population statistics (mean m, unbiased variance v, per
channel) of its input over the data, with the model in eval mode:

    mean_shift = max_c |running_mean - m| / sqrt(v + eps)
    var_ratio  = max_c max(r, 1 / r),   r = (running_var + eps) / (v + eps)

A BN is stale when mean_shift > MEAN_SHIFT_LIMIT or var_ratio > VAR_RATIO_LIMIT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bnexport.folding.checks import FLOAT16_MAX
from bnexport.folding.math import bn_scale_shift
from bnexport.stats.population import STATISTICS_BUFFERS
from bnexport.version import __version__

MEAN_SHIFT_LIMIT = 0.5
VAR_RATIO_LIMIT = 2.0
DEAD_VARIANCE = 1e-8

NEVER_UPDATED = "never updated"
DEAD_CHANNELS = "dead channels"
NOT_FINITE = "NaN/Inf"
NEGATIVE_VARIANCE = "negative variance"
TRAINING_MODE = "saved in training mode"
NO_RUNNING_STATS = "no running statistics"
FLOAT16_SCALE = "fold scale beyond float16"
STALE = "stale"


@dataclass
class BatchNormStats:
    """One BN call: its parameters summarised, its flags, its fold decision and its drift."""

    name: str
    kind: str
    channels: int
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    fold: dict[str, Any] = field(default_factory=dict)
    mean_shift: float | None = None
    var_ratio: float | None = None
    notes: list[str] = field(default_factory=list)
    eps: float = field(default=1e-5, repr=False)
    input_node: str | None = field(default=None, repr=False)  # in the traced graph


@dataclass
class InspectReport:
    """The inspection of one model; `exit_code` is 0 whenever it ran."""

    model: str
    batchnorm: list[BatchNormStats]
    data: str | None = None
    data_size: int = 0
    warnings: list[str] = field(default_factory=list)
    exit_code: int = 0

    @property
    def stale(self) -> list[BatchNormStats]:
        return [b for b in self.batchnorm if STALE in b.flags]

    @property
    def verdict(self) -> str:
        flagged = [b for b in self.batchnorm if b.flags]
        if self.data is None:
            base = "no --data: drift not measured"
            if flagged:
                return f"{base}; {len(flagged)} of {len(self.batchnorm)} BNs flagged"
            return f"{base}; no BN flagged"
        if not any(b.mean_shift is not None for b in self.batchnorm):
            return "no BN has running statistics to compare with the data"
        if self.stale:
            names = ", ".join(b.name for b in self.stale[:5])
            more = ", ..." if len(self.stale) > 5 else ""
            return (
                f"stale: {len(self.stale)} of {len(self.batchnorm)} BNs ({names}{more}) do not "
                f"fit the data; `bnexport recalibrate` would replace their statistics"
            )
        measured = sum(b.mean_shift is not None for b in self.batchnorm)
        return f"the statistics fit the data ({measured} BNs compared)"

    def to_dict(self) -> dict[str, Any]:
        """The `inspect` JSON report (drift keys only when data was given)."""
        layers = []
        for b in self.batchnorm:
            entry: dict[str, Any] = {
                "name": b.name,
                "kind": b.kind,
                "channels": b.channels,
                "flags": list(b.flags),
                "notes": list(b.notes),
                "summary": b.summary,
                "fold": b.fold,
            }
            if self.data is not None:
                entry["mean_shift"] = b.mean_shift
                entry["var_ratio"] = b.var_ratio
            layers.append(entry)
        out: dict[str, Any] = {
            "command": "inspect",
            "model": self.model,
            "bnexport_version": __version__,
            "batchnorm": layers,
            "verdict": self.verdict,
            "stale": [b.name for b in self.stale],
            "warnings": list(self.warnings),
            "exit_code": self.exit_code,
        }
        if self.data is not None:
            out["data"] = {"path": self.data, "samples": self.data_size}
        return out


def _summary(t: torch.Tensor | None) -> dict[str, float] | None:
    if t is None or t.numel() == 0:
        return None
    t = t.detach().to(torch.float64)
    return {"min": float(t.min()), "max": float(t.max()), "mean": float(t.mean())}


def parameter_flags(
    mean: torch.Tensor | None,
    var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    uses_batch_stats: bool,
    num_batches_tracked: int | None,
) -> tuple[list[str], list[str], torch.Tensor | None]:
    """(flags, notes, fold scale s) of one BN's parameters."""
    flags, notes = [], []
    if mean is None or var is None:
        return [NO_RUNNING_STATS], ["it tracks no running statistics"], None
    if uses_batch_stats:
        flags.append(TRAINING_MODE)
    tensors = {"running_mean": mean, "running_var": var, "weight": weight, "bias": bias}
    bad = [k for k, v in tensors.items() if v is not None and not torch.isfinite(v).all()]
    if bad:
        flags.append(NOT_FINITE)
        notes.append(f"NaN or Inf in {', '.join(bad)}")
    if (var < 0).any():
        flags.append(NEGATIVE_VARIANCE)
        notes.append(f"{int((var < 0).sum())} channel(s) with negative running_var")
    if num_batches_tracked == 0 and bool((mean == 0).all()) and bool((var == 1).all()):
        flags.append(NEVER_UPDATED)
    dead = (var.abs() <= DEAD_VARIANCE) | (
        (weight == 0) if weight is not None else torch.zeros_like(var, dtype=torch.bool)
    )
    if dead.any():
        flags.append(DEAD_CHANNELS)
        notes.append(f"{int(dead.sum())} channel(s) with gamma 0 or running_var near 0")
    s = None
    if not bad:
        s, _ = bn_scale_shift(mean, var.clamp_min(0), weight, bias, eps)
        if float(s.abs().max()) > FLOAT16_MAX:
            flags.append(FLOAT16_SCALE)
            notes.append(f"|s| reaches {float(s.abs().max()):.3g}")
    return flags, notes, s


def drift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[float, float]:
    """(mean_shift, var_ratio) of running statistics against population ones (see above)."""
    rm, rv = running_mean.to(torch.float64), running_var.to(torch.float64)
    shift = ((rm - mean).abs() / torch.sqrt(var + eps)).max()
    r = (rv + eps) / (var + eps)
    return float(shift), float(torch.maximum(r, 1 / r).max())


def inspect_program(
    program: torch.export.ExportedProgram,
    model: str,
    *,
    module_names: dict[str, str] | None = None,
    dataset=None,
    progress=lambda _: None,
    dry_run: bool = True,
    batch_size: int | None = None,
    fixed_batch: bool = False,
) -> InspectReport:
    """Inspect every BN call of an eval-mode program (the program is not changed).

    `dry_run=False` skips the fold engine's dry run (no `fold` entries)."""
    from bnexport.defaults import DATA_BATCH
    from bnexport.errors import BadInputError, InvalidModelError
    from bnexport.folding.checks import num_batches_tracked
    from bnexport.folding.program_state import ProgramState
    from bnexport.folding.torch_engine import batchnorm_calls, call_names, fold_program
    from bnexport.report import FoldReport
    from bnexport.stats.population import input_moments

    state = ProgramState(program, copy_graph=True)
    calls = batchnorm_calls(state.graph)
    if not calls and not module_names:
        raise BadInputError(
            f"'{model}' has no BatchNorm layer, so there are no statistics to inspect."
        )
    refused, fold_report = None, FoldReport()
    try:
        if dry_run:
            _, fold_report = fold_program(program, module_names)  # a dry run on a copy
    except InvalidModelError as exc:  # NaN/Inf or negative variance: fold would stop
        refused = str(exc)
    decisions = {d.name: d for d in fold_report.decisions}

    def tensor(node):
        return None if node is None else state.tensor(node)

    entries = []
    for call, name in zip(calls, call_names(calls)):
        mean, var = tensor(call.running_mean), tensor(call.running_var)
        weight, bias = tensor(call.weight), tensor(call.bias)
        tracked = num_batches_tracked(state, call) if mean is not None else None
        flags, notes, s = parameter_flags(
            mean,
            var,
            weight,
            bias,
            call.eps,
            uses_batch_stats=call.uses_batch_stats and mean is not None,
            num_batches_tracked=tracked,
        )
        entry = BatchNormStats(
            name,
            call.kind,
            call.channels,
            flags=flags,
            notes=notes,
            eps=call.eps,
            input_node=call.input.name,
        )
        for key, t in (
            ("running_mean", mean),
            ("running_var", var),
            ("weight", weight),
            ("bias", bias),
            ("scale", s),
        ):
            summary = _summary(t)
            if summary is not None:
                entry.summary[key] = summary
        d = decisions.get(name)
        if refused is not None:
            entry.fold = {"status": "refused", "reason": "fold stops on this model"}
        elif d is not None:
            entry.fold = {"status": d.status, "into": d.into, "direction": d.direction}
            if d.shift_kept:
                entry.fold["shift_kept"] = True
            if d.reason:
                entry.fold["reason"] = d.reason
        entries.append(entry)
    for d in fold_report.unused:
        entries.append(BatchNormStats(d.name, d.kind, d.channels or 0, fold={"status": d.status}))
    report = InspectReport(model, entries)
    if refused is not None:
        report.warnings.append(f"`bnexport fold` would stop: {refused}")
    if dataset is not None:
        progress("measuring the statistics of each BN's input over the data")
        called = [e for e in entries if e.input_node is not None]
        module = program.module()
        names = _module_names(program, module)
        size = batch_size or DATA_BATCH
        # a static-batch program takes only full batches of its own size
        batches = [b for b in dataset.batches(size) if not fixed_batch or b[0].shape[0] == size]
        with preserved_statistics(program):  # a training-mode BN would update them
            moments = input_moments(
                module, [names.get(e.input_node, e.input_node) for e in called], batches
            )
        used = sum(int(b[0].shape[0]) for b in batches)
        for e, call in zip(called, calls):
            m = moments[names.get(e.input_node, e.input_node)]
            mean, var = tensor(call.running_mean), tensor(call.running_var)
            if mean is None or m.mean is None:
                continue
            e.mean_shift, e.var_ratio = drift(mean, var, m.mean, m.var, e.eps)
            if e.mean_shift > MEAN_SHIFT_LIMIT or e.var_ratio > VAR_RATIO_LIMIT:
                e.flags.append(STALE)
        report.data, report.data_size = dataset.path, used
        if used < dataset.size:
            report.warnings.append(
                f"only {used} of the {dataset.size} rows of {dataset.path} were used: the "
                f"model's batch is fixed to {size}"
            )
    return report


def _module_names(program: torch.export.ExportedProgram, module) -> dict[str, str]:
    """Program user-input placeholder name -> the module's placeholder name (unlifting may
    rename them: `input` becomes `input_1`); other nodes keep their names."""
    user = set(program.graph_signature.user_inputs)
    ours = [n.name for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    theirs = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    return dict(zip(ours, theirs))


class preserved_statistics:
    """Restore a program's running statistics on exit (a pass over data through a module of a
    training-mode program updates them in place)."""

    def __init__(self, program: torch.export.ExportedProgram):
        self.program = program

    def __enter__(self):
        self.saved = {
            k: v.clone()
            for k, v in self.program.state_dict.items()
            if k.rsplit(".", 1)[-1] in STATISTICS_BUFFERS
        }
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for k, v in self.saved.items():
                self.program.state_dict[k].copy_(v)
