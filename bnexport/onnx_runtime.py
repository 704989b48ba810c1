"""onnxruntime on ONNX files, called like a model.

`OnnxRunner` feeds positional inputs (torch tensors or numpy) to a CPU session;
`OnnxReference` runs an original file as the reference of a fold (no graph optimizations, so
the comparison tests the graphs and not onnxruntime's fusions). A half-precision file has a
float32 twin: every float16/bfloat16 tensor and type of the file cast exactly to float32.
Both return their outputs named, as `Outputs`.
"""

from __future__ import annotations

import numpy as np

from bnexport.errors import BadInputError, summarize_exception
from bnexport.outputs import Outputs, as_numpy_batch

# onnxruntime's names of the floating types an input may be cast between (exactly, or by
# rounding to the half type the file declares)
_ORT_FLOATS = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bf16"}


def _numpy_float(name: str):
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class OnnxRunner:
    """An onnxruntime CPU session fed with positional inputs (torch tensors or numpy).

    A float16/bfloat16/float32 input goes in as the type the file declares among those three
    (a bfloat16 tensor reaches numpy as float32; a float32 twin takes float16 inputs as
    float32); every other input is fed as it is.
    """

    def __init__(self, path, optimize: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures reach the report as exceptions
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        model = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._floats = [_ORT_FLOATS.get(i.type) for i in self.session.get_inputs()]

    def _fed(self, x: np.ndarray, want: str | None) -> np.ndarray:
        if want == "bf16" and x.dtype in (np.float16, np.float32):
            return x.astype(_numpy_float(want))
        if want == "float32" and x.dtype == np.float16:
            return x.astype(np.float32)  # a float32 twin fed a float16 model's inputs
        if want == "float16" and x.dtype == np.float32:
            return x.astype(np.float16)  # a float16 export with float16 inputs (--fp16-io)
        return x  # anything else as it is (onnxruntime names a mismatch)

    def __call__(self, *args) -> list[np.ndarray]:
        arrays = as_numpy_batch(args)
        feed = {n: self._fed(x, w) for n, x, w in zip(self.input_names, arrays, self._floats)}
        return self.session.run(None, feed)


def uses_half_type(path) -> str | None:
    """ "bfloat16" or "float16" when the ONNX file at `path` declares tensors of that type
    (bfloat16 first), else None. External weights are not read."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = {t for t in _all_elem_types(model)}
    for name, code in (
        ("bfloat16", onnx.TensorProto.BFLOAT16),
        ("float16", onnx.TensorProto.FLOAT16),
    ):
        if code in found:
            return name
    return None


def _graphs(model):
    """The main graph, its subgraphs and those of every local function, as (nodes, graph)."""
    import onnx

    stack = [(list(model.graph.node), model.graph)]
    stack += [(list(f.node), None) for f in model.functions]
    while stack:
        nodes, graph = stack.pop()
        yield nodes, graph
        for node in nodes:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append((list(attr.g.node), attr.g))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack += [(list(g.node), g) for g in attr.graphs]


def _value_types(graph):
    """The tensor types of a graph's inputs, outputs and value_info."""
    for info in (*graph.input, *graph.output, *graph.value_info):
        t = info.type
        while t.HasField("sequence_type") or t.HasField("optional_type"):
            t = (
                t.sequence_type.elem_type
                if t.HasField("sequence_type")
                else t.optional_type.elem_type
            )
        if t.HasField("tensor_type"):
            yield t.tensor_type


def _all_elem_types(model):
    for nodes, graph in _graphs(model):
        if graph is not None:
            yield from (t.data_type for t in graph.initializer)
            yield from (t.elem_type for t in _value_types(graph))
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t.data_type


# attributes that name an element type (Cast's `to`, the `dtype` of generators)
_DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")


def float32_twin(model) -> None:
    """Make an ONNX ModelProto its float32 twin, in place: every float16/bfloat16 tensor
    (initializers, constants) is cast to float32 (exact: both types are subsets of float32),
    and every declared or requested float16/bfloat16 type becomes float32. The twin computes
    what the half-precision weights say, in float32."""
    import onnx
    from onnx import numpy_helper

    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    f32 = onnx.TensorProto.FLOAT

    def cast(tensor) -> None:
        if tensor.data_type in half:
            array = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    for nodes, graph in _graphs(model):
        if graph is not None:
            for tensor in graph.initializer:
                cast(tensor)
            for t in _value_types(graph):
                if t.elem_type in half:
                    t.elem_type = f32
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    cast(attr.t)
                for tensor in attr.tensors:
                    cast(tensor)
                names_type = attr.name in _DTYPE_ATTRIBUTES and attr.type == attr.INT
                if names_type and attr.i in half:
                    attr.i = f32


def float32_twin_runner(path, optimize: bool = True) -> OnnxRunner:
    """onnxruntime on the float32 twin of the ONNX file at `path` (made in a temporary
    directory that is removed once the session has loaded it)."""
    import tempfile
    from pathlib import Path

    import onnx

    model = onnx.load(str(path))  # external weights included
    float32_twin(model)
    with tempfile.TemporaryDirectory(prefix="bnexport-twin-") as tmp:
        twin = Path(tmp) / "float32_twin.onnx"
        large = model.ByteSize() > 2**31 - 2**27
        onnx.save(model, str(twin), save_as_external_data=large, location="float32_twin.data")
        del model
        return OnnxRunner(str(twin), optimize=optimize)


def move_weights_one_ulp(model, seed: int = 0) -> None:
    """Move every float32 initializer of more than one element of the ModelProto `model` by
    one unit in the last place, up or down at random (seeded), in place."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        if array.size < 2:
            continue
        toward = np.where(rng.random(array.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(np.nextafter(array, toward), tensor.name))


def one_ulp_twin_runner(path, seed: int = 0, optimize: bool = False) -> OnnxRunner:
    """onnxruntime on a copy of the ONNX file at `path` whose every float32 weight (an
    initializer of more than one element) is moved by one unit in the last place, up or down
    at random (seeded): the file's outputs under one more rounding of each weight, which is
    what a fold does to the weights it rewrites. Its difference from the file itself measures
    how much the model's outputs move under float32 rounding."""
    import onnx

    model = onnx.load(str(path))  # external weights included
    move_weights_one_ulp(model, seed)
    if model.ByteSize() > 2**31 - 2**27:
        raise ValueError("the file is too large to be moved by one unit in memory")
    return OnnxRunner(model.SerializeToString(), optimize=optimize)


class Float32TwinReference:
    """onnxruntime on the float32 twin of an ONNX file (no graph optimizations), called like
    a model; the float32 reference of a float16 ONNX original."""

    def __init__(self, path):
        self.path = str(path)
        self._runner = None

    def __call__(self, *args) -> Outputs:
        if self._runner is None:
            self._runner = float32_twin_runner(self.path, optimize=False)
        names = [o.name for o in self._runner.session.get_outputs()]
        return Outputs(names, list(self._runner(*args)))


class OnnxReference:
    """onnxruntime on the original ONNX file (no graph optimizations), called like a model;
    returns the outputs under their graph names. The session is created on first call."""

    def __init__(self, path: str):
        self.path = str(path)
        self._runner = None

    def _session(self):
        if self._runner is None:
            try:
                self._runner = OnnxRunner(self.path, optimize=False)
            except Exception as exc:  # noqa: BLE001 - the user's file cannot run here
                raise BadInputError(
                    f"onnxruntime cannot load '{self.path}' ({summarize_exception(exc, 400)}). "
                    "bnexport verifies every fold in onnxruntime, so the model must run there: "
                    "an op or domain it names above needs a newer onnxruntime or a custom-op "
                    "library, or the file is not a valid model."
                ) from None
        return self._runner

    def __call__(self, *args):
        runner = self._session()
        names = [o.name for o in runner.session.get_outputs()]
        return Outputs(names, list(runner(*args)))
