"""Float16 deployment: bnexport's `to_float16` against onnxconverter-common's default conversion.

    python benchmarks/half.py          # writes benchmarks/results_half.md
    python benchmarks/half.py --quick  # the shipped digits CNN only, few timing runs

Models: the three shipped checkpoints (models/NAME.pt2, held-out data models/NAME_test.npz),
ResNet-50 and MobileNetV2 from benchmarks/nets.py at 3x64x64 (trained-like BN statistics,
`train_statistics`; 16 seeded random inputs), and `overflow_net`: a small CNN that is fine in
float32 but not in float16 (one BN channel with gamma 3e5, so its folded conv weight exceeds
65504, compensated by the next conv's weights on that channel; a conv whose activations reach
about 1e5, compensated by the classifier; 64 seeded random inputs).

Each model is folded and exported by `run_fold` (i.e. `bnexport fold MODEL.pt2 -o OUT.onnx`,
the evaluation inputs as --data), and the folded float32 file is converted twice:

* ours: `bnexport.half.to_float16(model, batches)` with the evaluation inputs as batches
  (range analysis per layer, float32 kept where float16 would overflow, I/O float32);
* theirs: `onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True)`
  with its defaults (weights clamped to +-1e4 and tiny ones raised to 1e-7, no activation
  ranges).

Error: max |out - out32| / max |out32| over the evaluation inputs, out32 the folded float32
file; every file runs in onnxruntime (CPU) with graph optimizations off. Target: ours <= theirs
on every model. Argmax agreement with the float32 file and accuracy where the data is labelled;
the autoencoder's reconstruction MSE against its input. Size: bytes of the ONNX file.

Latency: onnxruntime CPU, `intra_op_num_threads=1`, graph optimizations ALL, at batch 1 and 32;
on the evaluation inputs (repeated up to the batch);
one warm-up run per file, then 5 rounds alternating the float32 file, ours and theirs (the order
rotates each round), each round the median of a fifth of the repetitions (`median_time`);
reported: the median of the rounds. The CPU provider has few float16 kernels, so float16 may
well be slower there; the numbers are reported as measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.nets import MobileNetV2, ResNet50, train_statistics  # noqa: E402
from benchmarks.timing import median_time, ort_session  # noqa: E402
from bnexport.half import to_float16  # noqa: E402
from bnexport.runs import RunOptions, run_fold  # noqa: E402

MODELS = ROOT / "models"
ROUNDS = 5
BIG_GAMMA = 3e5  # BN gamma of overflow_net's channel 0
BIG_ACTIVATION_WEIGHT = 1.5e4  # overflow_net.conv4's weights are uniform in [0, this]


class OverflowNet(nn.Module):
    """Conv-BN-ReLU x3, a conv, global mean, linear: with `overflow_net`'s weights, fine in
    float32 and out of float16's range in two places."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.conv4(x))
        return self.fc(x.mean((2, 3)))


def overflow_net(seed: int = 0) -> tuple[OverflowNet, np.ndarray]:
    """(eval model, 64 seeded inputs of shape 1x8x8).

    bn1's channel 0 has gamma 3e5, so the folded conv1 weight of that channel reaches about
    1.6e5 (> 65504) and its activations about 1e6; conv2's weights on that channel are divided
    by 3e5, so conv2's output is ordinary. conv4's weights are positive and up to 1.5e4, so its
    activations reach about 1e5; the classifier's weights are divided by 1e3."""
    torch.manual_seed(seed)
    model = OverflowNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        model.bn1.weight[0], model.bn1.bias[0] = BIG_GAMMA, 0.0
        model.conv1.weight[0] = torch.tensor(
            [[[0.3, -0.4, 0.2], [0.5, 0.1, -0.3], [0.2, 0.4, -0.5]]]
        )
        model.conv2.weight[:, 0] /= BIG_GAMMA
        model.conv4.weight.uniform_(0, BIG_ACTIVATION_WEIGHT)
        model.fc.weight /= 1e3
    x = np.random.default_rng(seed).standard_normal((64, 1, 8, 8)).astype(np.float32)
    return model, x


def save_pt2(model: nn.Module, example: np.ndarray, path: Path) -> None:
    """torch.export of the eval model with a dynamic batch axis, saved as .pt2."""
    args = (torch.from_numpy(example[:2]),)
    with _quiet():
        program = torch.export.export(model, args, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))


@dataclass
class Case:
    name: str
    pt2: Path
    data: Path  # npz with `x` (and `labels` for classifiers)
    note: str = ""


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def cases(quick: bool, work: Path) -> list[Case]:
    shipped = ["digits_cnn"] if quick else ["digits_cnn", "tabular_mlp", "digits_autoencoder"]
    out = [
        Case(n, MODELS / f"{n}.pt2", MODELS / f"{n}_test.npz", "shipped, held-out data")
        for n in shipped
    ]
    if quick:
        return out
    model, x = overflow_net()
    out.append(_built("overflow_net", model, x, work, "gamma 3e5 and activations ~1e5"))
    for name, build in (("resnet50", ResNet50), ("mobilenet_v2", MobileNetV2)):
        torch.manual_seed(0)
        shape = (3, 64, 64)
        model = train_statistics(build(), (4, *shape))
        x = np.random.default_rng(1).standard_normal((16, *shape)).astype(np.float32)
        out.append(_built(name, model, x, work, "benchmarks/nets.py, 3x64x64, seeded inputs"))
    return out


