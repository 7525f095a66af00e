"""GPU benchmark of the paged INT4 decode attention kernel (and the chunked-prefill read path).

For each shape: kernel time (median of ``triton.testing.do_bench``, eager = host launch
overhead included, and CUDA-graph replay = device time), the bytes the kernel must read
(codes + scales + zeros of K and V, plus q and the output), achieved GB/s and its share of the
measured device copy bandwidth, and torch ``scaled_dot_product_attention`` in bf16 on a
contiguous cache with GQA, for the speedup. A correctness check against the pure-torch twin runs
first. Usage: ``python benchmarks/bench_decode.py [--json PATH] [--sweep] [--variants]
[--only-variants] [--fallback [--shapes 64x16384,...]]`` (``--variants``: the kernel-variant
sweep first, then everything with its fastest variant; ``--fallback``: only layers with INT8 /
16-bit heads, INT8 groups in the tensor-core kernel against the Triton kernel, and SDPA bf16).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace

import torch
import triton
from torch.nn.functional import scaled_dot_product_attention

from sawquant.format import allocate_side
from sawquant.kernels import decode
from sawquant.kernels.decode import paged_decode_attention
from sawquant.kernels.plans import DEFAULT_DECODE_TUNING, DecodePlan, DecodeTuning, PrefillPlan
from sawquant.kernels.prefill import _dequant_into, paged_prefill_attention
from sawquant.quant import paged_write_ref, random_signs, slots_for
from sawquant.quant.decode import paged_decode_attention_ref
from sawquant.testing import poisoned_side

__all__ = ["run"]

QWEN3_8B = {"h_q": 32, "h_kv": 8, "d": 128, "block": 128}
DEMO = {"h_q": 9, "h_kv": 3, "d": 64, "block": 32}


def _bench(fn, graph: bool) -> float:
    """Median microseconds of fn (eager, or replayed from a CUDA graph)."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    us = _bench(lambda: dst.copy_(src), graph=False)
    return 2 * src.numel() * src.element_size() / us / 1e3


