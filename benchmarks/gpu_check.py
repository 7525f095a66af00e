"""GPU correctness checks of what the CPU suite can only run in the Triton interpreter.

1. **Engine blocks** (`BlockLayout`, the vLLM plugin's storage): the fused write kernel into
   strided pool views inside opaque byte blocks vs the twin on CPU into ordinary pools, bit for
   bit, and decode attention (kernel) on those views vs the twin's float32 reference.
2. **The transformers runtime on CUDA**: a random-weight Llama (Qwen3-8B head shapes, 2 layers)
   patched with several configs (signs, INT8/BF16 fallback heads, groups, centering and
   smoothing), prefill + decode steps + a chunk, float32; logits against the same model on the
   CPU with the twins, and the kernel path counted (every write and attention must have run on
   the GPU: ``cache.calls``). Decode steps replay CUDA graphs there (the default on CUDA).
3. **CUDA-graph decode in generate**: the same model in bfloat16, ``generate`` with graphs
   against ``cuda_graphs=False`` (greedy with left padding, seeded sampling, beam search, and a
   pool that grows mid-generation): identical tokens, every decode step a graph replay.

    python benchmarks/gpu_check.py [--json PATH]

Prints one row per check; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sawquant.config import KVConfig, LayerConfig, ModelFacts, SideConfig
from sawquant.kernels import decode
from sawquant.kernels.decode import paged_decode_attention
from sawquant.kernels.plans import DecodePlan
from sawquant.kernels.write import rotate_quantize_paged
from sawquant.quant import slots_for
from sawquant.quant.decode import paged_decode_attention_ref
from sawquant.quant.write import rotate_quantize_paged_ref
from sawquant.runtime.blocks import BlockLayout
from sawquant.runtime.layer import LayerKV
from sawquant.testing import differing_bytes


def check_blocks(dev: torch.device) -> list[dict]:
    facts = ModelFacts(num_layers=1, num_kv_heads=8, head_dim=128, model_type="llama")
    layers = {
        "int4 b128 signs": LayerConfig(k=SideConfig(rotation_block=128, sign_seed=1)),
        "mixed pools g32 center": LayerConfig(
            k=SideConfig(rotation_block=64, sign_seed=2, fallback_heads={1: 8, 6: 16}),
            v=SideConfig(group_size=32, fallback_heads={0: 16}, center=[[0.5] * 128] * 8),
        ),
    }
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        bs, num_blocks = 32, 40
        layout = BlockLayout.build(layer, facts, block_size=bs, dtype=torch.bfloat16)
        engine = torch.zeros(num_blocks, 1, bs, layout.bytes_per_token, dtype=torch.uint8)
        engine = engine.to(dev)
        in_blocks = layout.layer_kv(engine, layer, facts)
        plain = LayerKV.allocate(layer, num_kv_heads=8, head_dim=128, num_pages=num_blocks,
                                 page_size=bs, dtype=torch.bfloat16)  # fmt: skip
        table = torch.randperm(num_blocks, generator=gen)[:36].view(3, 12).to(torch.int32)
        lens = [371, 64, 250]
        for b, n in enumerate(lens):
            slots = slots_for(table[b : b + 1], torch.arange(n)[None], bs)[0]
            k = (torch.randn(n, 8, 128, generator=gen) * 2).to(torch.bfloat16)
            v = torch.randn(n, 8, 128, generator=gen).to(torch.bfloat16)
            rotate_quantize_paged(k.to(dev), v.to(dev), slots.to(dev), in_blocks.k, in_blocks.v)
            rotate_quantize_paged_ref(k, v, slots, plain.k, plain.v)
        differing = differing_bytes(in_blocks.k, plain.k) + differing_bytes(in_blocks.v, plain.v)
        q = torch.randn(3, 32, 128, generator=gen)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        ref = paged_decode_attention_ref(q, plain.k, plain.v, table, seq_lens,
                                         softmax_scale=128**-0.5)  # fmt: skip
        plan = DecodePlan.build(in_blocks.k, in_blocks.v, dev)
        out = paged_decode_attention(q.to(dev, torch.bfloat16), in_blocks.k, in_blocks.v,
                                     table.to(dev), seq_lens.to(dev), softmax_scale=128**-0.5,
                                     plan=plan)  # fmt: skip
        rel = float((out.float().cpu() - ref).norm() / ref.norm())
        ok = differing == 0 and rel < 1e-2  # bf16 q and output: the STYLE.md bf16 band
        rows.append({"check": f"blocks: {name}", "differing_bytes": differing,
                     "decode_rel_err": rel, "ok": ok})  # fmt: skip
    return rows


def _model(dev: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=1024)  # fmt: skip
    return LlamaForCausalLM(cfg).eval().to(dev)


def _run(model, ids: torch.Tensor):
    from sawquant.runtime.hf.compat import cache_kwargs, returned_cache

    with torch.no_grad():
        out = model(ids[:, :300], use_cache=True)
        cache, logits = returned_cache(out), [out.logits[:, -1:]]
        for t in range(300, 316):
            step = model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
            logits.append(step.logits)
        chunk = model(ids[:, 316:340], **cache_kwargs(model, cache), use_cache=True)
        logits.append(chunk.logits)
    return torch.cat(logits, 1).float().cpu(), dict(cache.calls)


def check_runtime(dev: torch.device) -> list[dict]:
    from sawquant.runtime import dispatch, patch, unpatch

    facts = ModelFacts(2, 8, 128, "llama")
    center = (torch.randn(8, 128, generator=torch.Generator().manual_seed(3)) * 0.2).tolist()
    configs = {
        "int4 b128 signs": KVConfig.uniform(
            facts, k=SideConfig(rotation_block=128, sign_seed=1), v=SideConfig(rotation_block=64)
        ),
        "fallbacks g32 center smooth": KVConfig(
            model=facts,
            layers=(
                LayerConfig(
                    k=SideConfig(rotation_block=64, fallback_heads={2: 8, 5: 16}),
                    v=SideConfig(group_size=32, center=center),
                ),
                LayerConfig(
                    k=SideConfig(rotation_block=128, sign_seed=2, center=center),
                    v=SideConfig(
                        rotation_block=32, fallback_heads={0: 16}, smooth=[[1.5] * 128] * 8
                    ),
                ),
            ),  # fmt: skip
        ),
    }
    ids = torch.randint(0, 512, (3, 340), generator=torch.Generator().manual_seed(1))
    cpu_model, gpu_model = _model(torch.device("cpu")), _model(dev)
    rows = []
    for name, config in configs.items():
        patch(cpu_model, config)
        patch(gpu_model, config)
        want, _ = _run(cpu_model, ids)
        launched = []
        real = dispatch.use_triton
        dispatch.use_triton = lambda t: launched.append(real(t)) or real(t)
        try:
            got, calls = _run(gpu_model, ids.to(dev))
        finally:
            dispatch.use_triton = real
        rel = float((got - want).norm() / want.norm())
        top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        kernels = bool(launched) and all(launched)
        ok = kernels and calls.get("decode", 0) >= 32 and rel < 2e-2 and top1 > 0.9
        rows.append({"check": f"runtime: {name}", "rel_err": rel, "top1": top1,
                     "all_kernel_launches": kernels, "calls": calls, "ok": ok})  # fmt: skip
        unpatch(cpu_model)
        unpatch(gpu_model)
    return rows


def _generate(model, ids, mask, **kwargs):
    from sawquant.runtime.hf.compat import returned_cache

    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40, pad_token_id=0,
            return_dict_in_generate=True, **kwargs,
        )  # fmt: skip
    return out.sequences.cpu(), returned_cache(out)


def check_graphs(dev: torch.device) -> list[dict]:
    from sawquant.runtime import patch, unpatch

    facts = ModelFacts(2, 8, 128, "llama")
    config = KVConfig.uniform(
        facts, k=SideConfig(rotation_block=128, sign_seed=1, fallback_heads={3: 8}),
        v=SideConfig(rotation_block=64),
    )  # fmt: skip
    model = _model(dev).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 512, (4, 200), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding
    mask[3, :150] = 0
    modes = {
        "greedy, left padding": (16, dict(do_sample=False)),
        "sampling": (16, dict(do_sample=True, top_k=50)),
        "beams 3": (16, dict(num_beams=3)),
        "page 2 (the table widens)": (2, dict(do_sample=False)),
    }
    rows, eager = [], None
    for name, (page, mode) in modes.items():
        patch(model, config, page_size=page, cuda_graphs=False)
        want, _ = _generate(model, ids, mask, **mode)
        patch(model, config, page_size=page)
        got, cache = _generate(model, ids, mask, **mode)
        unpatch(model)
        same = bool(torch.equal(got, want))
        replays = cache.calls["graph_replay"]
        rows.append({"check": f"graphs: {name}", "same_tokens": same, "graph_replays": replays,
                     "graphs": len(cache.graphs), "ok": same and replays == 39})  # fmt: skip
        eager = want if name.startswith("greedy") else eager
    # A second generate takes the first one's pools and graphs (sawquant.runtime.hf.reuse):
    # no new capture, the same tokens as eager.
    patch(model, config)
    _generate(model, ids, mask, do_sample=False)  # its cache dies at once: the leftovers stay
    reuse = model._sawquant_state.reuse  # None without graphs (a CPU dry run)
    spare = None if reuse is None else reuse.spare
    kept = -1 if spare is None else len(spare.graphs)
    got, cache = _generate(model, ids, mask, do_sample=False)
    reused = 0 if reuse is None else reuse.reused
    unpatch(model)
    same = bool(torch.equal(got, eager))
    replays = cache.calls["graph_replay"]
    rows.append({"check": "graphs: a second generate reuses the first one's", "same_tokens": same,
                 "reused": reused, "graphs_before": kept, "graphs_after": len(cache.graphs),
                 "graph_replays": replays,
                 "ok": same and reused == 1 and kept == len(cache.graphs) > 0
                 and replays == 39})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (TRITON_INTERPRET=1)")
    checks = {"blocks": check_blocks, "runtime": check_runtime, "graphs": check_graphs}
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(checks)}")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(checks)
    if unknown := set(names) - set(checks):
        parser.error(f"unknown check(s) {sorted(unknown)}; pick from {', '.join(checks)}")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    rows = [{"device": name, "torch": torch.__version__}]
    for check in names:
        before = dict(decode.LAUNCHES)
        rows += checks[check](dev)
        # Which decode kernel served the check (the tensor-core one where it applies).
        rows[-1]["decode_launches"] = {k: v - before.get(k, 0) for k, v in decode.LAUNCHES.items()}
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for row in rows[1:]:
        print(("PASS " if row["ok"] else "FAIL ") + json.dumps(row))
    sys.exit(0 if all(r["ok"] for r in rows[1:]) else 1)


if __name__ == "__main__":
    main()
