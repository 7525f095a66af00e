"""Tensor parallelism: which KV heads a rank holds, and the part of the config that is its own.

With tensor parallelism each rank computes a slice of the attention heads. KV heads are split
evenly when there are at least as many as ranks (rank r holds ``[r * H/tp, (r + 1) * H/tp)``);
with fewer KV heads than ranks each head is replicated on ``tp / H`` consecutive ranks (rank r
holds head ``r // (tp / H)``), the convention of vLLM and of transformers' ``tp_plan``. The
per-head parts of a config (fallback heads, centering and smoothing rows) must follow: rank r's
cache stores exactly its heads with their own settings.
"""

from __future__ import annotations

from dataclasses import replace

from sawquant.config import KVConfig, LayerConfig, SideConfig
from sawquant.errors import ConfigError

__all__ = ["local_config", "local_heads", "tensor_parallel_rank"]


def local_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """The global KV head indices rank ``tp_rank`` of ``tp_size`` holds, in order."""
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ConfigError(f"tensor-parallel rank {tp_rank} of {tp_size} is not a valid rank")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ConfigError(
                f"{num_kv_heads} KV heads do not split evenly over {tp_size} tensor-parallel "
                "ranks; use a tensor-parallel size that divides them"
            )
        n = num_kv_heads // tp_size
        return list(range(tp_rank * n, (tp_rank + 1) * n))
    if tp_size % num_kv_heads:
        raise ConfigError(
            f"{tp_size} tensor-parallel ranks cannot replicate {num_kv_heads} KV heads evenly; "
            "use a tensor-parallel size that is a multiple of the KV head count"
        )
    return [tp_rank // (tp_size // num_kv_heads)]


def _local_side(side: SideConfig, heads: list[int]) -> SideConfig:
    fallback = {i: side.fallback_heads[h] for i, h in enumerate(heads) if h in side.fallback_heads}

    def rows(table):
        return None if table is None else tuple(table[h] for h in heads)

    return replace(
        side, fallback_heads=fallback, center=rows(side.center), smooth=rows(side.smooth)
    )


def local_config(config: KVConfig, tp_size: int, tp_rank: int) -> KVConfig:
    """The config of rank ``tp_rank``: its KV heads only, each with its own settings
    (``tp_size`` 1 returns ``config`` itself)."""
    if tp_size == 1:
        return config
    heads = local_heads(config.model.num_kv_heads, tp_size, tp_rank)
    layers = tuple(
        LayerConfig(k=_local_side(layer.k, heads), v=_local_side(layer.v, heads))
        for layer in config.layers
    )
    model = replace(config.model, num_kv_heads=len(heads))
    return replace(config, model=model, layers=layers)


def tensor_parallel_rank(model) -> tuple[int, int]:
    """``(tp_size, tp_rank)`` of a transformers model loaded with ``tp_plan`` (``(1, 0)`` for
    an unsplit model). The rank is the model's position in its tensor-parallel mesh, or the
    process rank when the whole world is one tensor-parallel group."""
    size = int(getattr(model, "_tp_size", None) or 1)
    if size == 1:
        return 1, 0
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        names = getattr(mesh, "mesh_dim_names", None) or ()
        rank = mesh.get_local_rank("tp") if "tp" in names else mesh.get_local_rank()
        return size, int(rank)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == size:
        return size, dist.get_rank()
    raise ConfigError(
        f"the model is split over {size} tensor-parallel ranks but sawquant cannot tell which "
        "rank this process is (no device mesh on the model and the process group is not the "
        "tensor-parallel group); load it with tp_plan under torchrun, one process per rank"
    )
