"""The verify stage: an ONNX file in onnxruntime against a reference, on the same inputs.

The reference is a callable (the eval-mode original; an nn.Module is run in eval mode with its
flags restored) or the outputs it gave, recorded beforehand (one per batch). Outputs may be
torch tensors or numpy arrays, nested in tuples, lists or dicts.

For each output o over all batches: max abs error max|onnx - ref|, its scale max|ref|, and
max relative error = max abs error / scale. An output passes when
max abs error <= atol + rtol * scale. Class-score outputs (2-D, last axis >= 2) also report
argmax agreement.

A model that computes in float16 or bfloat16 is held to the precision it has. Its float32
twin (the same parameters and inputs cast exactly to float32) gives a second reference, the
`baseline`; the ONNX file and the half-precision original are both measured against it, and
an output passes when

    export error <= factor * the original's own error + atol + rtol * scale

(`factor`: HALF_ERROR_FACTOR, measured on real models; see bnexport.defaults). An original
whose own error is not finite (it overflows where float32 does not) gives no allowance.
Argmax agreement and accuracy still compare the ONNX file with the original itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from bnexport.defaults import DEFAULT_ATOL, DEFAULT_RTOL


@dataclass
class OutputCheck:
    name: str
    max_abs_err: float = 0.0
    scale: float = 0.0
    argmax_agree: int = 0
    argmax_total: int = 0
    original_err: float | None = None  # the half-precision original against its float32 twin

    @property
    def max_rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err

    @property
    def argmax_agreement(self) -> float | None:
        return self.argmax_agree / self.argmax_total if self.argmax_total else None


@dataclass
class Accuracy:
    reference: float
    onnx: float
    n: int


@dataclass
class VerifyResult:
    outputs: list[OutputCheck]
    samples: int
    atol: float
    rtol: float
    batch_sizes: list[int] = field(default_factory=list)
    accuracy: Accuracy | None = None
    data_argmax_agreement: float | None = None
    data: str | None = None
    data_size: int = 0
    # a half-precision model measured against its float32 twin (all None for float32 models)
    factor: float | None = None  # the allowance per unit of the original's own error
    model_dtype: str | None = None  # "float16" or "bfloat16"
    reference_dtype: str | None = None  # "float32": the twin the errors are measured against
    verified_file: str | None = None  # "ONNX file", or "float32 twin" when it could not run
    # a float16 export of a float32 model: whose own float16 error sets the allowance
    own_error_of: str | None = None
    # and the allowance per unit of scale where that own float16 run overflows
    fallback_rtol: float | None = None

    def tolerance(self, o: OutputCheck) -> float:
        """The largest error output `o` may have."""
        tol = self.atol + self.rtol * o.scale
        if self.factor is not None and o.original_err is not None:
            if np.isfinite(o.original_err):
                tol += self.factor * o.original_err
            elif self.fallback_rtol is not None:
                tol += self.fallback_rtol * o.scale
        return tol

    @property
    def passed(self) -> bool:
        return all(o.max_abs_err <= self.tolerance(o) for o in self.outputs)

    @property
    def original_err(self) -> float | None:
        """The largest error of the original against the float32 twin (None without one)."""
        errs = [o.original_err for o in self.outputs if o.original_err is not None]
        return max(errs) if errs else None

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((o.max_rel_err for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        from bnexport.render import verify_dict

        return verify_dict(self)


@dataclass
class Outputs:
    """The tensor leaves of one model output, flattened in the exporter's order, as numpy."""

    names: list[str]
    arrays: list[np.ndarray]


def as_outputs(value) -> Outputs:
    """Flatten a (nested) output of torch tensors or numpy arrays into named numpy arrays."""
    if isinstance(value, Outputs):
        return value
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten_with_path(value)
    names, arrays = [], []
    for path, leaf in leaves:
        if hasattr(leaf, "detach"):
            leaf = _tensor_numpy(leaf)
        if isinstance(leaf, np.ndarray):
            names.append(pytree.keystr(path) or "output")
            arrays.append(leaf)
    return Outputs(names, arrays)


