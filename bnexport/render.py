"""Rendering a report for people and files: text (rich tables on a terminal, plain aligned
text when piped), the progress of a run on a terminal, and the JSON file. Each report gives
its own JSON form (`to_dict()`); this module only writes it.

The text of `fold`, `verify` and `inspect` comes in three levels of detail: QUIET (the
verdict line only), DEFAULT (the verdict, one summary line, what was left grouped by reason,
the op counts that changed, the verification per output and the layers that failed or came
closest to their tolerance) and VERBOSE (every BN and every layer, as evidence).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bnexport.files import write_text_atomic
from bnexport.formatting import fmt, fmt_bytes, plain_table
from bnexport.report import FAILED, NOT_RUN, PASSED, FoldReport, OpCounts, RunReport, VerifyResult

if TYPE_CHECKING:
    from rich.console import Console

QUIET = "quiet"
DEFAULT = "default"
VERBOSE = "verbose"

# the names shown on one line of BNs grouped by reason, before "and N more"
NAMES_WIDTH = 60
# the layers shown by default: every failed one up to this many, else the closest ones
FAILED_LAYERS_SHOWN = 10
CLOSEST_LAYERS_SHOWN = 3


def _verify_rows(v: VerifyResult) -> list[tuple[str, ...]]:
    rows = []
    for o in v.outputs:
        agree = "-" if o.argmax_agreement is None else f"{o.argmax_agreement:.2%}"
        if v.reference_dtype is not None:
            own = "-" if o.original_err is None else fmt(o.original_err)
            rows.append((o.name, fmt(o.max_abs_err), own, fmt(v.tolerance(o)), fmt(o.scale), agree))
        else:
            rows.append((o.name, fmt(o.max_abs_err), fmt(o.max_rel_err), fmt(o.scale), agree))
    return rows


_VERIFY_HEADER = ("output", "max abs err", "max rel err", "scale", "argmax agree")
# a half-precision model: the export's error and the original's own, both against float32
_HALF_HEADER = ("output", "export err", "original err", "tolerance", "scale", "argmax agree")


def _verify_title(report: RunReport) -> str:
    v = report.verify
    if v.reference_dtype is None:
        return f"Verification (onnxruntime vs {report.reference})"
    if v.own_error_of is not None:
        return (
            f"Verification (the {v.model_dtype} export in onnxruntime vs {report.reference} in "
            f"float32; allowance from {v.own_error_of})"
        )
    run = "the float32 twin in onnxruntime" if v.verified_file == "float32 twin" else "onnxruntime"
    return (
        f"Verification ({run} vs {report.reference}; {v.model_dtype} model: the export and "
        f"the original each against the model run in {v.reference_dtype})"
    )


def tolerance_line(v: VerifyResult) -> str | None:
    """How a half-precision model's tolerance is formed (None for the plain tolerance)."""
    if v.reference_dtype is None:
        return None
    own = v.original_err
    which = f"({fmt(own)})" if len(v.outputs) == 1 else f"(at most {fmt(own)}; per output above)"
    if v.own_error_of is not None:
        return (
            f"tolerance for the {v.model_dtype} export: error <= {v.factor:g} x the error of "
            f"{v.own_error_of} {which} + atol {v.atol:g} + rtol {v.rtol:g} x scale, errors "
            "measured against the float32 original"
        )
    return (
        f"tolerance for {v.model_dtype}: export error <= {v.factor:g} x the {v.model_dtype} "
        f"original's own error {which} + atol {v.atol:g} + rtol {v.rtol:g} x scale, errors "
        f"measured against the model run in {v.reference_dtype}"
    )


def _table(console: Console, title: str, header: tuple[str, ...], rows, *, fold_wide=False):
    if not console.is_terminal:
        console.print(title, markup=False)
        console.print(plain_table(header, rows), markup=False)
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in header:
        table.add_column(col, overflow="fold" if fold_wide else "ellipsis")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _print(console: Console, line: str) -> None:
    console.print(line, markup=False)


# --------------------------------------------------------------------------- the verdict

# what each verdict means for the exit code, per command
_EXIT_MEANING = {
    ("fold", PASSED): "exported and verified",
    ("fold", FAILED): "exported, but it differs from the original; the file is kept",
    ("fold", NOT_RUN): "exported, but the comparison could not run; the file is kept",
    ("verify", PASSED): "computes what the original computes",
    ("verify", FAILED): "differs from the original",
    ("verify", NOT_RUN): "could not be compared with the original",
}


