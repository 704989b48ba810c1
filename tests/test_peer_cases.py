"""The peers' own BatchNorm-fusion test models (tests/peer_cases.py) through our ONNX engine:
each folds to the expected BN count, every refusal has its reason, outputs are unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.onnx_builders import bn_count, fold_proto, max_rel_diff, run
from tests.peer_cases import PEER_CASES

# BNs our engine leaves, and a phrase of the reason; every other case folds completely
LEFT = {
    "onnxscript_non_initializers": "graph input",
    "onnxscript_graph_inputs": "graph input",
    "onnxoptimizer_fuse_bn_into_conv_simple_2020": "graph input",
    "onnxslim_bn_only": "model input",
    "derived_conv_output_used_twice": "also used by",
}


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        t = value.type.tensor_type
        shape = [d.dim_value or 1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[value.name] = rng.uniform(0.1, 1, shape).astype(dtype)  # variances too
    return feeds


@pytest.mark.parametrize("case", sorted(PEER_CASES))
def test_peer_case(case):
    model = PEER_CASES[case][0]()
    folded, report = fold_proto(model)
    onnx.checker.check_model(folded, full_check=True)
    feeds = _feeds(model)
    assert max_rel_diff(run(model, feeds), run(folded, feeds)) < 1e-5
    if case in LEFT:
        assert bn_count(folded) == bn_count(model) == len(report.left)
        assert all(LEFT[case] in d.reason for d in report.left), report.left
    else:
        assert bn_count(folded) == 0 and len(report.folded) == bn_count(model), report.left
    if case == "onnxscript_shared_weights":
        # two Conv share W/B and the BN parameters: one fold serves both calls
        assert [(d.shared_calls, d.bytes_added) for d in report.folded] == [(2, 0)] * 2
        convs = [n for n in folded.graph.node if n.op_type == "Conv"]
        assert len({tuple(n.input[1:]) for n in convs}) == 1
    # inputs the caller may feed stay inputs
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
