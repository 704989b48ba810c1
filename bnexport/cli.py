"""`bnexport` command line: parse, call a run, render. No logic lives here.

Only click is imported at start-up, so `bnexport --help` and `--version` are instant; a
command imports the library (torch, onnx, onnxruntime) when it runs.

Exit codes: 0 exported and verified; 1 exported but verification failed (file kept);
2 bad usage or bad input (nothing written); 130 interrupted (SIGINT) and 143 terminated
(SIGTERM), no file of the run left.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from bnexport.defaults import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL, DEFAULT_SAMPLES
from bnexport.errors import EXIT_BAD_INPUT, BnexportError, Interrupted, summarize_exception
from bnexport.version import __version__

INTERRUPTED_HELP = (
    "130 interrupted (SIGINT, Ctrl-C) or 143 terminated (SIGTERM): no verdict, and no file of "
    "the run is left, not even an output that was complete but not yet verified."
)
EXIT_CODES_HELP = (
    "Exit codes: 0 exported and verified; 1 exported but verification failed (the ONNX file "
    "is kept and the report says so); 2 bad usage or bad input (nothing written); "
    + INTERRUPTED_HELP
)


_VERIFICATION_OPTIONS = ("--static-batch", "--atol", "--rtol", "--samples")


def _loading(fn):
    """The options that load a model and its data (every command)."""
    return _common(fn, verification=False)


def _common(fn, verification: bool = True):
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
            default=None,
            help=f"Absolute tolerance of the verification [default: {DEFAULT_ATOL:g}]. A "
            "float16/bfloat16 model is held by default to its dtype tolerance: the export's "
            "error against the model's float32 twin may be a few times the half-precision "
            "model's own error; giving --atol or --rtol applies atol + rtol x scale instead.",
        ),
        click.option(
            "--rtol",
            type=float,
            default=None,
            help="Tolerance relative to each output's scale (max |output|) "
            f"[default: {DEFAULT_RTOL:g}].",
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
            default=DEFAULT_SAMPLES,
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
    if not verification:
        options = [
            o
            for o in options
            if not any(name in _VERIFICATION_OPTIONS for name in _option_names(o))
        ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _detail(fn, verbose: bool = True):
    """-q/--quiet (the verdict line only) and -v/--verbose (every BN and every layer)."""
    options = [
        click.option(
            "-q",
            "--quiet",
            is_flag=True,
            help="Print only the verdict line (the exit code says the same).",
        )
    ]
    if verbose:
        options.append(
            click.option(
                "-v",
                "--verbose",
                is_flag=True,
                help="Print every BatchNorm and every folded layer, not only the summary, "
                "what was left and the layers closest to their tolerance.",
            )
        )
    for option in reversed(options):
        fn = option(fn)
    return fn


def _detail_level(kw: dict) -> str:
    from bnexport.render import DEFAULT, QUIET, VERBOSE

    quiet, verbose = kw.pop("quiet"), kw.pop("verbose", False)
    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose exclude each other: give one.")
    return QUIET if quiet else VERBOSE if verbose else DEFAULT


def _option_names(decorator) -> list[str]:
    """The flags a click.option decorator declares (applied to a throwaway function)."""

    def probe():
        pass

    decorator(probe)
    return [n for p in probe.__click_params__ for n in p.opts]


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
    help="ONNX opset of the export (default: torch.onnx's own, 20 with torch 2.13; an ONNX "
    "input keeps its own).",
)
@click.option(
    "--save-folded",
    type=click.Path(path_type=Path),
    metavar="PATH.pt2",
    help="Also save the folded torch.export program (the one that was exported).",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Keep the weights in OUT.onnx.data next to OUT.onnx (default: only for models "
    "whose weights exceed 2 GB, which a single ONNX file cannot hold).",
)
@click.option(
    "--recalibrate",
    type=click.Path(path_type=Path),
    metavar="CALIB.npz",
    help="First replace every BN's statistics with those of its input over this data "
    "(as `bnexport recalibrate` does), then fold, export and verify.",
)
@click.option(
    "--duplicate-shared",
    is_flag=True,
    help="For a layer called several times whose calls are followed by different BNs (or "
    "some by none): give each call that folds its own copy of the weights (the report "
    "gives the bytes added). By default such BNs are left, with the size a copy would add.",
)
@click.option(
    "--fp16",
    is_flag=True,
    help="Export float16 weights and compute. Layers whose folded weights or measured "
    "activations would overflow float16 stay float32 (named in the report); verified against "
    "the float32 original.",
)
@click.option(
    "--fp16-io",
    is_flag=True,
    help="With --fp16 (implies it): float16 inputs and outputs too (default: float32).",
)
@_common
@_detail
def fold(
    model,
    output,
    opset,
    save_folded,
    external_data,
    recalibrate,
    duplicate_shared,
    fp16,
    fp16_io,
    **kw,
) -> None:
    """Fold MODEL's BatchNorms, export it to ONNX and verify the export."""
    debug = kw.pop("debug")
    detail = _detail_level(kw)
    opts = _options(
        model=model,
        output=output,
        opset=opset,
        save_folded=save_folded,
        external_data=external_data,
        recalibrate=recalibrate,
        duplicate_shared=duplicate_shared,
        fp16=fp16 or fp16_io,
        fp16_io=fp16_io,
        **kw,
    )
    _run(lambda runs, progress: runs.run_fold(opts, progress), debug, detail)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("onnx_file", metavar="OUT.onnx", type=click.Path(path_type=Path))
