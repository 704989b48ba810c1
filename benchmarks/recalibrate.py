"""Recalibration: bnexport's one-pass recalibration against `torch.optim.swa_utils.update_bn`.

    python benchmarks/recalibrate.py          # writes benchmarks/results_recalibrate.md
    python benchmarks/recalibrate.py --quick  # the small models, one repetition

On the same model (stale statistics) and the same data, in this process, median of 3:

* bnexport: `recalibrate_module` on the model's eval-mode program, as loaded from a .pt2 (one
  pass over the data in topological order; each BN measured with the BNs upstream already
  recalibrated); tracing the module into a program is not timed (a .pt2 is one already);
* update_bn: `torch.optim.swa_utils.update_bn(loader, model)` (one pass in train mode,
  momentum None: the average of per-batch means and unbiased variances, every BN measured
  while the BNs upstream normalize with batch statistics).

Fixed-point error: afterwards, the eval-mode model runs over the data and each BN's running
statistics are compared with the exact (float64) statistics of its own input:
max over BNs and channels of max(|running_mean - m| / sqrt(v), |running_var - v| / v).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.nets import MLP, PreActResNet18  # noqa: E402
from benchmarks.timing import median_time  # noqa: E402
from bnexport.stats.population import ChannelMoments  # noqa: E402
from bnexport.stats.recalibrate import recalibrate_module  # noqa: E402
from models.architectures import digits_cnn  # noqa: E402

CHUNK = 256


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _stale(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for bn in _bns(model):
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.2, 5, generator=gen)
        bn.weight.data.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def cases(quick: bool = False) -> list[tuple[str, nn.Module, torch.Tensor]]:
    stale = digits_cnn()
    program = torch.export.load(str(ROOT / "models" / "digits_cnn_stale.pt2"))
    stale.load_state_dict(program.state_dict, strict=False)
    calib = torch.from_numpy(np.load(ROOT / "models" / "digits_cnn_stale_calib.npz")["x"])
    gen = torch.Generator().manual_seed(1)
    found = [
        ("digits_cnn_stale (shipped)", stale.eval(), calib),
        ("preact_resnet18", _stale(PreActResNet18()), torch.randn(1024, 3, 32, 32, generator=gen)),
        ("mlp_input_bn", _stale(MLP()), torch.randn(4096, 64, generator=gen) * 2 + 1),
    ]
    return [c for c in found if not quick or c[0] != "preact_resnet18"]


def fixed_point_error(model: nn.Module, data: torch.Tensor) -> float:
    moments = []
    hooks = []
    for bn in _bns(model):
        m = ChannelMoments()
        moments.append(m)
        hooks.append(bn.register_forward_pre_hook(lambda _, a, m=m: m.add(a[0])))
    model.eval()
    with torch.no_grad():
        for chunk in torch.split(data, CHUNK):
            model(chunk)
    for h in hooks:
        h.remove()
    worst = 0.0
    for bn, m in zip(_bns(model), moments):
        rm, rv = bn.running_mean.double(), bn.running_var.double()
        worst = max(
            worst,
            float(((rm - m.mean).abs() / m.var.sqrt()).max()),
            float(((rv - m.var).abs() / m.var).max()),
        )
    return worst


def program_of(model: nn.Module, data: torch.Tensor):
    """The model's program, as `bnexport recalibrate` loads it from a .pt2 (not timed)."""
    dims = ({0: torch.export.Dim("batch", min=2)},)
    return torch.export.export(copy.deepcopy(model).eval(), (data[:2],), dynamic_shapes=dims)


def ours(model: nn.Module, data: torch.Tensor, program) -> nn.Module:
    """Recalibrate through the program; return a copy of the model with the new statistics."""
    model = copy.deepcopy(model).eval()
    done, _ = recalibrate_module(program.module(), [(c,) for c in torch.split(data, CHUNK)])
    buffers = dict(model.named_buffers())
    for r in done:
        buffers[r.mean_target].copy_(r.mean)
        buffers[r.var_target].copy_(r.var)
    return model


def theirs(model: nn.Module, data: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(torch.split(data, CHUNK), model)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small models, one repetition")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results_recalibrate.md")
    opts = parser.parse_args(argv)
    lines = [
        f"Recalibration benchmark {datetime.date.today().isoformat()}: "
        "`python benchmarks/recalibrate.py`",
        "",
        "| model | samples | bnexport (s) | update_bn (s) | time ratio | target <= 1.5 | "
        "fixed-point error, bnexport | fixed-point error, update_bn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reps = opts.reps or (1 if opts.quick else 3)
    for name, model, data in cases(opts.quick):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        program = program_of(model, data)
        a = median_time(lambda m=model, d=data, p=program: ours(m, d, p), reps)
        b = median_time(lambda m=model, d=data: theirs(m, d), reps)
        err_a = fixed_point_error(ours(model, data, program), data)
        err_b = fixed_point_error(theirs(model, data), data)
        lines.append(
            f"| {name} | {len(data)} | {a:.3f} | {b:.3f} | {a / b:.2f} | "
            f"{'yes' if a <= 1.5 * b else 'no'} | {err_a:.1e} | {err_b:.1e} |"
        )
    table = "\n".join(lines) + "\n"
    opts.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