def verdict_line(report: RunReport) -> str:
    """The one line that says whether the file can be trusted, the exit code and what it
    means, and for a failure the first thing that differs."""
    word = "PASS" if report.passed else "FAIL"
    meaning = _EXIT_MEANING[
        report.command if report.command == "fold" else "verify", report.verdict
    ]
    line = f"verify: {word} - {report.output}: {meaning} (exit {report.exit_code})"
    if report.verdict == NOT_RUN:
        return f"{line}: {report.verify_error or 'no comparison was made'}"
    if report.verdict == FAILED:
        return f"{line}: {_first_difference(report.verify)}"
    return line


def _first_difference(v: VerifyResult) -> str:
    """What differs: the first output beyond its tolerance, and the first diverging layer."""
    parts = []
    failed = [o for o in v.outputs if o.max_abs_err > v.tolerance(o)]
    if failed:
        o = failed[0]
        others = f" (and {len(failed) - 1} other outputs)" if len(failed) > 1 else ""
        parts.append(
            f"output '{o.name}' differs by {fmt(o.max_abs_err)} (tolerance "
            f"{fmt(v.tolerance(o))}){others}"
        )
    first = v.first_failed_layer
    if first is not None:
        parts.append(
            f"first diverging layer {first.name} (with {first.batchnorm} folded in), "
            f"{fmt(first.max_rel_err)} x channel scale at channel {first.worst_channel}"
        )
    return "; ".join(parts) or "the comparison failed"


# --------------------------------------------------------------------------- the fold


def fold_summary(fold: FoldReport) -> str:
    """The summary line: BNs before and after, folded, Adds kept, and the folds that serve
    several calls of a shared layer."""
    line = fold.summary()
    shared = [d for d in fold.folded if d.shared_calls > 1]
    if shared:
        layers = len({d.into for d in shared})
        line += (
            f"; {len(shared)} BN call{'s' if len(shared) != 1 else ''} folded once into "
            f"{layers} shared layer{'s' if layers != 1 else ''}"
        )
    return line


# A reason names the nodes it is about; the same reason at another place names others. These
# rewrite a reason into the kind of reason it is, so that BNs left for the same kind of
# reason are listed together (torch.export node names: `add_3 (an addition)`, `relu_5 (relu,
# a nonlinearity)`, `conv layer layer1.0.conv1`; ONNX: `Relu 'node_relu_5'`).
_GENERAL = [
    (re.compile(r"\b\d+ of its \d+ channels\b"), "some of its channels"),
    (re.compile(r" \(channels? \d+(?:, (?:\d+|\.\.\.))*\)"), ""),
    (re.compile(r"\b[\w.]+ \((an? [^(),]+)\)"), r"\1"),
    (re.compile(r"\b[\w.]+ \((\w+), (an? [^()]+)\)"), r"\1 (\2)"),
    (re.compile(r"\b[\w.]+ \((\w+)\)"), r"\1"),
    (re.compile(r"\b(\w+) layer [\w.]+(?: \(call \d+\))?"), r"a \1 layer"),
    (re.compile(r"\bBatchNorm [\w.]+(?: \(call \d+\))?"), "another BatchNorm"),
    (re.compile(r"\bthe output '[^']*'"), "the output"),
    (re.compile(r"\bthe weights of [\w.]+"), "the weights of a layer"),
    (re.compile(r"\bbetween [\w.]+ and the BN\b"), "between the layer and the BN"),
    (re.compile(r"\bbetween the BN and [\w.]+"), "between the BN and the layer"),
]
_ONNX_NODE = re.compile(r"\b([A-Z]\w*) '[^']*'")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.])")


def reason_kind(reason: str) -> str:
    """The reason with the names of the nodes it mentions left out: `its input comes from
    add_3 (an addition), not a conv or linear` -> `its input comes from an addition, not a
    conv or linear`."""
    for pattern, replacement in _GENERAL:
        reason = pattern.sub(replacement, reason)
    return _ONNX_NODE.sub(lambda m: f"{'an' if m[1][0] in 'AEIOU' else 'a'} {m[1]}", reason)


