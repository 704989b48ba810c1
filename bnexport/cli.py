"""`bnexport` command line: parse, call the pipeline, render. No logic lives here.

Exit codes: 0 exported and verified; 1 exported but verification failed (file kept);
2 bad usage or bad input (nothing written).
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bnexport import __version__
from bnexport.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY_FAILED, BnexportError
from bnexport.export import DEFAULT_OPSET
from bnexport.pipeline import RunOptions, RunReport, run_fold, run_verify
from bnexport.verify import DEFAULT_ATOL, DEFAULT_RTOL

EXIT_CODES_HELP = (
    "Exit codes: 0 exported and verified; 1 exported but verification failed (the ONNX file "
    "is kept and the report says so); 2 bad usage or bad input (nothing written)."
)


def _common(fn):
    options = [
        click.option(
            "--input-shape",
            "input_shapes",
            multiple=True,
            metavar="N,C,H,W",
            help="Shape of one forward input, batch first; repeat for several inputs. "
            "Optional when the checkpoint records its inputs (.pt2).",
        ),
        click.option(
            "--arch",
            metavar="MODULE:CALLABLE",
            help="Callable that builds the architecture for a state_dict checkpoint, "
            "e.g. mypkg.nets:resnet50 or nets.py:build.",
        ),
        click.option(
            "--static-batch", is_flag=True, help="Keep the batch axis fixed (default: dynamic)."
        ),
        click.option(
            "--atol",
            type=float,
            default=DEFAULT_ATOL,
            show_default=True,
            help="Absolute tolerance of the verification.",
        ),
        click.option(
            "--rtol",
            type=float,
            default=DEFAULT_RTOL,
            show_default=True,
            help="Tolerance relative to each output's scale (max |output|).",
        ),
        click.option(
            "--data",
            type=click.Path(path_type=Path),
            metavar="INPUTS.npz",
            help="Your own inputs: arrays named after the forward inputs, plus an "
            "optional 'labels' array for accuracy.",
        ),
        click.option(
            "--samples",
            type=click.IntRange(1, 1000),
            default=4,
            show_default=True,
            help="Number of seeded random input batches to verify on.",
        ),
        click.option(
            "--json",
            "json_path",
            type=click.Path(path_type=Path),
            metavar="REPORT.json",
            help="Write a machine-readable report.",
        ),
        click.option(
            "--trust-pickle",
            is_flag=True,
            help="Allow loading a whole pickled nn.Module (runs code from the file).",
        ),
        click.option("--debug", is_flag=True, help="Show full tracebacks on errors."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="bnexport")
def main() -> None:
    """Fold BatchNorm into neighbouring layers, export to ONNX, verify with onnxruntime."""


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    metavar="OUT.onnx",
    help="Output file (default: MODEL's name with .onnx, next to it).",
)
@click.option(
    "--opset",
    type=click.IntRange(13, 25),
    default=DEFAULT_OPSET,
    show_default=True,
    help="ONNX opset version.",
)
@click.option(
    "--save-folded",
    type=click.Path(path_type=Path),
    metavar="PATH.pt2",
    help="Also save the folded model as a torch.export program.",
)
@_common
def fold(model, output, opset, save_folded, **kw) -> None:
    """Fold MODEL's BatchNorms, export it to ONNX and verify the export."""
    debug = kw.pop("debug")
    opts = RunOptions(
        model=model,
        output=output,
        opset=opset,
        save_folded=save_folded,
        input_shapes=list(kw.pop("input_shapes")),
        **kw,
    )
    _run(lambda progress: run_fold(opts, progress), debug)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("onnx_file", metavar="OUT.onnx", type=click.Path(path_type=Path))
@_common
def verify(model, onnx_file, **kw) -> None:
    """Check that OUT.onnx computes what MODEL computes in eval mode."""
    debug = kw.pop("debug")
    opts = RunOptions(model=model, input_shapes=list(kw.pop("input_shapes")), **kw)
    _run(lambda progress: run_verify(opts, onnx_file, progress), debug)


@contextmanager
def _quiet_libraries(debug: bool):
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


def _run(job, debug: bool) -> None:
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    interactive = out.is_terminal
    try:
        with _quiet_libraries(debug):
            if interactive:
                with err.status("working") as status:
                    report = job(lambda msg: status.update(msg))
            else:
                report = job(lambda msg: None)
    except BnexportError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - unexpected: one paragraph, traceback with --debug
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        err.print(
            f"error: unexpected {type(exc).__name__}: {first}. Run again with --debug for the "
            "full traceback.",
            markup=False,
        )
        sys.exit(EXIT_BAD_INPUT)
    render(report, out)
    sys.exit(EXIT_OK if report.passed else EXIT_VERIFY_FAILED)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def render(report: RunReport, console: Console) -> None:
    """Print the per-BN table, the ONNX summary and the verification verdict."""
    if report.fold is not None:
        table = Table(title=f"BatchNorm layers of {report.model}", title_justify="left")
        for col in ("BatchNorm", "outcome", "detail"):
            table.add_column(col, overflow="fold")
        for name, _, outcome, detail in report.fold.rows():
            table.add_row(name, outcome, detail)
        console.print(table)
        left = sum(d.status == "left" for d in report.fold.decisions)
        called = left + len(report.fold.folded)
        console.print(
            f"BatchNorm: {called} before, {left} after ({len(report.fold.folded)} folded)"
        )
    for warning in report.warnings:
        console.print(f"warning: {warning}", markup=False)
    if report.onnx is not None:
        verb = "wrote" if report.fold is not None else "checked"
        console.print(
            f"ONNX: {verb} {report.onnx.path} (opset {report.onnx.opset}, "
            f"{'dynamic' if report.onnx.dynamic_batch else 'static'} batch, "
            f"{report.onnx.batchnorm_nodes} BatchNormalization "
            f"node{'' if report.onnx.batchnorm_nodes == 1 else 's'})",
            markup=False,
        )
    if report.verify_error:
        console.print(
            f"verify: FAIL - the comparison could not run on the model's inputs: "
            f"{report.verify_error}",
            markup=False,
        )
        return
    v = report.verify
    table = Table(title="Verification (onnxruntime vs eval-mode PyTorch)", title_justify="left")
    for col in ("output", "max abs err", "max rel err", "scale", "argmax agree"):
        table.add_column(col)
    for o in v.outputs:
        agree = "-" if o.argmax_agreement is None else f"{o.argmax_agreement:.2%}"
        table.add_row(o.name, _fmt(o.max_abs_err), _fmt(o.max_rel_err), _fmt(o.scale), agree)
    console.print(table)
    if v.data is not None:
        console.print(f"verified on {v.data_size} samples from {v.data} and on random inputs")
    if v.accuracy is not None:
        console.print(
            f"accuracy on {v.accuracy.n} labelled samples: original {v.accuracy.reference:.2%}, "
            f"ONNX {v.accuracy.onnx:.2%}; argmax agreement {v.data_argmax_agreement:.2%}"
        )
    verdict = "PASS" if v.passed else "FAIL"
    console.print(
        f"verify: {verdict} ({v.samples} batch{'es' if v.samples != 1 else ''}, "
        f"batch sizes {sorted(set(v.batch_sizes))}, "
        f"max abs err {_fmt(v.max_abs_err)}, max rel err {_fmt(v.max_rel_err)}; "
        f"tolerance atol {v.atol:g} + rtol {v.rtol:g} x scale)"
    )


if __name__ == "__main__":
    main()
