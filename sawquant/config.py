"""The exported KV-cache config: what precision and rotation every layer's K and V use.

Versioned, validated and immutable; JSON round-trip is exact (``KVConfig.from_json(c.to_json())
== c``). Every validation error is a one-line ``ConfigError`` naming the field and the fix.
Importable without torch: engines and tools read configs without loading a model. The facts
every layer of sawquant checks against (which rotation blocks and group sizes exist, what a
cached element costs in bits) are defined here once.

JSON shape (``sawquant_kv.json``)::

    {"method": "sawquant", "format_version": 1, "layout": "sawquant-paged-v1",
     "model": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "model_type": "llama"},
     "values_folded": false,
     "layers": [{"k": {"bits": 4, "rotation_block": 32, "sign_seed": null, "group_size": null,
                       "fallback_heads": {"2": 8}},
                 "v": {...}}, ...]}

``fallback_heads`` maps a KV head index to 8 (INT8 per token) or 16 (BF16); the other heads use
``bits`` (``bits`` 8 or 16 is a whole-layer fallback for that side). ``values_folded`` says the V
rotation was folded into v_proj/o_proj at export, so the runtime stores V as produced.

Version 2 adds two exact, serving-compatible transforms per side, one row per KV head and
channel (``null`` = none); a cached vector x is stored as ``rotate((x - center) / smooth)``:

* ``center`` ([H_kv][D]): a calibrated per-channel mean. For keys it is exact for attention
  (q . center is the same for every key of a query, so the softmax does not change) and costs
  nothing at read time; for values the attention output gets it back (the weights sum to 1).
* ``smooth`` ([H_kv][D], > 0): per-channel scales divided out of the cached vector. For keys the
  query is multiplied by them (q . k = (q * s) . (k / s)); for values the output is.

A version-1 document (no transforms) still loads; a config without transforms is written as
version 1, so older sawquant releases read it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from sawquant.errors import ConfigError

__all__ = [
    "CONFIG_VERSION",
    "SUPPORTED_BLOCKS",
    "SUPPORTED_GROUPS",
    "FrozenMap",
    "KVConfig",
    "KVLayout",
    "LayerConfig",
    "ModelFacts",
    "SideConfig",
    "bits_per_element",
    "check_block",
    "check_group",
]

CONFIG_VERSION = 2  # the newest JSON schema version (the "format_version" key) this reads
SUPPORTED_BLOCKS = (1, 16, 32, 64, 128, 256)  # Hadamard block sizes (1 = no rotation)
# Group sizes below head_dim: powers of two that every kernel and twin handles. Smaller groups
# cost more than INT8 (g = 8 adds 4 bits of fp16 scale/zero per element).
SUPPORTED_GROUPS = (16, 32, 64, 128)
_BITS = (4, 8, 16)
_FALLBACK_BITS = (8, 16)
FP16_RANGE = 65504.0  # transforms stay within what the fp16 scales of a pool can express
MAX_SIGN_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


class KVLayout(str, Enum):
    """Storage layouts a config can ask for. New layouts get a new member and version."""

    PAGED_V1 = "sawquant-paged-v1"


def check_block(head_dim: int, block: int, where: str = "rotation block") -> None:
    """Raise ConfigError unless ``block`` is a supported Hadamard block dividing head_dim."""
    if isinstance(block, bool) or not isinstance(block, int) or block not in SUPPORTED_BLOCKS:
        raise ConfigError(f"{where} is {block!r}; use one of {SUPPORTED_BLOCKS}")
    if head_dim % block:
        raise ConfigError(
            f"{where} {block} does not divide head_dim {head_dim}; use a block that divides it"
        )


def check_group(head_dim: int, group: int | None, where: str = "group size") -> None:
    """Raise ConfigError unless ``group`` is None (whole head), head_dim, or a supported
    power of two that divides head_dim (the rule every kernel and twin follows)."""
    if group is None or group == head_dim:
        return
    ok = [g for g in SUPPORTED_GROUPS if g < head_dim and head_dim % g == 0]
    if isinstance(group, bool) or not isinstance(group, int) or group not in ok:
        raise ConfigError(
            f"{where} is {group!r} for head_dim {head_dim}; use null (one scale per head) or "
            f"one of {ok or 'none (head_dim too small)'}"
        )


def bits_per_element(bits: int, group_size: int | None, head_dim: int) -> float:
    """Stored bits per cached element: the code plus an fp16 scale and zero per group."""
    if bits == 16:
        return 16.0
    return bits + 32 / (group_size or head_dim)


class FrozenMap(Mapping):
    """An immutable, hashable mapping (a frozen config never holds a mutable dict)."""

    __slots__ = ("_items",)

    def __init__(self, data: Mapping | None = None):
        self._items = dict(sorted((data or {}).items()))

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


def _forbid_extra(obj: str, data: Any, allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{obj} must be a JSON object, got {type(data).__name__}")
    extra = sorted(set(data) - allowed)
    if extra:
        raise ConfigError(
            f"{obj}: unknown field(s) {extra}; remove them (allowed: {sorted(allowed)})"
        )


def _newer_version(version: int) -> str:
    return (
        f"format_version {version} is newer than this sawquant supports ({CONFIG_VERSION}); "
        "upgrade sawquant (pip install -U sawquant)"
    )


def _int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class SideConfig:
    """How one side (K or V) of one layer is cached."""

    bits: int = 4
    rotation_block: int = 1  # 1 = no rotation
    sign_seed: int | None = None  # random +-1 signs before the Hadamard when set
    group_size: int | None = None  # None = head_dim: one scale/zero per token and head
    fallback_heads: Mapping[int, int] = field(default_factory=FrozenMap)  # head -> 8 or 16
    center: tuple[tuple[float, ...], ...] | None = None  # [H_kv][D], subtracted (version 2)
    smooth: tuple[tuple[float, ...], ...] | None = None  # [H_kv][D] > 0, divided (version 2)

    def __post_init__(self) -> None:
        if not isinstance(self.fallback_heads, FrozenMap):
            object.__setattr__(self, "fallback_heads", FrozenMap(self.fallback_heads))
        for name in ("center", "smooth"):
            rows = getattr(self, name)
            if rows is not None and not isinstance(rows, tuple):
                try:
                    frozen = tuple(tuple(float(x) for x in row) for row in rows)
                except (TypeError, ValueError):
                    raise ConfigError(
                        f"{name} must be a list of per-head lists of numbers"
                    ) from None
                object.__setattr__(self, name, frozen)

    @property
    def transformed(self) -> bool:
        """True when the side uses a version-2 transform (centering or smoothing)."""
        return self.center is not None or self.smooth is not None

    def head_bits(self, num_kv_heads: int) -> tuple[int, ...]:
        """The precision of every KV head of this side."""
        return tuple(self.fallback_heads.get(h, self.bits) for h in range(num_kv_heads))

    def average_bits(self, num_kv_heads: int, head_dim: int) -> float:
        """Bits per cached element, fp16 scale and zero included."""
        per_head = [
            bits_per_element(b, self.group_size, head_dim) for b in self.head_bits(num_kv_heads)
        ]
        return sum(per_head) / num_kv_heads

    def validate(self, where: str, num_kv_heads: int, head_dim: int) -> None:
        if _int(f"{where}.bits", self.bits) not in _BITS:
            raise ConfigError(f"{where}.bits is {self.bits}; use one of {_BITS}")
        check_block(head_dim, _int(f"{where}.rotation_block", self.rotation_block),
                    f"{where}.rotation_block")  # fmt: skip
        if self.sign_seed is not None:
            seed = _int(f"{where}.sign_seed", self.sign_seed)
            if not 0 <= seed <= MAX_SIGN_SEED:
                raise ConfigError(
                    f"{where}.sign_seed {seed} is outside 0..2**63-1; use a smaller seed or null"
                )
        if self.group_size is not None:
            _int(f"{where}.group_size", self.group_size)
        check_group(head_dim, self.group_size, f"{where}.group_size")
        for head, bits in self.fallback_heads.items():
            _int(f"{where}.fallback_heads key", head)
            if not 0 <= head < num_kv_heads:
                raise ConfigError(
                    f"{where}.fallback_heads has head {head}, out of range for {num_kv_heads} "
                    f"KV heads; use 0..{num_kv_heads - 1}"
                )
            if isinstance(bits, bool) or bits not in _FALLBACK_BITS or not isinstance(bits, int):
                raise ConfigError(
                    f"{where}.fallback_heads[{head}] is {bits!r}; use 8 (INT8) or 16 (BF16)"
                )
        for name, positive in (("center", False), ("smooth", True)):
            rows = getattr(self, name)
            if rows is None:
                continue
            if len(rows) != num_kv_heads or any(len(r) != head_dim for r in rows):
                raise ConfigError(
                    f"{where}.{name} must hold {num_kv_heads} rows of {head_dim} numbers (one per "
                    "KV head and channel); recalibrate this model"
                )
            flat = [x for r in rows for x in r]
            if not all(math.isfinite(x) and abs(x) <= FP16_RANGE for x in flat):
                raise ConfigError(f"{where}.{name} holds NaN/Inf or huge values; recalibrate")
            if positive and not all(x > 0 for x in flat):
                raise ConfigError(f"{where}.smooth must be > 0 everywhere; recalibrate")

    def to_dict(self) -> dict:
        d = {
            "bits": self.bits,
            "rotation_block": self.rotation_block,
            "sign_seed": self.sign_seed,
            "group_size": self.group_size,
            "fallback_heads": {str(h): b for h, b in sorted(self.fallback_heads.items())},
        }
        for name in ("center", "smooth"):  # version-2 fields, written only when used
            rows = getattr(self, name)
            if rows is not None:
                d[name] = [list(r) for r in rows]
        return d

    @classmethod
    def from_dict(cls, data: dict, where: str = "side") -> SideConfig:
        _forbid_extra(where, data, {f.name for f in fields(cls)})
        data = dict(data)
        fb = data.get("fallback_heads") or {}
        if not isinstance(fb, dict):
            raise ConfigError(f'{where}.fallback_heads must be an object like {{"2": 8}}')
        try:
            data["fallback_heads"] = {int(h): b for h, b in fb.items()}
        except ValueError as err:
            raise ConfigError(f"{where}.fallback_heads keys must be head indices: {err}") from None
        return cls(**data)


@dataclass(frozen=True)
class LayerConfig:
    k: SideConfig = field(default_factory=SideConfig)
    v: SideConfig = field(default_factory=SideConfig)

    def to_dict(self) -> dict:
        return {"k": self.k.to_dict(), "v": self.v.to_dict()}

    @classmethod
    def from_dict(cls, data: dict, where: str = "layer") -> LayerConfig:
        _forbid_extra(where, data, {"k", "v"})
        return cls(
            k=SideConfig.from_dict(data.get("k", {}), f"{where}.k"),
            v=SideConfig.from_dict(data.get("v", {}), f"{where}.v"),
        )


@dataclass(frozen=True)
class ModelFacts:
    """The model shape a config was made for; loading refuses a config for another shape."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str = ""

    def validate(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if _int(f"model.{name}", getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim {self.head_dim} is odd; INT4 packs pairs")
        if not isinstance(self.model_type, str):
            raise ConfigError(f"model.model_type must be a string, got {self.model_type!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class KVConfig:
    model: ModelFacts
    layers: tuple[LayerConfig, ...]
    values_folded: bool = False
    layout: KVLayout = KVLayout.PAGED_V1
    method: str = "sawquant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layout, KVLayout):
            known = {m.value: m for m in KVLayout}
            if self.layout not in known:
                raise ConfigError(f"layout {self.layout!r} is unknown; use one of {sorted(known)}")
            object.__setattr__(self, "layout", known[self.layout])
        self.validate()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        model: ModelFacts,
        k: SideConfig | None = None,
        v: SideConfig | None = None,
        **kwargs: Any,
    ) -> KVConfig:
        """The same side configs on every layer (baselines: naive INT4, a fixed block)."""
        layer = LayerConfig(k=k or SideConfig(), v=v or SideConfig())
        return cls(model=model, layers=(layer,) * model.num_layers, **kwargs)

    def with_layers(self, layers: list[LayerConfig] | tuple[LayerConfig, ...]) -> KVConfig:
        return replace(self, layers=tuple(layers))

    @property
    def format_version(self) -> int:
        """The schema version this config needs: 2 with centering/smoothing, else 1 (so that
        older sawquant releases read a config that uses nothing newer)."""
        sides = (getattr(layer, s) for layer in self.layers for s in ("k", "v"))
        return 2 if any(side.transformed for side in sides) else 1

    # -- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        if self.method != "sawquant":
            raise ConfigError(f"method is {self.method!r}; this file is not a sawquant KV config")
        _bool("values_folded", self.values_folded)
        self.model.validate()
        if len(self.layers) != self.model.num_layers:
            raise ConfigError(
                f"layers has {len(self.layers)} entries but model.num_layers is "
                f"{self.model.num_layers}; give one entry per layer"
            )
        for i, layer in enumerate(self.layers):
            for side in ("k", "v"):
                getattr(layer, side).validate(
                    f"layers[{i}].{side}", self.model.num_kv_heads, self.model.head_dim
                )

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise ConfigError if this config was made for a model of another shape."""
        want = (self.model.num_layers, self.model.num_kv_heads, self.model.head_dim)
        got = (num_layers, num_kv_heads, head_dim)
        if want != got:
            raise ConfigError(
                "KV config was made for (layers, kv_heads, head_dim) = "
                f"{want} but the model has {got}; calibrate this model (sawquant calibrate)"
            )

    def average_bits(self) -> float:
        """Average bits per cached K/V element over all layers, scales and zeros included."""
        m = self.model
        per_side = [
            getattr(layer, s).average_bits(m.num_kv_heads, m.head_dim)
            for layer in self.layers
            for s in ("k", "v")
        ]
        return sum(per_side) / len(per_side)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "format_version": self.format_version,
            "layout": self.layout.value,
            "model": self.model.to_dict(),
            "values_folded": self.values_folded,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> KVConfig:
        if not isinstance(data, dict):
            raise ConfigError("KV config must be a JSON object; re-export it")
        version = _int("format_version", data.get("format_version", 1))
        if version > CONFIG_VERSION:
            # Checked first: a newer file may carry fields this version does not know.
            raise ConfigError(_newer_version(version))
        if version < 1:
            raise ConfigError(f"format_version {version} is invalid; it starts at 1")
        allowed = {"method", "format_version", "layout", "model", "values_folded", "layers"}
        _forbid_extra("config", data, allowed)
        for key in ("model", "layers"):
            if key not in data:
                raise ConfigError(f"config is missing {key!r}; export it with sawquant calibrate")
        model = data["model"]
        _forbid_extra("model", model, {f.name for f in fields(ModelFacts)})
        if not isinstance(data["layers"], list):
            raise ConfigError("layers must be a list with one entry per layer")
        layers = tuple(
            LayerConfig.from_dict(layer, f"layers[{i}]") for i, layer in enumerate(data["layers"])
        )
        try:
            facts = ModelFacts(**model)
        except TypeError as err:
            raise ConfigError(f"model: {err}; give num_layers, num_kv_heads, head_dim") from None
        rest = {k: data[k] for k in ("method", "layout", "values_folded") if k in data}
        config = cls(model=facts, layers=layers, **rest)
        if config.format_version > version:
            raise ConfigError(
                f"format_version is {version} but the layers use centering/smoothing, which "
                f"needs version {config.format_version}; re-export the config"
            )
        return config

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> KVConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"KV config is not valid JSON ({err}); re-export it") from None
        return cls.from_dict(data)