def left_groups(
    decisions: list[tuple[str, str, str | None]],
) -> list[tuple[str, str, list[str]]]:
    """(status, reason, names) of the BNs not folded, given as (name, status, reason), grouped
    by the kind of their reason: those left in the export first, then the others (never
    called); the largest group first. The reason shown is the BNs' own when they share it
    word for word, else its kind."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for name, status, reason in decisions:
        key = _NUMBER.sub("N", reason_kind(reason or ""))  # figures differ from place to place
        groups.setdefault((status, key), []).append((name, reason or ""))
    out = []
    for (status, key), members in sorted(
        groups.items(), key=lambda g: (g[0][0] != "left", -len(g[1]))
    ):
        reasons = {reason for _, reason in members}
        kinds = {reason_kind(reason) for reason in reasons}
        shown = reasons.pop() if len(reasons) == 1 else kinds.pop() if len(kinds) == 1 else key
        out.append((status, shown, [name for name, _ in members]))
    return out


def shorten_names(names: list[str], width: int = NAMES_WIDTH) -> str:
    """As many names as fit in `width` characters (at least one), then "and N more"."""
    shown = [names[0]]
    for name in names[1:]:
        if len(", ".join([*shown, name])) > width:
            break
        shown.append(name)
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def left_lines(fold: FoldReport) -> list[str]:
    """One line per kind of reason a BN was not folded: how many BNs, which, and why."""
    return _group_lines([(d.name, d.status, d.reason) for d in fold.decisions if not d.folded])


def merge_lines(fold: FoldReport) -> list[str]:
    """One line per sum of parallel branches that could not be merged, with the reason."""
    return [
        f"left: {len(m.branches)} branches ({', '.join(m.branches)}) in {m.into}: {m.reason}"
        for m in fold.merges
        if not m.merged
    ]


def _group_lines(decisions: list[tuple[str, str, str | None]]) -> list[str]:
    return [
        f"{status}: {len(names)} BN{'s' if len(names) != 1 else ''} "
        f"({shorten_names(names)}): {reason}"
        for status, reason, names in left_groups(decisions)
    ]


def _op_rows(rows: list[tuple[str, int, int]]) -> list[tuple[str, ...]]:
    def change(b: int, a: int) -> str:
        return f"{a - b:+d}" if a != b else "0"

    return [(op, str(b), str(a), change(b, a)) for op, b, a in rows]


def render_op_counts(counts: OpCounts, console: Console, detail: str = DEFAULT) -> None:
    """The nodes of the ONNX graph by op type, before and after the fold: the ops whose count
    changed (every op with VERBOSE), and the total."""
    rows = counts.rows() if detail == VERBOSE else counts.changed()
    total_before, total_after = sum(counts.before.values()), sum(counts.after.values())
    if not rows:
        _print(console, f"ONNX nodes: {total_after}, the same ops before and after the fold")
        return
    which = "every op" if detail == VERBOSE else "the ops that changed"
    _table(
        console,
        f"ONNX nodes by op type, before and after the fold ({which})",
        ("op", "before", "after", "change"),
        _op_rows(rows) + _op_rows([("all nodes", total_before, total_after)]),
    )


# --------------------------------------------------------------------------- the run


def render_run(report: RunReport, console: Console, detail: str = DEFAULT) -> None:
    """The verdict line; then (unless QUIET) what the fold did and how the file compares.
    VERBOSE adds every BN's decision, every op and every folded layer."""
    _print(console, verdict_line(report))
    if detail == QUIET:
        return
    if report.recalibrated is not None:
        r = report.recalibrated
        _print(
            console,
            f"recalibrated: {len(r['batchnorm'])} BNs on {r['samples']} samples from "
            f"{r['data']} (before folding)",
        )
    if report.fold is not None:
        _print(console, fold_summary(report.fold))
        if detail == VERBOSE:
            _table(
                console,
                f"BatchNorm layers of {report.model}",
                ("BatchNorm", "outcome", "detail"),
                report.fold.rows(),
                fold_wide=True,
            )
            if report.fold.merges:
                _table(
                    console,
                    "Parallel branches merged into one layer",
                    ("layer", "outcome", "detail"),
                    [(m.into, m.status, m.detail) for m in report.fold.merges],
                    fold_wide=True,
                )
        else:
            for line in left_lines(report.fold) + merge_lines(report.fold):
                _print(console, line)
    for warning in report.warnings:
        _print(console, f"warning: {warning}")
    if report.op_counts is not None:
        render_op_counts(report.op_counts, console, detail)
    if report.onnx is not None:
        o = report.onnx
        verb = "wrote" if report.command == "fold" else "checked"
        data = f" + {', '.join(o.external_data)}" if o.external_data else ""
        _print(
            console,
            f"ONNX: {verb} {o.path}{data} (opset {o.opset}, "
            f"{'dynamic' if o.dynamic_batch else 'static'} batch, "
            f"{o.batchnorm_nodes} BatchNormalization node{'' if o.batchnorm_nodes == 1 else 's'})",
        )
    if report.float16 is not None:
        for line in float16_lines(report.float16):
            _print(console, line)
    if report.saved_program is not None:
        _print(console, f"folded program: wrote {report.saved_program}")
    if report.verify is not None and not report.verify_error:
        render_verification(report, console, detail)


