"""The stages as a Python user calls them: trace once, external data, block-wise folding,
verification against recorded outputs, and a command line that starts without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bnexport.folding.torch_engine as torch_engine
from bnexport import RunOptions, fold, run_fold, verify_onnx
from bnexport.cli import main
from bnexport.errors import ExportError
from bnexport.export import export_program, save_onnx_model, to_onnx_program
from bnexport.folding.math import Layout, fold_into_following, fold_into_preceding
from tests.nets import SmallNet, build_from_spec, randomize_bn


@pytest.fixture()
def small_pt2(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).eval()
    args = (torch.randn(2, 1, 8, 8),)
    program = torch.export.export(model, args, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = tmp_path / "small.pt2"
    torch.export.save(program, str(path))
    return path


# --------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    code = (
        "import sys\n"
        "from bnexport.cli import main\n"
        "try:\n"
        f"    main([{flag!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'onnxscript') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout


def test_console_entry_exit_codes(small_pt2, tmp_path):
    """`python -m bnexport` ends with the command's exit code and flushed output."""
    done = subprocess.run(
        [sys.executable, "-m", "bnexport", "fold", str(small_pt2), "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("verify: PASS")
    done = subprocess.run(
        [sys.executable, "-m", "bnexport", "fold", str(tmp_path / "missing.pt2")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ")


# --------------------------------------------------------------------------- trace once


class _Counter:
    """Wraps a function and counts its calls (the real function still runs)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args[0] if args else kwargs.get("model"))
        return self.fn(*args, **kwargs)


def test_a_program_is_never_traced_again(small_pt2, tmp_path, monkeypatch):
    traces = _Counter(torch.export.export)
    exports = _Counter(torch.onnx.export)
    monkeypatch.setattr(torch.export, "export", traces)
    monkeypatch.setattr(torch.onnx, "export", exports)
    saved = tmp_path / "folded.pt2"
    report = run_fold(
        RunOptions(model=small_pt2, output=tmp_path / "o.onnx", save_folded=saved, samples=2)
    )
    assert report.passed
    assert traces.calls == []
    assert len(exports.calls) == 1
    assert isinstance(exports.calls[0], torch.export.ExportedProgram)
    # --save-folded wrote the program that was exported: no BatchNorm, same outputs
    program = torch.export.load(str(saved))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops)
    x = torch.randn(5, 1, 8, 8)
    onnx_out = verify_onnx(program.module(), str(tmp_path / "o.onnx"), [x])
    assert onnx_out.passed


def test_a_module_is_traced_once(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(randomize_bn(SmallNet()).eval().state_dict(), tmp_path / "sd.pt")
    traces = _Counter(torch.export.export)
    monkeypatch.setattr(torch.export, "export", traces)
    opts = RunOptions(
        model=tmp_path / "sd.pt",
        arch="tests.nets:small_net",
        input_shapes=["2,1,8,8"],
        output=tmp_path / "o.onnx",
        samples=1,
    )
    assert run_fold(opts).passed
    assert len(traces.calls) == 1


# --------------------------------------------------------------------------- external data


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_external_data_flag_writes_a_verified_pair(small_pt2, tmp_path):
    out, report = tmp_path / "pair.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(
        main,
        ["fold", str(small_pt2), "-o", str(out), "--external-data", "--json", str(report)],
    )
    assert result.exit_code == 0, result.output
    assert "pair.onnx + pair.onnx.data" in result.output
    assert _listing(tmp_path) == ["pair.onnx", "pair.onnx.data", "r.json", "small.pt2"]
    data = json.loads(report.read_text())
    assert data["onnx"]["external_data"] == ["pair.onnx.data"]
    assert data["verify"]["passed"] is True
    # the pair is deployed together: moved elsewhere, onnxruntime still finds the weights
    moved = tmp_path / "deploy"
    moved.mkdir()
    for name in ("pair.onnx", "pair.onnx.data"):
        os.replace(tmp_path / name, moved / name)
    session = ort.InferenceSession(str(moved / "pair.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (3, 3)


def test_size_threshold_chooses_external_data(small_pt2, tmp_path):
    small = run_fold(RunOptions(model=small_pt2, output=tmp_path / "a.onnx", samples=1))
    assert small.onnx.external_data is None
    assert not (tmp_path / "a.onnx.data").exists()
    opts = RunOptions(
        model=small_pt2, output=tmp_path / "b.onnx", samples=1, external_data_threshold=1000
    )
    large = run_fold(opts)
    assert large.passed and large.onnx.external_data == ["b.onnx.data"]
    assert (tmp_path / "b.onnx.data").stat().st_size > 1000


def test_failed_export_leaves_no_half_pair(tmp_path):
    """A model that fails onnx.checker leaves neither file, nor a temporary directory."""
    from onnxscript import ir

    torch.manual_seed(0)
    program = torch.export.export(randomize_bn(SmallNet()).eval(), (torch.randn(2, 1, 8, 8),))
    model = to_onnx_program(fold(program).program).model
    model.graph.append(ir.Node("", "NotAnOnnxOp", inputs=[model.graph.inputs[0]]))
    before = _listing(tmp_path)
    for external in (True, False):
        with pytest.raises(ExportError, match="onnx.checker"):
            save_onnx_model(model, tmp_path / "bad.onnx", external_data=external)
        assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- block-wise fold


@pytest.mark.parametrize(
    "spec",
    [
        [("conv", 6, 3, 1, 1, 0, "zeros", True), ("bn",), ("relu",), ("head", 5, True, True, 0)],
        [("convT", 6, 2, 2, 3, True), ("bn",), ("conv", 6, 1, 1, 3, 0, "zeros", False), ("bn",)],
        [("bn",), ("conv", 8, 3, 1, 2, 0, "zeros", True), ("bn",)],
    ],
)
def test_folding_in_small_blocks_equals_one_block(spec, monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(build_from_spec(spec, 6)).eval()
    x = torch.randn(3, 6, 9, 9)
    whole = fold(model, x)
    monkeypatch.setattr(torch_engine, "BLOCK_BYTES", 8)  # one row of weights per block
    blocks = fold(model, x)
    assert [d.status for d in whole.report.decisions] == [d.status for d in blocks.report.decisions]
    for name, value in whole.program.state_dict.items():
        assert torch.equal(value, blocks.program.state_dict[name]), name
    torch.testing.assert_close(blocks.module(x), model(x), atol=1e-4, rtol=1e-4)


def test_layouts_fold_onnx_style_weights():
    """The same math serves a (K, N) weight, as ONNX's MatMul and Gemm(transB=0) keep it."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    s_in, t_in = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5, torch.randn(6)
    s_out, t_out = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5, torch.randn(4)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    kn = Layout(out_axis=1)
    w1, b1 = fold_into_following(w, b, s_in, t_in.double(), kn)
    torch.testing.assert_close(x @ w1 + b1, (x * s_in + t_in) @ w + b)
    w2, b2 = fold_into_preceding(w, b, s_out, t_out.double(), kn)
    torch.testing.assert_close(x @ w2 + b2, (x @ w + b) * s_out + t_out)


# --------------------------------------------------------------------------- verify stage


def test_verify_accepts_recorded_numpy_outputs(small_pt2, tmp_path):
    program = torch.export.load(str(small_pt2))
    out = tmp_path / "o.onnx"
    export_program(fold(program).program, out)
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(n, 1, 8, 8)).astype(np.float32) for n in (1, 4)]
    module = program.module()
    recorded = [module(torch.from_numpy(b)).detach().numpy() for b in batches]
    assert verify_onnx(recorded, str(out), batches).passed
    wrong = [r + 0.1 for r in recorded]
    assert not verify_onnx(wrong, str(out), batches).passed


def test_fold_of_an_nn_module_keeps_the_module(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fold(model, torch.randn(2, 4))
    assert result.report.decisions[0].folded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
