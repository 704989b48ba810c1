"""`inspect --plot`: drift per BN layer as a PNG (matplotlib, the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

from bnexport.errors import BadInputError


def plot_drift(report, path: Path) -> None:
    """Two panels over the layers in graph order: mean_shift and var_ratio, with the limits
    above which a BN is called stale. Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInputError(
            "--plot needs matplotlib, which is not installed. Install it with "
            "`pip install 'bnexport[plot]'` (or `pip install matplotlib`), or leave out --plot."
        ) from None
    from bnexport.files import write_atomic
    from bnexport.stats.inspect import MEAN_SHIFT_LIMIT, STALE, VAR_RATIO_LIMIT

    layers = [b for b in report.batchnorm if b.mean_shift is not None]
    names = [b.name for b in layers]
    colors = ["tab:red" if STALE in b.flags else "tab:blue" for b in layers]
    height = max(3.0, 0.28 * len(layers) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    panels = (
        ("mean_shift", [b.mean_shift for b in layers], MEAN_SHIFT_LIMIT),
        ("var_ratio", [b.var_ratio for b in layers], VAR_RATIO_LIMIT),
    )
    for ax, (title, values, limit) in zip(axes, panels):
        ax.barh(range(len(layers)), values, color=colors)
        ax.axvline(limit, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{title} (stale above {limit:g})")
        if title == "var_ratio":
            ax.set_xscale("log")
            ax.set_xlim(left=1)
    axes[0].set_yticks(range(len(layers)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"BatchNorm drift of {Path(report.model).name} on {report.data_size} samples")
    fig.tight_layout()
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
