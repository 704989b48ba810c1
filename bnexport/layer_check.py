"""Every folded layer checked where it is, against one layer's rounding.

For each fold the exported file is cut just around it (see `CheckPoint`): the export's
tensor that stands where the fold is (`export_value`) is computed by onnxruntime from the
nearest tensors upstream that still hold the original's values, fed with the original's own
values there, and compared with the original's tensor at that point. Nothing upstream of the
cut enters the comparison, so a defect that a ReLU, a pooling or an argmax hides downstream
is seen, and the rounding of a deep network in front of the layer cannot hide one.

Per channel c of the compared tensor, over every position and sample:

    err_c   = max |export - original|,   scale_c = max |original|
    passes when err_c <= LAYER_RTOL * max(scale_c, LAYER_SCALE_FLOOR * max_c scale_c) + atol

LAYER_RTOL is a few float32 roundings of one layer (see bnexport.defaults).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bnexport.defaults import DEFAULT_ATOL, LAYER_RTOL, LAYER_SCALE_FLOOR
from bnexport.errors import summarize_exception
from bnexport.layer_cut import LayerCut, value_info, value_types
from bnexport.report import LayerCheck


def compare_layers(
    cuts: list[LayerCut],
    values: list[dict[str, np.ndarray]],
    *,
    optimize: bool,
    rtol: float = LAYER_RTOL,
    atol: float = DEFAULT_ATOL,
    floor: list[dict[str, np.ndarray]] | None = None,
    factor: float = 0.0,
) -> tuple[list[LayerCheck], list[dict[str, str]]]:
    """Run every cut on the original's values of each recorded batch (`values`, one dict of
    tensors by name per batch) and compare; the cuts that cannot run are returned apart.

    `floor`: the same tensors from the original computed otherwise (its float64 twin, or
    its weights moved by one unit in the last place), batch for batch; each channel then
    also allows `factor` times the original's own difference from them."""
    from bnexport.onnx_runtime import OnnxRunner

    checks, unrunnable = [], []
    for cut in cuts:
        try:
            runner = OnnxRunner(cut.model.SerializeToString(), optimize=optimize)
            err = scale = own = None
            samples = 0
            for i, batch in enumerate(values):
                fed = [batch[cut.feeds[name]] for name in runner.input_names]
                (got,) = runner(*fed)
                want = batch[cut.original_value]
                e, s = _channel_errors(want, got, cut.check.axis)
                err = e if err is None else np.maximum(err, e)
                scale = s if scale is None else np.maximum(scale, s)
                if floor is not None and i < len(floor) and cut.original_value in floor[i]:
                    o, _ = _channel_errors(floor[i][cut.original_value], want, cut.check.axis)
                    own = o if own is None else np.maximum(own, o)
                samples += int(want.shape[0]) if want.ndim else 1
        except Exception as exc:  # noqa: BLE001 - reported as a layer that could not be checked
            unrunnable.append({"name": cut.decision_name, "reason": summarize_exception(exc)})
            continue
        if err is None:
            continue
        own_allowance = None if own is None else factor * own
        checks.append(_verdict(cut, err, scale, samples, rtol, atol, own_allowance))
    return checks, unrunnable


def _channel_errors(want: np.ndarray, got: np.ndarray, axis: int):
    """(max |got - want|, max |want|) per channel on `axis`; inf where shapes differ or a
    value is not finite where the original's is. `got` of another shape but as many
    elements is the same tensor seen through a reshape (a layer's output before the reshapes
    that led to its BN) and is compared in the original's shape."""
    if want.shape != got.shape and want.size == got.size:
        got = got.reshape(want.shape)
    if want.shape != got.shape:
        n = want.shape[axis] if want.ndim > axis else 1
        return np.full(n, np.inf), np.zeros(n)
    w, g = want.astype(np.float64), got.astype(np.float64)
    if w.ndim == 0:
        w, g = w.reshape(1), g.reshape(1)
    axis = axis % w.ndim
    w, g = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), np.moveaxis(g, axis, 0)
    g = g.reshape(w.shape)
    same = (w == g) | (np.isnan(w) & np.isnan(g))
    with np.errstate(invalid="ignore"):
        diff = np.where(np.isfinite(w), np.abs(g - w), np.where(same, 0.0, np.inf))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN where the original is finite
    finite = np.where(np.isfinite(w), np.abs(w), 0.0)
    return diff.max(axis=1, initial=0.0), finite.max(axis=1, initial=0.0)


