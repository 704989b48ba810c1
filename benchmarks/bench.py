"""Side-by-side benchmarks of bnexport against the field's tools, reported as ratios.

    python benchmarks/bench.py               # full run (with the scale run), writes results.md
    python benchmarks/bench.py --no-scale    # full run without the 2.2 GB scale run
    python benchmarks/bench.py --quick       # small models, one repetition (smoke test)
    python benchmarks/bench.py --scale-only  # only the 2.2 GB scale run

The field of every export comparison is plain `torch.onnx.export` of the same saved
torch.export program (benchmarks/plain_export.py). Whole-process rows run `python -m bnexport
fold` and that script as processes of their own, alternating, and report the median wall
time; in-process rows alternate both sides in this process. Peak RSS is measured by a fresh
wrapper process around each command. Jobs run one at a time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.nets import reference_models  # noqa: E402
from benchmarks.timing import ort_session  # noqa: E402
from bnexport import fold  # noqa: E402
from bnexport.export import count_batchnorm_nodes  # noqa: E402
from bnexport.folding.torch_engine import fold_program  # noqa: E402
from bnexport.verify import OnnxRunner  # noqa: E402

# Every metric a quick run reports (each row's metric starts with one of these).
METRICS = (
    "fold time (s)",
    "fold cost beyond trace (share of trace)",
    "end to end, whole process (s)",
    "precision: max err vs float64",
    "precision: ours vs plain ONNX in ORT",
    "BatchNormalization nodes",
    "ORT latency",
    "peak RSS (MB)",
)

PLAIN_EXPORT = ROOT / "benchmarks" / "plain_export.py"
SCALE_NAME = "scale_2.2GB"
SCALE_FEATURES = 23500  # Linear(23500, 23500): 2.2 GB of float32 weights


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(a, b, reps: int) -> tuple[float, float]:
    """Median seconds of `a` and `b`, run alternately `reps` times each."""
    ta, tb = [], []
    for _ in range(reps):
        ta.append(_time(a))
        tb.append(_time(b))
    return statistics.median(ta), statistics.median(tb)


def _dyn(args):
    return tuple({0: torch.export.Dim.AUTO} for _ in args)


def bnexport_cmd(ckpt: Path, out: Path, *flags: str) -> list[str]:
    """The product: `bnexport fold` as a process of its own, default flags unless given."""
    return [sys.executable, "-m", "bnexport", "fold", str(ckpt), "-o", str(out), *flags]


def plain_cmd(ckpt: Path, out: Path) -> list[str]:
    """The field: plain torch.onnx.export of the same saved program, in a process of its own."""
    return [sys.executable, str(PLAIN_EXPORT), str(ckpt), str(out)]


def run_process(cmd: list[str]) -> None:
    """Run `cmd` to completion; raise if it does not exit 0."""
    proc = subprocess.run(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"exit code {proc.returncode} from: {' '.join(cmd)}\n{proc.stderr[-3000:]}"
        )


@dataclass
class ProcessRun:
    code: int
    seconds: float
    peak_mb: float
    stderr: str


_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "seconds = time.perf_counter() - start\n"
    "print(code, seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def measure_process(cmd: list[str]) -> ProcessRun:
    """Exit code, wall time and peak RSS of `cmd`, measured by a fresh wrapper process."""
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, check=True, cwd=ROOT
    )
    code, seconds, peak_kb = out.stdout.strip().splitlines()[-1].split()
    return ProcessRun(int(code), float(seconds), int(peak_kb) / 1024, out.stderr)


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of `cmd` (which must exit 0), measured by a fresh wrapper process."""
    run = measure_process(cmd)
    if run.code != 0:
        raise RuntimeError(f"exit code {run.code} from: {' '.join(cmd)}\n{run.stderr[-3000:]}")
    return run.peak_mb


def trace_and_fold(model, args, reps: int) -> tuple[float, float]:
    """Median seconds of tracing `model` and of folding the traced program in place.

    Each repetition traces a fresh copy of the model (untimed copy): the in-place fold writes
    into the program's weight tensors, which are the traced model's own parameters.
    """
    traces, folds = [], []
    for _ in range(reps):
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        program = torch.export.export(fresh, args, dynamic_shapes=_dyn(args))
        traces.append(time.perf_counter() - start)
        start = time.perf_counter()
        fold_program(program, copy_graph=False, in_place=True)
        folds.append(time.perf_counter() - start)
        del program, fresh
    return statistics.median(traces), statistics.median(folds)


