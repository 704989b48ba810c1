"""The text report on models with many BNs: the verdict and what was left first, the op counts
before and after (checked against the ONNX files themselves), every row with -v, the verdict
alone with -q, plain text when piped (click's CliRunner is not a terminal)."""

from __future__ import annotations

import io
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from rich.console import Console
from torch import nn

from benchmarks.nets import ResNet50, train_statistics
from bnexport.cli import main
from bnexport.inputs import example_inputs
from bnexport.load import load_source
from bnexport.render import VERBOSE, reason_kind, render_inspect, shorten_names, stage_display
from bnexport.stats.inspect import STALE, BatchNormStats, InspectReport
from tests.nets import many_reasons

ROOT = Path(__file__).resolve().parent.parent
REASONS_ARGS = ("--arch", "tests.nets:many_reasons", "--input-shape", "2,3,8,8")
DRAWN = re.compile("[\x1b┏┃┡│└━]")  # ANSI escapes and the lines of a drawn table


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _ops(path: Path) -> dict[str, int]:
    """Nodes of the file's main graph by op_type, read with onnx itself."""
    return dict(Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def _printed_ops(text: str) -> dict[str, tuple[int, int]]:
    """The rows of the printed op-count table: op -> (before, after)."""
    rows = re.findall(r"^(\w[\w ]*?)\s{2,}(\d+)\s+(\d+)\s+([+-]?\d+)$", text, re.M)
    return {op: (int(b), int(a)) for op, b, a, _ in rows}


def _export_keeping_batchnorm(program) -> dict[str, int]:
    """What `torch.onnx.export` makes of `program` with its own optimizer, less the rule
    that fuses Conv and BatchNormalization: the original's graph with every BN a node."""
    import onnxscript.rewriter as rewriter
    from onnxscript._framework_apis.torch_2_8 import optimize
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.onnx.export(program, (), dynamo=True, optimize=False, verbose=False)
    rules = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r not in _fuse_batchnorm.rules)
    try:
        optimize(exported.model)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules
    return dict(Counter(node.op_type for node in exported.model.graph))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A 50-layer bottleneck ResNet (53 BNs, narrow), folded by `bnexport fold`: (program
    file, ONNX file, JSON report, exit code, output)."""
    work = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    model = train_statistics(ResNet50(classes=10, base=4), (8, 3, 16, 16), batches=2)
    pt2, out, report = work / "r.pt2", work / "r.onnx", work / "r.json"
    program = torch.export.export(
        model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    )
    torch.export.save(program, str(pt2))
    code, text = _invoke("fold", pt2, "-o", out, "--json", report, "--samples", "1")
    return pt2, out, json.loads(report.read_text()), code, text


@pytest.fixture(scope="module")
def reasons(tmp_path_factory):
    """`tests.nets.ManyReasons` as a state_dict, folded: (weights, ONNX file, JSON report,
    exit code, output)."""
    work = tmp_path_factory.mktemp("reasons")
    weights, out, report = work / "w.pt", work / "w.onnx", work / "w.json"
    torch.save(many_reasons().state_dict(), weights)
    code, text = _invoke(
        "fold", weights, *REASONS_ARGS, "-o", out, "--json", report, "--samples", "1"
    )
    return weights, out, json.loads(report.read_text()), code, text


# --------------------------------------------------------------------------- fold


def test_a_50_layer_resnet_reads_in_a_screen(resnet):
    _, out, data, code, text = resnet
    assert code == 0, text
    lines = text.splitlines()
    assert len(lines) < 40, text
    assert lines[0] == f"verify: PASS - {out}: exported and verified (exit 0)"
    assert lines[1] == "BatchNorm: 53 before, 0 after (53 folded)"
    assert data["batchnorm"]["folded"] == 53
    assert "into preceding" not in text  # no row per BN
    assert "Folded layers closest to their tolerance (3 of 53; every layer with -v)" in text
    assert lines[-1].startswith("errors: max abs err")
    assert not DRAWN.search(text)  # piped: plain text


def test_the_op_counts_are_those_of_the_files(resnet):
    _, out, data, _, text = resnet
    after = _ops(out)
    assert data["op_counts"]["after"] == after
    before = data["op_counts"]["before"]
    assert before == {**after, "BatchNormalization": 53}
    printed = _printed_ops(text)
    assert printed == {
        "BatchNormalization": (53, 0),
        "all nodes": (sum(before.values()), sum(after.values())),
    }


def test_verbose_prints_every_bn_op_and_layer(resnet, tmp_path):
    pt2, _, _, _, _ = resnet
    code, text = _invoke("fold", pt2, "-o", tmp_path / "r.onnx", "--samples", "1", "-v")
    assert code == 0, text
    assert text.splitlines()[0].startswith("verify: PASS")
    assert text.count(" into preceding ") == 53
    assert "Folded layers, each compared with the original where it is (53)" in text
    assert len(re.findall(r"^\S+\s+\S+\s+\S+\s+\S+\s+\d+\s+ok$", text, re.M)) == 53
    printed = _printed_ops(text)
    assert set(printed) == {*_ops(tmp_path / "r.onnx"), "BatchNormalization", "all nodes"}
    assert not DRAWN.search(text)


def test_bns_left_are_grouped_by_reason(reasons):
    _, _, data, code, text = reasons
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0].startswith("verify: PASS")
    bn = data["batchnorm"]
    assert lines[1] == (
        f"BatchNorm: 14 before, {len(bn['left'])} after ({bn['folded']} folded); 1 shift kept "
        "as Add node; 1 never called by forward; 2 BN calls folded once into 1 shared layer"
    )
    grouped = [line for line in lines if line.startswith(("left: ", "unused: "))]
    assert grouped == lines[2 : 2 + len(grouped)]  # right after the summary
    counted = [int(re.match(r"\w+: (\d+) BN", line).group(1)) for line in grouped]
    assert sum(counted) == len(bn["left"]) + len(bn["unused"])
    assert len(grouped) < len(bn["left"]) + len(bn["unused"])
    # the pre-activation blocks after the first: one line, node names and figures left out
    assert (
        "left: 3 BNs (blocks.1.bn1, blocks.2.bn1, blocks.3.bn1): preceding: its input comes "
        "from an addition, not a conv or linear; following: some of its channels have a "
        "scale <= 0, and only a positive scale passes relu (a nonlinearity)"
    ) in grouped
    assert grouped[-1] == (
        "unused: 1 BN (spare_bn): forward never calls it, so it is not part of the exported model"
    )
    assert {name for entry in bn["left"] for name in [entry["name"]]} <= set(
        re.findall(r"[\w.]+", " ".join(grouped))
    )
    assert " into preceding " not in text


def test_op_counts_with_a_shift_kept_and_bns_left(reasons):
    weights, out, data, _, text = reasons
    after = _ops(out)
    before = data["op_counts"]["before"]
    assert data["op_counts"]["after"] == after
    assert after["BatchNormalization"] == len(data["batchnorm"]["left"]) == 7
    assert before["BatchNormalization"] == 14 and before["Add"] == after["Add"] - 1
    source = load_source(weights, arch=REASONS_ARGS[1], input_shapes=[REASONS_ARGS[3]])
    program = source.to_program(example_inputs(source.input_specs, dynamic=True))
    assert before == _export_keeping_batchnorm(program)
    assert _printed_ops(text) == {
        "BatchNormalization": (14, 7),
        "Add": (before["Add"], after["Add"]),
        "all nodes": (sum(before.values()), sum(after.values())),
    }


class FrozenAffines(nn.Module):
    """Affine maps that are not BN nodes: a frozen BN computed from buffers (`x * scale +
    shift`), a layer scale, and arithmetic by constants."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.register_buffer("frozen_var", torch.rand(8) + 0.5)
        self.register_buffer("frozen_mean", torch.rand(8))
        self.register_buffer("scale", torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x):
        s = self.frozen_var.rsqrt()
        y = self.conv1(x) * s.reshape(1, -1, 1, 1) - (self.frozen_mean * s).reshape(1, -1, 1, 1)
        y = self.conv2(torch.relu(y)) * self.scale + 0.25
        y = self.fc(torch.relu(self.bn(y)).mean((2, 3)))
        return y * self.gamma