def _tensor_numpy(x) -> np.ndarray:
    """A torch tensor as numpy; bfloat16 (which numpy lacks) as float32, which holds it exactly."""
    import torch

    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def as_numpy_batch(batch) -> tuple[np.ndarray, ...]:
    """One batch (a tensor, an array, or a tuple of them) as a tuple of numpy arrays."""
    items = batch if isinstance(batch, (tuple, list)) else (batch,)
    return tuple(_tensor_numpy(x) if hasattr(x, "detach") else np.asarray(x) for x in items)


HALF_DTYPES = ("float16", "bfloat16")


def float32_batches(batches: Iterable) -> list[tuple]:
    """The batches with every float16/bfloat16 input cast (exactly) to float32."""
    import torch

    def cast(x):
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
            return x.float()
        return x

    return [tuple(cast(x) for x in (b if isinstance(b, (tuple, list)) else (b,))) for b in batches]


def run_reference(reference: Callable, batch) -> Outputs:
    """Call `reference` on one batch without autograd (an nn.Module in eval mode)."""
    import torch

    from bnexport.trace import eval_mode

    items = batch if isinstance(batch, (tuple, list)) else (batch,)
    args = tuple(torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in items)
    with torch.inference_mode():
        if isinstance(reference, torch.nn.Module):
            with eval_mode(reference):
                return as_outputs(reference(*args))
        return as_outputs(reference(*args))


def record_reference(reference: Callable, batches: Iterable) -> list[Outputs]:
    """The reference's outputs on every batch, to compare with later."""
    return [run_reference(reference, batch) for batch in batches]


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