@_common
@_detail
def verify(model, onnx_file, **kw) -> None:
    """Check that OUT.onnx computes what MODEL computes in eval mode."""
    debug = kw.pop("debug")
    detail = _detail_level(kw)
    opts = _options(model=model, **kw)
    _run(lambda runs, progress: runs.run_verify(opts, onnx_file, progress), debug, detail)


@main.command(
    epilog="Exit codes: 0 the inspection ran; 2 bad usage or bad input; " + INTERRUPTED_HELP
)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    metavar="DRIFT.png",
    help="Draw the drift of every BN as a PNG (needs --data and matplotlib: bnexport[plot]).",
)
@_loading
@_detail
def inspect(model, plot, **kw) -> None:
    """Show every BatchNorm's statistics, flags and fold decision; with --data, how far the
    running averages are from the data."""
    from bnexport.render import render_inspect

    debug = kw.pop("debug")
    detail = _detail_level(kw)
    opts = _options(model=model, **kw)
    _run(
        lambda runs, progress: runs.run_inspect(opts, plot, progress),
        debug,
        detail,
        render_inspect,
    )


@main.command(
    epilog="Exit codes: 0 recalibrated and written; 2 bad usage or bad input; " + INTERRUPTED_HELP
)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    metavar="OUT.pt2",
    help="Recalibrated program to write (default: MODEL.recalibrated.pt2 next to MODEL).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="Samples per chunk of the pass over the data (default 256).",
)
@_loading
@functools.partial(_detail, verbose=False)
def recalibrate(model, output, batch_size, **kw) -> None:
    """Replace every BN's running statistics with the exact statistics of its input over
    --data, each computed with the BNs upstream already recalibrated."""
    from bnexport.render import render_recalibrate

    debug = kw.pop("debug")
    detail = _detail_level(kw)
    opts = _options(model=model, output=output, **kw)
    _run(
        lambda runs, progress: runs.run_recalibrate(opts, batch_size, progress),
        debug,
        detail,
        render_recalibrate,
    )


def _options(**kw):
    from bnexport.runs import RunOptions

    kw["input_shapes"] = list(kw.pop("input_shapes"))
    return RunOptions(**kw)


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


class _Failure(click.ClickException):
    """A library error at the CLI boundary: one paragraph on stderr, its own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", file=file, err=file is None)


def _run(job, debug: bool, detail: str, render=None) -> None:
    from rich.console import Console

    from bnexport import runs
    from bnexport.interrupts import completed, raise_if_interrupted
    from bnexport.render import QUIET, render_run, stage_display

    render = render or render_run
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with _quiet_libraries(debug), stage_display(err, show=detail != QUIET) as progress:
            report = job(runs, progress)
    except BnexportError as exc:
        raise_if_interrupted()  # an error that a signal caused is the interrupt
        if debug:
            raise
        raise _Failure(str(exc), exc.exit_code) from None
    except Exception as exc:  # noqa: BLE001 - unexpected: one paragraph, traceback with --debug
        raise_if_interrupted()
        if debug:
            raise
        raise _Failure(
            f"unexpected {summarize_exception(exc)}. Run again with --debug for the full "
            "traceback.",
            EXIT_BAD_INPUT,
        ) from None
    completed()  # the run's files are in place: a signal now changes nothing
    render(report, out, detail)
    raise SystemExit(report.exit_code)


def entry() -> None:
    """Console entry point: run the command, flush, and end the process at once.

    SIGINT and SIGTERM raise `Interrupted` while the command runs, so that the run removes what
    it wrote on the way out; the process then ends with 130 or 143 and one line on stderr.

    Interpreter teardown after torch, onnx and onnxruntime have been used takes about a second
    and does nothing for the user: every file has been written, closed and renamed by then.
    """
    from bnexport.interrupts import handling_signals

    with handling_signals():
        code = _main_exit_code()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _main_exit_code() -> int:
    """Run the command line; its exit code (an interrupt's printed as one line)."""
    from bnexport.interrupts import completed

    try:
        try:
            main(prog_name="bnexport")
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            completed()  # from here on a signal changes nothing
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    return code


if __name__ == "__main__":
    entry()
