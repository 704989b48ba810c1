"""Train the shipped example models from a fixed seed and save every file in models/.

Run from the repository root: `python -m models.train` (or `python models/train.py`).
Writes, for each model NAME: NAME.pt2 (torch.export program, batch axis dynamic),
NAME.safetensors (state_dict), NAME_test.npz (held-out split: `x`, and `labels` for
classifiers), and metrics.json with the measured test figures.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.architectures import digits_autoencoder, digits_cnn, tabular_mlp  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0


def _seed() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)


def _digits():
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, data.target, test_size=0.25, random_state=0, stratify=data.target)


def _tabular():
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    return train_test_split(x, data.target, test_size=0.25, random_state=0, stratify=data.target)


def _fit(model: nn.Module, x, target, loss_fn, epochs: int, lr: float, batch: int = 64):
    _seed()
    x, target = torch.from_numpy(x), torch.from_numpy(target)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x) - 1, batch):
            idx = order[start : start + batch]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            loss_fn(model(x[idx]), target[idx]).backward()
            opt.step()
    return model.eval()


def _save(name: str, model: nn.Module, x_test: np.ndarray, labels: np.ndarray | None) -> None:
    example = torch.from_numpy(x_test[:4])
    dims = {0: torch.export.Dim("batch", min=1, max=65536)}
    program = torch.export.export(model, (example,), dynamic_shapes=(dims,))
    torch.export.save(program, str(HERE / f"{name}.pt2"))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(HERE / f"{name}.safetensors"),
    )
    arrays = {"x": x_test.astype(np.float32)}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    np.savez_compressed(HERE / f"{name}_test.npz", **arrays)


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def main() -> dict:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    metrics = {}
    start = time.time()

    x_tr, x_te, y_tr, y_te = _digits()
    _seed()
    cnn = _fit(digits_cnn(), x_tr, y_tr, nn.functional.cross_entropy, epochs=30, lr=3e-3)
    with torch.no_grad():
        acc = float((cnn(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    _save("digits_cnn", cnn, x_te, y_te)
    metrics["digits_cnn"] = {
        "test_accuracy": acc,
        "test_mse": None,
        "batchnorm_layers": _bn_count(cnn),
        "n_test": len(y_te),
    }

    _seed()
    ae = _fit(digits_autoencoder(), x_tr, x_tr, nn.functional.mse_loss, epochs=40, lr=3e-3)
    with torch.no_grad():
        mse = float(nn.functional.mse_loss(ae(torch.from_numpy(x_te)), torch.from_numpy(x_te)))
    _save("digits_autoencoder", ae, x_te, None)
    metrics["digits_autoencoder"] = {
        "test_accuracy": None,
        "test_mse": mse,
        "batchnorm_layers": _bn_count(ae),
        "n_test": len(x_te),
    }

    t_tr, t_te, ty_tr, ty_te = _tabular()
    _seed()
    mlp = _fit(
        tabular_mlp(), t_tr, ty_tr, nn.functional.cross_entropy, epochs=80, lr=3e-3, batch=32
    )
    with torch.no_grad():
        acc = float((mlp(torch.from_numpy(t_te)).argmax(1).numpy() == ty_te).mean())
    _save("tabular_mlp", mlp, t_te, ty_te)
    metrics["tabular_mlp"] = {
        "test_accuracy": acc,
        "test_mse": None,
        "batchnorm_layers": _bn_count(mlp),
        "n_test": len(ty_te),
    }

    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    for name, m in metrics.items():
        sizes = {p.name: p.stat().st_size for p in HERE.glob(f"{name}*")}
        print(name, m, sizes)
    print(f"trained in {time.time() - start:.1f} s")
    return metrics


if __name__ == "__main__":
    main()