def render_verification(report: RunReport, console: Console, detail: str = DEFAULT) -> None:
    """Every output's errors, where the samples came from, the folded layers that failed or
    came closest to their tolerance (every layer with VERBOSE), and the errors against the
    tolerance."""
    v = report.verify
    _table(
        console,
        _verify_title(report),
        _VERIFY_HEADER if v.reference_dtype is None else _HALF_HEADER,
        _verify_rows(v),
    )
    line = samples_line(v)
    if line:
        _print(console, line)
    if v.accuracy is not None:
        _print(
            console,
            f"accuracy on {v.accuracy.n} labelled samples: original {v.accuracy.reference:.2%}, "
            f"ONNX {v.accuracy.onnx:.2%}; argmax agreement {v.data_argmax_agreement:.2%}",
        )
    for line in layer_lines(v):
        _print(console, line)
    shown = shown_layers(v, detail)
    if shown:
        _table(
            console,
            _layers_title(v, shown, detail),
            ("layer", "BN folded in", "max abs err", "max rel err", "channel", "result"),
            [
                (
                    c.name,
                    c.batchnorm,
                    fmt(c.max_abs_err),
                    fmt(c.max_rel_err),
                    str(c.worst_channel),
                    "ok" if c.passed else "FAIL",
                )
                for c in shown
            ],
        )
    line = tolerance_line(v)
    if line is not None:
        _print(console, line)
        tolerance = f"{v.factor:g} x original err + atol {v.atol:g} + rtol {v.rtol:g} x scale"
    else:
        tolerance = f"atol {v.atol:g} + rtol {v.rtol:g} x scale"
    checked = "" if v.verified_file != "float32 twin" else " of the float32 twin"
    _print(
        console,
        f"errors: max abs err{checked} {fmt(v.max_abs_err)}, max rel err {fmt(v.max_rel_err)} "
        f"over {v.samples} batch{'es' if v.samples != 1 else ''} "
        f"(batch sizes {sorted(set(v.batch_sizes))}); tolerance {tolerance}",
    )


def shown_layers(v: VerifyResult, detail: str = DEFAULT) -> list:
    """The folded layers worth a row: with VERBOSE every one (in topological order); else
    those that failed, or when none did the few with the largest error against their
    channel's scale (none for a model with a single folded layer: its line says it all)."""
    if detail == VERBOSE:
        return list(v.layers)
    failed = [c for c in v.layers if not c.passed]
    if failed:
        return failed[:FAILED_LAYERS_SHOWN]
    if len(v.layers) < 2:
        return []
    return sorted(v.layers, key=lambda c: -c.max_rel_err)[:CLOSEST_LAYERS_SHOWN]


def _layers_title(v: VerifyResult, shown: list, detail: str) -> str:
    if detail == VERBOSE:
        return f"Folded layers, each compared with the original where it is ({len(shown)})"
    failed = sum(not c.passed for c in v.layers)
    if failed:
        more = f"; {len(shown)} shown, every layer with -v" if failed > len(shown) else ""
        return f"Folded layers that differ from the original ({failed} of {len(v.layers)}{more})"
    return (
        f"Folded layers closest to their tolerance ({len(shown)} of {len(v.layers)}; every "
        "layer with -v)"
    )


