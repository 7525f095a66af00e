"""Calibration recipes: what to try and how to choose, as a typed object that YAML maps onto 1:1.

A recipe file holds exactly the fields of :class:`Recipe` (unknown keys are an error, so a typo
never silently falls back to a default). Shipped recipes live in the ``sawquant.recipes``
package (``recipes/*.yaml``); ``load_recipe`` takes one of their names or a path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sawquant.config import SUPPORTED_BLOCKS, SUPPORTED_GROUPS
from sawquant.errors import ConfigError, InputError

__all__ = ["Recipe", "available_recipes", "default_recipe_name", "load_recipe"]


@dataclass(frozen=True)
class Recipe:
    """Every knob of ``sawquant calibrate``; see docs/calibrate.md for how each is used."""

    name: str = "default"
    description: str = ""
    # Calibration data: a text source ("demo", a .txt or .jsonl path) and its windows.
    data: str = "demo"
    samples: int = 16
    seq_len: int = 512
    # Candidates: rotation blocks (those dividing head_dim are tried), random +-1 sign seeds
    # (null = no signs) and group sizes (null = one scale/zero per token and head).
    blocks: tuple[int, ...] = (1, 16, 32, 64, 128, 256)
    sign_seeds: tuple[int | None, ...] = (None, 0)
    group_sizes: tuple[int | None, ...] = (None,)
    # Exact transforms tried per head: none, center, center+smooth, smooth (stats.TRANSFORMS).
    transforms: tuple[str, ...] = ("none", "center", "center+smooth")
    # Windows that only measure channel means and ranges for the transforms (cheap forwards).
    transform_windows: int = 1
    # After this many measured windows, keep only the keep_candidates best candidates per layer
    # side and group size (naive INT4 and INT8 stay): the remaining windows measure fewer.
    pilot_windows: int = 2
    keep_candidates: int = 4
    # Attention-output error is measured on this many query positions per window (0 = all).
    query_samples: int = 128
    # Windows (of the same data) also run forward+backward to weigh each layer's error by the
    # loss's sensitivity to its attention output (empirical Fisher); 0 = plain relative error.
    fisher_windows: int = 4
    # Choose the smallest block whose error is within (1 + tolerance) of the best one.
    block_tolerance: float = 0.02
    # A head whose relative attention-output error under INT4 stays above this is a fallback.
    fallback_threshold: float = 0.25
    max_fallback_fraction: float = 0.25  # of all (layer, side, KV head) triples
    max_avg_bits: float = 5.0  # per cached element, fp16 scales and zeros included
    allow_bf16: bool = True  # fall back to BF16 where INT8 is not enough
    seed: int = 0  # query-position sampling

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        where = f"recipe {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("recipe name must be a non-empty string")
        _positive_int(where, "samples", self.samples)
        _positive_int(where, "seq_len", self.seq_len, low=2)
        _positive_int(where, "query_samples", self.query_samples, low=0)
        _positive_int(where, "fisher_windows", self.fisher_windows, low=0)
        _positive_int(where, "transform_windows", self.transform_windows, low=1)
        _positive_int(where, "pilot_windows", self.pilot_windows, low=1)
        _positive_int(where, "keep_candidates", self.keep_candidates, low=1)
        from sawquant.calibration.stats import TRANSFORMS

        if not self.transforms or any(t not in TRANSFORMS for t in self.transforms):
            raise ConfigError(
                f"{where}: transforms {list(self.transforms)} must be a non-empty subset of "
                f"{list(TRANSFORMS)}"
            )
        if not self.blocks or any(b not in SUPPORTED_BLOCKS for b in self.blocks):
            raise ConfigError(
                f"{where}: blocks {list(self.blocks)} must be a non-empty subset of "
                f"{list(SUPPORTED_BLOCKS)}"
            )
        for s in self.sign_seeds:
            if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
                raise ConfigError(
                    f"{where}: sign_seeds entries must be null or integers >= 0, got {s!r}"
                )
        if not self.sign_seeds:
            raise ConfigError(f"{where}: sign_seeds is empty; use [null] for no signs")
        for g in self.group_sizes:
            if g is not None and (isinstance(g, bool) or g not in SUPPORTED_GROUPS):
                raise ConfigError(
                    f"{where}: group_sizes entries must be null or one of "
                    f"{list(SUPPORTED_GROUPS)}, got {g!r}"
                )
        if not self.group_sizes:
            raise ConfigError(f"{where}: group_sizes is empty; use [null] for one scale per head")
        for key in ("block_tolerance", "fallback_threshold", "max_fallback_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{where}: {key} must be a number >= 0, got {value!r}")
        if self.max_fallback_fraction > 1:
            raise ConfigError(
                f"{where}: max_fallback_fraction must be <= 1, got {self.max_fallback_fraction}"
            )
        bits = self.max_avg_bits
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits <= 4:
            raise ConfigError(
                f"{where}: max_avg_bits must be a number > 4 (INT4 plus its scales), got {bits!r}"
            )
        if not isinstance(self.allow_bf16, bool):
            raise ConfigError(f"{where}: allow_bf16 must be true or false")
        _positive_int(where, "seed", self.seed, low=0)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (None values are ignored: 'not given on the CLI')."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where} must be a mapping of recipe fields, got {type(data).__name__}"
            )
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown}; remove them (allowed: {allowed})"
            )
        data = dict(data)
        for key in ("blocks", "sign_seeds", "group_sizes", "transforms"):
            if key in data:
                if not isinstance(data[key], (list, tuple)):
                    raise ConfigError(f"{where}: {key} must be a list, got {data[key]!r}")
                data[key] = tuple(data[key])
        return cls(**data)


def _positive_int(where: str, key: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}: {key} must be an integer >= {low}, got {value!r}")


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``sawquant.recipes``."""
    root = resources.files("sawquant.recipes")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def default_recipe_name(model_type: str, *, demo: bool = False) -> str:
    """The shipped recipe for a model family (``demo`` for the embedded demo model): the
    architecture registry names the family, and families without a recipe of their own use
    ``default``."""
    from sawquant.architectures import ARCHITECTURES

    if demo:
        return "demo"
    arch = ARCHITECTURES.get(model_type)
    name = arch.family if arch is not None else "default"
    return name if name in available_recipes() else "default"


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``default``, ``llama``, ...) or a YAML file by path."""
    import yaml

    text_path = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path) or text_path.endswith((".yaml", ".yml")) or "/" in text_path
    )
    if looks_like_path:
        path = Path(text_path).expanduser()
        if not path.is_file():
            raise InputError(
                f"recipe file {text_path!r} does not exist; give a YAML file or one of "
                f"{available_recipes()}"
            )
        source, raw = str(path), path.read_text(encoding="utf-8")
    else:
        resource = resources.files("sawquant.recipes") / f"{text_path}.yaml"
        if not resource.is_file():
            raise InputError(
                f"unknown recipe {text_path!r}; use one of {available_recipes()} or a YAML path"
            )
        source, raw = f"recipe {text_path!r}", resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML ({first}); fix its syntax") from None
    return Recipe.from_dict(data if data is not None else {}, where=source)
