"""The stored tensors of a torch.export program, as the fold engine reads and rewrites them.

In an `ExportedProgram` graph, parameters, buffers and constant tensors are placeholders named
by the graph signature; their values live in `state_dict` / `constants`. `ProgramState` maps a
placeholder to its target and tensor, records replaced and new tensors, drops placeholders no
node uses any more, and builds the resulting program. It never changes a tensor in place and
never touches the dicts of the program it started from, so the caller's model is unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from torch import fx, nn
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)

_STORED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def placeholder_name(target: str) -> str:
    """The placeholder name of a new parameter: `p_` and its state name with every character
    that may not stand in a Python identifier made `_` (module paths such as torchvision's
    `trunk_output.block1.block1-0` hold hyphens; generated code names the placeholder)."""
    return "p_" + re.sub(r"\W", "_", target)


class ProgramState:
    """Read, replace, add and remove the tensors behind a program's stored placeholders."""

    def __init__(self, program: torch.export.ExportedProgram, *, copy_graph: bool = True):
        self.program = program
        self.gm: fx.GraphModule = (
            copy.deepcopy(program.graph_module) if copy_graph else program.graph_module
        )
        # keyed by the placeholders of this graph, in order: copying a graph may rename a
        # placeholder (an input called `input` becomes `input_1`)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.specs: dict[str, InputSpec] = {}
        for node, spec in zip(placeholders, program.graph_signature.input_specs):
            spec = copy.copy(spec)
            if getattr(spec.arg, "name", node.name) != node.name:
                spec.arg = dataclasses.replace(spec.arg, name=node.name)
            self.specs[node.name] = spec
        self.state_dict = dict(program.state_dict)
        self.constants = dict(program.constants)
        self._fake_mode = None
        self._last_parameter: fx.Node | None = None
        self._storage_users: dict[int, int] | None = None

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def target(self, node: object) -> str | None:
        """The state name behind a stored placeholder (`conv.weight`), else None."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        spec = self.specs.get(node.name)
        return spec.target if spec is not None and spec.kind in _STORED else None

    def value(self, target: str) -> torch.Tensor | None:
        if target in self.state_dict:
            return self.state_dict[target]
        value = self.constants.get(target)
        return value if isinstance(value, torch.Tensor) else None

    def tensor(self, node: fx.Node) -> torch.Tensor:
        value = self.value(self.target(node))
        if value is None:
            raise KeyError(node.name)
        return value

    def replace(self, target: str, value: torch.Tensor) -> None:
        """Store `value` under `target`, keeping its kind (parameter, buffer or constant)."""
        if target in self.state_dict:
            old = self.state_dict[target]
            if isinstance(old, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            self.state_dict[target] = value
        else:
            self.constants[target] = value

    def add_parameter(self, target_hint: str, value: torch.Tensor) -> fx.Node:
        """A new parameter placeholder holding `value`, named after `target_hint` if free."""
        target, k = target_hint, 1
        while target in self.state_dict or target in self.constants:
            target = f"{target_hint}_folded{'' if k == 1 else k}"
            k += 1
        if self._last_parameter is None:
            placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
            params = [n for n in placeholders if self.specs[n.name].kind == InputKind.PARAMETER]
            anchor = params[-1] if params else None
            first = placeholders[0] if placeholders else None
        else:
            anchor, first = self._last_parameter, None
        insert = (
            self.graph.inserting_after(anchor) if anchor else self.graph.inserting_before(first)
        )
        with insert:
            node = self.graph.placeholder(placeholder_name(target))
        self._last_parameter = node
        node.meta["val"] = self._fake(value)
        self.specs[node.name] = InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target)
        self.state_dict[target] = nn.Parameter(value, requires_grad=False)
        return node

    def _fake(self, value: torch.Tensor):
        """A fake tensor for a new placeholder's metadata, in the program's own fake mode."""
        if self._fake_mode is None:
            from torch._guards import detect_fake_mode

            vals = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
            self._fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        if self._fake_mode is None:
            return value.to("meta")
        return self._fake_mode.from_tensor(value, static_shapes=True)

    def shares_memory(self, target: str) -> bool:
        """Whether another stored tensor views the same memory as `target` (tied weights)."""
        if self._storage_users is None:
            self._storage_users = {}
            for value in [*self.state_dict.values(), *self.constants.values()]:
                if isinstance(value, torch.Tensor):
                    ptr = value.untyped_storage().data_ptr()
                    self._storage_users[ptr] = self._storage_users.get(ptr, 0) + 1
        ptr = self.value(target).untyped_storage().data_ptr()
        return self._storage_users.get(ptr, 0) > 1

    def remove_unused(self) -> None:
        """Drop computations nothing reads any more (a frozen BN's scale computed from its
        buffers), then stored placeholders that no node uses (and their tensors, if nothing
        else does)."""
        for node in reversed(list(self.graph.nodes)):
            if node.op == "call_function" and not node.users and not node.is_impure():
                self.graph.erase_node(node)
        mutated = {
            s.target
            for s in self.program.graph_signature.output_specs
            if s.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION)
        }
        holders: dict[str, int] = {}
        for spec in self.specs.values():
            holders[spec.target] = holders.get(spec.target, 0) + 1
        for node in list(self.graph.nodes):
            target = self.target(node)
            if target is None or node.users or target in mutated:
                continue
            self.graph.erase_node(node)
            del self.specs[node.name]
            holders[target] -= 1
            if not holders[target]:
                self.state_dict.pop(target, None)
                self.constants.pop(target, None)

    def _output_specs(self) -> list[OutputSpec]:
        """The output specs, naming the nodes that produce the outputs now (a folded BN's
        output is produced by its layer)."""
        output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        values = output.args[0] if isinstance(output.args[0], (list, tuple)) else output.args
        specs = []
        for spec, value in zip(self.program.graph_signature.output_specs, values):
            if isinstance(value, fx.Node) and isinstance(spec.arg, TensorArgument):
                spec = OutputSpec(spec.kind, TensorArgument(value.name), spec.target)
            specs.append(spec)
        return specs

    def build(self) -> torch.export.ExportedProgram:
        """A program over the rewritten graph with the new signature and state."""
        self.graph.lint()  # the ExportedProgram below compiles the graph into a new module
        order = [n.name for n in self.graph.nodes if n.op == "placeholder"]
        signature = ExportGraphSignature(
            input_specs=[self.specs[name] for name in order],
            output_specs=self._output_specs(),
        )
        return torch.export.ExportedProgram(
            root=self.gm,
            graph=self.graph,
            graph_signature=signature,
            state_dict=self.state_dict,
            range_constraints=copy.deepcopy(self.program.range_constraints),
            module_call_graph=copy.deepcopy(self.program.module_call_graph),
            example_inputs=self.program.example_inputs,
            constants=self.constants,
            verifiers=self.program.verifiers,
        )