def samples_line(v: VerifyResult) -> str | None:
    """How many samples were compared, and where they came from."""
    parts = []
    if v.random_samples:
        parts.append(f"{v.random_samples} random samples ({v.random_source})")
    if v.data is not None:
        parts.append(f"{v.data_size} samples from {v.data}")
    return f"verified on {' and '.join(parts)}" if parts else None


def layer_lines(v: VerifyResult) -> list[str]:
    """The per-layer check in a few lines: how many folded layers were compared where they
    are, the first that diverges (with its worst channel), and those that could not be."""
    lines = []
    if v.layers:
        samples = max(layer.samples for layer in v.layers)
        failed = [layer for layer in v.layers if not layer.passed]
        worst = max(v.layers, key=lambda layer: layer.max_rel_err)
        lines.append(
            f"layers: {len(v.layers) - len(failed)} of {len(v.layers)} folded layers match the "
            f"original where they are ({samples} sample{'s' if samples != 1 else ''}; largest "
            f"error {fmt(worst.max_rel_err)} "
            f"x channel scale at {worst.name}; tolerance {fmt(v.layer_rtol or 0)} x channel "
            "scale"
            + (
                f" + a multiple of the original's own error against {v.layer_own_error_of})"
                if v.layer_own_error_of
                else ")"
            )
        )
    first = v.first_failed_layer
    if first is not None:
        lines.append(
            f"first diverging layer: {first.name} (with {first.batchnorm} folded in), channel "
            f"{first.worst_channel}: max abs err {fmt(first.max_abs_err)}, "
            f"{fmt(first.max_rel_err)} x the channel's scale"
        )
    for entry in v.layers_unmapped:
        lines.append(f"layer not checked: {entry['name']}: {entry['reason']}")
    if not v.outputs_passed and first is None and v.layers:
        lines.append("every folded layer matches where it is; the outputs differ downstream")
    return lines


def float16_lines(half) -> list[str]:
    """What `--fp16` made: the share of float16 weights and compute, and every node kept in
    float32 with its reason."""
    io = sorted({*half.inputs.values(), *half.outputs.values()})
    lines = [
        f"float16: {half.float16_nodes} of {half.nodes} nodes compute in float16, "
        f"{half.float16_weight_share:.1%} of the weight bytes are float16 "
        f"({fmt_bytes(half.float16_weight_bytes)}); inputs and outputs {' and '.join(io)}"
    ]
    lines += [f"kept in float32: {k.name} ({k.op_type}): {k.reason}" for k in half.kept_float32]
    return lines


def report_dict(report) -> dict:
    """Any command's report (fold/verify, inspect, recalibrate) in its JSON form."""
    return report.to_dict()


def report_json(report) -> str:
    """Any command's report (fold/verify, inspect, recalibrate) as JSON text."""
    return json.dumps(report_dict(report), indent=2) + "\n"


def write_json(report, path: str | Path) -> None:
    """Write any command's JSON report atomically."""
    write_text_atomic(Path(path), report_json(report))


# --------------------------------------------------------------------------- inspect


def _fold_cell(fold: dict) -> str:
    if fold.get("status") == "folded" and fold.get("shift_kept"):
        return f"scale folded into {fold['into']}, shift kept as an Add"
    if fold.get("status") == "folded":
        return f"folded into {fold['direction']} {fold['into']}"
    return fold.get("status", "-")


def _inspect_row(b, with_data: bool) -> tuple[str, ...]:
    s = b.summary.get("scale")
    scale = f"{fmt(s['min'])}..{fmt(s['max'])}" if s else "-"
    row = (b.name, str(b.channels), scale, ", ".join(b.flags) or "-", _fold_cell(b.fold))
    if with_data:
        row += tuple("-" if v is None else fmt(v) for v in (b.mean_shift, b.var_ratio))
    return row


def _drift(b) -> float:
    """How far past the stale limits a BN is (0 when not measured)."""
    from bnexport.stats.inspect import MEAN_SHIFT_LIMIT, VAR_RATIO_LIMIT

    return max((b.mean_shift or 0) / MEAN_SHIFT_LIMIT, (b.var_ratio or 0) / VAR_RATIO_LIMIT)


# what `fold` would do with a BN, by the status of its dry run
_WOULD = {
    "folded": "would fold",
    "left": "would be left",
    "unused": "never called",
    "refused": "would stop the fold",
}


