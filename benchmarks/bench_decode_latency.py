"""Small-batch decode latency (issue 13's 1x4k target): where one decode call's time goes.

For each shape (a Qwen3-8B layer, block-128 rotation with signs, page 16, random codes): a check
against the fp32 twin, the default call's CUDA-graph and eager times and which kernels ran, the
split merge timed alone for each merge layout (query heads per program), the Triton split kernel
over split counts and tile sizes, the tensor-core kernel over split counts, torch SDPA bf16 on a
contiguous cache, and the eager wall time per call of 200 back-to-back calls (host-bound when
it exceeds the graph time). ``--before FILE`` (repeatable) also times an older
``kernels/decode.py`` (``git show REV:kernels/decode.py > FILE``) in the same run. Usage: ``python
benchmarks/bench_decode_latency.py [--json PATH] [--before FILE] [--shapes 1x4096,...]
[--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import replace

import torch
import triton
from bench_decode import (
    QWEN3_8B,
    _bench,
    _decode_bytes,
    _random_stores,
    parse_shapes,
    read_bandwidth,
    time_shapes,
)
from torch.nn.functional import scaled_dot_product_attention

from sawquant.kernels import decode
from sawquant.kernels.plans import DEFAULT_DECODE_TUNING, DecodePlan, merge_heads
from sawquant.quant.decode import paged_decode_attention_ref

SCALE = 128**-0.5


def _eager_per_call(fn, calls: int = 200) -> float:
    """Microseconds per call of ``calls`` back-to-back eager calls, one sync at the end."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location(f"decode_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_shape(device, batch, ctx, before=None, quick=False) -> dict:
    ks, vs, table = _random_stores(batch, ctx, QWEN3_8B, 16, device)
    plan = DecodePlan.build(ks, vs, device)
    q = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    row = {"kind": "time", "batch": batch, "context": ctx}
    row["bytes"] = _decode_bytes(ks, vs, batch, ctx, q.numel() * 2)

    def fn(tune=DEFAULT_DECODE_TUNING, mod=decode, **kw):
        return lambda: mod.paged_decode_attention(
            q, ks, vs, table, lens, softmax_scale=SCALE, plan=plan, tuning=tune, **kw
        )

    ref = paged_decode_attention_ref(q, ks, vs, table, lens, softmax_scale=SCALE).float()
    out = fn()().float()
    row["rel_err"] = ((out - ref).norm() / ref.norm()).item()
    before_launches = dict(decode.LAUNCHES)
    fn()()
    row["default_launches"] = {
        k: v - before_launches.get(k, 0)
        for k, v in decode.LAUNCHES.items()
        if v != before_launches.get(k)
    }
    row["default_us"] = _bench(fn(), True)
    row["default_eager_us"] = _bench(fn(), False)
    row["default_eager_per_call_us"] = _eager_per_call(fn())
    row["merge_heads_auto"] = merge_heads(batch, 32, plan.num_sms, DEFAULT_DECODE_TUNING)
    for heads in sorted({16, row["merge_heads_auto"]}):
        tune = replace(DEFAULT_DECODE_TUNING, merge_heads=heads)
        err = ((fn(tune)().float() - ref).norm() / ref.norm()).item()
        row[f"merge{heads}_us"] = _bench(fn(tune), True)
        row[f"merge{heads}_rel_err"] = err
    for name, mod in (before or {}).items():
        row[f"before_{name}_us"] = _bench(fn(mod=mod), True)

    if quick:
        return _sdpa(row, q, batch, ctx)
    # The merge alone, on partial states of the default's split count.
    splits = max(decode.split_choices(plan, ks, vs, batch, 4, table.shape[1] * 16)[1])
    ml = torch.randn(batch, 32, splits, 2, device=device).abs_()
    acc = torch.randn(batch, 32, splits, 128, device=device)
    dst = torch.empty_like(q)
    row["merge_alone_splits"] = splits
    for heads in (16, 8, 4, 2, 1):
        tune = replace(DEFAULT_DECODE_TUNING, merge_heads=heads)
        row[f"merge_alone_h{heads}_us"] = _bench(
            lambda t=tune: decode.merge_splits(ml, acc, dst, plan, vs, 4, t), True
        )

    # The Triton split kernel (with the default merge) over split counts and tile sizes.
    triton_rows = {}
    for bn in (32, 64, 128) if batch <= 8 else ():
        for s in (4, 8, 16, 32, 64):
            if s * 64 > ctx:
                continue
            tune = replace(DEFAULT_DECODE_TUNING, mma=False, block_n=bn)
            triton_rows[f"bn{bn}_s{s}"] = _bench(fn(tune, num_splits=s), True)
    row["triton_sweep_us"] = triton_rows
    forced = replace(DEFAULT_DECODE_TUNING, mma_min_tokens=0)
    row["mma_sweep_us"] = {
        s: _bench(fn(forced, num_splits=s), True)
        for s in (2, 4, 8, 16)
        if s * 256 <= ctx and batch <= 8
    }
    _sdpa(row, q, batch, ctx)
    best = min(triton_rows.items(), key=lambda kv: kv[1]) if triton_rows else None
    print(
        f"B{batch}x{ctx}: default {row['default_us']:.1f} us {row['default_launches']} "
        f"(eager/call {row['default_eager_per_call_us']:.1f}) before {_befores(row)} "
        f"merge-alone {[round(row[f'merge_alone_h{h}_us'], 1) for h in (16, 8, 4, 2, 1)]} "
        f"triton best {best} mma {row['mma_sweep_us']} sdpa {row['sdpa_us']:.1f} "
        f"err {row['rel_err']:.1e}",
        flush=True,
    )
    return row


def _befores(row: dict) -> list[float]:
    return [round(v, 1) for k, v in row.items() if k.startswith("before_")]


def _sdpa(row: dict, q, batch: int, ctx: int) -> dict:
    """torch SDPA bf16 on a contiguous cache of the same shape, into ``row``."""
    kc = torch.randn(batch, 8, ctx, 128, device=q.device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    sdpa = lambda: scaled_dot_product_attention(  # noqa: E731
        q[:, :, None], kc, vc, scale=SCALE, enable_gqa=True
    )
    row["sdpa_us"] = _bench(sdpa, True)
    row["sdpa_eager_per_call_us"] = _eager_per_call(sdpa)
    if "triton_sweep_us" not in row:
        print(f"B{batch}x{ctx}: default {row['default_us']:.1f} us {row['default_launches']} "
              f"before {_befores(row)} sdpa {row['sdpa_us']:.1f} "
              f"err {row['rel_err']:.1e}", flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument(
        "--before", action="append", help="an older kernels/decode.py to time (repeatable)"
    )
    parser.add_argument("--shapes", default="1x4096,1x16384,8x4096,32x16384,64x8192")
    parser.add_argument("--quick", action="store_true", help="defaults and SDPA only")
    args = parser.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    before = {path: _load_module(path) for path in args.before or ()}
    rows = [{"kind": "env", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
             "triton": triton.__version__, "before": args.before}]  # fmt: skip
    rows.append({"kind": "bandwidth", "read_GBps": read_bandwidth(dev)})
    time_shapes(
        rows, parse_shapes(args.shapes), lambda b, n: time_shape(dev, b, n, before, args.quick),
        args.json,
    )  # fmt: skip


if __name__ == "__main__":
    main()