def read_bandwidth(device: torch.device) -> float:
    """The best read rate in GB/s: a read-only reduction over 4 GiB (what decode attention,
    which reads far more than it writes, should be compared with; the copy rate counts writes).
    The best of a few reduction shapes is kept."""
    src = torch.randn(1 << 30, device=device)  # 4 GiB of float32
    best = 0.0
    for rows in (1 << 10, 1 << 14):
        view = src.view(rows, -1)
        out = torch.empty(rows, device=device)
        us = _bench(lambda v=view, o=out: torch.sum(v, dim=1, out=o), graph=False)
        best = max(best, src.numel() * src.element_size() / us / 1e3)
    del src
    torch.cuda.empty_cache()
    return best


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "BxN,BxN" -> [(batch, context), ...]."""
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]


def time_shapes(rows: list, shapes, time_one, json_path: str | None) -> list:
    """Append ``time_one(batch, context)`` for each shape to ``rows``; a shape that fails is
    recorded as an error row and the others still run; ``rows`` is rewritten to ``json_path``
    after each shape, so a run cut short keeps what it measured."""
    for b, n in shapes:
        try:
            rows.append(time_one(b, n))
        except Exception as err:  # keep timing the other shapes
            rows.append({"kind": "error", "shape": [b, n], "error": repr(err)[:500]})
            print("error", b, n, repr(err)[:500], flush=True)
        torch.cuda.empty_cache()
        if json_path:
            with open(json_path, "w") as f:
                json.dump(rows, f, indent=1)
    return rows


def _random_stores(
    batch, ctx, spec, page, device, k_bits=None, v_bits=None, seed=0, rotations=None,
    groups=(None, None),
):  # fmt: skip
    """Stores filled with random codes/scales (valid data for timing), permuted block table.
    ``rotations``: ((block, sign seed or None) of K, the same of V); default: the spec's block,
    signs from seed 1 on both sides. ``groups``: the group size of K and of V."""
    h_kv, d = spec["h_kv"], spec["d"]
    g = torch.Generator(device=device).manual_seed(seed)
    pages_per_seq = math.ceil(ctx / page)
    num_pages = batch * pages_per_seq + 1
    table = torch.randperm(num_pages, device=device, generator=g)[: batch * pages_per_seq]
    table = table.view(batch, pages_per_seq).to(torch.int32)
    stores = []
    rotations = rotations or ((spec["block"], 1), (spec["block"], 1))
    for bits, (block, sign_seed), group in zip((k_bits, v_bits), rotations, groups):
        st = poisoned_side(
            num_kv_heads=h_kv, head_dim=d, block=block, num_pages=num_pages,
            page_size=page, seed=sign_seed, head_bits=bits, device=device, group=group,
        )  # fmt: skip
        for pool in st.pools.values():  # valid values (random bytes may be NaN/Inf patterns)
            if pool.scale is None:
                pool.codes.normal_(generator=g)
                continue
            pool.scale.uniform_(0.05, 0.2, generator=g)
            pool.zero.uniform_(-1.5, -0.5, generator=g)
        stores.append(st)
    return stores[0], stores[1], table


def _decode_bytes(k_store, v_store, batch, ctx, q_bytes):
    return (k_store.bytes_per_token() + v_store.bytes_per_token()) * batch * ctx + 2 * q_bytes


# Launch variants of the sweep. The designs that lost on the H100 and were removed from the
# kernel (the first round's half-width kernel, q K^T and K-as-A orientations, Triton's
# pipeliner instead of the hand prefetch, maxnreg caps, the round-2 fallback handling) are in
# bench_decode_variants_h100_2026-11-22_run1.json and bench_decode_h100_2026-11-22_run2.json.
VARIANTS = [
    DEFAULT_DECODE_TUNING,
    DecodeTuning(subnormal_unpack=False),
    DecodeTuning(block_n=256, num_warps=8),
    DecodeTuning(block_n=64),
]


def _quantized_case(device, h_q, h_kv, d, block, page, lens, dtype, seed=0, bits=None, gs=None):
    """q and K/V stores holding real quantized data (paged_write_ref), random block table.
    ``gs``: both sides' group size, or a (K, V) pair."""
    g = torch.Generator(device=device).manual_seed(seed)
    maxp = math.ceil(max(lens) / page)
    table = torch.randperm(len(lens) * maxp + 2, device=device, generator=g)
    table = table[: len(lens) * maxp].view(len(lens), maxp).to(torch.int32)
    bits = bits or ((4,) * h_kv, (4,) * h_kv)
    stores = []
    for side, hb in enumerate(bits):
        st = allocate_side(
            num_kv_heads=h_kv,
            head_dim=d,
            head_bits=hb,
            num_pages=table.numel() + 2,
            page_size=page,
            block=block,
            group_size=gs[side] if isinstance(gs, tuple) else gs,
            signs=random_signs(d, side) if side == 0 else None,
            device=device,
            dtype=dtype,
        )
        for b, n in enumerate(lens):
            pos = torch.arange(n, device=device)
            slots = slots_for(table[b : b + 1], pos[None], page)[0]
            x = torch.randn(n, h_kv, d, device=device, generator=g) * 2
            for pb, pool in st.pools.items():
                paged_write_ref(
                    x[:, st.heads[pb].long()], slots, pool, block=st.block, signs=st.signs
                )
        stores.append(st)
    q = torch.randn(len(lens), h_q, d, device=device, generator=g).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    return (q, stores[0], stores[1], table, sl)


