"""Typed errors a user can cause. Each message is one line: the problem, then the fix.

The CLI prints these without a traceback and exits with code 2; library callers catch them.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InputError",
    "NonFiniteKVError",
    "RuntimeBypassError",
    "SawquantError",
    "UnsupportedModelError",
]


class SawquantError(Exception):
    """Base class: something the user can fix. ``str(err)`` is the one-line message."""


class ConfigError(SawquantError, ValueError):
    """A KV config or recipe that does not validate (names the field and the fix)."""


class InputError(SawquantError, ValueError):
    """A missing path, a bad data file, text too short for the request."""


class UnsupportedModelError(SawquantError):
    """A checkpoint sawquant cannot serve (not a causal LM, MLA, unknown head layout)."""


class RuntimeBypassError(RuntimeError):
    """A patched model ran a step without the sawquant cache (an engine or transformers change
    routed K/V elsewhere). Not a user error: the INT4 path silently not running is a defect, so
    it is raised instead of serving from a full-precision cache."""


class NonFiniteKVError(SawquantError, ValueError):
    """The model produced NaN/Inf keys or values (or values outside what the cache format can
    hold). sawquant never stores them: every later attention over that page would be NaN."""
