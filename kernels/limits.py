"""What the Triton kernels support, checked when a config is applied to a model on a GPU (not at
its first write). No triton import: ``patch`` calls it before any kernel is loaded."""

from __future__ import annotations

from sawquant.config import KVConfig
from sawquant.errors import ConfigError

__all__ = ["MAX_HEAD_DIM", "check_kernel_limits"]

# The write, decode and prefill kernels are built and tested up to head_dim 256 (tiles of
# 8 * BLOCK_W channels; wider heads would need register budgets nobody measured).
MAX_HEAD_DIM = 256


def check_kernel_limits(config: KVConfig) -> None:
    """Raise ConfigError naming the limit when the kernels cannot serve ``config``. Group sizes,
    rotation blocks and precisions need no check here: the config's own validation already
    holds them to the rule every kernel follows."""
    d = config.model.head_dim
    if d > MAX_HEAD_DIM:
        raise ConfigError(
            f"head_dim {d} is above what sawquant's GPU kernels support ({MAX_HEAD_DIM}); "
            "run this model on the CPU twins, or open an issue for wider heads"
        )
