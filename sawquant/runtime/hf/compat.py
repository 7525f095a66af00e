"""What differs between the transformers releases sawquant supports (``>=5.17,<6``), in one place.

transformers 5.17 passes a model's KV cache as ``past_key_values`` (argument and output field).
Later releases renamed both to ``cache`` and keep the old name as a deprecated alias until
5.40; when a call carries both names the old one is ignored. Every sawquant call site that hands
a cache to a model, or reads one back, goes through here, so the rename is handled once and
sawquant's own calls never trigger a deprecation warning.

Tensor parallelism: ``from_pretrained(tp_plan=..., tp_size=...)`` is deprecated since 5.17 in
favour of ``distributed_config=DistributedConfig(...)``, which every supported release has;
sawquant passes the new form for either spelling.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

__all__ = [
    "CACHE_NAMES",
    "cache_kwarg",
    "cache_kwargs",
    "distributed_kwargs",
    "pop_cache",
    "returned_cache",
]

# The names a cache travels under, newest first.
CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _forward_cache_name(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters  # follows @wraps decorators
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model``'s forward takes its cache ("cache" or
    "past_key_values")."""
    return _forward_cache_name(type(model))


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name ``model``'s forward expects."""
    return {cache_kwarg(model): cache}


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a forward's kwargs, whichever name it came under (None if absent).

    The new name wins when both are present, as transformers itself decides.
    """
    found = None
    for name in reversed(CACHE_NAMES):
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def returned_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` or ``output.past_key_values``), or None.

    Reads the dataclass field that exists, so the deprecated property is never touched.
    """
    for name in CACHE_NAMES:
        if name in getattr(output, "__dataclass_fields__", {}):
            return getattr(output, name)
    if isinstance(output, dict):
        for name in CACHE_NAMES:
            if output.get(name) is not None:
                return output[name]
    return None


def distributed_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments with ``tp_plan`` / ``tp_size`` moved into a
    ``DistributedConfig`` (the form transformers keeps; the old one warns and is to go)."""
    if "tp_plan" not in kwargs and "tp_size" not in kwargs:
        return kwargs
    from sawquant.errors import InputError

    if kwargs.get("distributed_config") is not None:
        raise InputError(
            "pass tensor parallelism either as tp_plan/tp_size or as distributed_config, not both"
        )
    from transformers import DistributedConfig

    rest = dict(kwargs)
    tp = {name: rest.pop(name) for name in ("tp_plan", "tp_size") if name in rest}
    rest["distributed_config"] = DistributedConfig(**tp)
    return rest
