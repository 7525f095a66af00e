"""Fixtures for the vLLM plugin tests: they run in vLLM's own environment (``bash
tests/stacks.sh vllm``, part of the README's test command) and are not collected elsewhere, unless
SAWQUANT_REQUIRE_VLLM=1 (set by that stack) makes a missing vLLM an error.

Engines are module-scoped and shut down after their module: each costs about 30 s to start on
2 cores. They run the model in float32 so that sawquant's vLLM path and its transformers path
compute the same thing up to float rounding.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

# A bare directory named vllm on sys.path is a namespace package, not vLLM: require a real one.
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    if os.environ.get("SAWQUANT_REQUIRE_VLLM") == "1":
        raise ImportError("SAWQUANT_REQUIRE_VLLM=1 but vLLM is not installed here")
    collect_ignore_glob = ["test_*.py"]  # not vLLM's environment: nothing to run


@pytest.fixture(scope="session")
def demo_export_path():
    """The demo exported with its calibrated INT4 config (built once into the user cache)."""
    from sawquant.verify import demo_export

    return demo_export()
