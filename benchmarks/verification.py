"""Verification on deep networks: false alarms, the float32 factors, the smallest defect caught,
and what the checks cost.

    python benchmarks/verification.py [--quick] [--out benchmarks/results_verification.md]

For each deep network of benchmarks/deep_nets.py (saved with torch.export, dynamic batch):

* false alarms: `bnexport fold` of the correct fold under the fixed rule (atol 1e-6 + rtol
  1e-5 x scale, end to end; what bnexport used to apply) and under the default rule (the
  float64 noise floor when the fixed rule is missed, and every folded layer where it is);
* the float32 factor: on bnexport's own verification batches, the export's error against the
  model run in float64 over the float32 model's own error against it (FLOAT32_ERROR_FACTOR
  must exceed this on every correct fold);
* the ONNX factor: the same network exported without folding (`torch.onnx.export(...,
  optimize=False)`) and folded by the ONNX engine: the folded file's error against the
  original file over how far the original moves when every weight is moved by one float32
  unit in the last place (ONNX_FLOAT32_FACTOR must exceed it);
* the smallest defect caught: one output channel of a folded layer in the middle of the network
  scaled by 1 + d in the written file, `bnexport verify` run on it, for d from 1e-2 down;
* the per-layer check's largest error on correct folds, against LAYER_RTOL;
* verification time: `run_verify` of the correct file, in this process.

Full mode also times whole processes, `python -m bnexport fold CKPT -o OUT` against
`python benchmarks/plain_export.py CKPT OUT` (alternating, median of 3), for ResNet-50 and
MobileNetV2 at 224 px.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from benchmarks.deep_nets import deep_models  # noqa: E402
from bnexport.defaults import FLOAT32_ERROR_FACTOR, LAYER_RTOL, ONNX_FLOAT32_FACTOR  # noqa: E402
from bnexport.input_profile import program_profile  # noqa: E402
from bnexport.inputs import verification_batches  # noqa: E402
from bnexport.onnx_runtime import OnnxRunner, one_ulp_twin_runner  # noqa: E402
from bnexport.outputs import as_numpy_batch, as_outputs  # noqa: E402
from bnexport.runs import RunOptions, run_fold, run_verify  # noqa: E402
from bnexport.source import float64_twin, program_input_specs  # noqa: E402
from models.unfolded import export_unfolded  # noqa: E402

DEFECTS = (1e-2, 1e-3, 3e-4, 1e-4, 3e-5)


def _max_err(a: list, b: list) -> float:
    return max(
        float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
        for pa, pb in zip(a, b)
        for x, y in zip(as_outputs(pa).arrays, as_outputs(pb).arrays)
    )


def float32_factor(program, onnx_path: Path) -> tuple[float, float, float]:
    """(export error, own error, ratio), both against the float64 twin, on the batches a
    default `bnexport fold` verifies on."""
    profile = program_profile(program)
    specs = program_input_specs(program)
    batches = verification_batches(
        specs,
        dynamic=True,
        samples=4,
        sizes=(1, 4, profile.batch_size()),
        moments=profile.moments,
    )
    module = program.module()
    with torch.inference_mode():
        f32 = [module(*b) for b in batches]
        f64 = [float64_twin(module)(*b) for b in batches]
    runner = OnnxRunner(str(onnx_path))
    ours = [runner(*as_numpy_batch(b)) for b in batches]
    export_err, own_err = _max_err(ours, f64), _max_err(f32, f64)
    return export_err, own_err, export_err / own_err if own_err else float("nan")


def onnx_factor(unfolded: Path, folded: Path, specs, seed: int = 0) -> tuple[float, float, float]:
    """(folded file vs original, original with each weight moved by one unit in the last place
    vs original, ratio)."""
    batches = [
        tuple(
            np.random.default_rng(seed + i).standard_normal((n, *s.shape[1:])).astype(np.float32)
            for s in specs
        )
        for i, n in enumerate((1, 8, 8, 8))
    ]
    plain = OnnxRunner(str(unfolded), optimize=False)
    moved = one_ulp_twin_runner(str(unfolded))
    ours = OnnxRunner(str(folded), optimize=False)
    ref = [plain(*b) for b in batches]
    export_err = _max_err([ours(*b) for b in batches], ref)
    own_err = _max_err([moved(*b) for b in batches], ref)
    return export_err, own_err, export_err / own_err if own_err else float("nan")


def inject(onnx_path: Path, weight: str, channel: int, d: float, out: Path) -> bool:
    model = onnx.load(str(onnx_path))
    for t in model.graph.initializer:
        if t.name == weight:
            a = numpy_helper.to_array(t).astype(np.float32).copy()
            a[channel] *= 1 + d
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            onnx.save(model, str(out))
            return True
    return False


def smallest_defect(pt2: Path, onnx_path: Path, report, work: Path) -> tuple[str, str, float]:
    """(layer, named layer, smallest d caught) for a folded layer in the middle."""
    folded = [d for d in report.fold.folded if d.direction == "preceding"]
    target = folded[len(folded) // 2]
    weight = f"{target.into}.weight"
    caught, named = float("nan"), "-"
    for d in DEFECTS:
        bad = work / "defect.onnx"
        if not inject(onnx_path, weight, 0, d, bad):
            return target.into, "weight not found", caught
        result = run_verify(RunOptions(model=pt2), bad)
        if result.passed:
            break
        caught = d
        first = result.verify.first_failed_layer if result.verify else None
        named = first.name if first else "(outputs only)"
    return target.into, named, caught


def bench_model(name, model, shape, work: Path) -> dict:
    x = torch.randn(2, *shape)
    program = torch.export.export(
        model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},)
    )
    pt2, out = work / f"{name}.pt2", work / f"{name}.onnx"
    torch.export.save(program, str(pt2))
    fixed = run_fold(RunOptions(model=pt2, output=out, atol=1e-6, rtol=1e-5))
    start = time.perf_counter()
    default = run_fold(RunOptions(model=pt2, output=out))
    fold_s = time.perf_counter() - start
    start = time.perf_counter()
    verified = run_verify(RunOptions(model=pt2), out)
    verify_s = time.perf_counter() - start
    v = default.verify
    row = {
        "model": name,
        "folded": f"{len(default.fold.folded)}/{default.fold.total}",
        "fixed rule": "PASS" if fixed.verify.outputs_passed else "FAIL (false alarm)",
        "default rule": "PASS" if default.passed else "FAIL (false alarm)",
        "verify of the file": "PASS" if verified.passed else "FAIL",
        "layers checked": f"{len(v.layers)} (+{len(v.layers_unmapped)} not)",
        "worst layer err / scale": max((c.max_rel_err for c in v.layers), default=0.0),
        "fold s": fold_s,
        "verify s": verify_s,
    }
    e, o, ratio = float32_factor(program, out)
    row |= {"export err vs f64": e, "own err vs f64": o, "f32 ratio": ratio}
    unfolded, folded_onnx = work / f"{name}.unfolded.onnx", work / f"{name}.folded.onnx"
    export_unfolded(pt2, unfolded)
    onnx_run = run_fold(RunOptions(model=unfolded, output=folded_onnx))
    e, o, ratio = onnx_factor(unfolded, folded_onnx, program_input_specs(program))
    row |= {
        "ONNX in": "PASS" if onnx_run.passed else "FAIL",
        "ONNX ratio": ratio,
    }
    layer, named, d = smallest_defect(pt2, out, default, work)
    row |= {"defect layer": layer, "named": named, "smallest d caught": d}
    return row


def whole_process(name: str, model, shape, work: Path, rounds: int = 3) -> dict:
    x = torch.randn(2, *shape)
    program = torch.export.export(
        model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},)
    )
    pt2 = work / f"{name}.pt2"
    torch.export.save(program, str(pt2))
    ours_cmd = [sys.executable, "-m", "bnexport", "fold", str(pt2), "-o", str(work / "o.onnx")]
    plain_cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "plain_export.py"),
        str(pt2),
        str(work / "p.onnx"),
    ]
    ours, plain = [], []
    for _ in range(rounds):
        for cmd, times in ((ours_cmd, ours), (plain_cmd, plain)):
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False)
            times.append(time.perf_counter() - start)
    a, b = statistics.median(ours), statistics.median(plain)
    return {"model": name, "bnexport fold s": a, "plain export s": b, "ratio": a / b}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3g}"
    return str(v)


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small networks only")
    parser.add_argument("--models", nargs="*", help="only these networks (by name)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results_verification.md")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    rows, timing = [], []
    with tempfile.TemporaryDirectory(prefix="bnexport-verification-") as tmp:
        work = Path(tmp)
        for name, model, shape in deep_models(quick=args.quick):
            if args.models and name not in args.models:
                continue
            print(f"{name} ...", flush=True)
            rows.append(bench_model(name, model, shape, work))
            print(rows[-1], flush=True)
        if not args.quick:
            for name, model, shape in deep_models(quick=False):
                if name in ("resnet50", "mobilenet_v2") and name in (args.models or [name]):
                    timing.append(whole_process(name, model, shape, work))
                    print(timing[-1], flush=True)
    text = [
        f"Verification benchmark ({'quick' if args.quick else 'full'}): "
        f"`python benchmarks/verification.py{' --quick' if args.quick else ''}`",
        "",
        f"FLOAT32_ERROR_FACTOR = {FLOAT32_ERROR_FACTOR:g}, ONNX_FLOAT32_FACTOR = "
        f"{ONNX_FLOAT32_FACTOR:g}, LAYER_RTOL = {LAYER_RTOL:g}.",
        "",
        table(rows),
    ]
    if timing:
        text += ["", "Whole processes (alternating, median of 3):", "", table(timing)]
    args.out.write_text("\n".join(text) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
