"""Float16 deployment (`bnexport.half.to_float16`) on real exports, run in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from benchmarks.half import overflow_net, save_pt2
from bnexport.half import HalfReport, to_float16
from bnexport.runs import RunOptions, run_fold

MODELS = Path(__file__).resolve().parent.parent / "models"
FLOAT16 = onnx.TensorProto.FLOAT16


def _run(model, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = x.astype(np.float16) if inp.type == "tensor(float16)" else x
    return session.run(None, {inp.name: x})[0]


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _fold(pt2: Path, out: Path, data: Path | None = None) -> onnx.ModelProto:
    report = run_fold(RunOptions(model=pt2, output=out, data=data, samples=1))
    assert report.passed
    return onnx.load(str(out))


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """name -> (folded float32 file, held-out data) of the shipped models."""
    work = tmp_path_factory.mktemp("half")
    out = {}
    for name in ("digits_cnn", "tabular_mlp", "digits_autoencoder"):
        path = work / f"{name}.onnx"
        _fold(MODELS / f"{name}.pt2", path)
        out[name] = (path, np.load(MODELS / f"{name}_test.npz"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_cnn", "tabular_mlp", "digits_autoencoder"])
def test_shipped_models_in_float16(folded, name):
    path, data = folded[name]
    x = data["x"].astype(np.float32)
    half, report = to_float16(onnx.load(str(path)), [(x,)])
    assert isinstance(report, HalfReport)
    assert report.float16_weight_share >= 0.9
    assert report.kept_float32 == []
    assert set(report.inputs.values()) == {"float32"} == set(report.outputs.values())
    y32, y16 = _run(path, x), _run(half, x)
    assert y16.dtype == np.float32 and np.isfinite(y16).all()
    if "labels" in data.files:
        agree = (y16.argmax(1) == y32.argmax(1)).mean()
        assert agree >= 0.995
        acc32, acc16 = ((y.argmax(1) == data["labels"]).mean() for y in (y32, y16))
        assert abs(acc16 - acc32) <= 0.005
    else:
        flat = x.reshape(len(x), -1).astype(np.float64)
        mse32, mse16 = (
            ((y.reshape(len(x), -1).astype(np.float64) - flat) ** 2).mean() for y in (y32, y16)
        )
        assert abs(mse16 - mse32) <= 0.01 * mse32
    d = report.to_dict()
    assert d["weight_bytes"]["float16_share"] == report.float16_weight_share
    assert d["inputs"] == report.inputs and d["kept_float32"] == []


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    """(eval model, inputs, folded float32 file) of a CNN fine in float32, not in float16."""
    work = tmp_path_factory.mktemp("overflow")
    model, x = overflow_net()
    pt2, data = work / "overflow.pt2", work / "overflow_test.npz"
    save_pt2(model, x, pt2)
    np.savez(data, x=x)
    path = work / "overflow.onnx"
    _fold(pt2, path, data)
    return model, x, path


def _reader(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.input)


@pytest.mark.slow
def test_overflowing_layers_stay_float32(overflow):
    from onnxconverter_common.float16 import convert_float_to_float16

    _, x, path = overflow
    model32 = onnx.load(str(path))
    # the layers beyond float16: conv1 (weight ~1.6e5, activations ~1e6), its ReLU, conv2 that
    # reads them; conv4 (activations ~1e5), its ReLU, the mean and the classifier reading them
    conv1 = _reader(model32, "conv1.weight")
    relu1 = _reader(model32, conv1.output[0])
    conv2 = _reader(model32, "conv2.weight")
    conv4 = _reader(model32, "conv4.weight")
    relu4 = _reader(model32, conv4.output[0])
    mean = _reader(model32, relu4.output[0])
    fc = _reader(model32, "fc.weight")
    expected = {n.name for n in (conv1, relu1, conv2, conv4, relu4, mean, fc)}

    half, report = to_float16(model32, [(x,)])
    kept = {k.name: k for k in report.kept_float32}
    assert set(kept) == expected
    assert "weight 'conv1.weight' reaches" in kept[conv1.name].reason
    assert "beyond float16's largest finite value 65504" in kept[conv1.name].reason
    assert "4 x that is beyond float16's range" in kept[conv4.name].reason
    assert f"reads '{relu1.output[0]}' which is out of float16's range" in kept[conv2.name].reason
    assert kept[conv2.name].op_type == "Conv"
    # the rest is float16: conv2's output onwards through conv3
    node_types = {n.name: n for n in half.graph.node}
    conv3 = _reader(half, "conv3.weight")
    assert _initializer(half, "conv3.weight").data_type == FLOAT16
    assert _initializer(half, "conv1.weight").data_type == onnx.TensorProto.FLOAT
    assert conv3.name in node_types
    assert report.float16_nodes == report.nodes - len(expected)

    y32, y16 = _run(path, x), _run(half, x)
    assert np.isfinite(y16).all()
    assert _rel_err(y16, y32) < 2e-3

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = convert_float_to_float16(model32, keep_io_types=True)
    y_theirs = _run(theirs, x)
    assert not np.isfinite(y_theirs).all() or _rel_err(y_theirs, y32) > 0.05


@pytest.mark.slow
def test_exact_weights_are_rounded_once(overflow):
    """With exact float64 values, a float16 weight is exact.astype(float16), bit for bit, where
    rounding through float32 first would differ."""
    model, x, path = overflow
    model32 = onnx.load(str(path))
    # conv3's folded weight and bias in float64, as the fold computes them
    bn, conv = model.bn3, model.conv3
    s = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).detach().numpy()
    w = conv.weight.double().detach().numpy() * s[:, None, None, None]
    b = (conv.bias.double() - bn.running_mean.double()).detach().numpy() * s
    b = b + bn.bias.double().detach().numpy()
    stored = numpy_helper.to_array(_initializer(model32, "conv3.weight"))
    np.testing.assert_allclose(w, stored, rtol=1e-6, atol=1e-7)
    # values just above the midpoints between float16 neighbours: float32 rounds them onto the
    # midpoint, and float16 then rounds the tie to even; one rounding from float64 rounds up
    low = w.astype(np.float16)
    high = np.nextafter(low, np.float16(np.inf))
    mid = (low.astype(np.float64) + high.astype(np.float64)) / 2
    ties = mid + np.abs(mid) * 2.0**-30
    assert (ties.astype(np.float32) == mid).all()
    exact = {"conv3.weight": ties, "conv3.bias": b}

    half, _ = to_float16(model32, [(x,)], exact=exact)
    for name, value in exact.items():
        got = numpy_helper.to_array(_initializer(half, name))
        assert got.dtype == np.float16
        assert np.array_equal(got.view(np.uint16), value.astype(np.float16).view(np.uint16))
    twice = ties.astype(np.float32).astype(np.float16)
    assert (twice != ties.astype(np.float16)).any()  # the case one rounding exists for
    # without exact values the stored float32 is rounded (once, from float32)
    plain, _ = to_float16(model32, [(x,)])
    got = numpy_helper.to_array(_initializer(plain, "conv3.weight"))
    assert np.array_equal(got.view(np.uint16), stored.astype(np.float16).view(np.uint16))


@pytest.mark.slow
def test_float16_inputs_and_outputs(folded):
    path, data = folded["digits_cnn"]
    x = data["x"].astype(np.float32)
    half, report = to_float16(onnx.load(str(path)), [(x,)], keep_io_types=False)
    assert report.inputs == {"x": "float16"}
    assert set(report.outputs.values()) == {"float16"}
    assert half.graph.input[0].type.tensor_type.elem_type == FLOAT16
    assert half.graph.output[0].type.tensor_type.elem_type == FLOAT16
    y16 = _run(half, x)
    assert y16.dtype == np.float16
    assert (y16.argmax(1) == _run(path, x).argmax(1)).mean() >= 0.995


class _Residual(nn.Module):
    """An out-of-range tensor read by two nodes (a branch and the skip connection)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x) * 1e5
        return self.c((torch.relu(self.b(h)) + h) * 1e-5)