def latency(path_a: Path, path_b: Path, x: np.ndarray, optimize: bool, budget: float):
    """Median latency of two ONNX files on the same input, alternating single runs."""
    sa, sb = ort_session(path_a, optimize), ort_session(path_b, optimize)
    feed_a = {sa.get_inputs()[0].name: x}
    feed_b = {sb.get_inputs()[0].name: x}
    for s, f in ((sa, feed_a), (sb, feed_b)):
        s.run(None, f)
    ta, tb, start = [], [], time.perf_counter()
    while len(ta) < 5 or (time.perf_counter() - start < budget and len(ta) < 200):
        ta.append(_time(lambda: sa.run(None, feed_a)))
        tb.append(_time(lambda: sb.run(None, feed_b)))
    return statistics.median(ta), statistics.median(tb)


def precision(model, onnx_path: Path, shape: tuple, seeds=(0, 1, 2)) -> tuple[float, float]:
    """(max error of the ONNX file, max error of float32 PyTorch), both against float64."""
    model64 = copy.deepcopy(model).double()
    runner = OnnxRunner(str(onnx_path))
    ours = floor = 0.0
    for seed in seeds:
        x = torch.randn((4, *shape), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = model64(x.double()).numpy()
            f32 = model(x).double().numpy()
        got = runner(x)[0].astype(np.float64)
        ours = max(ours, float(np.abs(got - ref).max()))
        floor = max(floor, float(np.abs(f32 - ref).max()))
    return ours, floor


def _fmt(x) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    return f"{x:.3g}"


def bench_model(name, model, shape, reps: int, quick: bool, work: Path) -> list[tuple]:
    rows = []
    args = (torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)),)
    large = 224 in shape  # resnet50, mobilenet_v2: the whole-process target applies

    # 1. fold time: ours vs torch.fx fuse (information only)
    from torch.fx.experimental.optimization import fuse

    try:
        fuse(copy.deepcopy(model))
        fuse_ok = True
    except Exception as exc:  # noqa: BLE001
        fuse_ok, fuse_reason = False, f"fuse fails: {type(exc).__name__}"
    if fuse_ok:
        ours, theirs = alternate(lambda: fold(model, args), lambda: fuse(model), reps)
        rows.append((name, "fold time (s)", ours, theirs, ours / theirs, "info"))
    else:
        ours = statistics.median(_time(lambda: fold(model, args)) for _ in range(reps))
        rows.append((name, "fold time (s)", ours, fuse_reason, "n/a", "info"))

    # 2. the fold's own cost (in place, on the traced program) as a share of the trace
    trace_s, fold_s = trace_and_fold(model, args, reps)
    rows.append(
        (
            name,
            "fold cost beyond trace (share of trace)",
            fold_s,
            trace_s,
            fold_s / trace_s,
            "<= 0.1",
        )
    )

    # 3. end to end, whole process: the CLI against plain export of the same saved program
    ckpt = work / f"{name}.pt2"
    torch.export.save(torch.export.export(model, args, dynamic_shapes=_dyn(args)), str(ckpt))
    ours_onnx, plain_onnx = work / f"{name}.ours.onnx", work / f"{name}.plain.onnx"
    ours_cmd = bnexport_cmd(ckpt, ours_onnx, "--samples", "4")
    field_cmd = plain_cmd(ckpt, plain_onnx)
    if quick:  # one run of each process gives both its time and its peak RSS
        runs = [measure_process(ours_cmd), measure_process(field_cmd)]
        for cmd, run in zip((ours_cmd, field_cmd), runs):
            if run.code != 0:
                raise RuntimeError(
                    f"exit code {run.code} from: {' '.join(cmd)}\n{run.stderr[-3000:]}"
                )
        ours, theirs = runs[0].seconds, runs[1].seconds
    else:
        ours, theirs = alternate(
            lambda: run_process(ours_cmd), lambda: run_process(field_cmd), reps
        )
    rows.append(
        (
            name,
            "end to end, whole process (s)",
            ours,
            theirs,
            ours / theirs,
            "<= 1.0" if large else "info",
        )
    )

    # 4. precision against the float32 floor (and, for context, the unfolded ONNX file)
    err, floor = precision(model, ours_onnx, shape)
    rows.append(
        (
            name,
            "precision: max err vs float64",
            err,
            floor,
            err / floor if floor else float("nan"),
            "<= 1.0",
        )
    )
    plain_err, _ = precision(model, plain_onnx, shape)
    rows.append(
        (
            name,
            "precision: ours vs plain ONNX in ORT",
            err,
            plain_err,
            err / plain_err if plain_err else float("nan"),
            "info",
        )
    )

    # 5. BatchNormalization nodes
    bn_ours = count_batchnorm_nodes(onnx.load(str(ours_onnx)))
    bn_plain = count_batchnorm_nodes(onnx.load(str(plain_onnx)))
    rows.append(
        (
            name,
            "BatchNormalization nodes",
            bn_ours,
            bn_plain,
            "fewer" if bn_ours < bn_plain else "same" if bn_ours == bn_plain else "MORE",
            "never more",
        )
    )

    # 6. onnxruntime latency
    budget = 0.3 if quick else 6.0
    for batch in (1, 16):
        x = np.random.default_rng(batch).normal(size=(batch, *shape)).astype(np.float32)
        for optimize in (False, True):
            a, b = latency(ours_onnx, plain_onnx, x, optimize, budget)
            if optimize:
                target = "<= 1.02"
            else:
                target = "< 1.0" if bn_ours < bn_plain else "n/a (no BN only we fold)"
            label = f"ORT latency b{batch} opt {'all' if optimize else 'off'} (ms)"
            rows.append((name, label, a * 1e3, b * 1e3, a / b, target))

    # 7. peak RSS of the same two commands
    ours_mb, plain_mb = ([runs[0].peak_mb], [runs[1].peak_mb]) if quick else ([], [])
    for _ in range(0 if quick else 2):
        ours_mb.append(peak_rss_mb(ours_cmd))
        plain_mb.append(peak_rss_mb(field_cmd))
    a, b = statistics.median(ours_mb), statistics.median(plain_mb)
    rows.append((name, "peak RSS (MB)", a, b, a / b, "<= 1.5"))
    return rows


