"""The per-BatchNorm fold report: plain data that renders as a table or as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

FOLDED = "folded"
LEFT = "left"
UNUSED = "unused"


@dataclass
class FoldDecision:
    """What happened to one BatchNorm call site.

    `into` and `direction` are set when `status == "folded"`; `reason` when it is not.
    """

    name: str
    kind: str
    status: str
    into: str | None = None
    direction: str | None = None
    reason: str | None = None
    channels: int | None = None

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
        return len(self.decisions)

    @property
    def folded(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.status == FOLDED]

    @property
    def left(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.status != FOLDED]

    def decision(self, name: str) -> FoldDecision:
        """The decision for the BN called `name` (KeyError when there is none)."""
        for d in self.decisions:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "folded": len(self.folded),
            "left": [{"name": d.name, "reason": d.reason} for d in self.left],
            "layers": [asdict(d) for d in self.decisions],
            "warnings": list(self.warnings),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(name, kind, outcome, detail) per BN, for table rendering."""
        out = []
        for d in self.decisions:
            if d.folded:
                out.append((d.name, d.kind, "folded", f"into {d.direction} {d.into}"))
            else:
                out.append((d.name, d.kind, d.status, d.reason or ""))
        return out

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows()] + [4])
        lines = [f"{'name':<{width}}  outcome  detail"]
        lines += [f"{n:<{width}}  {o:<7}  {det}" for n, _, o, det in self.rows()]
        lines.append(f"{len(self.folded)} of {self.total} BatchNorm folded")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
