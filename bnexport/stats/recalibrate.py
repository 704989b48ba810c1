"""`recalibrate`: replace every BN's running statistics by the exact population statistics of
its input over a data set, each computed with every BN upstream already on its new statistics.

The eval-mode graph runs once, node by node in topological order, over every chunk of the
data: when a BN is reached, the moments of its input over all chunks (float64, unbiased
variance as PyTorch keeps running_var) become its running statistics before its own output is
computed. Afterwards the model is a fixed point: each BN's running_mean and running_var are
the mean and unbiased variance of its own input over the data, to float64 accumulation
accuracy. Cost: one forward pass over the data. Memory: the live activations of every chunk at
once (each node's output is freed after its last user ran), about the largest set of
simultaneously live activations of one sample times the number of samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bnexport.folding.sites import match_batchnorm
from bnexport.outputs import as_outputs
from bnexport.stats.population import ChannelMoments
from bnexport.version import __version__


@dataclass
class Recalibrated:
    """The new statistics of one BN (by the names of its buffers in the program)."""

    name: str
    mean_target: str
    var_target: str
    mean: torch.Tensor
    var: torch.Tensor
    samples: int


def _buffer_target(node: fx.Node | None) -> str | None:
    return node.target if node is not None and node.op == "get_attr" else None


def recalibrate_module(
    module: fx.GraphModule, chunks: Sequence[tuple]
) -> tuple[list[Recalibrated], list[str]]:
    """Recalibrate the BNs of an eval-mode graph module in place over `chunks` (tuples of
    forward inputs). Returns the new statistics and the names of BNs left (no running
    statistics)."""
    from bnexport.errors import BadInputError

    graph = module.graph
    nodes = list(graph.nodes)
    seen: dict[str, str] = {}
    for node in nodes:
        bn = match_batchnorm(node) if node.op == "call_function" else None
        target = _buffer_target(bn.running_mean) if bn is not None else None
        if target is None:
            continue
        if bn.uses_batch_stats:
            raise BadInputError(
                f"BatchNorm '{bn.name}' was saved in training mode (it normalizes with batch "
                "statistics), so its running statistics are not what the model uses. Export "
                "the model from model.eval() and recalibrate that."
            )
        if target in seen:
            raise BadInputError(
                f"BatchNorm '{bn.name}' is called more than once in forward, on different "
                "inputs; one set of running statistics cannot be the population statistics of "
                "each of them, so it cannot be recalibrated. Give each call its own BatchNorm."
            )
        seen[target] = bn.name
    last_use: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            last_use[arg] = node
    runners = [fx.Interpreter(module) for _ in chunks]
    for runner, chunk in zip(runners, chunks):
        runner.args_iter = iter(chunk)
    done: list[Recalibrated] = []
    left: list[str] = []
    with torch.no_grad():
        for node in nodes:
            bn = match_batchnorm(node) if node.op == "call_function" else None
            if bn is not None:
                mean_t, var_t = _buffer_target(bn.running_mean), _buffer_target(bn.running_var)
                if bn.uses_batch_stats or mean_t is None or var_t is None:
                    left.append(bn.name)
                else:
                    moments = ChannelMoments()
                    for runner in runners:
                        moments.add(runner.env[bn.input])
                    mean_buf, var_buf = module.get_buffer(mean_t), module.get_buffer(var_t)
                    mean_buf.copy_(moments.mean.to(mean_buf.dtype))
                    var_buf.copy_(moments.var.to(var_buf.dtype))
                    done.append(
                        Recalibrated(bn.name, mean_t, var_t, moments.mean, moments.var, moments.n)
                    )
            for runner in runners:
                runner.env[node] = runner.run_node(node)
            for arg in node.all_input_nodes:
                if last_use.get(arg) is node:
                    for runner in runners:
                        runner.env.pop(arg, None)
    return done, left


@dataclass
class RecalibrateReport:
    """What `recalibrate` changed: drift per BN before -> after, accuracy before -> after."""

    model: str
    output: str
    samples: int
    batches: int
    layers: list[dict]
    left: list[str]
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    warnings: list[str] | None = None
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The `recalibrate` JSON report."""
        out: dict[str, Any] = {
            "command": "recalibrate",
            "model": self.model,
            "output": self.output,
            "bnexport_version": __version__,
            "samples": self.samples,
            "batches": self.batches,
            "batchnorm": self.layers,
            "left": self.left,
            "warnings": list(self.warnings or []),
            "exit_code": self.exit_code,
        }
        if self.accuracy_before is not None:
            out["accuracy"] = {"before": self.accuracy_before, "after": self.accuracy_after}
        return out


def accuracy(module, chunks: Sequence[tuple], labels) -> float | None:
    """Argmax accuracy of the module's first output over the chunks, or None without labels."""
    if labels is None:
        return None
    correct = seen = 0
    with torch.no_grad():
        for chunk in chunks:
            arrays = as_outputs(module(*chunk)).arrays
            if not arrays or arrays[0].ndim != 2:
                return None
            out = torch.from_numpy(arrays[0])
            lab = torch.as_tensor(labels[seen : seen + out.shape[0]])
            correct += int((out.argmax(1) == lab).sum())
            seen += out.shape[0]
    return correct / seen if seen else None


def check_calibration_data(dataset, specs) -> None:
    """Refuse data that cannot give statistics: fewer than 2 samples, NaN or Inf."""
    from bnexport.errors import BadInputError

    if dataset.size < 2:
        raise BadInputError(
            f"The calibration data '{dataset.path}' holds {dataset.size} sample(s); a variance "
            "needs at least 2. Pass more calibration data."
        )
    for spec, x in zip(specs, dataset.inputs):
        if x.dtype.is_floating_point and not torch.isfinite(x).all():
            raise BadInputError(
                f"The calibration data '{dataset.path}' has NaN or Inf in input '{spec.name}'; "
                "statistics over it would be NaN. Clean the data and try again."
            )


def recalibrate_program(
    program: torch.export.ExportedProgram, chunks: Sequence[tuple], model: str
) -> tuple[list[Recalibrated], list[str]]:
    """Recalibrate a program's BNs over `chunks` and write the new statistics (and
    num_batches_tracked = number of chunks) into its state. Raises BadInputError when it has
    no BN with running statistics, or a BN's input has variance 0 in some channel."""
    from bnexport.errors import BadInputError

    done, left = recalibrate_module(program.module(), chunks)
    if not done:
        raise BadInputError(f"'{model}' has no BatchNorm with running statistics to recalibrate.")
    for r in done:
        zero = (r.var <= 0).nonzero().flatten().tolist()
        if zero:
            raise BadInputError(
                f"The input of BatchNorm '{r.name}' has variance 0 over the data in channel(s) "
                f"{zero[:8]}: the data never varies there, so no statistics can be estimated "
                "(eps alone would divide). Use more varied calibration data."
            )
    for r in done:
        for target, value in ((r.mean_target, r.mean), (r.var_target, r.var)):
            buffer = program.state_dict.get(target, program.constants.get(target))
            if buffer is not None:
                buffer.copy_(value.to(buffer.dtype))
        tracked = r.mean_target[: -len("running_mean")] + "num_batches_tracked"
        if r.mean_target.endswith("running_mean") and tracked in program.state_dict:
            program.state_dict[tracked].fill_(len(chunks))
    return done, left