def scale_model(features: int = SCALE_FEATURES) -> nn.Module:
    """Linear-BN1d-ReLU-Linear with 2.2 GB of weights and seeded random BN statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(features, features), nn.BatchNorm1d(features), nn.ReLU(), nn.Linear(features, 10)
    )
    gen = torch.Generator().manual_seed(0)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.1, generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0.0, 0.1, generator=gen)
    return model.eval()


def _remove_onnx(path: Path) -> None:
    """Delete an ONNX file and its external data (`path.data`, or any other companion)."""
    for p in [path, *path.parent.glob(path.name + "*")]:
        p.unlink(missing_ok=True)


def _ort_runs(path: Path, features: int) -> bool:
    """Whether onnxruntime loads `path` and runs one batch on it."""
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).normal(size=(2, features)).astype(np.float32)
        out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        return out.shape == (2, 10) and bool(np.isfinite(out).all())
    except Exception as exc:  # noqa: BLE001 - a file that does not load is the answer "no"
        print(f"onnxruntime cannot run {path}: {exc}", file=sys.stderr)
        return False


def _wait_until_quiet(limit: float = 120.0) -> None:
    """Wait (up to `limit` s) until the machine's CPUs are mostly idle before a measurement."""
    start = time.perf_counter()
    while psutil.cpu_percent(interval=1.0) > 30.0:
        if time.perf_counter() - start > limit:
            print("warning: the machine is busy; the scale run is measured anyway", file=sys.stderr)
            return


def bench_scale(work: Path) -> list[tuple]:
    """One run each of the CLI and plain export on a 2.2 GB checkpoint: time, peak RSS, result.

    Only the measured process runs meanwhile: this process has freed the model and program,
    and the onnxruntime check of the result runs after the measurement, before the next one.
    """
    n = SCALE_FEATURES
    ckpt = work / "scale.pt2"
    print(f"{SCALE_NAME}: building and saving the checkpoint ...", file=sys.stderr, flush=True)
    model = scale_model(n)
    example = (torch.randn((2, n), generator=torch.Generator().manual_seed(0)),)
    program = torch.export.export(model, example, dynamic_shapes=_dyn(example))
    torch.export.save(program, str(ckpt))
    del program, model, example
    gc.collect()

    ours_onnx, plain_onnx = work / "scale.ours.onnx", work / "scale.plain.onnx"
    report = work / "scale.report.json"
    ours_cmd = bnexport_cmd(ckpt, ours_onnx, "--json", str(report))
    print(f"{SCALE_NAME}: bnexport fold ...", file=sys.stderr, flush=True)
    _wait_until_quiet()
    ours = measure_process(ours_cmd)
    if ours.code != 0:
        print(f"bnexport fold exited with {ours.code}:\n{ours.stderr[-3000:]}", file=sys.stderr)
    passed = json.loads(report.read_text())["verify"]["passed"] if report.is_file() else None
    verdict = {True: "passed", False: "failed", None: "no report"}[passed]
    loads = ours_onnx.is_file() and _ort_runs(ours_onnx, n)
    _remove_onnx(ours_onnx)
    gc.collect()

    print(f"{SCALE_NAME}: plain export ...", file=sys.stderr, flush=True)
    _wait_until_quiet()
    plain = measure_process(plain_cmd(ckpt, plain_onnx))
    _remove_onnx(plain_onnx)
    if plain.code != 0:
        raise RuntimeError(f"plain export exited with {plain.code}:\n{plain.stderr[-3000:]}")
    ckpt.unlink()

    return [
        (
            SCALE_NAME,
            "end to end, whole process (s)",
            ours.seconds,
            plain.seconds,
            ours.seconds / plain.seconds,
            "info",
        ),
        (
            SCALE_NAME,
            "peak RSS (MB)",
            ours.peak_mb,
            plain.peak_mb,
            ours.peak_mb / plain.peak_mb,
            "<= 1.5",
        ),
        (
            SCALE_NAME,
            "exit code / verify / ORT loads",
            f"{ours.code} / {verdict} / {'yes' if loads else 'no'}",
            "-",
            "-",
            "info",
        ),
    ]


