"""One rank of the tensor-parallel test (run by torchrun from test_tensor_parallel.py, or with
no torchrun for the unsplit reference): load an export with sawquant.from_pretrained, score a
fixed window through the paged cache (prefill, then teacher-forced decode steps), greedy-decode,
and save what the test compares to ``OUT/rank{rank}.pt``."""

from __future__ import annotations

import os
import sys

import torch

from sawquant.quant.attention import read_positions
from sawquant.runtime import from_pretrained
from sawquant.runtime.hf.compat import cache_kwargs, returned_cache

PREFILL, DECODE, NEW = 24, 8, 8


def main(path: str, out: str) -> None:
    torch.set_num_threads(1)
    split = "WORLD_SIZE" in os.environ
    kwargs = {"tp_plan": "auto"} if split else {"device_map": "cpu"}
    model = from_pretrained(path, dtype=torch.float32, **kwargs)
    ids = torch.randint(3, model.config.vocab_size, (1, PREFILL + DECODE),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        step = model(ids[:, :PREFILL], use_cache=True)
        cache = returned_cache(step)
        logits = [step.logits[0, -1]]
        for t in range(PREFILL, PREFILL + DECODE):
            step = model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
            logits.append(step.logits[0, -1])
        table = cache.plan.block_table[:1]
        stored = [
            [read_positions(store, table, 0, PREFILL + DECODE) for store in cache.stores(i)]
            for i in range(len(cache.layers))
        ]
        tokens = model.generate(ids[:, :PREFILL], max_new_tokens=NEW, do_sample=False)
    rank = int(os.environ.get("RANK", 0))
    torch.save(
        {
            "logits": torch.stack(logits),
            "stored": stored,  # per layer (K, V): [H_local, L, D] as the cache reads them back
            "head_bits": [
                [[bits for bits, _ in s.pool_of()] for s in cache.stores(i)]
                for i in range(len(stored))
            ],  # fmt: skip
            "tokens": tokens[0, PREFILL:],
            "calls": dict(cache.calls),
            "bytes_per_token": model.sawquant_memory().bytes_per_token,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
