"""One layer's KV cache, engine-agnostic: its K and V stores, and the kernel plans derived from
them, built once per allocation (and kept across growth: a plan depends on the layout, not on
the page count). Every engine adapter (transformers, vLLM) holds one per attention layer and
passes it to ``sawquant.runtime.dispatch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sawquant.config import LayerConfig, SideConfig
from sawquant.format import Pool, SideStore, allocate_side
from sawquant.quant import random_signs

__all__ = ["LayerKV", "make_side_store"]


def make_side_store(
    side: SideConfig,
    *,
    num_kv_heads: int,
    head_dim: int,
    num_pages: int,
    page_size: int,
    rotate: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> SideStore:
    """Allocate the pools of one side as the config says; ``rotate=False`` stores unrotated
    (a V side whose rotation was folded into the weights at export)."""
    signs = None
    if rotate and side.sign_seed is not None:
        signs = random_signs(head_dim, side.sign_seed)
    center = None if side.center is None else torch.tensor(side.center, dtype=torch.float32)
    smooth = None if side.smooth is None else torch.tensor(side.smooth, dtype=torch.float32)
    return allocate_side(
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        head_bits=side.head_bits(num_kv_heads),
        num_pages=num_pages,
        page_size=page_size,
        block=side.rotation_block if rotate else 1,
        signs=signs,
        group_size=side.group_size,
        center=center,
        smooth=smooth,
        device=device,
        dtype=dtype,
    )


def _resized(store: SideStore, num_pages: int) -> SideStore:
    """A copy of ``store`` with ``num_pages`` pages; the first pages keep their contents."""
    pools = {}
    for bits, old in store.pools.items():
        spec = replace(old.spec, num_pages=num_pages)
        tensors = []
        for t in (old.codes, old.scale, old.zero):
            if t is None:
                tensors.append(None)
                continue
            new = torch.zeros((num_pages, *t.shape[1:]), dtype=t.dtype, device=t.device)
            keep = min(num_pages, t.shape[0])
            new[:keep] = t[:keep]
            tensors.append(new)
        pools[bits] = Pool(spec, *tensors)
    return replace(store, pools=pools)


@dataclass
class LayerKV:
    """K and V stores of one layer, with their decode/prefill plans made on first use."""

    k: SideStore
    v: SideStore
    _plans: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def allocate(cls, config: LayerConfig, *, values_folded: bool = False, **shape) -> LayerKV:
        """Both sides of one layer as ``config`` says; ``shape`` is :func:`make_side_store`'s
        num_kv_heads, head_dim, num_pages, page_size, device and dtype."""
        return cls(
            k=make_side_store(config.k, **shape),
            v=make_side_store(config.v, rotate=not values_folded, **shape),
        )

    @property
    def device(self) -> torch.device:
        return next(iter(self.k.pools.values())).codes.device

    def plan(self, kind: str) -> Any:
        """The kernels' plan of this layer ("decode" or "prefill"), built once.

        Importing sawquant.kernels is deferred to here: only a layer on a GPU with triton asks."""
        if kind not in self._plans:
            from sawquant.kernels import plans

            builder = {"decode": plans.DecodePlan, "prefill": plans.PrefillPlan}[kind]
            self._plans[kind] = builder.build(self.k, self.v, self.device)
        return self._plans[kind]

    def resize(self, num_pages: int) -> None:
        """Reallocate both sides with ``num_pages`` pages, keeping the first pages (the plans
        stay valid: they depend on the heads and rotations only)."""
        self.k = _resized(self.k, num_pages)
        self.v = _resized(self.v, num_pages)

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy pages ``src`` onto pages ``dst`` in every pool of both sides."""
        s = torch.tensor(src, dtype=torch.int64, device=self.device)
        d = torch.tensor(dst, dtype=torch.int64, device=self.device)
        for store in (self.k, self.v):
            for pool in store.pools.values():
                for t in (pool.codes, pool.scale, pool.zero):
                    if t is not None:
                        t[d] = t[s]

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()
