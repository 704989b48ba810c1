"""Rendering a report for people and files: text (rich tables on a terminal, plain aligned
text when piped) and the JSON file. Each report gives its own JSON form (`to_dict()`); this
module only writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from bnexport.files import write_text_atomic
from bnexport.formatting import fmt, fmt_bytes, plain_table
from bnexport.report import RunReport, VerifyResult

if TYPE_CHECKING:
    from rich.console import Console


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


def render_run(report: RunReport, console: Console) -> None:
    """Print the per-BN table, the ONNX summary and the verification verdict."""
    if report.recalibrated is not None:
        r = report.recalibrated
        console.print(
            f"recalibrated: {len(r['batchnorm'])} BNs on {r['samples']} samples from "
            f"{r['data']} (before folding)",
            markup=False,
        )
    if report.fold is not None:
        _table(
            console,
            f"BatchNorm layers of {report.model}",
            ("BatchNorm", "outcome", "detail"),
            report.fold.rows(),
            fold_wide=True,
        )
        console.print(report.fold.summary(), markup=False)
    for warning in report.warnings:
        console.print(f"warning: {warning}", markup=False)
    if report.onnx is not None:
        o = report.onnx
        verb = "wrote" if report.command == "fold" else "checked"
        data = f" + {', '.join(o.external_data)}" if o.external_data else ""
        console.print(
            f"ONNX: {verb} {o.path}{data} (opset {o.opset}, "
            f"{'dynamic' if o.dynamic_batch else 'static'} batch, "
            f"{o.batchnorm_nodes} BatchNormalization node{'' if o.batchnorm_nodes == 1 else 's'})",
            markup=False,
        )
    if report.float16 is not None:
        for line in float16_lines(report.float16):
            console.print(line, markup=False)
    if report.saved_program is not None:
        console.print(f"folded program: wrote {report.saved_program}", markup=False)
    if report.verify_error:
        console.print(
            f"verify: FAIL - the comparison could not run on the model's inputs: "
            f"{report.verify_error}",
            markup=False,
        )
        return
    v = report.verify
    _table(
        console,
        _verify_title(report),
        _VERIFY_HEADER if v.reference_dtype is None else _HALF_HEADER,
        _verify_rows(v),
    )
    line = samples_line(v)
    if line:
        console.print(line, markup=False)
    if v.accuracy is not None:
        console.print(
            f"accuracy on {v.accuracy.n} labelled samples: original {v.accuracy.reference:.2%}, "
            f"ONNX {v.accuracy.onnx:.2%}; argmax agreement {v.data_argmax_agreement:.2%}",
            markup=False,
        )
    for line in layer_lines(v):
        console.print(line, markup=False)
    verdict = "PASS" if v.passed else "FAIL"
    line = tolerance_line(v)
    if line is not None:
        console.print(line, markup=False)
        tolerance = f"{v.factor:g} x original err + atol {v.atol:g} + rtol {v.rtol:g} x scale"
    else:
        tolerance = f"atol {v.atol:g} + rtol {v.rtol:g} x scale"
    checked = "" if v.verified_file != "float32 twin" else " of the float32 twin"
    console.print(
        f"verify: {verdict} ({v.samples} batch{'es' if v.samples != 1 else ''}, "
        f"batch sizes {sorted(set(v.batch_sizes))}, "
        f"max abs err{checked} {fmt(v.max_abs_err)}, max rel err {fmt(v.max_rel_err)}; "
        f"tolerance {tolerance})",
        markup=False,
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


def render_inspect(report, console: Console) -> None:
    """The per-BN table, the warnings and the verdict line."""
    with_data = report.data is not None
    header = ("BatchNorm", "ch", "s min..max", "flags", "fold")
    if with_data:
        header += ("mean_shift", "var_ratio")
    rows = []
    for b in report.batchnorm:
        s = b.summary.get("scale")
        scale = f"{fmt(s['min'])}..{fmt(s['max'])}" if s else "-"
        row = (b.name, str(b.channels), scale, ", ".join(b.flags) or "-", _fold_cell(b.fold))
        if with_data:
            row += tuple("-" if v is None else fmt(v) for v in (b.mean_shift, b.var_ratio))
        rows.append(row)
    _table(console, f"BatchNorm statistics of {report.model}", header, rows, fold_wide=True)
    for b in report.batchnorm:
        for note in b.notes:
            console.print(f"{b.name}: {note}", markup=False)
    if with_data:
        console.print(
            f"drift measured on {report.data_size} samples from {report.data} (model in eval "
            "mode, float64)",
            markup=False,
        )
    for warning in report.warnings:
        console.print(f"warning: {warning}", markup=False)
    console.print(f"verdict: {report.verdict}", markup=False)


# --------------------------------------------------------------------------- recalibrate


def render_recalibrate(report, console: Console) -> None:
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
        console.print(f"{name}: left (it tracks no running statistics)", markup=False)
    for warning in report.warnings or []:
        console.print(f"warning: {warning}", markup=False)
    if report.accuracy_before is not None:
        console.print(
            f"accuracy on {report.samples} labelled samples: before {report.accuracy_before:.2%}, "
            f"after {report.accuracy_after:.2%}",
            markup=False,
        )
    console.print(
        f"recalibrate: wrote {report.output} ({len(report.layers)} BNs, {report.samples} "
        f"samples in {report.batches} batches)",
        markup=False,
    )
