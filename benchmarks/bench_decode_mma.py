"""The tensor-core decode kernel (``kernels/decode_mma.py``) against the Triton kernel, same run.

First correctness against the fp32 twin on real quantized data (both kernels, every case the
tensor-core kernel takes: rotation or none, smoothing, GQA 1 to 16, softcap, sliding window,
odd lengths, pages of 16 and 64, a fallback head in the same layer), with the launch counts
that show which kernel ran; then CUDA-graph device times of a Qwen3-8B layer at the issue's
shapes for both kernels, a split sweep and launch variants of the new one, torch SDPA bf16,
and the measured read and copy rates. Usage: ``python benchmarks/bench_decode_mma.py
[--json PATH] [--quick] [--shapes 32x16384,...] [--no-sweep]``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

import torch
import triton
from bench_decode import (
    QWEN3_8B,
    _bench,
    _decode_bytes,
    _quantized_case,
    _random_stores,
    copy_bandwidth,
    parse_shapes,
    read_bandwidth,
    time_shapes,
)
from torch.nn.functional import scaled_dot_product_attention

from sawquant.kernels import decode
from sawquant.kernels.plans import DEFAULT_DECODE_TUNING, DecodePlan, mma_programs_per_sm
from sawquant.quant.decode import paged_decode_attention_ref

TRITON = replace(DEFAULT_DECODE_TUNING, mma=False)
MMA = replace(DEFAULT_DECODE_TUNING, mma_min_tokens=0)  # forced: the dispatch rule off
# The defaults (1 tile of codes in flight per warp, GQA <= 8 capped at 128 registers: 4
# programs per SM) against 3 programs per SM: depth 1 uncapped (150 registers) and depth 2 (168;
# ptxas, triton 3.6, sm_90a). The 2026-12-03 runs of the earlier kernel (commit 3ecc7e6,
# bench_decode_mma_variants_h200_2026-12-03.json) timed depth 3 and page ids loaded an
# iteration ahead: both slower, since deleted.
MMA_VARIANTS = {
    "depth1_uncapped": replace(MMA, mma_maxnreg=None),
    "depth2_uncapped": replace(MMA, mma_depth=2, mma_maxnreg=None),
}

CASES = [
    dict(h_q=32, h_kv=8, block=128, lens=[1, 999, 4096]),
    dict(h_q=32, h_kv=8, block=128, lens=[37, 130, 2000], dtype=torch.float16,
         kw=dict(softcap=30.0)),
    dict(h_q=32, h_kv=8, block=128, lens=[300, 5000], kw=dict(sliding_window=300, num_splits=3)),
    dict(h_q=32, h_kv=8, block=1, signs=False, lens=[999, 17]),
    dict(h_q=32, h_kv=8, block=1, lens=[640]),  # signs only: a diagonal rotation
    dict(h_q=32, h_kv=8, block=128, lens=[1500, 3], smooth=True),
    dict(h_q=32, h_kv=8, block=1, signs=False, lens=[1500], smooth=True),
    dict(h_q=16, h_kv=1, block=64, lens=[777]),
    dict(h_q=8, h_kv=8, block=32, lens=[1, 65, 1024]),
    dict(h_q=12, h_kv=2, block=128, lens=[513, 4100], page=64),
    dict(h_q=32, h_kv=8, block=128, lens=[999, 2500], bits=((8,) + (4,) * 7, (4,) * 8)),
    dict(h_q=32, h_kv=8, block=128, lens=[4096] * 2, kw=dict(num_splits=1)),
    # Per-group scales (the grouped build): both sides, one side, with softcap / window /
    # smoothing / GQA 16 / pages of 64 / a fallback head beside.
    dict(h_q=32, h_kv=8, block=128, lens=[1, 999, 4096], gs=32),
    dict(h_q=32, h_kv=8, block=128, lens=[37, 130, 2000], dtype=torch.float16, gs=16,
         kw=dict(softcap=30.0)),
    dict(h_q=32, h_kv=8, block=64, lens=[300, 5000], gs=(64, None),
         kw=dict(sliding_window=300, num_splits=3)),
    dict(h_q=32, h_kv=8, block=1, signs=False, lens=[999, 17], gs=(None, 32)),
    dict(h_q=32, h_kv=8, block=128, lens=[1500, 3], smooth=True, gs=32),
    dict(h_q=16, h_kv=1, block=128, lens=[777], gs=(32, 64)),
    dict(h_q=12, h_kv=2, block=128, lens=[513, 4100], page=64, gs=16),
    dict(h_q=32, h_kv=8, block=128, lens=[999, 2500], bits=((8,) + (4,) * 7, (4,) * 8), gs=32),
    # INT8 sides (the wide build, two halves of byte slots): V only, K + V beside BF16 heads
    # with softcap, unrotated, smoothed, windowed, GQA 16, pages of 64.
    dict(h_q=32, h_kv=8, block=128, lens=[1, 999, 4096], bits=((4,) * 8, (8,) + (4,) * 7)),
    dict(h_q=32, h_kv=8, block=128, lens=[37, 130, 2000], dtype=torch.float16,
         bits=((8, 8, 16, 4, 4, 4, 4, 4), (8, 4, 4, 16, 4, 4, 4, 4)), kw=dict(softcap=30.0)),
    dict(h_q=32, h_kv=8, block=1, signs=False, lens=[999, 17], bits=((8,) * 8, (8,) * 8)),
    dict(h_q=32, h_kv=8, block=128, lens=[1500, 3], smooth=True,
         bits=((8, 4) * 4, (4, 8) * 4)),
    dict(h_q=32, h_kv=8, block=64, lens=[300, 5000], bits=((8,) * 8, (4,) * 8),
         kw=dict(sliding_window=300, num_splits=3)),
    dict(h_q=16, h_kv=1, block=128, lens=[777], bits=((8,), (8,))),
    dict(h_q=12, h_kv=2, block=128, lens=[513, 4100], page=64, bits=((8, 4), (4, 8))),
    dict(h_q=32, h_kv=8, block=128, lens=[999, 2500], bits=((8,) + (4,) * 7, (4,) * 8),
         gs=(None, 32)),
]  # fmt: skip
# Timed per-group configs (K group, V group) of --groups.
GROUP_CONFIGS = {
    "per-token": (None, None), "g64": (64, 64), "g32": (32, 32), "g16": (16, 16),
    "k-g32": (32, None), "v-g32": (None, 32),
}  # fmt: skip
TRITON_GROUPS = replace(DEFAULT_DECODE_TUNING, mma_groups=False)


def check(device) -> list[dict]:
    rows = []
    for i, c in enumerate(CASES):
        dtype = c.get("dtype", torch.bfloat16)
        args = _quantized_case(
            device, c["h_q"], c["h_kv"], 128, c["block"], c.get("page", 16), c["lens"], dtype,
            seed=i, bits=c.get("bits"), gs=c.get("gs"),
        )  # fmt: skip
        q, ks, vs, table, lens = args
        if not c.get("signs", True):
            ks.signs = None
        if c.get("smooth"):
            g = torch.Generator(device=device).manual_seed(100 + i)
            ks.smooth = torch.rand(c["h_kv"], 128, device=device, generator=g) * 3 + 0.25
            ks.inv_smooth = 1.0 / ks.smooth
        kw = c.get("kw", {})
        ref = paged_decode_attention_ref(*args, softmax_scale=0.088, **kw).float()
        row = {"kind": "check", "case": {k: str(v) for k, v in c.items()}}
        kernels = {"triton": TRITON, "mma": MMA, **{f"mma_{k}": t for k, t in MMA_VARIANTS.items()}}
        for name, tune in kernels.items():
            before = dict(decode.LAUNCHES)
            out = decode.paged_decode_attention(*args, softmax_scale=0.088, tuning=tune, **kw)
            torch.cuda.synchronize()
            row[f"{name}_rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
            row[f"{name}_finite"] = bool(torch.isfinite(out).all())
            row[f"{name}_launches"] = {
                k: v - before.get(k, 0) for k, v in decode.LAUNCHES.items() if v != before.get(k)
            }
        print(
            f"check {i:2d} triton {row['triton_rel_err']:.2e} mma {row['mma_rel_err']:.2e} "
            f"variants max {max(row[f'mma_{k}_rel_err'] for k in MMA_VARIANTS):.2e} "
            f"launches {row['mma_launches']} {c}",
            flush=True,
        )
        rows.append(row)
    return rows


def time_shape(device, batch, ctx, read_bw, sweep=True, variants=True) -> dict:
    ks, vs, table = _random_stores(batch, ctx, QWEN3_8B, 16, device)
    plan = DecodePlan.build(ks, vs, device)
    q = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    nbytes = _decode_bytes(ks, vs, batch, ctx, q.numel() * 2)

    def fn(tune, **kw):
        return lambda: decode.paged_decode_attention(
            q, ks, vs, table, lens, softmax_scale=0.088, plan=plan, tuning=tune, **kw
        )

    row = {"kind": "time", "batch": batch, "context": ctx, "bytes": nbytes}
    row["triton_us"] = _bench(fn(TRITON), True)
    row["default_us"] = _bench(fn(DEFAULT_DECODE_TUNING), True)  # what the launcher picks
    before = dict(decode.LAUNCHES)
    fn(DEFAULT_DECODE_TUNING)()
    row["default_launches"] = {
        k: v - before.get(k, 0) for k, v in decode.LAUNCHES.items() if v != before.get(k)
    }
    row["mma_us"] = _bench(fn(MMA), True)
    row["mma_eager_us"] = _bench(fn(MMA), False)
    row["triton_eager_us"] = _bench(fn(TRITON), False)
    default = DEFAULT_DECODE_TUNING  # Qwen3-8B: GQA 4
    row["auto_splits"] = plan.mma_splits(
        batch, 8, ctx, mma_programs_per_sm(4, default), default.mma_min_tokens
    )
    if sweep:
        row["mma_splits"] = {
            s: _bench(fn(MMA, num_splits=s), True) for s in (1, 2, 3, 4, 6, 8, 12, 16, 32)
        }
    if variants:
        for name, tune in MMA_VARIANTS.items():
            try:
                row[f"{name}_us"] = _bench(fn(tune), True)
            except Exception as err:  # a variant that does not compile is reported
                row[f"{name}_us"] = repr(err)[:200]
    kc = torch.randn(batch, 8, ctx, 128, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    row["sdpa_us"] = _bench(
        lambda: scaled_dot_product_attention(q[:, :, None], kc, vc, scale=0.088, enable_gqa=True),
        True,
    )
    row["fp8_at_read_us"] = 2 * batch * ctx * 8 * 128 / read_bw / 1e3
    row["int4_at_read_us"] = nbytes / read_bw / 1e3
    row["mma_pct_read"] = 100 * row["int4_at_read_us"] / row["mma_us"]
    print(
        f"B{batch}x{ctx}: default {row['default_us']:.1f} {row['default_launches']} "
        f"triton {row['triton_us']:.1f} mma {row['mma_us']:.1f} "
        f"(eager {row['mma_eager_us']:.1f}) sdpa {row['sdpa_us']:.1f} "
        f"int4@read {row['int4_at_read_us']:.1f} ({row['mma_pct_read']:.0f}%) "
        f"splits {row.get('mma_splits')} variants "
        f"{ {k: row.get(k + '_us') for k in MMA_VARIANTS} }",
        flush=True,
    )
    return row


def time_groups(device, batch, ctx) -> list[dict]:
    """CUDA-graph time of a Qwen3-8B layer (K block 128 with signs, V block 128) per group
    configuration: as dispatched (the tensor-core kernel's grouped build) and with groups sent
    to the Triton kernel (what every release before this one did), against per-token scales."""
    q = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    rows, base = [], None
    for name, groups in GROUP_CONFIGS.items():
        ks, vs, table = _random_stores(batch, ctx, QWEN3_8B, 16, device, groups=groups)
        plan = DecodePlan.build(ks, vs, device)
        row = {"kind": "groups", "batch": batch, "context": ctx, "config": name,
               "bytes": _decode_bytes(ks, vs, batch, ctx, q.numel() * 2)}  # fmt: skip
        kernels = (("default", DEFAULT_DECODE_TUNING), ("triton", TRITON_GROUPS),
                   ("mma_forced", MMA))  # fmt: skip
        for kname, tune in kernels:
            if kname == "triton" and groups == (None, None):
                continue

            def fn(tune=tune, ks=ks, vs=vs, table=table, plan=plan):
                return decode.paged_decode_attention(
                    q, ks, vs, table, lens, softmax_scale=0.088, plan=plan, tuning=tune
                )

            before = dict(decode.LAUNCHES)
            fn()
            row[f"{kname}_launches"] = {
                k: v - before.get(k, 0) for k, v in decode.LAUNCHES.items() if v != before.get(k)
            }
            row[f"{kname}_us"] = _bench(fn, True)
        base = base or row["default_us"]
        row["vs_per_token"] = row["default_us"] / base
        print(
            f"groups B{batch}x{ctx} {name:9s} default {row['default_us']:7.1f} us "
            f"({row['vs_per_token']:.3f}x per-token) {row['default_launches']} "
            f"triton {row.get('triton_us', float('nan')):7.1f} "
            f"mma forced {row['mma_forced_us']:7.1f} {row['mma_forced_launches']}",
            flush=True,
        )
        rows.append(row)
        del ks, vs, table
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="no split sweep or variants")
    parser.add_argument("--shapes", help="BxN,... to time instead of the default shapes")
    parser.add_argument("--no-sweep", action="store_true", help="variants, but no split sweep")
    parser.add_argument(
        "--groups", action="store_true",
        help="after the checks: only per-group scale timings (the shapes, or 8x4096,32x16384,"
        "64x8192,8x32768)",
    )  # fmt: skip
    args = parser.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = [{"kind": "env", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
             "triton": triton.__version__, "tuning": asdict(MMA)}]  # fmt: skip
    rows += check(dev)
    bw, read_bw = copy_bandwidth(dev), read_bandwidth(dev)
    rows.append({"kind": "bandwidth", "copy_GBps": bw, "read_GBps": read_bw})
    print(f"copy {bw:.0f} GB/s read {read_bw:.0f} GB/s", flush=True)
    shapes = ((1, 4096), (4, 4096), (1, 16384), (8, 4096), (32, 16384), (8, 32768),
              (64, 8192), (8, 16384))  # fmt: skip
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    if args.groups:
        shapes = parse_shapes(args.shapes or "8x4096,32x16384,64x8192,8x32768")
        for b, n in shapes:
            rows += time_groups(dev, b, n)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        return
    time_shapes(
        rows, shapes,
        lambda b, n: time_shape(dev, b, n, read_bw, variants=not args.quick,
                                sweep=not (args.quick or args.no_sweep)),
        args.json,
    )  # fmt: skip


if __name__ == "__main__":
    main()
