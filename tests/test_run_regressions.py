"""Regression tests for defects of the run pipeline, each at the level a user meets it."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnexport import fold
from bnexport.cli import main
from bnexport.errors import summarize_exception
from bnexport.export import export_onnx
from tests.nets import SmallNet, WithUnusedBatchNorm, randomize_bn


def _listing(directory):
    """Every entry, hidden files and directories included."""
    return sorted(p.name for p in directory.iterdir())


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _fold_with_arch(state_dict, arch: str, *extra):
    """`bnexport fold` of a state_dict with --arch tests.nets:ARCH on (2, 1, 8, 8) inputs."""
    shape = ["--input-shape", "2,1,8,8"]
    return _invoke("fold", state_dict, "--arch", f"tests.nets:{arch}", *shape, *extra)


@pytest.fixture()
def state_dict(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "sd.pt"
    torch.save(randomize_bn(SmallNet()).eval().state_dict(), path)
    return path


# --------------------------------------------------------------------------- defect 1


def test_summary_of_an_exception_without_message():
    assert summarize_exception(AssertionError()) == "AssertionError (no message)"
    assert summarize_exception(ValueError("\n\n  first\nsecond")) == "ValueError: first"
    assert summarize_exception(RuntimeError("\x1b[96mcoloured\x1b[0m")) == "RuntimeError: coloured"


def test_model_failing_with_empty_message_writes_nothing(tmp_path, state_dict):
    """A bare `assert` in forward: exit 2, one paragraph naming it, no file left behind."""
    before = _listing(tmp_path)
    result = _fold_with_arch(
        state_dict, "asserts_outside_export", "-o", tmp_path / "out.onnx", "--json", tmp_path / "r"
    )
    assert result.exit_code == 2, result.output
    assert "AssertionError (no message)" in result.output
    assert "Traceback" not in result.output and "IndexError" not in result.output
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- defect 2


def test_failing_export_leaves_no_folded_program_and_no_onnx(tmp_path, state_dict):
    before = _listing(tmp_path)
    result = _fold_with_arch(
        state_dict,
        "not_exportable_to_onnx",
        "-o",
        tmp_path / "out.onnx",
        "--save-folded",
        tmp_path / "folded.pt2",
    )
    assert result.exit_code == 2, result.output
    assert "torch.onnx.export failed" in result.output
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- defect 3


def test_left_is_counted_one_way(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(WithUnusedBatchNorm()).eval()
    torch.save(model, tmp_path / "whole.pt")
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = _invoke(
        "fold",
        tmp_path / "whole.pt",
        "--trust-pickle",
        "--input-shape",
        "2,1,8,8",
        "-o",
        out,
        "--json",
        report,
        "--samples",
        "1",
    )
    assert result.exit_code == 0, result.output
    bn = json.loads(report.read_text())["batchnorm"]
    assert [d["name"] for d in bn["left"]] == ["input_bn"]
    assert [d["name"] for d in bn["unused"]] == ["spare_bn"]
    assert bn["total"] == bn["folded"] + len(bn["left"]) + len(bn["unused"]) == 3
    onnx_nodes = json.loads(report.read_text())["onnx"]["batchnorm_nodes"]
    assert onnx_nodes == len(bn["left"])
    assert f"BatchNorm: 2 before, {len(bn['left'])} after (1 folded)" in result.output
    assert "1 never called by forward" in result.output


# --------------------------------------------------------------------------- defect 4


def test_folding_a_program_bnexport_wrote(tmp_path, state_dict):
    first = _fold_with_arch(
        state_dict, "small_net", "-o", tmp_path / "a.onnx", "--save-folded", tmp_path / "a.pt2"
    )
    assert first.exit_code == 0, first.output
    second = _invoke(
        "fold", tmp_path / "a.pt2", "-o", tmp_path / "b.onnx", "--json", tmp_path / "b.json"
    )
    assert second.exit_code == 0, second.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["onnx"]["dynamic_batch"] is True  # the saved program kept its dynamic batch
    assert data["batchnorm"]["total"] == 0
    keys = [p.key for p in onnx.load(str(tmp_path / "b.onnx")).metadata_props]
    assert len(keys) == len(set(keys))


def test_fold_accepts_its_own_results(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).eval()
    x = torch.randn(3, 1, 8, 8)
    first = fold(model, x)
    again = fold(first.module, x)  # the GraphModule of a program cannot change mode
    assert "training mode" not in " ".join(again.report.warnings)
    twice = fold(first)
    for result in (again, twice):
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)
    # exporting the same result twice sets, not duplicates, the metadata keys
    for name in ("one.onnx", "two.onnx"):
        export_onnx(first, tmp_path / name)
        keys = [p.key for p in onnx.load(str(tmp_path / name)).metadata_props]
        assert len(keys) == len(set(keys))


def test_fold_leaves_a_program_untouched():
    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).eval()
    x = torch.randn(2, 1, 8, 8)
    program = torch.export.export(model, (x,))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    nodes = len(program.graph.nodes)
    result = fold(program)
    assert len(program.graph.nodes) == nodes
    assert all(torch.equal(before[k], v) for k, v in program.state_dict.items())
    torch.testing.assert_close(program.module()(x), result.module(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- defect 5


def test_fold_and_verify_agree_on_the_batch_axis(tmp_path, state_dict):
    args = ["--arch", "tests.nets:small_net", "--input-shape", "3,1,8,8", "--samples", "2"]
    for static in (False, True):
        extra = ["--static-batch"] if static else []
        out, fold_json, verify_json = (tmp_path / f"{n}{static}" for n in ("m.onnx", "f", "v"))
        r = _invoke("fold", state_dict, "-o", out, "--json", fold_json, *args, *extra)
        assert r.exit_code == 0, r.output
        r = _invoke("verify", state_dict, out, "--json", verify_json, *args)
        assert r.exit_code == 0, r.output
        folded = json.loads(fold_json.read_text())
        verified = json.loads(verify_json.read_text())
        assert folded["onnx"]["dynamic_batch"] is (not static)
        assert verified["onnx"]["dynamic_batch"] is (not static)
        sizes = set(verified["verify"]["batch_sizes"])
        assert sizes == ({3} if static else {1, 4})
        assert verified["verdict"] == folded["verdict"] == "passed"


# --------------------------------------------------------------------------- review findings


def test_outputs_that_name_the_same_file_are_refused(tmp_path, state_dict):
    before = _listing(tmp_path)
    out = tmp_path / "same.onnx"
    for extra in (["--json", out], ["--save-folded", out], ["--json", f"{out}.data"]):
        result = _fold_with_arch(state_dict, "small_net", "-o", out, *extra)
        assert result.exit_code == 2, result.output
        assert "would be the same file" in result.output
        assert _listing(tmp_path) == before


def test_failing_save_folded_leaves_no_onnx(tmp_path, state_dict, monkeypatch):
    """Disk full while writing --save-folded: neither file appears (exit 2)."""

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", disk_full)
    before = _listing(tmp_path)
    result = _fold_with_arch(
        state_dict, "small_net", "-o", tmp_path / "o.onnx", "--save-folded", tmp_path / "f.pt2"
    )
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and "nothing was written" in result.output
    assert _listing(tmp_path) == before


def test_an_inline_export_removes_the_stale_data_file(tmp_path, state_dict):
    out = tmp_path / "o.onnx"
    assert _fold_with_arch(state_dict, "small_net", "-o", out, "--external-data").exit_code == 0
    assert (tmp_path / "o.onnx.data").is_file()
    assert _fold_with_arch(state_dict, "small_net", "-o", out).exit_code == 0
    assert not (tmp_path / "o.onnx.data").exists()
    assert onnx.load(str(out)).graph.initializer  # the weights are inside the file now


def test_non_finite_outputs_must_match_exactly():
    import numpy as np

    from bnexport.verify import compare

    ref = [np.array([[-np.inf, 1.0, 2.0]], dtype=np.float32)]

    def onnx_with(values):
        return lambda *args: [np.array([values], dtype=np.float32)]

    batches = [np.zeros((1, 3), np.float32)]
    same = compare([ref], onnx_with([-np.inf, 1.0, 2.0]), batches)
    assert same.passed and same.outputs[0].scale == 2.0
    wrong_finite = compare([ref], onnx_with([-np.inf, 100.0, -50.0]), batches)
    assert not wrong_finite.passed
    wrong_infinite = compare([ref], onnx_with([0.0, 1.0, 2.0]), batches)
    assert not wrong_infinite.passed


def test_static_batch_reports_the_data_rows_it_compared(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).eval()
    torch.export.save(
        torch.export.export(model, (torch.randn(4, 1, 8, 8),)), str(tmp_path / "m.pt2")
    )
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(10, 1, 8, 8)).astype("f4"))
    report = tmp_path / "r.json"
    args = ["-o", tmp_path / "m.onnx", "--data", data, "--json", report, "--samples", "1"]
    result = _invoke("fold", tmp_path / "m.pt2", *args)
    assert result.exit_code == 0, result.output
    verify = json.loads(report.read_text())["verify"]
    assert verify["data"]["samples"] == 8  # two batches of the fixed 4; 2 rows left over
    assert "only 8 of the 10 rows" in result.output


class WithUnbatchedInput(torch.nn.Module):
    """forward(x, scale): x has a batch axis, `scale` (shape (4,)) does not."""

    def __init__(self):
        super().__init__()
        self.net = SmallNet()

    def forward(self, x, scale):
        return self.net(x) * scale[:3].sum()


def test_an_input_without_batch_axis_keeps_its_shape(tmp_path):
    torch.manual_seed(0)
    model = WithUnbatchedInput().eval()
    randomize_bn(model)
    args = (torch.randn(2, 1, 8, 8), torch.rand(4))
    dyn = ({0: torch.export.Dim.AUTO}, None)
    torch.export.save(torch.export.export(model, args, dynamic_shapes=dyn), str(tmp_path / "m.pt2"))
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = _invoke("fold", tmp_path / "m.pt2", "-o", out, "--json", report, "--samples", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["onnx"]["dynamic_batch"] is True
    assert set(data["verify"]["batch_sizes"]) == {1, 4}
    assert data["batchnorm"]["folded"] == 1
    result = _invoke("verify", tmp_path / "m.pt2", out, "--samples", "2")
    assert result.exit_code == 0, result.output


def test_fold_of_a_program_whose_input_is_called_input():
    """An nn.Sequential's forward argument is `input`; copying the graph renames it."""
    from bnexport import fold

    model = randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)))
    model.eval()  # trained-like statistics: the BN is far from an identity
    program = torch.export.export(model, (torch.randn(2, 1, 5, 5),))
    result = fold(program)
    x = torch.randn(2, 1, 5, 5)
    assert len(result.report.folded) == 1
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = result.module(x).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


class _BiasFreeBlock(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_module_paths_that_are_not_identifiers_fold_and_export(tmp_path):
    """torchvision's RegNet names blocks `block1-0`; a module may also start with a digit.
    The bias a fold adds to a bias-free conv is named after that path."""
    model = nn.Sequential()
    model.add_module("block1-0", _BiasFreeBlock(3))
    model.add_module("0stem", _BiasFreeBlock(4))
    randomize_bn(model.eval())
    pt2, out = tmp_path / "m.pt2", tmp_path / "m.onnx"
    dyn = ({0: torch.export.Dim("batch", min=1, max=64)},)
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=dyn)
    torch.export.save(program, str(pt2))
    result = _invoke("fold", pt2, "-o", out, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["batchnorm"]["folded"] == 2
    # the program bounds its batch at 64: the random batches stay within it
    assert max(data["verify"]["batch_sizes"]) <= 64