def sweep_variants(device: torch.device, bw: float) -> list[dict]:
    """Every VARIANTS entry: relative error vs the twin (Qwen3-8B layer, lengths 1/999/4096,
    and fallback heads + group size 32 at d 96), then graph time at the three target shapes
    for a few split counts."""
    spec = QWEN3_8B
    checks = [
        _quantized_case(device, 32, 8, 128, 128, 16, [1, 999, 4096], torch.bfloat16),
        _quantized_case(device, 12, 4, 96, 32, 16, [130, 1500], torch.float16, seed=1,
                        bits=((8, 4, 4, 16), (4, 4, 16, 8)), gs=32),
    ]  # fmt: skip
    refs = [paged_decode_attention_ref(*c, softmax_scale=0.1).float() for c in checks]
    shapes = {}
    for batch, ctx in ((32, 16384), (8, 32768), (1, 4096)):
        k_store, v_store, table = _random_stores(batch, ctx, spec, 16, device)
        q = torch.randn(batch, spec["h_q"], spec["d"], device=device, dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        # 2 resident programs per SM (of 132) fill one wave at 1 / 4 / 16+ splits; the
        # others test 3 per SM (registers <= 168) and 2 waves.
        splits = {16384: [1, 2, 3], 32768: [4, 6, 8], 4096: [8, 16]}[ctx]
        shapes[(batch, ctx)] = (q, k_store, v_store, table, lens, splits)
    rows = []
    for var in VARIANTS:
        row = {"kind": "variant", "config": asdict(var)}
        try:
            errs = []
            # The second case compiles 4 more kernels: only for two variants (time on the GPU).
            full = var in (VARIANTS[0], VARIANTS[1])
            for case, ref in list(zip(checks, refs))[: 2 if full else 1]:
                out = paged_decode_attention(*case, softmax_scale=0.1, tuning=var)
                errs.append(((out.float() - ref).norm() / ref.norm()).item())
                errs.append(float(torch.isfinite(out).all()))
            row["rel_err"] = errs
            for (batch, ctx), (q, ks, vs, table, lens, splits) in shapes.items():
                for ns in splits:
                    fn = lambda: paged_decode_attention(  # noqa: E731
                        q, ks, vs, table, lens, softmax_scale=0.088, num_splits=ns, tuning=var
                    )
                    us = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3
                    row[f"{batch}x{ctx}/s{ns}"] = us
        except Exception as err:  # a variant that does not compile or run: record and go on
            row["error"] = repr(err)[:400]
        print(_variant_line(row), flush=True)
        rows.append(row)
    for (batch, ctx), (q, ks, vs, table, lens, splits) in shapes.items():
        nbytes = _decode_bytes(ks, vs, batch, ctx, q.numel() * 2)
        rows.append({"kind": "shape", "batch": batch, "context": ctx, "bytes_read": nbytes,
                     "us_at_75pct": nbytes / (0.75 * bw) / 1e3})  # fmt: skip
    return rows


def _variant_line(r: dict) -> str:
    t = " ".join(f"{k}={v:.1f}" for k, v in r.items() if "/s" in k)
    e = " ".join(f"{x:.1e}" for x in r.get("rel_err", []))
    return f"{r['config']} err[{e}] {t} {r.get('error', '')}"


def check_correctness(device: torch.device, tuning: DecodeTuning) -> list[dict]:
    """Kernel vs the fp32 twin on real quantized data (paged_write_ref), several layouts."""
    rows = []
    cases = [
        dict(h_q=32, h_kv=8, d=128, block=128, page=16, lens=[1, 999, 4096], bits=None),
        dict(h_q=9, h_kv=3, d=64, block=32, page=64, lens=[77, 3000], bits=None),
        dict(h_q=8, h_kv=2, d=128, block=64, page=16, lens=[513, 2000], bits=((8, 4), (4, 16))),
        dict(h_q=12, h_kv=4, d=96, block=32, page=16, lens=[130, 1500], bits=None, gs=32),
    ]
    for case in cases:
        for dtype, kw in (
            (torch.bfloat16, {}),
            (torch.float16, dict(softcap=30.0)),
            (torch.bfloat16, dict(sliding_window=300, num_splits=3)),
        ):
            lens, page, d, h_kv = case["lens"], case["page"], case["d"], case["h_kv"]
            args = _quantized_case(
                device,
                case["h_q"],
                h_kv,
                d,
                case["block"],
                page,
                lens,
                dtype,
                seed=len(rows),
                bits=case["bits"],
                gs=case.get("gs"),
            )
            out = paged_decode_attention(*args, softmax_scale=d**-0.5, tuning=tuning, **kw)
            ref = paged_decode_attention_ref(*args, softmax_scale=d**-0.5, **kw).float()
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append(
                {
                    "case": f"h{case['h_q']}/{h_kv} d{d} page{page} bits{case['bits']} "
                    f"gs{case.get('gs')} {str(dtype)[6:]} {kw}",
                    "rel_err": rel,
                    "finite": bool(torch.isfinite(out).all()),
                }
            )
    return rows


def bench_decode_shape(
    device, spec, batch, ctx, page, bw, read_bw, sweep=False, tuning=DEFAULT_DECODE_TUNING
) -> dict:
    k_store, v_store, table = _random_stores(batch, ctx, spec, page, device)
    # As engines call it: the layer's plan built once, outside the timed launches.
    plan = DecodePlan.build(k_store, v_store, device)
    q = torch.randn(batch, spec["h_q"], spec["d"], device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    scale = spec["d"] ** -0.5
    nbytes = _decode_bytes(k_store, v_store, batch, ctx, q.numel() * 2)

    def kern(tune=tuning, **kw):
        return lambda: paged_decode_attention(
            q, k_store, v_store, table, lens, softmax_scale=scale, plan=plan, tuning=tune, **kw
        )

    variants = []
    tuned = tuning
    if sweep:
        configs = [(bn, nw, ns) for bn in (32, 64, 128) for nw in (4, 8) for ns in (1, 2, 3)]
        for bn, nw, ns in configs:
            tune = replace(tuning, block_n=bn, num_warps=nw, num_stages=ns)
            try:
                us = _bench(kern(tune), graph=True)
            except Exception as err:  # a config that does not compile (shared memory)
                us = float("nan")
                print("variant failed", bn, nw, ns, type(err).__name__)
            variants.append({"block_n": bn, "num_warps": nw, "num_stages": ns, "graph_us": us})
        best = min(
            (v for v in variants if v["graph_us"] == v["graph_us"]), key=lambda v: v["graph_us"]
        )
        tuned = replace(
            tuning, block_n=best["block_n"], num_warps=best["num_warps"],
            num_stages=best["num_stages"],
        )  # fmt: skip
        auto = plan.splits(batch, spec["h_kv"], ctx)
        for ns in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, auto}):
            variants.append(
                {"num_splits": ns, "graph_us": _bench(kern(tuned, num_splits=ns), True)}
            )
    eager = _bench(kern(tuned), graph=False)
    graph = _bench(kern(tuned), graph=True)

    # Baseline: SDPA bf16 on a contiguous cache [B, H_kv, ctx, D], GQA.
    kc = torch.randn(batch, spec["h_kv"], ctx, spec["d"], device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q4 = q[:, :, None]
    try:
        sdpa = lambda: scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True)  # noqa: E731
        sdpa()
        gqa = "enable_gqa"
    except TypeError:
        grp = spec["h_q"] // spec["h_kv"]
        kr, vr = kc.repeat_interleave(grp, 1), vc.repeat_interleave(grp, 1)
        sdpa = lambda: scaled_dot_product_attention(q4, kr, vr, scale=scale)  # noqa: E731
        gqa = "repeat_interleave"
    sdpa_eager = _bench(sdpa, graph=False)
    sdpa_graph = _bench(sdpa, graph=True)
    best = min(eager, graph)
    return {
        "kind": "decode",
        "layer": spec,
        "batch": batch,
        "context": ctx,
        "page_size": page,
        "kernel_us_eager": eager,
        "kernel_us_graph": graph,
        "bytes_read": nbytes,
        "GBps_graph": nbytes / graph / 1e3,
        "pct_copy_bw_graph": 100 * nbytes / graph / 1e3 / bw,
        "GBps_eager": nbytes / eager / 1e3,
        "pct_copy_bw_eager": 100 * nbytes / eager / 1e3 / bw,
        "pct_read_bw_graph": 100 * nbytes / graph / 1e3 / read_bw,
        # An FP8 cache (1 byte per element, K and V) read at the measured read rate.
        "fp8_at_read_bw_us": (2 * batch * ctx * spec["h_kv"] * spec["d"]) / read_bw / 1e3,
        "sdpa_bf16_us_eager": sdpa_eager,
        "sdpa_bf16_us_graph": sdpa_graph,
        "sdpa_gqa": gqa,
        "speedup_eager": sdpa_eager / eager,
        "speedup_graph": sdpa_graph / graph,
        "best_us": best,
        "num_splits_auto": plan.splits(batch, spec["h_kv"], ctx),
        "variants": variants,
        "tuning": asdict(tuned),
    }


