"""Helpers the vLLM tests share (imported by name: pytest puts tests/vllm_plugin on sys.path)."""

from __future__ import annotations


def shutdown(llm) -> None:
    """Stop an engine's processes now (rather than at interpreter exit)."""
    llm.llm_engine.engine_core.shutdown()


def export_with(config, out):
    """The demo checkpoint exported with ``config`` to ``out``."""
    from sawquant.export import export_checkpoint

    export_checkpoint(None, config, out, check_weights=False)
    return out