def test_op_counts_of_folded_affine_maps_that_are_not_bns(tmp_path):
    torch.manual_seed(0)
    program = torch.export.export(
        FrozenAffines().eval(),
        (torch.randn(2, 3, 8, 8),),
        dynamic_shapes=({0: torch.export.Dim.AUTO},),
    )
    pt2, out, report = tmp_path / "a.pt2", tmp_path / "a.onnx", tmp_path / "a.json"
    torch.export.save(program, str(pt2))
    code, text = _invoke("fold", pt2, "-o", out, "--json", report, "--samples", "1")
    assert code == 0, text
    data = json.loads(report.read_text())
    assert data["batchnorm"]["affine_maps"]["folded"] >= 2
    assert data["op_counts"]["after"] == _ops(out)
    before = data["op_counts"]["before"]
    assert before == _export_keeping_batchnorm(torch.export.load(str(pt2)))
    assert before["Mul"] > data["op_counts"]["after"].get("Mul", 0)


def test_quiet_prints_the_verdict_line_only(tmp_path):
    out = tmp_path / "q.onnx"
    model = ROOT / "models" / "digits_cnn.unfolded.onnx"
    code, text = _invoke("fold", model, "-o", out, "--samples", "1", "-q")
    assert code == 0
    assert text == f"verify: PASS - {out}: exported and verified (exit 0)\n"
    assert out.is_file()