# Fallback-pool configurations of a Qwen3-8B layer (8 KV heads): (K head bits, V head bits).
FALLBACK_CONFIGS = {
    "int4": ((4,) * 8, (4,) * 8),
    "int8-k-head": ((8,) + (4,) * 7, (4,) * 8),
    "int8-v-head": ((4,) * 8, (8,) + (4,) * 7),
    "int8-kv-head": ((8,) + (4,) * 7, (8,) + (4,) * 7),
    "int8-k-2heads": ((8, 8) + (4,) * 6, (4,) * 8),
    "bf16-k-head": ((16,) + (4,) * 7, (4,) * 8),
    "all-16bit": ((16,) * 8, (16,) * 8),
}
# "one-stream": INT8 groups in the tensor-core kernel's wide build (3 programs per SM), every
# group launched after the other; "int8-triton": INT8 groups in the Triton kernel, one stream
# (every release before 2026-12-04); "now": the defaults, the fallback groups on a side stream
# overlapping the INT4 group's launch; "forced": that, with no dispatch rule (the tensor-core
# kernel at any length); "side-own": the side-stream groups sized as if alone (before
# 2026-12-04 21:15 UTC); "side-x1": exactly the main group's splits ("now": up to 4x). Ratios
# 2 and 8, and the main group sized for all of the layer's heads, lost to 4
# (bench_decode_fallback_h200_2026-12-04_sidesplits.json, _mainlayer.json).
# (The 2026-12-04 run named the first four now / int8-triton / concurrent /
# concurrent-forced: bench_decode_fallback_h200_2026-12-04_streams.json.)
# The wide build capped at 128 registers (4 programs per SM) was no faster at 64x16k
# (bench_decode_fallback_h200_2026-12-04_int8.json); the older A/B of the fallback tile width
# is in bench_decode_fallback_h200_2026-12-03.json.
FALLBACK_MODES = {
    "one-stream": DecodeTuning(concurrent_groups=False),
    "int8-triton": DecodeTuning(mma_int8=False, concurrent_groups=False),
    "now": DEFAULT_DECODE_TUNING,
    "forced": DecodeTuning(mma_min_tokens=0),
    "side-own": DecodeTuning(side_split_ratio=0),
    "side-x1": DecodeTuning(side_split_ratio=1),
}
INT8_MODES = ("int8-triton",)  # only for configs with an INT8 side
ONE_GROUP = ("int4", "all-16bit")  # one head group: nothing to overlap


