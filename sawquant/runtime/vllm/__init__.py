"""The vLLM adapter: ``pip install "sawquant[vllm]"``, then ``vllm serve OUT``.

vLLM loads the entry point ``vllm.general_plugins: sawquant = sawquant.runtime.vllm:register``
in every process. For a checkpoint whose config.json carries ``kv_cache_quantization`` (method
sawquant), its attention layers then store K/V in sawquant's page format inside vLLM's KV blocks
and run sawquant's write and attention (the Triton kernels on CUDA tensors, the torch twins on
CPU); for any other checkpoint nothing changes. See docs/vllm.md.

This module imports nothing from vLLM until vLLM calls :func:`register`.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """The vLLM plugin entry point (idempotent, cheap: it only installs hooks)."""
    from sawquant.runtime.vllm.plugin import install

    install()
