"""Small hand-built ONNX graphs for the ONNX engine's tests (onnx.helper, seeded weights)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Accumulate nodes and initializers; `model()` returns a checked ModelProto."""

    def __init__(self, seed: int = 0, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, array: np.ndarray, base: str = "w") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape: int, base: str = "w") -> str:
        return self.const((self.rng.standard_normal(shape) * 0.5).astype(self.dtype), base)

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"n_{op}"), **attrs))
        return outs[0] if n_out == 1 else outs

    def bn(self, x: str, channels: int, *, eps: float = 1e-5, **attrs) -> str:
        """A BatchNormalization with trained-like statistics: every other channel (the first
        included) has a variance of 3e-5..3e-4, where eps is 3-30% of it, as in trained nets;
        the others 0.3..2."""
        r = self.rng
        var = r.uniform(0.3, 2.0, channels)
        var[::2] = 10 ** r.uniform(-4.5, -3.5, len(var[::2]))
        params = [
            self.const((r.uniform(0.5, 1.5, channels) * r.choice([-1, 1], channels)), "gamma"),
            self.const(r.normal(0, 0.5, channels), "beta"),
            self.const(r.normal(0, 0.5, channels), "mean"),
            self.const(var, "var"),
        ]
        for i, name in enumerate(params):
            init = next(t for t in self.inits if t.name == name)
            init.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init).astype(self.dtype), name)
            )
            params[i] = name
        return self.node("BatchNormalization", [x, *params], epsilon=eps, **attrs)

    def model(
        self,
        inputs: list[tuple[str, list]],
        outputs: list[str],
        opset: int = 18,
        elem=TensorProto.FLOAT,
        **kw,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
            [helper.make_tensor_value_info(o, elem, None) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
        model.ir_version = min(model.ir_version, 10)
        # the outputs get their types (and shapes where known) from shape inference
        inferred = onnx.shape_inference.infer_shapes(model)
        for out, inf in zip(model.graph.output, inferred.graph.output):
            out.type.CopyFrom(inf.type)
            if not out.type.tensor_type.HasField("shape"):
                out.type.tensor_type.shape.SetInParent()
        onnx.checker.check_model(model)
        return model


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def fold_proto(model: onnx.ModelProto, **options):
    """(folded ModelProto, FoldReport) through the ONNX engine (`options`: duplicate_shared)."""
    from bnexport.folding.onnx_engine import fold_onnx_model

    ir_model = ir.serde.deserialize_model(model)
    report = fold_onnx_model(ir_model, **options)
    return ir.serde.serialize_model(ir_model), report


def max_rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(
        float(np.abs(x.astype(np.float64) - y).max() / max(np.abs(x).max(), 1e-12))
        for x, y in zip(a, b)
    )
