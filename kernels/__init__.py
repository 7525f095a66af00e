"""Fused Triton kernels (installed as ``sawquant.kernels``); each has a pure-torch ``*_ref`` twin."""
