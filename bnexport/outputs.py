"""Model inputs and outputs as numpy, whatever computed them (PyTorch or onnxruntime).

An output may be a tensor, an array, or tuples, lists and dicts of them; `as_outputs`
flattens it into its tensor leaves, named by their path in the exporter's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