def _built(name: str, model: nn.Module, x: np.ndarray, work: Path, note: str) -> Case:
    pt2, data = work / f"{name}.pt2", work / f"{name}_inputs.npz"
    save_pt2(model, x, pt2)
    np.savez(data, x=x)
    return Case(name, pt2, data, note)


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: x})[0].astype(np.float64)


def latency(models: list, x: np.ndarray, reps: int) -> list[float]:
    """Median seconds per run of each model, in alternating rounds (order rotating)."""
    sessions = [ort_session(m, optimize=True) for m in models]
    for s in sessions:
        s.run(None, {s.get_inputs()[0].name: x})
    per_round = max(1, reps // ROUNDS)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(ROUNDS):
        order = [(r + k) % len(sessions) for k in range(len(sessions))]
        for i in order:
            s = sessions[i]
            feeds = {s.get_inputs()[0].name: x}
            times[i].append(median_time(lambda s=s, f=feeds: s.run(None, f), per_round))
    return [statistics.median(t) for t in times]


@dataclass
class Result:
    name: str
    note: str
    err_ours: float
    err_theirs: float
    finite_theirs: bool
    sizes: tuple[int, int, int]  # bytes: float32, ours, theirs
    weight_share: float  # ours: share of float16 weight bytes
    kept: list  # ours: KeptNode list
    nodes: int
    convert_s: float  # ours: seconds of to_float16
    fold: str = ""  # run_fold's verdict and max relative error against the eval model
    differing: int = 0  # float16 weight values of ours that differ from theirs
    agreement: tuple[float, float] | None = None  # argmax agreement with float32: ours, theirs
    accuracy: tuple[float, float, float] | None = None  # float32, ours, theirs
    mse: tuple[float, float, float] | None = None  # reconstruction MSE: float32, ours, theirs
    latency: list[tuple] = field(default_factory=list)  # (batch, f32 s, ours s, theirs s)


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.abs(out - ref).max() / (np.abs(ref).max() or 1.0))


def bench_case(case: Case, reps: tuple[int, int], work: Path) -> Result:
    from onnxconverter_common.float16 import convert_float_to_float16

    f32_path = work / f"{case.name}.onnx"
    with _quiet():
        report = run_fold(RunOptions(model=case.pt2, output=f32_path, data=case.data, samples=2))
    if report.verify is None or not f32_path.is_file():
        raise RuntimeError(f"bnexport fold wrote no verified file for {case.pt2}")
    data = np.load(case.data)
    x = data["x"].astype(np.float32)
    labels = data["labels"] if "labels" in data.files else None
    model32 = onnx.load(str(f32_path))
    start = time.perf_counter()
    ours, half_report = to_float16(model32, [(x,)])
    convert_s = time.perf_counter() - start
    with _quiet():
        theirs = convert_float_to_float16(model32, keep_io_types=True)
    paths = [f32_path, work / f"{case.name}.ours.onnx", work / f"{case.name}.theirs.onnx"]
    onnx.save(ours, str(paths[1]))
    onnx.save(theirs, str(paths[2]))
    y32, y_ours, y_theirs = (_run(ort_session(p, optimize=False), x) for p in paths)
    result = Result(
        case.name,
        case.note,
        _rel_err(y_ours, y32),
        _rel_err(y_theirs, y32),
        bool(np.isfinite(y_theirs).all()),
        tuple(p.stat().st_size for p in paths),
        half_report.float16_weight_share,
        half_report.kept_float32,
        half_report.nodes,
        convert_s,
        f"{'PASS' if report.passed else 'FAIL'} {report.verify.max_rel_err:.1e}",
    )
    result.differing = _differing_weights(ours, theirs)
    if y32.ndim == 2 and y32.shape[1] >= 2:
        top = y32.argmax(1)
        result.agreement = tuple(float((y.argmax(1) == top).mean()) for y in (y_ours, y_theirs))
        if labels is not None:
            result.accuracy = tuple(
                float((y.argmax(1) == labels).mean()) for y in (y32, y_ours, y_theirs)
            )
    elif y32.size == x.size:
        flat = x.reshape(len(x), -1).astype(np.float64)
        result.mse = tuple(
            float(((y.reshape(len(x), -1) - flat) ** 2).mean()) for y in (y32, y_ours, y_theirs)
        )
    for batch, n in zip((1, 32), reps):
        rows = x[np.arange(batch) % len(x)]  # the evaluation inputs, repeated up to the batch
        result.latency.append((batch, *latency(paths, rows, n)))
    return result


