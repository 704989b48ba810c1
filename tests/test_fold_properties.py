"""Property: on random architectures, folding never changes outputs beyond float32 rounding,
removes every BN a pattern covers, and leaves the input model untouched."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnexport import fold
from tests.nets import batchnorm_nodes, build_from_spec, randomize_bn


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_step(draw, c: int, h: int):
    cout = draw(st.integers(1, 8))
    groups = draw(st.sampled_from([g for g in _divisors(c) if cout % g == 0]))
    k = draw(st.sampled_from([1, 3]))
    stride = draw(st.sampled_from([1, 2])) if h >= 6 else 1
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad = draw(st.sampled_from([0, k // 2])) if h > k + 1 else k // 2
    if mode != "zeros" and pad >= h:
        pad = 0
    bias = draw(st.booleans())
    step = ("conv", cout, k, stride, groups, pad, mode, bias)
    h = (h + 2 * pad - k) // stride + 1
    return step, cout, h


@st.composite
def architecture(draw):
    """(spec, in_channels, size): a chain with optional residual blocks and a linear head."""
    c = draw(st.integers(1, 6))
    in_c, h = c, 8
    spec: list[tuple] = []
    covered = 0
    if draw(st.booleans()):
        spec.append(("bn",))
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "convT", "res", "relu"]))
        if kind == "conv":
            step, c, h = draw(conv_step(c, h))
            spec.append(step)
        elif kind == "convT" and h <= 8:
            cout = draw(st.integers(1, 8))
            groups = draw(st.sampled_from([g for g in _divisors(c) if cout % g == 0]))
            k, stride = draw(st.sampled_from([(2, 2), (3, 1), (3, 2)]))
            spec.append(("convT", cout, k, stride, groups, draw(st.booleans())))
            c, h = cout, (h - 1) * stride + k
        elif kind == "res":
            groups = draw(st.sampled_from(_divisors(c)))
            body = [("conv", c, 3, 1, groups, 1, "zeros", draw(st.booleans())), ("bn",)]
            if draw(st.booleans()):
                body.append(("relu",))
            spec.append(("res", body))
            continue
        else:
            spec.append(("relu",))
            continue
        if draw(st.booleans()):
            if draw(st.booleans()):
                spec.append(("drop",))
            spec.append(("bn",))
            covered += 1
    spec.append(("head", draw(st.integers(2, 5)), draw(st.booleans()), draw(st.booleans()), c))
    return spec, in_c


def _covered_bn_names(model: nn.Module) -> set[str]:
    """BNs directly after a conv/convT/linear (only dropout between), directly before a
    conv/convT/linear (any padding: a zero-padded conv keeps the shift as an Add) or head
    BNs."""
    names = set()
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for i, (name, child) in enumerate(children):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            j = i - 1
            while j >= 0 and isinstance(children[j][1], nn.Dropout):
                j -= 1
            prev = children[j][1] if j >= 0 else None
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
            if isinstance(prev, layers) or isinstance(nxt, layers):
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architecture(), seed=st.integers(0, 2**16), batch=st.integers(2, 3))
def test_folding_never_changes_outputs(arch, seed, batch):
    spec, in_c = arch
    torch.manual_seed(seed)
    model = randomize_bn(build_from_spec(spec, in_c), seed).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(batch, in_c, 8, 8)

    result = fold(model, (x,))

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        ref32 = model(x)
        ref64 = copy.deepcopy(model).double()(x.double())
        got = result.module(x)
    scale = ref64.abs().max().item()
    floor = (ref32.double() - ref64).abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    # float32 rounding: the folded model may round differently from the unfolded one, but its
    # error against float64 stays within a small multiple of the unfolded float32 error.
    assert err <= 4 * floor + 1e-6 * max(scale, 1.0), (err, floor, scale)

    folded = {d.name for d in result.report.folded}
    missing = _covered_bn_names(model) - folded
    assert not missing, (missing, str(result.report))
    left_nodes = batchnorm_nodes(result.module)
    assert left_nodes == len(result.report.left)


class Shared(nn.Module):
    """One encoder applied to each of `calls` inputs (weights shared by every call)."""

    def __init__(self, encoder: nn.Module, calls: int):
        super().__init__()
        self.enc, self.calls = encoder, calls

    def forward(self, x):
        # a different input per call (a roll, which no fold takes in)
        return torch.stack([self.enc(x.roll(k, -1)) for k in range(self.calls)], dim=1)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architecture(), seed=st.integers(0, 2**16), calls=st.integers(2, 3))
def test_a_shared_encoder_folds_exactly_as_one_call(arch, seed, calls):
    """Calling the encoder several times folds every BN it folds when called once, into the
    very same weights (one fold per weight, never one per call), and keeps outputs."""
    spec, in_c = arch
    torch.manual_seed(seed)
    encoder = randomize_bn(build_from_spec(spec, in_c), seed).eval()
    x = torch.randn(2, in_c, 8, 8)
    once = fold(Shared(encoder, 1), (x,))
    shared = fold(Shared(encoder, calls), (x,))

    folded_once = {d.name for d in once.report.folded}
    folded_shared = {d.name.split(" (call")[0] for d in shared.report.folded}
    assert folded_once == folded_shared, (str(once.report), str(shared.report))
    assert len(shared.report.folded) == calls * len(folded_once)
    # the BN folds write the very same weights; merges of layers may differ, as a conv ->
    # 1x1 conv chain merges only in a block called once
    if not once.report.merges and not shared.report.merges:
        a, b = once.program.state_dict, shared.program.state_dict
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        ref64 = copy.deepcopy(Shared(encoder, calls)).double()(x.double())
        ref32 = Shared(encoder, calls)(x)
        got = shared.module(x)
    floor = (ref32.double() - ref64).abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    assert err <= 4 * floor + 1e-6 * max(ref64.abs().max().item(), 1.0), (err, floor)


def _tie_layers(source: nn.Module, target: nn.Module) -> None:
    """Make every conv/linear of `target` the very module of `source` (shared weights)."""
    for (name, mod), (_, other) in zip(source.named_children(), list(target.named_children())):
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            setattr(target, name, mod)
        else:
            _tie_layers(mod, other)


class Pair(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.stack([self.a(x), self.b(x * 2)], dim=1)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architecture(), seed=st.integers(0, 2**16), duplicate=st.booleans())
def test_shared_layers_with_their_own_bns_never_change_outputs(arch, seed, duplicate):
    """Two branches share every conv/linear but have BNs of their own: each BN either folds
    into its own copy of the weights (`duplicate_shared`) or is left; outputs never change."""
    spec, in_c = arch
    torch.manual_seed(seed)
    a = randomize_bn(build_from_spec(spec, in_c), seed)
    b = randomize_bn(copy.deepcopy(a), seed + 1)
    _tie_layers(a, b)
    model = Pair(a, b).eval()
    x = torch.randn(2, in_c, 8, 8)

    result = fold(model, (x,), duplicate_shared=duplicate)

    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        floor = (model(x).double() - ref64).abs().max().item()
        err = (result.module(x).double() - ref64).abs().max().item()
    assert err <= 4 * floor + 1e-6 * max(ref64.abs().max().item(), 1.0), (err, floor)
    if duplicate:
        covered = _covered_bn_names(a)
        folded = {d.name.removeprefix("a.") for d in result.report.folded}
        assert covered <= folded, (covered, str(result.report))
    left_nodes = batchnorm_nodes(result.module)
    assert left_nodes == len(result.report.left)