def test_quiet_and_verbose_exclude_each_other(reasons, tmp_path):
    code, text = _invoke("fold", reasons[0], *REASONS_ARGS, "-o", tmp_path / "x.onnx", "-q", "-v")
    assert code == 2 and "exclude each other" in text
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_input_counts_its_own_nodes(tmp_path):
    """Before is the input file, after the written one, both read back with onnx."""
    model = tmp_path / "digits_cnn.unfolded.onnx"
    shutil.copy(ROOT / "models" / "digits_cnn.unfolded.onnx", model)
    out, report = tmp_path / "f.onnx", tmp_path / "f.json"
    code, text = _invoke("fold", model, "-o", out, "--json", report, "--samples", "1")
    assert code == 0, text
    counts = json.loads(report.read_text())["op_counts"]
    assert counts == {"before": _ops(model), "after": _ops(out)}
    changed = {
        op: (counts["before"].get(op, 0), counts["after"].get(op, 0))
        for op in {*counts["before"], *counts["after"]}
        if counts["before"].get(op, 0) != counts["after"].get(op, 0)
    }
    total = (sum(counts["before"].values()), sum(counts["after"].values()))
    assert _printed_ops(text) == {**changed, "all nodes": total}


# --------------------------------------------------------------------------- verify


def test_verify_names_the_diverging_layers_first(reasons, tmp_path):
    weights, out, data, _, _ = reasons
    assert any(d["into"] == "blocks.2.conv1" for d in data["batchnorm"]["layers"])
    model = onnx.load(str(out))
    (tensor,) = [t for t in model.graph.initializer if t.name == "blocks.2.conv1.weight"]
    array = numpy_helper.to_array(tensor).copy()
    array[3] *= 1.01
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    code, text = _invoke("verify", weights, bad, *REASONS_ARGS, "--samples", "1")
    assert code == 1, text
    lines = text.splitlines()
    assert lines[0].startswith(f"verify: FAIL - {bad}: differs from the original (exit 1): ")
    assert "first diverging layer blocks.2.conv1 (with blocks.2.bn2 folded in)" in lines[0]
    assert "at channel 3" in lines[0]
    assert "Folded layers that differ from the original (" in text
    results = re.findall(r"^(\S+)\s+\S+\s+\S+\s+\S+\s+(\d+)\s+(ok|FAIL)$", text, re.M)
    assert ("blocks.2.conv1", "3", "FAIL") in results
    assert {result for _, _, result in results} == {"FAIL"}  # only the layers that differ
    assert _printed_ops(text)["BatchNormalization"] == (14, 7)
    assert len(lines) < 40


