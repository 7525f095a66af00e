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


def hf_scores(path, windows):
    """(nll, top-1) of positions 1..L-1 of each window [N, L] through sawquant's transformers
    runtime on the same export (float32): the reference the vLLM scores are compared with."""
    import torch

    from sawquant.runtime import from_pretrained

    model = from_pretrained(path, dtype=torch.float32)
    nll, top = [], []
    with torch.inference_mode():
        for row in windows:
            logp = model(input_ids=row[None], use_cache=True).logits[0, :-1].float()
            logp = logp.log_softmax(-1)
            nll.append(-logp.gather(-1, row[1:, None])[:, 0])
            top.append(logp.argmax(-1))
    return torch.stack(nll), torch.stack(top)