def _differing_weights(ours: onnx.ModelProto, theirs: onnx.ModelProto) -> int:
    """Values of the float16 initializers both files hold (by name) that differ bit-wise."""
    from onnx import numpy_helper

    mine = {t.name: t for t in ours.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    count = 0
    for t in theirs.graph.initializer:
        if t.name in mine and t.data_type == onnx.TensorProto.FLOAT16:
            a = numpy_helper.to_array(mine[t.name]).reshape(-1).view(np.uint16)
            b = numpy_helper.to_array(t).reshape(-1).view(np.uint16)
            count += int((a != b).sum()) if a.shape == b.shape else int(a.size)
    return count


def _met(r: Result) -> str:
    if r.err_ours <= r.err_theirs:
        return "yes"
    return f"no (ours - theirs = {r.err_ours - r.err_theirs:.1e})"


def _fmt(v: float) -> str:
    if v == float("inf"):
        return "inf (not finite)"
    return f"{v:.3e}" if v < 0.01 else f"{v:.4g}"


def render(results: list[Result], cmd: str, reps: tuple[int, int], wall: float) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    import onnxconverter_common

    lines = [
        f"Float16 benchmark {datetime.date.today().isoformat()}: `{cmd}` ({wall:.0f} s)",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__},"
        f" onnx {onnx.__version__}, onnxconverter-common {onnxconverter_common.__version__}; "
        f"load average at the end {load}.",
        "",
        "float32: the folded file from `run_fold`. ours: `to_float16` on it (I/O float32). "
        "theirs: onnxconverter-common's `convert_float_to_float16(model, keep_io_types=True)` "
        "with its defaults. Error: max |out - out32| / max |out32| on the evaluation inputs "
        "(onnxruntime, optimizations off); target ours <= theirs. Argmax: agreement with the "
        "float32 file. float16 weights: ours, share of weight bytes stored as float16. "
        "Kept float32: ours, nodes left in float32 of all nodes. Fold: `run_fold`'s verdict on "
        "the float32 file and its max relative error against the PyTorch eval model "
        "(tolerance atol 1e-6 + rtol 1e-5 x scale). Weights differing: float16 weight values "
        "(of the initializers both files hold in float16) that differ between ours and theirs: "
        "theirs raises nonzero weights below 1e-7 to +-1e-7 and clamps beyond +-1e4, ours rounds "
        "each to float16's nearest value (0 or a subnormal below 6e-8).",
        "",
        "| model | error: ours | error: theirs | met | argmax agree: ours / theirs "
        "| size KB: float32 / ours / theirs | float16 weights (ours) | kept float32 (ours) "
        "| weights differing: ours vs theirs | to_float16 (s) | fold: float32 file |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = f"{r.name} ({r.note})" if r.note else r.name
        agree = " / ".join(f"{a:.4f}" for a in r.agreement) if r.agreement else "-"
        sizes = " / ".join(f"{s / 1024:.1f}" for s in r.sizes)
        lines.append(
            f"| {name} | {_fmt(r.err_ours)} | {_fmt(r.err_theirs)} | "
            f"{_met(r)} | {agree} | {sizes} | {r.weight_share:.1%} | {len(r.kept)} of {r.nodes} "
            f"| {r.differing} | {r.convert_s:.2f} | {r.fold} |"
        )
    for r in results:
        if r.accuracy:
            acc = ", ".join(
                f"{k} {v:.4f}" for k, v in zip(("float32", "ours", "theirs"), r.accuracy)
            )
            lines += ["", f"{r.name} held-out accuracy: {acc}."]
        if r.mse:
            mse = ", ".join(f"{k} {v:.4e}" for k, v in zip(("float32", "ours", "theirs"), r.mse))
            lines += ["", f"{r.name} held-out reconstruction MSE: {mse}."]
    lines += ["", "Nodes ours kept in float32, with the reasons:", ""]
    for r in results:
        if not r.kept:
            lines.append(f"* {r.name}: none")
            continue
        lines.append(f"* {r.name}:")
        lines += [f"  * `{k.name}` ({k.op_type}): {k.reason}" for k in r.kept]
    lines += [
        "",
        f"Latency (ms): onnxruntime CPU, 1 thread, graph optimizations ALL, median of {ROUNDS} "
        f"rounds alternating the three files (order rotating), {reps[0]} runs at batch 1 and "
        f"{reps[1]} at batch 32 per file. Information: the CPU provider runs float16 with few "
        "native kernels (it casts around the others), so float16 is not expected to be faster "
        "here; the float16 files are for float16 hardware.",
        "",
        "| model | batch | float32 (ms) | ours (ms) | theirs (ms) | ours / float32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for batch, a, b, c in r.latency:
            lines.append(
                f"| {r.name} | {batch} | {a * 1e3:.3g} | {b * 1e3:.3g} | {c * 1e3:.3g} | "
                f"{b / a:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the digits CNN only, few runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results_half.md")
    opts = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    reps = (20, 5) if opts.quick else (200, 30)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(opts.quick, Path(tmp)):
            print(f"benchmarking {case.name} ...", file=sys.stderr, flush=True)
            results.append(bench_case(case, reps, Path(tmp)))
    flags = " --quick" if opts.quick else ""
    wall = time.perf_counter() - start
    table = render(results, "python benchmarks/half.py" + flags, reps, wall)
    opts.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