def _met(ratio, target: str) -> str:
    if target == "info":
        return ""
    if isinstance(ratio, str):
        return {"fewer": "yes", "same": "yes", "MORE": "no"}.get(ratio, "n/a")
    if target.startswith("<="):
        return "yes" if ratio <= float(target.split()[1]) else "no"
    if target.startswith("< 1.0"):
        return "yes" if ratio < 1.0 else "no"
    return "n/a"


def render(rows: list[tuple], header: str) -> str:
    lines = [
        header,
        "",
        "| model | metric | bnexport | field | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, metric, ours, theirs, ratio, target in rows:
        lines.append(
            f"| {name} | {metric} | {_fmt(ours)} | {_fmt(theirs)} | {_fmt(ratio)} | "
            f"{target} | {_met(ratio, target)} |"
        )
    return "\n".join(lines) + "\n"


def machine_header(mode: str, cmd: str) -> str:
    mem = psutil.virtual_memory().total / 2**30
    return "\n".join(
        [
            f"Benchmark run {datetime.date.today().isoformat()} ({mode}): `{cmd}`",
            "",
            f"Machine: {os.cpu_count()} cores, {mem:.0f} GiB, {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}, onnx {onnx.__version__}. ",
            "Field: plain `torch.onnx.export(program, (), dynamo=True)` of the same saved "
            "torch.export program, unfolded (`benchmarks/plain_export.py`), for every export "
            "comparison; `torch.export.export` for the fold cost beyond trace; "
            "`torch.fx.experimental.optimization.fuse` for fold time (information). "
            "Whole process: `python -m bnexport fold CKPT -o OUT --samples 4` against "
            "`python benchmarks/plain_export.py CKPT OUT`, alternating, median; the scale run "
            "(`bnexport fold CKPT -o OUT --json R.json`) runs each once. Peak RSS: the same "
            "commands under a wrapper process. Latency: onnxruntime CPU, 1 thread, median of "
            "alternating runs.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, one repetition")
    parser.add_argument(
        "--scale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the 2.2 GB scale run (default: part of a full run, never of --quick)",
    )
    parser.add_argument("--scale-only", action="store_true", help="only the 2.2 GB scale run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("--reps", type=int, default=None)
    opts = parser.parse_args(argv)
    if opts.quick and (opts.scale or opts.scale_only):
        parser.error("the scale run is never part of --quick")
    if opts.scale_only and opts.scale is False:
        parser.error("--scale-only contradicts --no-scale")
    scale = opts.scale_only or (not opts.quick if opts.scale is None else opts.scale)
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    reps = opts.reps or (1 if opts.quick else 5)
    rows: list[tuple] = []
    if not opts.scale_only:
        with tempfile.TemporaryDirectory() as tmp:
            for name, model, shape in reference_models(opts.quick):
                print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
                rows += bench_model(name, model, shape, reps, opts.quick, Path(tmp))
    if scale:
        gc.collect()
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_scale(Path(tmp))
    mode = "scale only" if opts.scale_only else "quick" if opts.quick else "full"
    flags = " --scale-only" if opts.scale_only else " --quick" if opts.quick else ""
    if not opts.scale_only and not opts.quick and not scale:
        flags = " --no-scale"
    if opts.reps:
        flags += f" --reps {opts.reps}"
    table = render(rows, machine_header(mode, "python benchmarks/bench.py" + flags))
    opts.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
