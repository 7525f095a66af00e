"""Fused Triton kernels (installed as ``sawquant.kernels``).

Each kernel has a pure-torch ``*_ref`` twin with the same signature.
"""
