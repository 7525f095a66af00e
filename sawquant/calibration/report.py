"""The ``--plot`` heatmap: per layer and KV head, how strong the K/V outlier channels are."""

from __future__ import annotations

import math
import os
from pathlib import Path

from sawquant.calibration.api import CalibrationResult
from sawquant.errors import InputError

__all__ = ["check_plotting", "plot_outliers"]

_INSTALL = "pip install matplotlib (the 'plot' extra of sawquant)"


def check_plotting() -> None:
    """Raise InputError now, before a long calibration, if matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(f"--plot needs matplotlib; install it with {_INSTALL}")


def plot_outliers(result: CalibrationResult, path: str | os.PathLike) -> Path:
    """Write a PNG: log10 channel-outlier ratio per layer (rows) and KV head (columns), K and V
    side by side; fallback heads are marked with their bits (8 or 16)."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    layers = result.stats.get("layers")
    if not layers:
        raise InputError(
            "this calibration file has no statistics to plot; re-run sawquant calibrate"
        )
    num_heads = result.config.model.num_kv_heads
    width = max(9.0, 3.0 + 1.0 * num_heads)
    fig, axes = plt.subplots(1, 2, figsize=(width, 2.0 + 0.22 * len(layers)))
    for ax, side in zip(axes, ("k", "v")):
        grid = [[math.log10(max(r, 1.0)) for r in layer[side]["outlier_ratio"]] for layer in layers]
        image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        for i, layer_cfg in enumerate(result.config.layers):
            for head, bits in getattr(layer_cfg, side).fallback_heads.items():
                ax.text(head, i, str(bits), ha="center", va="center", color="cyan", fontsize=7)
        ax.set_title(f"{side.upper()}: log10 outlier ratio")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(num_heads))
        fig.colorbar(image, ax=ax)
    fig.suptitle(
        f"{result.model or 'model'}: max channel / median channel per KV head\n"
        "(numbers: fallback heads, 8 = INT8, 16 = BF16)"
    )
    fig.tight_layout()
    out = Path(path).expanduser()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
