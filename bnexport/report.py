"""The run report: plain data with one verdict, which decides the exit code.

Every result a run produces is a type here: each BN's fold decision, the ONNX file written,
the per-output comparison, and the run that holds them. Their `to_dict()` is the JSON form
(the keys documented in docs/cli.md; new keys are added, never renamed); `bnexport.render`
turns them into text and files. This module imports nothing above it.

A BatchNorm has one of three fates: `folded` into a neighbour, `left` in the exported graph
(with a reason), or `unused` (forward never calls it, so it is not in the exported graph).
A fold into a following zero-padded conv folds the scale only and keeps the shift as an Add
before the conv (`shift_kept`): the BN is gone, an Add stands in its place.
`left` means the same thing everywhere: the BNs the exported model still computes.

Verification: for each output o over all batches, max abs error max|onnx - ref|, its scale
max|ref|, and max relative error = max abs error / scale. An output passes when
max abs error <= atol + rtol * scale (+ factor * the half-precision original's own error,
for a model that computes in float16 or bfloat16; see `bnexport.verify`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bnexport.errors import EXIT_OK, EXIT_VERIFY_FAILED
from bnexport.formatting import fmt_bytes, plain_table
from bnexport.version import __version__

FOLDED = "folded"
LEFT = "left"
UNUSED = "unused"
# the direction of a BN on constants (a weight standardized in forward): computed at fold time
COMPUTED = "computed"
# the direction of a map on a branch of a sum merged into one layer (an identity branch's BN)
MERGED = "merged"

PASSED = "passed"
FAILED = "failed"
NOT_RUN = "not run"


@dataclass
class CheckPoint:
    """Where a fold is checked in the exported graph, by tensor names: the export's tensor
    `export_value`, computed from the nearest tensors upstream that still hold the original's
    values (fed with those values), must equal the original's tensor `original_value`
    (channels on `axis`) up to one layer's rounding.

    For a fold into the preceding layer the export's value is what now stands where the BN's
    output stood; for a fold into the following layer (or a shift kept as an Add) both values
    are the following layer's output."""

    export_value: str
    original_value: str
    axis: int = 1
    # the layer's own output, when only reshapes stand between it and `export_value` (an
    # exporter may merge them away): checked in its place, reshaped to the original's shape
    layer_value: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FoldDecision:
    """What happened to one BatchNorm call site.

    `into` and `direction` are set when `status == "folded"`; `reason` when it is not.
    `shift_kept`: only the scale was folded, the shift stays as an Add before `into`.
    `shared_calls`: how many calls of `into` share the folded weights (more than 1 when one
    fold serves a layer called several times). `bytes_added`: the size of the copy of the
    layer's weights this call was given (`duplicate_shared`), 0 when none.
    """

    name: str
    kind: str
    status: str
    into: str | None = None
    direction: str | None = None
    reason: str | None = None
    channels: int | None = None
    shift_kept: bool = False
    shared_calls: int = 1
    bytes_added: int = 0
    check: CheckPoint | None = field(default=None, repr=False)  # where the fold is checked
    batchnorm: bool = True  # False for another frozen affine map (Mul/Add by constants, ...)
    # the layer that `into` (or, for a map merged directly, the map) became part of when a
    # sum of parallel branches was merged into one layer; checked there
    merged_into: str | None = None

    @property
    def folded(self) -> bool:
        return self.status == FOLDED

    @property
    def label(self) -> str:
        """The name for a table: a map that is not a BN carries its kind."""
        if self.batchnorm or self.name.startswith(self.kind):
            return self.name
        return f"{self.kind} {self.name}"

    @property
    def detail(self) -> str:
        """What happened to this BN, in a sentence fragment (its reason when left)."""
        if not self.folded:
            return self.reason or ""
        if self.direction == COMPUTED:
            return "computed once at fold time: its input is constant"
        if self.direction == MERGED:
            return f"merged into {self.into} with the branches it is summed with"
        text = (
            f"scale folded into {self.into}; shift kept as an Add before it"
            if self.shift_kept
            else f"into {self.direction} {self.into}"
        )
        if self.bytes_added:
            text += f" (its own copy of {self.into}'s weights, +{fmt_bytes(self.bytes_added)})"
        elif self.shared_calls > 1:
            text += f" (weights shared by {self.shared_calls} calls, folded once)"
        if self.merged_into is not None:
            text += f", then merged into {self.merged_into}"
        return text