def check_fallback_correctness(device: torch.device) -> list[dict]:
    """Kernel vs the fp32 twin with INT8 / 16-bit heads (Qwen3-8B layer, lengths 1/999/4096,
    auto splits and 3 splits)."""
    mixed = ((8, 16, 4, 4, 4, 4, 4, 4), (16, 8, 16, 4, 4, 4, 4, 4))  # groups 8/16 16/8 4/16 4/4
    rows = []
    for name, bits in [*FALLBACK_CONFIGS.items(), ("mixed", mixed)]:
        for dtype in (torch.bfloat16, torch.float16)[: 2 if name in ("mixed", "all-16bit") else 1]:
            args = _quantized_case(device, 32, 8, 128, 128, 16, [1, 999, 4096], dtype, bits=bits)
            ref = paged_decode_attention_ref(*args, softmax_scale=128**-0.5).float()
            # forced: the tensor-core kernel for every group it can take, whatever the length
            for mode, tuning in FALLBACK_MODES.items():
                for splits in (None, 3):
                    before = dict(decode.LAUNCHES)
                    out = paged_decode_attention(
                        *args, softmax_scale=128**-0.5, num_splits=splits, tuning=tuning
                    )
                    rel = ((out.float() - ref).norm() / ref.norm()).item()
                    launches = {k: v - before.get(k, 0) for k, v in decode.LAUNCHES.items()}
                    rows.append(
                        {
                            "kind": "fallback_check",
                            "case": f"{name} {str(dtype)[6:]} {mode} splits={splits}",
                            "rel_err": rel,
                            "finite": bool(torch.isfinite(out).all()),
                            "launches": {k: v for k, v in launches.items() if v},
                        }
                    )
                    if tuning.concurrent_groups:  # two streams inside a captured graph
                        rows.append(_graph_check(args, tuning, splits, out, name, dtype, mode))
    return rows


def _graph_check(args, tuning, splits, eager, name, dtype, mode) -> dict:
    """The same call captured in a CUDA graph and replayed: its output must equal eager's."""
    plan = DecodePlan.build(args[1], args[2], args[0].device)  # host work: not in a capture
    call = lambda: paged_decode_attention(  # noqa: E731
        *args, softmax_scale=128**-0.5, num_splits=splits, tuning=tuning, plan=plan
    )
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch's docs ask
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    graph.replay()
    torch.cuda.synchronize()
    diff = ((out.float() - eager.float()).norm() / eager.float().norm()).item()
    return {
        "kind": "fallback_check",
        "case": f"{name} {str(dtype)[6:]} {mode} splits={splits} graph-vs-eager",
        "rel_err": diff,  # against the eager output: 0 when the replay matches it
        "finite": bool(torch.isfinite(out).all()),
    }


def _layer_graph_us(q, k_store, v_store, table, lens, scale, plan, tuning=DEFAULT_DECODE_TUNING):
    """CUDA-graph µs of one decode call over the layer's stores."""
    return _bench(
        lambda: paged_decode_attention(
            q, k_store, v_store, table, lens, softmax_scale=scale, plan=plan, tuning=tuning
        ),
        graph=True,
    )


