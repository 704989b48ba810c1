"""`bnexport fold MODEL.onnx` as a user runs it: outputs, reports, files kept, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bnexport.cli import main
from tests.onnx_builders import GraphBuilder, bn_count, max_rel_diff, run

MODELS = Path(__file__).resolve().parent.parent / "models"
X4_ = ("x", ["N", 4, 6, 6])


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _cnn(b: GraphBuilder | None = None) -> onnx.ModelProto:
    """x -> Conv(pad 1) -> BN -> Relu -> Conv -> BN -> GAP -> Flatten -> Gemm, dynamic batch."""
    b = b or GraphBuilder(seed=3)
    c = b.node("Relu", [b.bn(b.node("Conv", ["x", b.weight(6, 3, 3, 3)], pads=[1] * 4), 6)])
    c = b.bn(b.node("Conv", [c, b.weight(8, 6, 1, 1), b.weight(8)]), 8)
    f = b.node("Flatten", [b.node("GlobalAveragePool", [c])])
    y = b.node("Gemm", [f, b.weight(4, 8), b.weight(4)], transB=1)
    model = b.model([("x", ["batch", 3, 8, 8])], [y])
    model.doc_string = "a small CNN"
    model.metadata_props.add(key="author", value="tests")
    return model


@pytest.fixture()
def cnn_onnx(tmp_path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), str(path))
    return path


def test_fold_onnx_default_output_report_and_json(cnn_onnx, tmp_path):
    before = cnn_onnx.read_bytes()
    result = _invoke("fold", cnn_onnx, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "cnn.folded.onnx"
    assert out.is_file() and cnn_onnx.read_bytes() == before
    assert "verify: PASS" in result.output and "batch sizes [1, 8, " in result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verdict"] == "passed" and data["exit_code"] == 0
    assert data["batchnorm"]["total"] == 2 and data["batchnorm"]["folded"] == 2
    assert data["onnx"]["batchnorm_nodes"] == 0 and data["onnx"]["dynamic_batch"] is True
    assert "original ONNX file" in data["verify"]["reference"]
    folded, original = onnx.load(str(out)), onnx.load(str(cnn_onnx))
    onnx.checker.check_model(folded, full_check=True)
    assert bn_count(folded) == 0
    # the file's own properties survive; our metadata is added once
    assert folded.doc_string == "a small CNN"
    assert (folded.ir_version, folded.opset_import) == (original.ir_version, original.opset_import)
    keys = [p.key for p in folded.metadata_props]
    assert keys.count("author") == 1 and keys.count("bnexport_folded") == 1
    assert folded.graph.input[0].type == original.graph.input[0].type
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    assert max_rel_diff(run(original, {"x": x}), run(folded, {"x": x})) < 1e-5


def test_folding_a_folded_file_again_adds_no_duplicate_metadata(cnn_onnx, tmp_path):
    assert _invoke("fold", cnn_onnx).exit_code == 0
    again = _invoke("fold", tmp_path / "cnn.folded.onnx", "-o", tmp_path / "twice.onnx")
    assert again.exit_code == 0, again.output
    keys = [p.key for p in onnx.load(str(tmp_path / "twice.onnx")).metadata_props]
    assert len(keys) == len(set(keys))


def test_output_may_not_be_the_input(cnn_onnx, tmp_path):
    before = _snapshot(tmp_path)
    result = _invoke("fold", cnn_onnx, "-o", cnn_onnx)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert _snapshot(tmp_path) == before


def test_external_data_is_written_back_as_external_data(tmp_path):
    model = _cnn()
    src = tmp_path / "ext.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="ext.bin", size_threshold=0)
    result = _invoke("fold", src, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx.data").is_file()
    assert "out.onnx.data" in result.output
    folded = onnx.load(str(tmp_path / "out.onnx"))
    assert bn_count(folded) == 0


def test_missing_external_data_is_refused(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(_cnn(), str(src), save_as_external_data=True, location="ext.bin", size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    before = _snapshot(tmp_path)
    result = _invoke("fold", src)
    assert (
        result.exit_code == 2 and "ext.bin" in result.output and "does not exist" in result.output
    )
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("cut", [40, 300, 2000])
def test_truncated_onnx_is_refused(cnn_onnx, tmp_path, cut):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(cnn_onnx.read_bytes()[:cut])
    before = _snapshot(tmp_path)
    result = _invoke("fold", bad)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "bad.onnx" in result.output
    assert _snapshot(tmp_path) == before


def test_model_onnxruntime_cannot_load_names_the_op(tmp_path):
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example"))
    graph = helper.make_graph(
        b.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)],
    )
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "custom.onnx"))
    before = _snapshot(tmp_path)
    result = _invoke("fold", tmp_path / "custom.onnx")
    assert result.exit_code == 2, result.output
    assert "onnxruntime cannot load" in result.output and "Frobnicate" in result.output
    assert _snapshot(tmp_path) == before


def _token_model() -> onnx.ModelProto:
    b = GraphBuilder(seed=4)
    emb = b.node("Gather", [b.weight(10, 6), "ids"])  # (N, T, 6)
    t = b.node("Transpose", [emb], perm=[0, 2, 1])
    y = b.node("Conv", [b.bn(t, 6), b.weight(4, 6, 1)])
    model = b.model([("ids", ["N", 5])], [y])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    return model


def test_integer_inputs_need_data(tmp_path):
    onnx.save(_token_model(), str(tmp_path / "tok.onnx"))
    result = _invoke("fold", tmp_path / "tok.onnx")
    assert result.exit_code == 2 and "ids" in result.output and "--data" in result.output
    ids = np.random.default_rng(0).integers(0, 10, (20, 5))
    np.savez(tmp_path / "ids.npz", ids=ids)
    result = _invoke("fold", tmp_path / "tok.onnx", "--data", tmp_path / "ids.npz")
    assert result.exit_code == 0, result.output
    assert "verify: PASS" in result.output
    assert bn_count(onnx.load(str(tmp_path / "tok.folded.onnx"))) == 0


def test_open_dims_need_an_input_shape(tmp_path):
    b = GraphBuilder()
    y = b.bn(b.node("Conv", ["x", b.weight(4, 3, 3, 3)]), 4)
    onnx.save(b.model([("x", ["N", 3, "H", "W"])], [y]), str(tmp_path / "m.onnx"))
    result = _invoke("fold", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "--input-shape x=DIMS" in result.output
    result = _invoke("fold", tmp_path / "m.onnx", "--input-shape", "x=1,3,9,7")
    assert result.exit_code == 0, result.output
    result = _invoke("fold", tmp_path / "m.onnx", "--input-shape", "x=1,5,9,7", "-o", "o.onnx")
    assert result.exit_code == 2 and "does not fit" in result.output


def test_save_folded_is_refused_for_onnx(cnn_onnx, tmp_path):
    result = _invoke("fold", cnn_onnx, "--save-folded", tmp_path / "p.pt2")
    assert result.exit_code == 2 and "--save-folded" in result.output
    assert not (tmp_path / "cnn.folded.onnx").exists()


def test_verify_folded_against_original_onnx(cnn_onnx, tmp_path):
    assert _invoke("fold", cnn_onnx).exit_code == 0
    result = _invoke("verify", cnn_onnx, tmp_path / "cnn.folded.onnx")
    assert result.exit_code == 0 and "verify: PASS" in result.output


# --------------------------------------------------------------------------- round trip


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_cnn", "tabular_mlp", "digits_autoencoder"])
def test_shipped_models_fold_the_same_through_onnx(name, tmp_path):
    """models/NAME.unfolded.onnx is NAME.pt2 exported by torch.onnx.export(optimize=False)
    (python -m models.unfolded): every BN a node, as older exporters leave them."""
    plain = MODELS / f"{name}.unfolded.onnx"
    data = MODELS / f"{name}_test.npz"
    checkpoint = _invoke(
        "fold", MODELS / f"{name}.pt2", "-o", tmp_path / "ckpt.onnx", "--json", tmp_path / "c.json"
    )
    assert checkpoint.exit_code == 0, checkpoint.output
    out = tmp_path / "via_onnx.onnx"
    via_onnx = _invoke("fold", plain, "-o", out, "--data", data, "--json", tmp_path / "o.json")
    assert via_onnx.exit_code == 0, via_onnx.output
    c, o = (json.loads((tmp_path / f).read_text()) for f in ("c.json", "o.json"))
    assert bn_count(onnx.load(str(plain))) > 0
    assert o["onnx"]["batchnorm_nodes"] == c["onnx"]["batchnorm_nodes"]
    assert o["verify"]["passed"] and o["verify"]["data"]["samples"] > 0


def test_input_that_fails_the_checker_but_runs_is_folded_with_a_warning(tmp_path):
    b = GraphBuilder()
    y = b.bn(b.node("Conv", ["x", b.weight(5, 3, 1, 1)]), 5)
    graph = helper.make_graph(
        b.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],  # no shape field
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "loose.onnx"))
    result = _invoke("fold", tmp_path / "loose.onnx")
    assert result.exit_code == 0, result.output
    assert "does not pass onnx.checker" in result.output and "verify: PASS" in result.output
    assert bn_count(onnx.load(str(tmp_path / "loose.folded.onnx"))) == 0


def test_static_batch_is_a_warning_for_onnx(cnn_onnx, tmp_path):
    result = _invoke("fold", cnn_onnx, "--static-batch")
    assert result.exit_code == 0, result.output
    assert "--static-batch has no effect on an ONNX input" in result.output
    assert "batch sizes [1, 8, " in result.output


def test_initializer_that_is_a_graph_output_keeps_its_type(tmp_path):
    """An initializer that is also a graph output: after the fold the output is still
    declared float [3] and still yields the initializer's values."""
    b = GraphBuilder()
    y = b.bn(b.node("Conv", ["x", b.weight(5, 4, 1, 1)]), 5)
    k = b.const(np.ones(3, np.float32), "k")
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        b.nodes,
        "g",
        [vi("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [vi(y, TensorProto.FLOAT, ["N", 5, 6, 6]), vi(k, TensorProto.FLOAT, [3])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = _invoke("fold", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    folded = onnx.load(str(tmp_path / "m.folded.onnx"))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    outputs = {
        o.name: (o.type.tensor_type.elem_type, [d.dim_value for d in o.type.tensor_type.shape.dim])
        for o in folded.graph.output
    }
    assert outputs[k] == (TensorProto.FLOAT, [3])  # declared float [3] in the file, still so
    got = run(folded, {"x": np.ones((2, 4, 6, 6), np.float32)})[1]
    assert got.dtype == np.float32 and np.array_equal(got, np.ones(3, np.float32))


def test_external_data_stays_external_when_every_external_tensor_was_folded(tmp_path):
    b = GraphBuilder()
    y = b.bn(b.node("Conv", ["x", b.weight(64, 4, 3, 3)]), 64)
    onnx.save(
        b.model([X4_], [y]),
        str(tmp_path / "e.onnx"),
        save_as_external_data=True,
        location="e.bin",
        size_threshold=4096,  # only the conv weight is external
    )
    result = _invoke("fold", tmp_path / "e.onnx")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e.folded.onnx.data").is_file()
