"""What both engines share in their decisions: the wording for layers called more than once,
and how folds into layers that a merge of branches took in are recorded.

A layer whose weights serve several calls folds a BN once, into the shared weights, when every
call is followed (or preceded) by a BN with the same scale and shift: the one fold is exact for
every call. Otherwise each call may get its own copy of the weights (`duplicate_shared`),
which adds their size to the file; without it the BN is left with a reason naming the flag.
"""

from __future__ import annotations

from bnexport.formatting import fmt_bytes
from bnexport.report import MERGED

DUPLICATE_FLAG = "--duplicate-shared"


def shared_refusal(layer: str, calls: int, why: str, copy_bytes: int) -> str:
    """The reason a BN next to a shared layer is left, naming the flag and its cost.

    `why` says what differs between the calls, e.g. "conv2d_2 is followed by another BN" or
    "the weights are also read by embedding".
    """
    return (
        f"the weights of {layer} serve {calls} calls and {why}, so folding into them would "
        f"change the other calls; {DUPLICATE_FLAG} gives this call its own folded copy of the "
        f"weights (+{fmt_bytes(copy_bytes)})"
    )


def zero_scale_refusal(layer: str, channels: list[int]) -> str:
    """The reason a BN before a zero-padded layer is left when some channel has s = 0."""
    shown = ", ".join(str(c) for c in channels[:5]) + (", ..." if len(channels) > 5 else "")
    return (
        f"{layer} pads with zeros that do not pass through the BN, and channel"
        f"{'s' if len(channels) > 1 else ''} {shown} of the BN have scale 0 (gamma = 0), so "
        "its shift cannot be kept as an Add before the padding"
    )


def note_merged_layers(merged_into: dict[str, str], decided: dict) -> None:
    """Folds into the layers named in `merged_into` are checked as part of the layer each
    became part of (through earlier merges too)."""
    for d in decided.values():
        if d.merged_into is not None:
            names = [merged_into.get(n, n) for n in d.merged_into.split(", ")]
            d.merged_into = ", ".join(dict.fromkeys(names))
        if not d.folded or d.direction == MERGED or d.into is None:
            continue
        targets = [merged_into[n] for n in d.into.split(", ") if n in merged_into]
        if targets:
            d.merged_into = ", ".join(dict.fromkeys(targets))
            d.check = None
