"""GPU benchmark of the fused rotate + quantize + paged write kernel.

1. Checks the kernel bit-exact against the pure-torch twin on the GPU (INT4, fallback pools,
   head_dim 96, signs, groups), untouched slots included.
2. Measures the device copy bandwidth (1 GiB device-to-device copy, bytes read + written).
3. Times the write (median of ``triton.testing.do_bench``, rotating input buffers so they do
   not sit in L2) for a Qwen3-8B layer (8 KV heads, head_dim 128) and the demo layer (3 KV
   heads, head_dim 64), at 65,536 tokens (prefill) and 32 tokens (one decode step of batch 32),
   block 1 vs 64 vs 128: microseconds, GB/s (bytes read + written), share of copy bandwidth and
   time over block 1.

Usage: ``python benchmarks/bench_write.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton

from sawquant.format import SideStore
from sawquant.kernels import write
from sawquant.kernels.write import rotate_quantize_paged
from sawquant.quant.write import rotate_quantize_paged_ref
from sawquant.testing import copy_side, differing_bytes, poisoned_side

__all__ = ["run"]

QWEN3_8B = {"name": "qwen3-8b", "h_kv": 8, "d": 128, "blocks": (1, 64, 128)}
DEMO = {"name": "demo", "h_kv": 3, "d": 64, "blocks": (1, 32, 64)}
PAGE = 16


def _us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    us = _us(lambda: dst.copy_(src))
    return 2 * (1 << 28) * 4 / us / 1e3


def _side(h_kv, d, block, *, pages, device, bits=None, group=None, seed=None) -> SideStore:
    """Pools poisoned with random bytes: untouched slots must keep these bytes."""
    return poisoned_side(
        num_kv_heads=h_kv, head_dim=d, block=block, num_pages=pages, page_size=PAGE,
        seed=seed, group=group, head_bits=bits, device=device,
    )  # fmt: skip


_copy = copy_side


def _slots(tokens: int, pages: int, device, gen) -> torch.Tensor:
    """Prefill-like slots: consecutive positions through a permuted block table."""
    table = torch.randperm(pages, device=device, generator=gen)
    pos = torch.arange(tokens, device=device)
    return table[pos // PAGE] * PAGE + pos % PAGE


def _inputs(tokens, h_kv, d, device, gen, dtype=torch.bfloat16):
    x = torch.randn(2, tokens, h_kv, d, device=device, generator=gen)
    x[..., :4] *= 30.0  # outlier channels, as post-RoPE keys have
    x = x.to(dtype)
    return x[0], x[1]


def check(device: torch.device) -> list[dict]:
    """Kernel vs twin on the GPU, bit for bit; returns one row per case."""
    gen = torch.Generator(device=device).manual_seed(0)
    cases = [
        # name, h_kv, d, k block, k seed, v block, group, k bits, v bits, T, dtype
        ("qwen b128 signs", 8, 128, 128, 1, 64, None, None, None, 4099, torch.bfloat16),
        ("qwen b1 g32 fp32", 8, 128, 1, None, 128, 32, None, None, 517, torch.float32),
        ("demo b64 fp16", 3, 64, 64, 2, 32, None, None, None, 2049, torch.float16),
        ("mixed pools", 3, 64, 32, 3, 16, 32, (4, 8, 16), (16, 4, 4), 1001, torch.bfloat16),
        ("d96 b32", 4, 96, 32, 4, 16, 32, (4, 4, 8, 4), None, 777, torch.bfloat16),
        ("decode 32", 8, 128, 128, 5, 128, None, None, None, 32, torch.bfloat16),
        # Decode-step sizes (a row spread over several threads): fallback pools, groups, d96.
        (
            "decode 7 mixed pools g32",
            3,
            64,
            32,
            7,
            16,
            32,
            (4, 8, 16),
            (16, 4, 4),
            7,
            torch.bfloat16,
        ),
        ("decode 5 d96 b32", 4, 96, 32, 8, 16, 32, (4, 4, 8, 4), None, 5, torch.float16),
        ("decode 256 b64 fp32", 8, 128, 64, 9, 128, None, None, None, 256, torch.float32),
        ("d256 b256", 2, 256, 256, 6, 16, None, None, None, 300, torch.bfloat16),
    ]
    rows = []
    for name, h_kv, d, kb, ks, vb, group, kbits, vbits, tokens, dtype in cases:
        pages = 2 * (tokens // PAGE + 2)
        k_store = _side(h_kv, d, kb, pages=pages, device=device, bits=kbits, group=group, seed=ks)
        v_store = _side(h_kv, d, vb, pages=pages, device=device, bits=vbits, group=group)
        cpu = torch.device("cpu")
        k_ref, v_ref = _copy(k_store, cpu), _copy(v_store, cpu)  # the spec: the twin on CPU
        k_gpu_ref, v_gpu_ref = _copy(k_store), _copy(v_store)
        k, v = _inputs(tokens, h_kv, d, device, gen, dtype)
        slots = _slots(tokens, pages, device, gen)
        slots[torch.rand(tokens, device=device, generator=gen) < 0.1] = -1
        rotate_quantize_paged(k, v, slots, k_store, v_store)
        rotate_quantize_paged_ref(k.cpu(), v.cpu(), slots.cpu(), k_ref, v_ref)
        rotate_quantize_paged_ref(k, v, slots, k_gpu_ref, v_gpu_ref)
        rows.append(
            {
                "check": name,
                "tokens": tokens,
                "differing_bytes": differing_bytes(k_store, k_ref)
                + differing_bytes(v_store, v_ref),
                # torch on CUDA divides by a scalar as a multiply by its reciprocal, so the twin
                # run on the GPU may differ from the spec: reported, not required.
                "gpu_twin_vs_spec_bytes": differing_bytes(k_gpu_ref, k_ref)
                + differing_bytes(v_gpu_ref, v_ref),
            }
        )
    return rows


def _bytes(tokens, h_kv, d, in_bytes=2) -> int:
    """Bytes the write must move: K and V read, slots read, codes + fp16 scale/zero written."""
    return tokens * (2 * h_kv * (d * in_bytes + d // 2 + 4) + 8)


def time_write(spec, tokens, block, device, copy_gbs, *, signs=False, spread=None) -> dict:
    h_kv, d = spec["h_kv"], spec["d"]
    gen = torch.Generator(device=device).manual_seed(1)
    pages = tokens // PAGE + 2
    k_store = _side(h_kv, d, block, pages=pages, device=device, seed=7 if signs else None)
    v_store = _side(h_kv, d, block, pages=pages, device=device)
    slots = _slots(tokens, pages, device, gen)
    in_set = 2 * tokens * h_kv * d * 2
    n_sets = max(2, min(64, (200 << 20) // in_set + 1))  # > 200 MB of inputs: none stays in L2
    sets = [_inputs(tokens, h_kv, d, device, gen) for _ in range(n_sets)]
    state = {"i": 0}
    # As the runtime calls it: the kernel flags unstorable values, checked once per step
    # (without a flag the launcher would synchronise on every call).
    flag = torch.zeros(1, dtype=torch.int32, device=device)

    def step():
        k, v = sets[state["i"] % n_sets]
        state["i"] += 1
        rotate_quantize_paged(k, v, slots, k_store, v_store, flag=flag, spread=spread)

    us = _us(step)
    nbytes = _bytes(tokens, h_kv, d)
    gbs = nbytes / us / 1e3
    assert int(flag[0]) == 0, "random inputs were flagged as unstorable"
    row = {
        "model": spec["name"], "h_kv": h_kv, "head_dim": d, "tokens": tokens, "block": block,
        "signs": signs, "warps": write._NUM_WARPS, "us": round(us, 2), "bytes": nbytes,
        "GB/s": round(gbs, 1), "pct_copy": round(100 * gbs / copy_gbs, 1), "spread": spread,
    }  # fmt: skip
    if tokens <= 1024:  # a decode step: launch overhead dominates eager timing; graph = device
        k, v = sets[0]
        graph_us = triton.testing.do_bench_cudagraph(
            lambda: rotate_quantize_paged(k, v, slots, k_store, v_store, flag=flag, spread=spread),
            rep=100, return_mode="median",
        ) * 1e3  # fmt: skip
        row["graph_us"] = round(graph_us, 2)
    return row


def run(device: torch.device | str) -> list[dict]:
    """All checks and timings on ``device``; one dict per row."""
    device = torch.device(device)
    rows: list[dict] = [
        {
            "device": torch.cuda.get_device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
    ]
    rows += check(device)
    copy_gbs = copy_bandwidth(device)
    rows.append({"copy_GB/s": round(copy_gbs, 1)})
    for spec in (QWEN3_8B, DEMO):
        for tokens in (65536, 32):
            base = None
            for block in spec["blocks"]:
                row = time_write(spec, tokens, block, device, copy_gbs)
                base = base or row["us"]
                row["vs_block1"] = round(row["us"] / base, 3)
                rows.append(row)
            if tokens == 65536:
                row = time_write(spec, tokens, spec["blocks"][-1], device, copy_gbs, signs=True)
                row["vs_block1"] = round(row["us"] / base, 3)
                rows.append(row)
    return rows


def small_steps(device: torch.device | str, copy_gbs: float) -> list[dict]:
    """Decode-step writes (a few tokens) of a Qwen3-8B layer: one row per thread against a
    row spread over several threads, without rotation and with block 128 and signs."""
    rows = []
    for tokens in (1, 8, 32, 64, 256):
        for block, signs in ((1, False), (128, True)):
            for spread in (False, True):
                row = time_write(QWEN3_8B, tokens, block, device, copy_gbs, signs=signs,
                                 spread=spread)  # fmt: skip
                print(f"T={tokens:4d} block {block:3d} signs {signs!s:5} spread {spread!s:5} "
                      f"graph {row['graph_us']:6.2f} us", flush=True)  # fmt: skip
                rows.append(row)
    return rows


def sweep(device: torch.device | str, copy_gbs: float) -> list[dict]:
    """65,536-token writes, no rotation vs the largest block, for several warps per program."""
    device = torch.device(device)
    rows, default = [], write._NUM_WARPS
    try:
        for warps in (1, 2, 4, 8):
            write._NUM_WARPS = warps
            for spec in (QWEN3_8B, DEMO):
                base = None
                for block in (1, spec["blocks"][-1]):
                    row = time_write(spec, 65536, block, device, copy_gbs)
                    base = base or row["us"]
                    row["vs_block1"] = round(row["us"] / base, 3)
                    rows.append(row)
    finally:
        write._NUM_WARPS = default
    return rows


def layouts(device: torch.device | str, copy_gbs: float) -> list[dict]:
    """65,536-token writes of a Qwen3-8B layer (block 1, block 128 + signs): the row-per-thread
    layout (the default above 2048 rows) against the spread one at several rows per program
    and warps. Which layout wins at bandwidth sizes had not been measured."""
    device = torch.device(device)
    rows = []
    saved = write._NUM_WARPS, write._SPREAD_ROWS_PER_PROGRAM, write._SPREAD_NUM_WARPS
    variants = [(False, 0, w) for w in (1, 2, 4)]
    variants += [(True, r, w) for r, w in ((4, 2), (8, 2), (8, 4), (16, 4), (32, 4), (32, 8))]
    try:
        for spread, per_program, warps in variants:
            if spread:
                write._SPREAD_ROWS_PER_PROGRAM, write._SPREAD_NUM_WARPS = per_program, warps
            else:
                write._NUM_WARPS = warps
            base = None
            for block, signs in ((1, False), (128, True)):
                row = time_write(QWEN3_8B, 65536, block, device, copy_gbs, signs=signs,
                                 spread=spread)  # fmt: skip
                row.update(warps=warps, rows_per_program=per_program or 32 * warps)
                base = base or row["us"]
                row["vs_block1"] = round(row["us"] / base, 3)
                print(f"spread {spread!s:5} rows {row['rows_per_program']:3d} warps {warps} "
                      f"block {block:3d}: {row['us']:7.2f} us {row['pct_copy']:5.1f}% of copy "
                      f"({row['vs_block1']:.3f}x block 1)", flush=True)  # fmt: skip
                rows.append(row)
    finally:
        write._NUM_WARPS, write._SPREAD_ROWS_PER_PROGRAM, write._SPREAD_NUM_WARPS = saved
    return rows


def compiled_stats() -> list[dict]:
    """Registers and spills of every compiled variant (Triton 3.x kernel cache; best effort)."""
    rows = []
    try:
        for cache in write._rotate_quantize_paged_kernel.device_caches.values():
            for key, kernel in cache[0].items():
                rows.append(
                    {
                        "kernel": str(key)[-120:],
                        "n_regs": kernel.n_regs,
                        "n_spills": kernel.n_spills,
                    }
                )
    except Exception as err:  # the cache layout is Triton-internal
        rows.append({"kernel": f"stats unavailable: {err!r}"})
    return rows


def _table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "check" in r:
            ok = "ok" if r["differing_bytes"] == 0 else f"FAIL ({r['differing_bytes']} bytes)"
            lines.append(
                f"check {r['check']:<18} T={r['tokens']:<6} bit-exact vs CPU twin: {ok}"
                f"  (torch twin on GPU vs CPU: {r['gpu_twin_vs_spec_bytes']} bytes differ)"
            )
        elif "copy_GB/s" in r:
            lines.append(f"device copy bandwidth: {r['copy_GB/s']:.0f} GB/s (read + write)")
            lines.append(
                f"{'layer':<9} {'T':>6} {'block':>5} {'signs':>5} {'warps':>5} {'us':>9} "
                f"{'GB/s':>7} {'%copy':>6} {'/block1':>7} {'graph_us':>8}"
            )
        elif "us" in r:
            lines.append(
                f"{r['model']:<9} {r['tokens']:>6} {r['block']:>5} {str(r['signs']):>5} "
                f"{r['warps']:>5} {r['us']:>9.2f} {r['GB/s']:>7.0f} {r['pct_copy']:>6.1f} "
                f"{r['vs_block1']:>7.3f} {r.get('graph_us', ''):>8}"
            )
        else:
            lines.append(" ".join(f"{k}={v}" for k, v in r.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--sweep", action="store_true", help="also time warps per program")
    parser.add_argument(
        "--small", action="store_true", help="only the decode-step writes, both row layouts"
    )
    parser.add_argument(
        "--layouts", action="store_true",
        help="only 65,536-token writes: row per thread against spread rows, several sizes",
    )  # fmt: skip
    args = parser.parse_args()
    device = triton.runtime.driver.active.get_active_torch_device()
    if args.layouts:
        rows = check(device)
        copy_gbs = copy_bandwidth(device)
        rows += [{"copy_GB/s": round(copy_gbs, 1)}] + layouts(device, copy_gbs)
        rows += compiled_stats()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if args.small:
        rows = check(device)
        rows += small_steps(device, copy_bandwidth(device))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = run(device)
    if args.sweep:
        rows += sweep(device, next(r["copy_GB/s"] for r in rows if "copy_GB/s" in r))
    rows += compiled_stats()
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