def _error_and_scale(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |got - ref|, max |ref|) over the finite reference values.

    A non-finite reference value (inf, -inf or NaN, as in masked log-probabilities) must be
    matched exactly; otherwise the error is inf. So an infinite output never widens the
    tolerance of the others.
    """
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r64)
    if not finite.all():
        same = (r64 == g64) | (np.isnan(r64) & np.isnan(g64))
        if not same[~finite].all():
            return float("inf"), 0.0
        r64, g64 = r64[finite], g64[finite]
    if not r64.size:
        return 0.0, 0.0
    err = float(np.max(np.abs(r64 - g64)))
    return (err if np.isfinite(err) else float("inf")), float(np.max(np.abs(r64)))


def compare(
    reference: Callable | Sequence,
    runner: Callable,
    batches: Iterable,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    labels: np.ndarray | None = None,
    baseline: Sequence | None = None,
    factor: float | None = None,
    half_outputs: Sequence | None = None,
) -> VerifyResult:
    """Run the ONNX model on every batch and accumulate per-output errors against the reference.

    `reference` is a callable, or a sequence with the recorded output of each batch.
    `baseline`: the recorded outputs of the float32 twin of a half-precision reference; then
    the errors (and scales) of the ONNX model and of the reference itself are measured against
    it, and `factor` (the dtype tolerance) applies.
    `half_outputs`: for a float16 export of a float32 reference, the reference model's own
    outputs computed in float16 on every batch; the errors are measured against the reference
    and the allowance is `factor` times the error of `half_outputs` against it.
    """
    recorded = None if callable(reference) else list(reference)
    twin = None if baseline is None else list(baseline)
    own = None if half_outputs is None else list(half_outputs)
    measured = twin is not None or own is not None
    checks: list[OutputCheck] | None = None
    samples, batch_sizes = 0, []
    ref_correct = onnx_correct = n_labels = 0
    agree = total = 0
    for i, batch in enumerate(batches):
        expected = run_reference(reference, batch) if recorded is None else recorded[i]
        expected = as_outputs(expected)
        names, ref = expected.names, expected.arrays
        arrays = as_numpy_batch(batch)
        got = runner(*arrays)
        if len(got) != len(ref):
            raise ValueError(f"the ONNX model has {len(got)} outputs but the model has {len(ref)}")
        if checks is None:
            checks = [OutputCheck(n, original_err=0.0 if measured else None) for n in names]
        # what the errors are measured against, and the half-precision run whose own error
        # against that sets the allowance: the original against its float32 twin, or the
        # reference's float16 run against the (float32) reference
        base = ref if twin is None else as_outputs(twin[i]).arrays
        mine = as_outputs(own[i]).arrays if own is not None else ref
        for check, r, g, b, h in zip(checks, ref, got, base, mine):
            if measured:
                err_h = _error_and_scale(b, h)[0] if b.shape == h.shape else float("inf")
                check.original_err = max(check.original_err, err_h)
            if b.shape != g.shape:
                check.max_abs_err = float("inf")
                continue
            err, scale = _error_and_scale(b, g)
            check.max_abs_err = max(check.max_abs_err, err)
            check.scale = max(check.scale, scale)
            if r.ndim == 2 and r.shape[1] >= 2 and np.issubdtype(r.dtype, np.floating):
                check.argmax_agree += int((r.argmax(1) == g.argmax(1)).sum())
                check.argmax_total += r.shape[0]
        if labels is not None and ref and ref[0].ndim == 2:
            lab = labels[n_labels : n_labels + ref[0].shape[0]]
            ref_correct += int((ref[0].argmax(1) == lab).sum())
            onnx_correct += int((got[0].argmax(1) == lab).sum())
            n_labels += len(lab)
            agree += int((ref[0].argmax(1) == got[0].argmax(1)).sum())
            total += len(lab)
        samples += 1
        batch_sizes.append(int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1)
    result = VerifyResult(checks or [], samples, atol, rtol, batch_sizes)
    if measured:
        result.factor, result.reference_dtype = factor, "float32"
    if n_labels:
        result.accuracy = Accuracy(ref_correct / n_labels, onnx_correct / n_labels, n_labels)
        result.data_argmax_agreement = agree / total
    return result


def merge(results: list[VerifyResult]) -> VerifyResult:
    """Combine several comparisons of the same model (random and user data)."""
    base = results[0]
    merged = replace(
        base,
        outputs=[OutputCheck(o.name) for o in base.outputs],
        samples=0,
        batch_sizes=[],
        accuracy=None,
        data_argmax_agreement=None,
        data=None,
        data_size=0,
    )
    for r in results:
        merged.samples += r.samples
        merged.batch_sizes += r.batch_sizes
        for m, o in zip(merged.outputs, r.outputs):
            if o.original_err is not None:
                m.original_err = max(m.original_err or 0.0, o.original_err)
            m.max_abs_err = max(m.max_abs_err, o.max_abs_err)
            m.scale = max(m.scale, o.scale)
            m.argmax_agree += o.argmax_agree
            m.argmax_total += o.argmax_total
        if r.accuracy is not None:
            merged.accuracy = r.accuracy
            merged.data_argmax_agreement = r.data_argmax_agreement
        if r.data is not None:
            merged.data, merged.data_size = r.data, r.data_size
    return merged


def verify_onnx(
    reference: Callable | Sequence,
    onnx_path: str,
    inputs: Iterable,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    labels: np.ndarray | None = None,
) -> VerifyResult:
    """Compare a reference with the ONNX file at `onnx_path` on every batch of `inputs`.

    `reference`: a callable (an nn.Module is run in eval mode, its flags restored) or the
    recorded output of each batch (torch tensors or numpy arrays). `inputs` yields one batch
    per item: a tensor or array, or a tuple of forward's positional inputs.
    """
    batches = list(inputs)
    return compare(
        reference, OnnxRunner(str(onnx_path)), batches, atol=atol, rtol=rtol, labels=labels
    )