def inspect_summary(report) -> str:
    """One line: the BNs, what `fold` would do with them, and how many are flagged."""
    counts: dict[str, int] = {}
    for b in report.batchnorm:
        status = b.fold.get("status", "-")
        counts[status] = counts.get(status, 0) + 1
    fold = ", ".join(f"{n} {_WOULD.get(status, status)}" for status, n in counts.items())
    stale = len(report.stale)
    other = sum(1 for b in report.batchnorm if b.flags) - stale
    flagged = f"{stale} stale, {other} flagged otherwise" if report.data else f"{other} flagged"
    return f"BatchNorm: {len(report.batchnorm)} BNs; {fold}; {flagged}"


def render_inspect(report, console: Console, detail: str = DEFAULT) -> None:
    """The verdict line; then (unless QUIET) one summary line, the BNs `fold` would leave
    grouped by reason, and the flagged BNs, the stale ones first (VERBOSE: every BN, in the
    order the model calls them)."""
    _print(console, f"verdict: {report.verdict}")
    if detail == QUIET:
        return
    _print(console, inspect_summary(report))
    with_data = report.data is not None
    decisions = [
        (b.name, b.fold.get("status"), b.fold.get("reason"))
        for b in report.batchnorm
        if b.fold.get("status") not in (None, "folded")
    ]
    for line in _group_lines(decisions):  # the table's fold column gives no reason
        _print(console, line)
    header = ("BatchNorm", "ch", "s min..max", "flags", "fold")
    if with_data:
        header += ("mean_shift", "var_ratio")
    if detail == VERBOSE:
        shown = list(report.batchnorm)
        title = f"BatchNorm statistics of {report.model}"
    else:
        stale = sorted(report.stale, key=lambda b: -_drift(b))
        shown = stale + [b for b in report.batchnorm if b.flags and b not in stale]
        title = (
            f"BatchNorm statistics of {report.model}: the {len(shown)} flagged"
            f"{', stale first' if stale else ''} (every BN with -v)"
        )
    if shown:
        _table(console, title, header, [_inspect_row(b, with_data) for b in shown], fold_wide=True)
    for b in shown:
        for note in b.notes:
            _print(console, f"{b.name}: {note}")
    if with_data:
        _print(
            console,
            f"drift measured on {report.data_size} samples from {report.data} (model in eval "
            "mode, float64)",
        )
    for warning in report.warnings:
        _print(console, f"warning: {warning}")


# --------------------------------------------------------------------------- recalibrate


def render_recalibrate(report, console: Console, detail: str = DEFAULT) -> None:
    """The line saying what was written; then (unless QUIET) every recalibrated BN's drift
    before and after, and the accuracy before and after."""
    _print(
        console,
        f"recalibrate: wrote {report.output} ({len(report.layers)} BNs, {report.samples} "
        f"samples in {report.batches} batches)",
    )
    if detail == QUIET:
        return

    def pair(a, b) -> str:
        return f"{'-' if a is None else fmt(a)} -> {'-' if b is None else fmt(b)}"

    rows = [
        (
            d["name"],
            str(d["channels"]),
            pair(d["mean_shift_before"], d["mean_shift"]),
            pair(d["var_ratio_before"], d["var_ratio"]),
        )
        for d in report.layers
    ]
    _table(
        console,
        f"Recalibrated BatchNorm statistics of {report.model}",
        ("BatchNorm", "ch", "mean_shift before -> after", "var_ratio before -> after"),
        rows,
    )
    for name in report.left:
        _print(console, f"{name}: left (it tracks no running statistics)")
    for warning in report.warnings or []:
        _print(console, f"warning: {warning}")
    if report.accuracy_before is not None:
        _print(
            console,
            f"accuracy on {report.samples} labelled samples: before {report.accuracy_before:.2%}, "
            f"after {report.accuracy_after:.2%}",
        )


# --------------------------------------------------------------------------- progress


@contextmanager
def stage_display(console: Console, show: bool = True) -> Iterator[Callable[[str], None]]:
    """A progress callback for a run: on a terminal (and `show`), a spinner with the stage the
    run is in and the time since it started, on `console` (stderr), gone when the run ends;
    otherwise a callback that shows nothing, so piped output holds only the report."""
    if not (show and console.is_terminal):
        yield lambda _: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=None)
        yield lambda stage: progress.update(task, description=stage)
