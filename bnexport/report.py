"""The run report: plain data with one verdict, which decides the exit code.

A BatchNorm has one of three fates: `folded` into a neighbour, `left` in the exported graph
(with a reason), or `unused` (forward never calls it, so it is not in the exported graph).
A fold into a following zero-padded conv folds the scale only and keeps the shift as an Add
before the conv (`shift_kept`): the BN is gone, an Add stands in its place.
`left` means the same thing everywhere: the BNs the exported model still computes.
Rendering (tables, JSON, ONNX metadata) lives in `bnexport.render`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnexport.errors import EXIT_OK, EXIT_VERIFY_FAILED

if TYPE_CHECKING:
    from bnexport.export import OnnxInfo
    from bnexport.verify import VerifyResult

FOLDED = "folded"
LEFT = "left"
UNUSED = "unused"

PASSED = "passed"
FAILED = "failed"
NOT_RUN = "not run"


@dataclass
class FoldDecision:
    """What happened to one BatchNorm call site.

    `into` and `direction` are set when `status == "folded"`; `reason` when it is not.
    `shift_kept`: only the scale was folded, the shift stays as an Add before `into`.
    `shared_calls`: how many calls of `into` share the folded weights (more than 1 when one
    fold serves a layer called several times). `bytes_added`: the size of the copy of the
    layer's weights this call was given (`duplicate_shared`), 0 when none.
    """

    name: str
    kind: str
    status: str
    into: str | None = None
    direction: str | None = None
    reason: str | None = None
    channels: int | None = None
    shift_kept: bool = False
    shared_calls: int = 1
    bytes_added: int = 0

    @property
    def folded(self) -> bool:
        return self.status == FOLDED


@dataclass
class FoldReport:
    """Every BatchNorm of a model with its fate, plus model-level warnings."""

    decisions: list[FoldDecision] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Every BatchNorm: folded + left + unused."""
        return len(self.decisions)

    @property
    def folded(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.status == FOLDED]

    @property
    def left(self) -> list[FoldDecision]:
        """BNs that the exported model still computes."""
        return [d for d in self.decisions if d.status == LEFT]

    @property
    def unused(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.status == UNUSED]

    @property
    def adds_added(self) -> int:
        """Add nodes that stand where a BN was (its shift, before a zero-padded conv)."""
        return sum(d.shift_kept for d in self.folded)

    @property
    def bytes_added(self) -> int:
        """Bytes of weight copies made so that calls of a shared layer fold separately."""
        return sum(d.bytes_added for d in self.decisions)

    @property
    def called(self) -> int:
        """BN calls in the traced graph before folding (folded + left)."""
        return len(self.folded) + len(self.left)

    def decision(self, name: str) -> FoldDecision:
        """The decision for the BN called `name` (KeyError when there is none)."""
        for d in self.decisions:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        from bnexport.render import fold_report_dict

        return fold_report_dict(self)

    def to_json(self, indent: int = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        from bnexport.render import fold_report_text

        return fold_report_text(self)


@dataclass
class RunReport:
    """What one run did, and its verdict.

    `verdict` is `passed` (the ONNX file computes what the original does), `failed` (it was
    written but does not), or `not run` (the comparison itself could not run: `verify_error`).
    """

    command: str
    model: str
    output: str
    fold: FoldReport | None = None
    onnx: OnnxInfo | None = None
    verify: VerifyResult | None = None
    verify_error: str | None = None
    saved_program: str | None = None
    warnings: list[str] = field(default_factory=list)
    reference: str = "eval-mode PyTorch"  # what the ONNX file was compared with
    recalibrated: dict | None = None  # fold --recalibrate: data, samples, BNs
    float16: Any = None  # fold --fp16: the HalfReport (layers kept in float32, weight bytes)

    @property
    def verdict(self) -> str:
        if self.verify_error is not None or self.verify is None:
            return NOT_RUN
        return PASSED if self.verify.passed else FAILED

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_VERIFY_FAILED
