"""Side-by-side benchmarks of bnexport against the field's folding, reported as ratios.

    python benchmarks/bench.py            # full run, writes benchmarks/results.md
    python benchmarks/bench.py --quick    # small models, one repetition (smoke test)

Both sides of each comparison run in the same process, alternating, and the median of the
repetitions is reported.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.nets import reference_models  # noqa: E402
from bnexport import fold  # noqa: E402
from bnexport.export import count_batchnorm_nodes  # noqa: E402
from bnexport.runs import RunOptions, run_fold  # noqa: E402
from bnexport.verify import OnnxRunner  # noqa: E402

METRICS = (
    "fold time",
    "end to end",
    "precision vs float32 floor",
    "BatchNormalization nodes",
    "ORT latency",
    "peak RSS",
)


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


def plain_export(model, args, path: Path) -> None:
    program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=_dyn(args), verbose=False)
    program.save(str(path))


def _session(path: Path, optimize: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency(path_a: Path, path_b: Path, x: np.ndarray, optimize: bool, budget: float):
    """Median latency of two ONNX files on the same input, alternating single runs."""
    sa, sb = _session(path_a, optimize), _session(path_b, optimize)
    feed_a = {sa.get_inputs()[0].name: x}
    feed_b = {sb.get_inputs()[0].name: x}
    for s, f in ((sa, feed_a), (sb, feed_b)):
        s.run(None, f)
    ta, tb, start = [], [], time.perf_counter()
    while len(ta) < 5 or (time.perf_counter() - start < budget and len(ta) < 200):
        ta.append(_time(lambda: sa.run(None, feed_a)))
        tb.append(_time(lambda: sb.run(None, feed_b)))
    return statistics.median(ta), statistics.median(tb)


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of a child process, measured by a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


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

    # 1. fold time: ours vs torch.fx fuse
    from torch.fx.experimental.optimization import fuse

    try:
        fuse(copy.deepcopy(model))
        fuse_ok = True
    except Exception as exc:  # noqa: BLE001
        fuse_ok, fuse_reason = False, f"fuse fails: {type(exc).__name__}"
    if fuse_ok:
        ours, theirs = alternate(lambda: fold(model, args), lambda: fuse(model), reps)
        rows.append((name, "fold time (s)", ours, theirs, ours / theirs, "<= 0.5"))
    else:
        ours = statistics.median(_time(lambda: fold(model, args)) for _ in range(reps))
        rows.append((name, "fold time (s)", ours, fuse_reason, "n/a", "<= 0.5"))

    # 2. end to end
    ckpt = work / f"{name}.pt2"
    torch.export.save(torch.export.export(model, args, dynamic_shapes=_dyn(args)), str(ckpt))
    ours_onnx, plain_onnx = work / f"{name}.ours.onnx", work / f"{name}.plain.onnx"
    opts = RunOptions(model=ckpt, output=ours_onnx, samples=2)
    e2e_reps = max(1, min(reps, 3))
    ours, theirs = alternate(
        lambda: run_fold(opts), lambda: plain_export(model, args, plain_onnx), e2e_reps
    )
    rows.append((name, "end to end (s)", ours, theirs, ours / theirs, "<= 1.25"))

    # 3. precision against the float32 floor (and, for context, the unfolded ONNX file)
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

    # 4. BatchNormalization nodes
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

    # 5. onnxruntime latency
    budget = 1.0 if quick else 6.0
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

    # 6. peak RSS
    rss_reps = 1 if quick else 2
    ours_mb, plain_mb = [], []
    for _ in range(rss_reps):
        ours_mb.append(
            peak_rss_mb(
                [
                    sys.executable,
                    "-m",
                    "bnexport",
                    "fold",
                    str(ckpt),
                    "-o",
                    str(work / "rss.onnx"),
                    "--samples",
                    "2",
                ]
            )
        )
        plain_mb.append(
            peak_rss_mb(
                [
                    sys.executable,
                    str(ROOT / "benchmarks" / "plain_export.py"),
                    str(ckpt),
                    str(work / "rss_plain.onnx"),
                ]
            )
        )
    a, b = statistics.median(ours_mb), statistics.median(plain_mb)
    rows.append((name, "peak RSS (MB)", a, b, a / b, "<= 1.5"))
    return rows


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


def machine_header(quick: bool) -> str:
    mem = psutil.virtual_memory().total / 2**30
    cmd = "python benchmarks/bench.py" + (" --quick" if quick else "")
    return "\n".join(
        [
            f"Benchmark run {datetime.date.today().isoformat()} ({'quick' if quick else 'full'}): "
            f"`{cmd}`",
            "",
            f"Machine: {os.cpu_count()} cores, {mem:.0f} GiB, {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}, onnx {onnx.__version__}. ",
            "Field: `torch.fx.experimental.optimization.fuse` (fold time) and plain "
            "`torch.onnx.export(dynamo=True)` of the unfolded model (everything else). Latency: "
            "onnxruntime CPU, 1 thread, median of alternating runs.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, one repetition")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("--reps", type=int, default=None)
    opts = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    reps = opts.reps or (1 if opts.quick else 5)
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, shape in reference_models(opts.quick):
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows += bench_model(name, model, shape, reps, opts.quick, Path(tmp))
    table = render(rows, machine_header(opts.quick))
    opts.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