def _dynamo_export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, (x,), dynamo=True).model_proto


def test_out_of_range_tensor_with_two_readers_never_passes_through_float16():
    torch.manual_seed(0)
    model, x = _Residual().eval(), torch.randn(16, 8)
    exported = _dynamo_export(model, x)
    half, report = to_float16(exported, [(x.numpy(),)])
    kept = {k.op_type for k in report.kept_float32}
    assert {"Mul", "Gemm", "Relu", "Add"} <= kept
    with torch.no_grad():
        ref = model(x).numpy()
    y = _run(half, x.numpy())
    assert np.isfinite(y).all()
    assert _rel_err(y, ref) < 1e-2
    # no Cast to float16 reads an out-of-range tensor: every tensor's values from onnx's own
    # reference evaluator (not onnxruntime), against float16's largest finite value, 65504
    feeds = {exported.graph.input[0].name: x.numpy()}
    values = ReferenceEvaluator(exported).run(None, feeds, intermediate=True)
    floats = {n: v for n, v in values.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}
    out_of_range = {n for n, v in floats.items() if np.abs(v).max() > 65504.0}
    assert len(out_of_range) >= 4  # a * 1e5, b's output, its Relu and the sum (about 2e5)
    to_half = [n for n in half.graph.node if n.op_type == "Cast" and n.attribute[0].i == FLOAT16]
    assert to_half and not {n.input[0] for n in to_half} & out_of_range


def test_unnamed_nodes_are_named_and_converted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 6)
    exported = _dynamo_export(model, x)
    for node in exported.graph.node:
        node.name = ""
    half, report = to_float16(exported, [(x.numpy(),)])
    names = [n.name for n in half.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert report.kept_float32 == [] and report.float16_weight_share == 1.0
    with torch.no_grad():
        assert _rel_err(_run(half, x.numpy()), model(x).numpy()) < 5e-3