@dataclass
class BranchMerge:
    """A sum of parallel branches of one tensor (convs, linears, the tensor itself, with
    per-channel maps such as BNs on the way) merged into one layer `into`, or left with
    `reason`; or (`chain`) a conv and the 1x1 conv right after it, merged. `branches` says
    what each branch was (`conv3x3`, `identity BN`), `layers` the layers whose weights it
    took; `convs_removed` and `bytes_removed` are what the merge took out of the model (the
    layers, and the stored tensors only they read, less the merged layer's own)."""

    into: str
    branches: list[str]
    merged: bool
    layers: list[str] = field(default_factory=list)
    reason: str | None = None
    convs_removed: int = 0
    bytes_removed: int = 0
    check: CheckPoint | None = field(default=None, repr=False)  # the merged layer's output
    chain: bool = False  # not branches: a conv and the 1x1 conv after it (`branches` in order)

    @property
    def status(self) -> str:
        return MERGED if self.merged else LEFT

    @property
    def detail(self) -> str:
        what = f"{len(self.branches)} branches ({', '.join(self.branches)})"
        if self.chain:
            what = " -> ".join(self.branches)
        if not self.merged:
            return f"{what} left: {self.reason}"
        return (
            f"merged {what} into {self.into} ({self.convs_removed} "
            f"layer{'s' if self.convs_removed != 1 else ''} and {fmt_bytes(self.bytes_removed)} "
            "removed)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "into": self.into,
            "status": self.status,
            "branches": list(self.branches),
            "layers": list(self.layers),
            "convs_removed": self.convs_removed,
            "bytes_removed": self.bytes_removed,
            "reason": self.reason,
            "detail": self.detail,
            "chain": self.chain,
        }