# --------------------------------------------------------------------------- rendering


def _stats(name: str, flags=(), mean_shift=0.1, var_ratio=1.1) -> BatchNormStats:
    return BatchNormStats(
        name,
        "BatchNorm2d",
        4,
        flags=list(flags),
        fold={"status": "folded", "into": "conv", "direction": "preceding"},
        mean_shift=mean_shift,
        var_ratio=var_ratio,
    )


def _render(render, report, detail: str | None = None) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    render(report, console) if detail is None else render(report, console, detail)
    return buffer.getvalue()


def test_inspect_shows_the_stale_layers_first():
    layers = [_stats(f"layer{i}.bn") for i in range(40)]
    layers[5] = _stats("layer5.bn", [STALE], mean_shift=0.8)
    layers[30] = _stats("layer30.bn", [STALE], var_ratio=9.0)
    layers[12] = _stats("layer12.bn", ["dead channels"])
    layers[20].fold = {"status": "left", "reason": "its input comes from add_3 (an addition)"}
    layers[21].fold = {"status": "left", "reason": "its input comes from add_4 (an addition)"}
    report = InspectReport("m.pt2", layers, data="d.npz", data_size=100)
    text = _render(render_inspect, report)
    lines = text.splitlines()
    assert lines[0].startswith("verdict: stale: 2 of 40 BNs (layer5.bn, layer30.bn)")
    assert lines[1] == (
        "BatchNorm: 40 BNs; 38 would fold, 2 would be left; 2 stale, 1 flagged otherwise"
    )
    assert lines[2] == ("left: 2 BNs (layer20.bn, layer21.bn): its input comes from an addition")
    rows = [line.split()[0] for line in lines if re.match(r"layer\d+\.bn\s", line)]
    assert rows == ["layer30.bn", "layer5.bn", "layer12.bn"]  # largest drift first
    verbose = _render(render_inspect, report, VERBOSE)
    rows = [line.split()[0] for line in verbose.splitlines() if re.match(r"layer\d+\.bn ", line)]
    assert rows == [f"layer{i}.bn" for i in range(40)]


def test_reasons_are_grouped_without_node_names():
    assert reason_kind(
        "preceding: the output of conv layer layer1.0.conv2 is also used by add_3 (an "
        "addition); following: its output feeds relu_5 (relu, a nonlinearity)"
    ) == (
        "preceding: the output of a conv layer is also used by an addition; following: its "
        "output feeds relu (a nonlinearity)"
    )
    assert reason_kind(
        "preceding: its input comes from Add 'node_add_81', not a conv or linear; following: "
        "its output feeds Relu 'node_relu_5'"
    ) == (
        "preceding: its input comes from an Add, not a conv or linear; following: its output "
        "feeds a Relu"
    )
    assert reason_kind(
        "following: 6 of its 8 channels have a scale <= 0 (channel 1, 2, 3, 4, 6, ...), and "
        "only a positive scale passes relu_8 (relu, a nonlinearity)"
    ) == (
        "following: some of its channels have a scale <= 0, and only a positive scale passes "
        "relu (a nonlinearity)"
    )
    assert reason_kind("forward never calls it") == "forward never calls it"


def test_long_name_lists_are_shortened():
    names = [f"stages.{i}.blocks.0.bn1" for i in range(20)]
    assert shorten_names(names) == ("stages.0.blocks.0.bn1, stages.1.blocks.0.bn1 and 18 more")
    assert shorten_names(["a"]) == "a"


def test_the_stage_is_shown_on_a_terminal_only():
    shown = io.StringIO()
    with stage_display(Console(file=shown, force_terminal=True, width=80)) as progress:
        progress("exporting to ONNX")
    assert "exporting to ONNX" in shown.getvalue()
    piped = io.StringIO()
    with stage_display(Console(file=piped)) as progress:
        progress("exporting to ONNX")
    assert piped.getvalue() == ""
    quiet = io.StringIO()
    with stage_display(Console(file=quiet, force_terminal=True), show=False) as progress:
        progress("exporting to ONNX")
    assert quiet.getvalue() == ""