def _verdict(
    cut: LayerCut, err, scale, samples: int, rtol: float, atol: float, own=None
) -> LayerCheck:
    floor = LAYER_SCALE_FLOOR * float(scale.max(initial=0.0))
    reference = np.maximum(scale, floor)
    tolerance = rtol * reference + atol
    if own is not None:
        tolerance = tolerance + np.where(np.isfinite(own), own, 0.0)
    worst = int(np.argmax(err / tolerance))
    relative = np.where(reference > 0, err / np.where(reference > 0, reference, 1), err)
    return LayerCheck(
        name=cut.layer_name,
        batchnorm=cut.decision_name,
        max_abs_err=float(err.max(initial=0.0)),
        max_rel_err=float(relative.max(initial=0.0)),
        worst_channel=worst,
        passed=bool((err <= tolerance).all()),
        samples=samples,
    )


def program_capture_names(program) -> set[str]:
    """The tensors of a torch.export program that a check may need: the user inputs, every
    BN call's and other affine map's input and output, every conv/linear layer's input
    and output, and every sum of parallel branches that a merge may turn into one layer."""
    from bnexport.folding.affines import ConstantValues, affine_calls
    from bnexport.folding.branches import sum_outputs
    from bnexport.folding.program_state import ProgramState
    from bnexport.folding.sites import match_batchnorm, match_layer

    state = ProgramState(program, copy_graph=False)
    constants = ConstantValues(state)
    names = set(program.graph_signature.user_inputs)
    for call in affine_calls(state.graph, constants):
        names.update((call.input.name, call.node.name))
    names.update(sum_outputs(state, constants))
    for node in state.graph.nodes:
        if node.op != "call_function":
            continue
        bn = match_batchnorm(node)
        if bn is not None:
            names.update((bn.input.name, bn.node.name))
            continue
        layer = match_layer(node, state)
        if layer is not None:
            names.add(node.name)
            if node.args and hasattr(node.args[0], "name"):
                names.add(node.args[0].name)
    return names


def capture_program_values(
    program, batches: Iterable[tuple], names: set[str], budget: int
) -> list[dict[str, np.ndarray]]:
    """The values of the named tensors of `program` (eval mode, before any fold) on each
    batch, as numpy, batch by batch while they fit in `budget` bytes (at least one batch)."""
    return capture_module_values(program.module(), batches, names, budget)


def capture_module_values(
    module, batches: Iterable[tuple], names: set[str], budget: int, dtype=None
) -> list[dict[str, np.ndarray]]:
    """As `capture_program_values`, on a graph module (a program's `.module()`); with
    `dtype`, floating inputs are cast to it first (a float64 twin's)."""
    import torch
    from torch import fx

    cast = (
        (lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
        if dtype is not None
        else (lambda x: x)
    )

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names and isinstance(out, torch.Tensor):
                value = out.detach()
                value = value.float() if value.dtype == torch.bfloat16 else value
                self.found[n.name] = value.numpy().copy()
            return out

    captured, used = [], 0
    with torch.inference_mode():
        for batch in batches:
            runner = Capture(module)
            runner.found = {}
            runner.run(*(cast(x) for x in batch))
            size = sum(a.nbytes for a in runner.found.values())
            if captured and used + size > budget:
                break
            captured.append(runner.found)
            used += size
    return captured


def onnx_values(
    path: str, batches: Iterable[tuple], names: set[str], budget: int, one_ulp: bool = False
) -> list[dict[str, np.ndarray]]:
    """The values of the named tensors of the ONNX file at `path` (and its inputs) on each
    batch, from onnxruntime without graph optimizations, batch by batch while they fit in
    `budget` bytes (at least one batch). With `one_ulp`, of the file with every weight moved
    by one unit in the last place (`move_weights_one_ulp`)."""
    import onnx

    from bnexport.onnx_runtime import OnnxRunner, move_weights_one_ulp
    from bnexport.outputs import as_numpy_batch

    model = onnx.load(str(path))
    if one_ulp:
        move_weights_one_ulp(model)
    types = value_types(onnx.shape_inference.infer_shapes(model))
    inputs = [i.name for i in model.graph.input]
    outputs = {o.name for o in model.graph.output}
    extra = sorted(n for n in names if n not in outputs and n not in inputs)
    model.graph.output.extend(value_info(n, types) for n in extra)
    runner = OnnxRunner(model.SerializeToString(), optimize=False)
    del model
    order = [o.name for o in runner.session.get_outputs()]
    captured, used = [], 0
    for batch in batches:
        found = dict(zip(order, runner(*batch)))
        found.update(zip(inputs, as_numpy_batch(batch)))
        found = {n: v for n, v in found.items() if n in names or n in inputs}
        size = sum(a.nbytes for a in found.values())
        if captured and used + size > budget:
            break
        captured.append(found)
        used += size
    return captured
