"""Typed errors a user can cause. Each message is one line: the problem, then the fix.

The CLI prints these without a traceback and exits with code 2; library callers catch them.
"""

from __future__ import annotations

__all__ = ["SawquantError", "ConfigError", "InputError", "UnsupportedModelError"]


class SawquantError(Exception):
    """Base class: something the user can fix. ``str(err)`` is the one-line message."""


class ConfigError(SawquantError, ValueError):
    """A KV config or recipe that does not validate (names the field and the fix)."""


class InputError(SawquantError, ValueError):
    """A missing path, a bad data file, text too short for the request."""


class UnsupportedModelError(SawquantError):
    """A checkpoint sawquant cannot serve (not a causal LM, MLA, unknown head layout)."""