def bench_fallback(
    device: torch.device, batch: int = 64, ctx: int = 16384, configs: tuple | None = None
) -> list[dict]:
    """Graph time of one Qwen3-8B layer with fallback heads, before / now, and SDPA bf16."""
    spec, page, rows = QWEN3_8B, 16, []
    scale = spec["d"] ** -0.5
    q = torch.randn(batch, spec["h_q"], spec["d"], device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    for name in configs or tuple(FALLBACK_CONFIGS):
        kb, vb = FALLBACK_CONFIGS[name]
        k_store, v_store, table = _random_stores(batch, ctx, spec, page, device, kb, vb)
        nbytes = _decode_bytes(k_store, v_store, batch, ctx, q.numel() * 2)
        for mode, tuning in FALLBACK_MODES.items():
            if mode in INT8_MODES and not name.startswith("int8"):
                continue
            if mode != "now" and name in ONE_GROUP:
                continue
            plan = DecodePlan.build(k_store, v_store, device)
            before = dict(decode.LAUNCHES)
            paged_decode_attention(
                q, k_store, v_store, table, lens, softmax_scale=scale, plan=plan, tuning=tuning
            )
            launches = {k: v - before.get(k, 0) for k, v in decode.LAUNCHES.items()}
            mma, splits = decode.split_choices(
                plan, k_store, v_store, batch, spec["h_q"] // spec["h_kv"], table.shape[1] * page,
                tuning=tuning,
            )  # fmt: skip
            try:
                us = _layer_graph_us(q, k_store, v_store, table, lens, scale, plan, tuning)
            except Exception as err:  # report and go on
                us = float("nan")
                print("fallback bench failed", name, mode, repr(err)[:300])
            rows.append(
                {
                    "kind": "fallback",
                    "config": name,
                    "mode": mode,
                    "batch": batch,
                    "context": ctx,
                    "graph_us": us,
                    "bytes_read": nbytes,
                    "GBps": nbytes / us / 1e3,
                    "launches": {k: v for k, v in launches.items() if v},
                    "groups": [f"{'mma' if m else 'triton'} x{n}" for m, n in zip(mma, splits)],
                }
            )
        torch.cuda.empty_cache()
    kc = torch.randn(batch, spec["h_kv"], ctx, spec["d"], device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q4 = q[:, :, None]
    sdpa = lambda: scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True)  # noqa: E731
    us = _bench(sdpa, graph=True)
    nbytes = 2 * kc.numel() * 2 + 2 * q.numel() * 2
    rows.append(
        {
            "kind": "fallback",
            "config": "sdpa-bf16",
            "mode": "torch",
            "batch": batch,
            "context": ctx,
            "graph_us": us,
            "bytes_read": nbytes,
            "GBps": nbytes / us / 1e3,
        }
    )
    return rows


def bench_prefill(device, spec, chunk, cached, page) -> dict:
    """Batch 1: a chunk of new queries over `cached` quantized tokens vs SDPA on bf16."""
    from torch.nn.attention.bias import causal_lower_right

    k_store, v_store, table = _random_stores(1, cached + chunk, spec, page, device)
    h_q, h_kv, d = spec["h_q"], spec["h_kv"], spec["d"]
    q = torch.randn(1, h_q, chunk, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, h_kv, chunk, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.tensor([cached], dtype=torch.int32, device=device)
    ours = _bench(
        lambda: paged_prefill_attention(
            q, k, v, k_store, v_store, table, lens, softmax_scale=d**-0.5
        ),
        graph=False,
    )
    grp = h_q // h_kv
    buf = torch.empty(1, h_q, cached + chunk, d, device=device, dtype=torch.bfloat16)
    plan = PrefillPlan.build(k_store, v_store, device)
    gather = _bench(
        lambda: _dequant_into(
            buf, k_store, table, lens, cached, grp, plan.k_unrot, plan.k_rot_scale
        ),
        graph=False,
    )
    kc = torch.randn(1, h_kv, cached + chunk, d, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    mask = causal_lower_right(chunk, cached + chunk)
    # torch's lower-right causal kernels take no GQA: time SDPA with the heads repeated
    # inside the call, and (its lower bound) on a cache already stored per query head.
    kr, vr = kc.repeat_interleave(grp, 1), vc.repeat_interleave(grp, 1)
    base = _bench(
        lambda: scaled_dot_product_attention(
            q, kc.repeat_interleave(grp, 1), vc.repeat_interleave(grp, 1), attn_mask=mask
        ),
        False,
    )
    base_pre = _bench(lambda: scaled_dot_product_attention(q, kr, vr, attn_mask=mask), False)
    return {
        "kind": "prefill",
        "layer": spec,
        "chunk": chunk,
        "cached": cached,
        "page_size": page,
        "kernel_us_eager": ours,
        "gather_one_side_us_eager": gather,
        "sdpa_bf16_us_eager": base,
        "sdpa_bf16_prerepeated_us_eager": base_pre,
        "speedup_eager": base / ours,
    }


def run(
    device: torch.device | str, sweep: bool = False, variants: bool = False, full: bool = True
) -> list[dict]:
    """All measurements on ``device`` (a CUDA device); returns one dict per row. ``variants``:
    the kernel-variant sweep first, then (``full``) everything else with its fastest variant."""
    device = torch.device(device)
    rows: list[dict] = [
        {
            "kind": "env",
            "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
    ]
    tuning = DEFAULT_DECODE_TUNING
    if variants:
        bw = copy_bandwidth(device)
        rows.append({"kind": "copy_bandwidth", "GBps": bw})
        rows += sweep_variants(device, bw)
        if not full:
            return rows
        ok = [r for r in rows if r["kind"] == "variant" and "error" not in r]
        ok = [r for r in ok if max(r["rel_err"][0::2]) < 5e-3 and min(r["rel_err"][1::2]) == 1]

        def best_sum(r):  # best split count at each of the two long shapes
            return sum(min(v for k, v in r.items() if k.startswith(s)) for s in ("32x", "8x"))

        tuning = DecodeTuning(**min(ok, key=best_sum)["config"])
        rows.append({"kind": "chosen_variant", "config": asdict(tuning)})
        torch.cuda.empty_cache()
    rows += [{"kind": "correctness", **r} for r in check_correctness(device, tuning)]
    bw = copy_bandwidth(device)
    read_bw = read_bandwidth(device)
    rows.append({"kind": "copy_bandwidth", "GBps": bw})
    rows.append({"kind": "read_bandwidth", "GBps": read_bw})
    page = 16
    common = dict(bw=bw, read_bw=read_bw, sweep=sweep, tuning=tuning)
    jobs = [
        (bench_decode_shape, (device, QWEN3_8B, b, n, page), common)
        for b, n in ((32, 16384), (8, 32768), (64, 8192), (1, 4096))
    ]
    jobs += [
        (bench_decode_shape, (device, QWEN3_8B, 32, 16384, 64), common),
        (bench_decode_shape, (device, DEMO, 32, 4096, page), common),
        (bench_prefill, (device, QWEN3_8B, 2048, 16384, page), {}),
    ]
    for fn, args, kwargs in jobs:
        try:
            rows.append(fn(*args, **kwargs))
        except Exception as err:  # keep measuring the other shapes; the error is reported
            rows.append({"kind": "error", "job": fn.__name__, "error": repr(err)[:500]})
        torch.cuda.empty_cache()
    return rows


# Rotation cost at generate()'s shapes: ((K block, K sign seed), (V block, V sign seed)).
ROTATIONS = {
    "none": ((1, None), (1, None)),
    "k32": ((32, 0), (1, None)),
    "k128": ((128, 0), (1, None)),
    "k128+v32": ((128, 0), (32, None)),
}


def bench_rotation(device, shapes=((1, 4096), (8, 4096), (32, 16384))) -> list[dict]:
    """Graph time of a Qwen3-8B layer per rotation config: what the rotations cost over plain
    INT4 where a step is short (batch 1, 4k) and where it is long. (Two variants of the q
    rotation, after the first tiles' loads and by torch before the launch, were measured
    with this on the H200 and lost: RESULTS.md.)"""
    rows = []
    for batch, ctx in shapes:
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16)
        base = None
        for name, rot in ROTATIONS.items():
            ks, vs, table = _random_stores(batch, ctx, QWEN3_8B, 16, device, rotations=rot)
            plan = DecodePlan.build(ks, vs, device)

            def fn(ks=ks, vs=vs, table=table, plan=plan):
                return paged_decode_attention(
                    q, ks, vs, table, lens, softmax_scale=0.088, plan=plan
                )

            us = _bench(fn, graph=True)
            base = us if base is None else base
            row = {"kind": "rotation", "batch": batch, "context": ctx, "config": name,
                   "graph_us": us, "vs_none": us / base}  # fmt: skip
            print(_rotation_line(row), flush=True)
            rows.append(row)
            del ks, vs, fn
            torch.cuda.empty_cache()
    return rows


def _rotation_line(r: dict) -> str:
    return (
        f"rotation B{r['batch']}x{r['context']} {r['config']:9s} "
        f"graph {r['graph_us']:7.1f} us ({r['vs_none']:.3f}x none)"
    )


def _table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["kind"] == "decode":
            lines.append(
                f"decode h{r['layer']['h_q']}/{r['layer']['h_kv']} d{r['layer']['d']} "
                f"B{r['batch']}x{r['context']} page{r['page_size']}: "
                f"eager {r['kernel_us_eager']:.1f} us, graph {r['kernel_us_graph']:.1f} us, "
                f"{r['GBps_graph']:.0f} GB/s ({r['pct_read_bw_graph']:.0f}% read, "
                f"{r['pct_copy_bw_graph']:.0f}% copy), FP8 at read rate "
                f"{r['fp8_at_read_bw_us']:.0f} us, SDPA eager {r['sdpa_bf16_us_eager']:.1f} "
                f"graph {r['sdpa_bf16_us_graph']:.1f} us, speedup eager "
                f"{r['speedup_eager']:.2f}x graph {r['speedup_graph']:.2f}x"
            )
        elif r["kind"] == "prefill":
            lines.append(
                f"prefill B1 chunk {r['chunk']} over {r['cached']}: "
                f"{r['kernel_us_eager']:.0f} us vs SDPA {r['sdpa_bf16_us_eager']:.0f} us"
                f" (pre-repeated cache {r['sdpa_bf16_prerepeated_us_eager']:.0f} us); "
                f"dequant gather of one side {r['gather_one_side_us_eager']:.0f} us"
            )
        elif r["kind"] == "variant":
            lines.append(_variant_line(r))
        elif r["kind"] == "fallback":
            lines.append(
                f"fallback B{r['batch']}x{r['context']} {r['config']:12s} {r['mode']:10s} "
                f"graph {r['graph_us']:8.1f} us  {r['GBps']:6.0f} GB/s {r.get('launches', '')}"
                f" {r.get('groups', '')}"
            )
        elif r["kind"] == "rotation":
            lines.append(_rotation_line(r))
        elif r["kind"] in ("correctness", "fallback_check"):
            lines.append(
                f"check {r['case']}: rel err {r['rel_err']:.2e} finite {r['finite']} "
                f"{r.get('launches', '')}"
            )
        else:
            lines.append(str(r))
    return "\n".join(lines)


def bench_side_sweep(device, batch: int, ctx: int, configs=("int8-k-head", "bf16-k-head")):
    """Graph time of a layer with one fallback head group as its side-stream group's split
    count is forced (the main group's as the launcher picks it): where the split rule leaves
    time. (Enqueuing the side group before the main one, tried on 2026-12-04, won only for a
    BF16 head at 8x32k and lost 6-7 % at 64x16k and 32x16k: removed.)"""
    spec, page, rows = QWEN3_8B, 16, []
    scale = spec["d"] ** -0.5
    q = torch.randn(batch, spec["h_q"], spec["d"], device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    choose = decode.split_choices
    for name in configs:
        kb, vb = FALLBACK_CONFIGS[name]
        k_store, v_store, table = _random_stores(batch, ctx, spec, page, device, kb, vb)
        plan = DecodePlan.build(k_store, v_store, device)
        group = spec["h_q"] // spec["h_kv"]
        mma, auto = choose(plan, k_store, v_store, batch, group, table.shape[1] * page)
        side = 1 - plan.main_group
        forced = [s for s in (1, 2, 4, 8, 16, 32, 64) if s * 256 <= ctx]
        for label, count in [("auto", None), *((f"side={s}", s) for s in forced)]:
            splits = list(auto)
            if count:
                splits[side] = count
            decode.split_choices = lambda *a, _s=splits, **k: (list(mma), list(_s))
            try:
                us = _layer_graph_us(q, k_store, v_store, table, lens, scale, plan)
            finally:
                decode.split_choices = choose
            rows.append(
                {
                    "kind": "side_sweep", "config": name, "variant": label, "batch": batch,
                    "context": ctx, "graph_us": us, "splits": splits,
                    "mma": list(mma),
                }
            )  # fmt: skip
            print(f"side sweep {batch}x{ctx} {name} {label}: {us:.1f} us {splits}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch parameters")
    parser.add_argument("--variants", action="store_true", help="kernel-variant sweep first")
    parser.add_argument("--only-variants", action="store_true", help="stop after the sweep")
    parser.add_argument(
        "--fallback",
        action="store_true",
        help="only the INT8 / 16-bit pool check and timings (--shapes, default 64x16384)",
    )
    parser.add_argument("--shapes", help="BxN,... for --fallback / --side-sweep")
    parser.add_argument(
        "--side-sweep",
        action="store_true",
        help="only the fallback group's forced split counts (--shapes, default 8x16384)",
    )
    parser.add_argument(
        "--rotation",
        action="store_true",
        help="only the rotation cost (plain INT4 vs rotated K, rotated K and V)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode needs a CUDA device")
    dev = torch.device("cuda", torch.cuda.current_device())
    if args.side_sweep:
        rows = [{"kind": "env", "device": torch.cuda.get_device_name(dev)}]
        for b, n in parse_shapes(args.shapes or "8x16384"):
            rows += bench_side_sweep(dev, b, n)
    elif args.rotation:
        env = {"kind": "env", "device": torch.cuda.get_device_name(dev)}
        rows = [env, *bench_rotation(dev)]
    elif args.fallback:
        env = {"kind": "env", "device": torch.cuda.get_device_name(dev)}
        env.update(torch=torch.__version__, triton=triton.__version__)
        rows = [env, *check_fallback_correctness(dev)]
        print(_table(rows), flush=True)
        for b, n in parse_shapes(args.shapes or "64x16384"):
            rows += bench_fallback(dev, b, n)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        if not args.shapes:
            rows += bench_fallback(dev, 17, 16384, ("all-16bit",))
    else:
        rows = run(dev, sweep=args.sweep, variants=args.variants, full=not args.only_variants)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(_table(rows))


if __name__ == "__main__":
    main()
