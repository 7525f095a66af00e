"""Fused Triton kernels (installed as ``sawquant.kernels``).

Each kernel has a pure-torch ``*_ref`` twin with the same signature.
"""

if __name__ == "kernels":  # pragma: no cover - only from a checkout's root, see below
    # This folder is importable as a top-level ``kernels`` only when Python runs with a
    # checkout's root on sys.path (``python -m pytest``, ``python -m sawquant.cli`` there).
    # That name belongs to Hugging Face's ``kernels`` package, which transformers >= 5.25
    # depends on and imports at start-up (``from kernels import CUDAProperties``): hand the
    # import over to the installed package, so the checkout's folder does not shadow it.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None:  # none installed: stay, transformers then finds no version
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