@dataclass
class FoldReport:
    """Every BatchNorm of a model with its fate, plus model-level warnings.

    `aliases` and `changed` say what the tensor names of the folded graph mean: a name in
    `aliases` now holds the value the original held under the name it maps to (a layer's
    output that took over its BN's output); a name in `changed` holds a value the original
    never computed under that name (a layer's output before the BN it took in). Every other
    name of the original keeps its value."""

    decisions: list[FoldDecision] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict, repr=False)
    changed: set[str] = field(default_factory=set, repr=False)
    # sums of parallel branches merged into one layer, and those left (with the reason)
    merges: list[BranchMerge] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Every BatchNorm: folded + left + unused."""
        return len(self.decisions)

    @property
    def folded(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.status == FOLDED]

    @property
    def left(self) -> list[FoldDecision]:
        """BNs that the exported model still computes."""
        return [d for d in self.decisions if d.status == LEFT]

    @property
    def unused(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.status == UNUSED]

    @property
    def adds_added(self) -> int:
        """Add nodes that stand where a BN was (its shift, before a zero-padded conv)."""
        return sum(d.shift_kept for d in self.folded)

    @property
    def bytes_added(self) -> int:
        """Bytes of weight copies made so that calls of a shared layer fold separately."""
        return sum(d.bytes_added for d in self.decisions)

    @property
    def merged(self) -> list[BranchMerge]:
        return [m for m in self.merges if m.merged]

    @property
    def convs_removed(self) -> int:
        """Layers the merges of parallel branches took out of the model."""
        return sum(m.convs_removed for m in self.merged)

    @property
    def called(self) -> int:
        """BN calls in the traced graph before folding (folded + left)."""
        return len(self.folded) + len(self.left)

    def decision(self, name: str) -> FoldDecision:
        """The decision for the BN called `name` (KeyError when there is none)."""
        for d in self.decisions:
            if d.name == name:
                return d
        raise KeyError(name)

    def rows(self) -> list[tuple[str, str, str]]:
        """(name, outcome, detail) per BN and other affine map; a map that is not a BN is
        named with what it is (`FrozenBatchNorm2d layer1.0.bn1`)."""
        return [(d.label, d.status, d.detail) for d in self.decisions]

    def summary(self) -> str:
        """One line, counting exactly what the JSON counts."""
        bns = [d for d in self.folded + self.left if d.batchnorm]
        left = sum(not d.folded for d in bns)
        line = f"BatchNorm: {len(bns)} before, {left} after ({len(bns) - left} folded)"
        maps = [d for d in self.folded + self.left if not d.batchnorm]
        if maps:
            kept = sum(not d.folded for d in maps)
            counts = f"{len(maps)} before, {kept} after ({len(maps) - kept} folded)"
            what = "affine maps (Mul/Add by constants, frozen BNs, layer scales)"
            line = (
                f"{line}; other {what}: {counts}" if bns else f"BatchNorm: none; {what}: {counts}"
            )
        if self.adds_added:
            plural = "s" if self.adds_added != 1 else ""
            line += f"; {self.adds_added} shift{plural} kept as Add node{plural}"
        if self.bytes_added:
            line += f"; {fmt_bytes(self.bytes_added)} of weight copies added"
        if self.unused:
            line += f"; {len(self.unused)} never called by forward"
        if self.merged:
            sums = sum(not m.chain for m in self.merged)
            chains = len(self.merged) - sums
            removed = self.convs_removed
            what = [f"{sums} sum{'s' if sums != 1 else ''} of parallel branches"] if sums else []
            if chains:
                what.append(f"{chains} conv -> 1x1 conv chain{'s' if chains != 1 else ''}")
            line += (
                f"; {' and '.join(what)} merged into one layer each ({removed} "
                f"layer{'s' if removed != 1 else ''}, "
                f"{fmt_bytes(sum(m.bytes_removed for m in self.merged))} removed)"
            )
        left = len(self.merges) - len(self.merged)
        if left:
            line += f"; {left} sum{'s' if left != 1 else ''} of branches left"
        return line

    def to_dict(self) -> dict[str, Any]:
        """`total` = folded + len(left) + len(unused), over BNs and other affine maps alike;
        `left` are the maps the export still runs; `affine_maps` counts the maps that are
        not BatchNorm (each row of `layers` says which it is in `batchnorm`)."""
        maps = [d for d in self.decisions if not d.batchnorm]
        return {
            "total": self.total,
            "folded": len(self.folded),
            "adds_added": self.adds_added,
            "bytes_added": self.bytes_added,
            "left": [{"name": d.name, "reason": d.reason} for d in self.left],
            "unused": [{"name": d.name, "reason": d.reason} for d in self.unused],
            "affine_maps": {"total": len(maps), "folded": sum(d.folded for d in maps)},
            "layers": [_decision_dict(d) for d in self.decisions],
            "merges": [m.to_dict() for m in self.merges],
            "convs_removed": self.convs_removed,
            "warnings": list(self.warnings),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [plain_table(("BatchNorm", "outcome", "detail"), self.rows())]
        if self.merges:
            rows = [(m.into, m.status, m.detail) for m in self.merges]
            lines.append(plain_table(("branch sum", "outcome", "detail"), rows))
        lines.append(self.summary())
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _decision_dict(d: FoldDecision) -> dict[str, Any]:
    out = asdict(d)
    out.pop("check")
    return out


@dataclass
class OnnxInfo:
    """What an ONNX file holds, as read from the file itself."""

    path: str
    opset: int
    batchnorm_nodes: int
    inputs: list[str]
    outputs: list[str]
    dynamic_batch: bool
    external_data: list[str] | None = None  # data files next to `path`, when weights are external
    batch_size: int | None = None  # the fixed batch of a static-batch file

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "opset": self.opset,
            "batchnorm_nodes": self.batchnorm_nodes,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "dynamic_batch": self.dynamic_batch,
            "external_data": self.external_data,
        }


@dataclass
class OpCounts:
    """Nodes of the main ONNX graph by op_type, before and after the fold.

    `after` is the file written (or checked). `before` is the original's graph: for an ONNX
    input, the input file's own nodes; for a checkpoint, the graph the exporter writes of the
    original with every BN a node (`bnexport.export.ops_before_fold`)."""

    before: dict[str, int]
    after: dict[str, int]

    def changed(self) -> list[tuple[str, int, int]]:
        """(op_type, before, after) of every op whose count changed, largest change first."""
        ops = set(self.before) | set(self.after)
        rows = [(op, self.before.get(op, 0), self.after.get(op, 0)) for op in ops]
        rows = [r for r in rows if r[1] != r[2]]
        return sorted(rows, key=lambda r: (-abs(r[2] - r[1]), r[0]))

    def rows(self) -> list[tuple[str, int, int]]:
        """(op_type, before, after) of every op, most frequent first."""
        ops = set(self.before) | set(self.after)
        rows = [(op, self.before.get(op, 0), self.after.get(op, 0)) for op in ops]
        return sorted(rows, key=lambda r: (-max(r[1], r[2]), r[0]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": dict(sorted(self.before.items())),
            "after": dict(sorted(self.after.items())),
        }


@dataclass
class OutputCheck:
    """One output's errors over every batch compared."""

    name: str
    max_abs_err: float = 0.0
    scale: float = 0.0
    argmax_agree: int = 0
    argmax_total: int = 0
    original_err: float | None = None  # the half-precision original against its float32 twin

    @property
    def max_rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err

    @property
    def argmax_agreement(self) -> float | None:
        return self.argmax_agree / self.argmax_total if self.argmax_total else None


