"""The checkout's top-level ``kernels/`` folder must not shadow Hugging Face's ``kernels``
package (a dependency of transformers >= 5.25, imported when transformers starts) when Python
runs from the repository root, as ``python -m pytest`` does."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_top_level_kernels_is_the_installed_package_from_the_root():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed on this stack")
    where = _run("import kernels; print(kernels.__file__)")
    assert not Path(where).resolve().is_relative_to(ROOT), where
    # transformers' start-up import of it, and ours, both work from the root.
    _run("import transformers.modeling_utils; import sawquant.kernels.plans")


def test_sawquant_kernels_is_ours_from_the_root():
    assert _run("import kernels, sawquant.kernels as k; print(k.__name__)") == "sawquant.kernels"
    assert _run("from sawquant.kernels.plans import DecodePlan; print(DecodePlan.__module__)") == (
        "sawquant.kernels.plans"
    )
