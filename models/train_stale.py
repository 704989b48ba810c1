"""Train the digits CNN with a BatchNorm momentum of 0.002, so that its running statistics lag
far behind its final weights: a model whose statistics are stale by construction, for
`bnexport inspect` and `bnexport recalibrate`.

    python -m models.train_stale

Writes digits_cnn_stale.pt2, digits_cnn_stale_test.npz (the held-out split, with labels) and
digits_cnn_stale_calib.npz (the training images: calibration data, with labels).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.architectures import digits_cnn
from models.train import HERE, _digits, _fit, _save, _seed

MOMENTUM = 0.002


def main() -> float:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = _digits()
    _seed()
    model = digits_cnn()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = MOMENTUM
    model = _fit(model, x_tr, y_tr, nn.functional.cross_entropy, epochs=30, lr=3e-3)
    _save("digits_cnn_stale", model, x_te, y_te)
    (HERE / "digits_cnn_stale.safetensors").unlink()  # the .pt2 is the example
    np.savez_compressed(
        HERE / "digits_cnn_stale_calib.npz", x=x_tr.astype(np.float32), labels=y_tr.astype(np.int64)
    )
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    print(f"digits_cnn_stale: held-out accuracy {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