@dataclass
class LayerCheck:
    """One folded layer compared where it is (see `CheckPoint`): the largest error over its
    channels, the channel where the error is largest against that channel's tolerance, and
    the verdict. `name` is the layer the BN `batchnorm` was folded into."""

    name: str
    batchnorm: str
    max_abs_err: float
    max_rel_err: float
    worst_channel: int
    passed: bool
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Accuracy:
    reference: float
    onnx: float
    n: int


@dataclass
class VerifyResult:
    """The comparison of an ONNX file with its reference, per output, and its verdict."""

    outputs: list[OutputCheck]
    samples: int
    atol: float
    rtol: float
    batch_sizes: list[int] = field(default_factory=list)
    accuracy: Accuracy | None = None
    data_argmax_agreement: float | None = None
    data: str | None = None
    data_size: int = 0
    # a half-precision model measured against its float32 twin (all None for float32 models)
    factor: float | None = None  # the allowance per unit of the original's own error
    model_dtype: str | None = None  # "float16" or "bfloat16"
    reference_dtype: str | None = None  # "float32": the twin the errors are measured against
    verified_file: str | None = None  # "ONNX file", or "float32 twin" when it could not run
    # a float16 export of a float32 model: whose own float16 error sets the allowance
    own_error_of: str | None = None
    # and the allowance per unit of scale where that own float16 run overflows
    fallback_rtol: float | None = None
    # every folded layer compared where it is, in topological order, and the folded BNs
    # whose place could not be found in the file (with the reason)
    layers: list[LayerCheck] = field(default_factory=list)
    layers_unmapped: list[dict[str, str]] = field(default_factory=list)
    layer_rtol: float | None = None  # the per-layer tolerance, per unit of channel scale
    # where a layer missed it: what the original's own rounding there was measured against
    layer_own_error_of: str | None = None
    # where the random inputs came from, and how many samples they hold
    random_samples: int = 0
    random_source: str | None = None

    def tolerance(self, o: OutputCheck) -> float:
        """The largest error output `o` may have."""
        tol = self.atol + self.rtol * o.scale
        if self.factor is not None and o.original_err is not None:
            if math.isfinite(o.original_err):
                tol += self.factor * o.original_err
            elif self.fallback_rtol is not None:
                tol += self.fallback_rtol * o.scale
        return tol

    @property
    def outputs_passed(self) -> bool:
        return all(o.max_abs_err <= self.tolerance(o) for o in self.outputs)

    @property
    def passed(self) -> bool:
        return self.outputs_passed and all(layer.passed for layer in self.layers)

    @property
    def first_failed_layer(self) -> LayerCheck | None:
        """The first folded layer (in topological order) that diverges."""
        return next((layer for layer in self.layers if not layer.passed), None)

    @property
    def original_err(self) -> float | None:
        """The largest error of the original against the float32 twin (None without one)."""
        errs = [o.original_err for o in self.outputs if o.original_err is not None]
        return max(errs) if errs else None

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((o.max_rel_err for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "passed": self.passed,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "samples": self.samples,
            "atol": self.atol,
            "rtol": self.rtol,
            "batch_sizes": self.batch_sizes,
            "outputs": [
                {
                    "name": o.name,
                    "max_abs_err": o.max_abs_err,
                    "max_rel_err": o.max_rel_err,
                    "scale": o.scale,
                    "argmax_agreement": o.argmax_agreement,
                }
                for o in self.outputs
            ],
        }
        if self.model_dtype is not None:
            # a half-precision model: what was run, and what its errors are measured against
            out["model_dtype"] = self.model_dtype
            out["verified_file"] = self.verified_file
            if self.own_error_of is not None:
                out["original_err_of"] = self.own_error_of
        if self.reference_dtype is not None:
            out["reference_dtype"] = self.reference_dtype
            out["factor"] = self.factor
            out["original_err"] = self.original_err
            for entry, o in zip(out["outputs"], self.outputs):
                entry["original_err"] = o.original_err
                entry["tolerance"] = self.tolerance(o)
        if self.accuracy is not None:
            out["accuracy"] = {
                "original": self.accuracy.reference,
                "onnx": self.accuracy.onnx,
                "n": self.accuracy.n,
            }
        if self.data_argmax_agreement is not None:
            out["data_argmax_agreement"] = self.data_argmax_agreement
        if self.data is not None:
            out["data"] = {"path": self.data, "samples": self.data_size}
        if self.random_source is not None:
            out["random"] = {"samples": self.random_samples, "source": self.random_source}
        out["layers"] = [layer.to_dict() for layer in self.layers]
        if self.layer_rtol is not None:
            out["layer_rtol"] = self.layer_rtol
        if self.layer_own_error_of is not None:
            out["layer_original_err_of"] = self.layer_own_error_of
        if self.layers_unmapped:
            out["layers_unmapped"] = list(self.layers_unmapped)
        return out


@dataclass
class RunReport:
    """What one run did, and its verdict.

    `verdict` is `passed` (the ONNX file computes what the original does), `failed` (it was
    written but does not), or `not run` (the comparison itself could not run: `verify_error`).
    """

    command: str
    model: str
    output: str
    fold: FoldReport | None = None
    onnx: OnnxInfo | None = None
    verify: VerifyResult | None = None
    verify_error: str | None = None
    saved_program: str | None = None
    warnings: list[str] = field(default_factory=list)
    reference: str = "eval-mode PyTorch"  # what the ONNX file was compared with
    recalibrated: dict | None = None  # fold --recalibrate: data, samples, BNs
    float16: Any = None  # fold --fp16: the HalfReport (layers kept in float32, weight bytes)
    op_counts: OpCounts | None = None  # ONNX nodes by op_type, before and after the fold

    @property
    def verdict(self) -> str:
        if self.verify_error is not None or self.verify is None:
            return NOT_RUN
        return PASSED if self.verify.passed else FAILED

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_VERIFY_FAILED

    def to_dict(self) -> dict[str, Any]:
        """The JSON report of `fold` and `verify`."""
        out: dict[str, Any] = {
            "command": self.command,
            "model": self.model,
            "output": self.output,
            "bnexport_version": __version__,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
        }
        if self.fold is not None:
            fold = self.fold.to_dict()
            fold.pop("warnings")
            out["batchnorm"] = fold
        if self.onnx is not None:
            out["onnx"] = self.onnx.to_dict()
        if self.saved_program is not None:
            out["saved_program"] = self.saved_program
        if self.recalibrated is not None:
            out["recalibrated"] = self.recalibrated
        if self.float16 is not None:
            out["float16"] = self.float16.to_dict()
        if self.op_counts is not None:
            out["op_counts"] = self.op_counts.to_dict()
        verify = self.verify.to_dict() if self.verify is not None else {"passed": False}
        if self.verify_error:
            verify["passed"] = False
            verify["error"] = self.verify_error
        verify["reference"] = self.reference
        out["verify"] = verify
        out["warnings"] = list(self.warnings)
        return out
