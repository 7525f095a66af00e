"""One decode call of a Qwen3-8B layer per kernel, for Nsight Compute.

Usage: ``ncu --clock-control none --kernel-name regex:split_kernel --launch-skip 2
--launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section
WarpStateStats --section Occupancy python benchmarks/profile_decode.py --batch 32 --context
16384``: it runs the tensor-core kernel (``--kernel mma``) or the Triton one (``triton``) a few
times on random codes with a permuted block table, as ``bench_decode_mma.py`` times them.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from bench_decode import QWEN3_8B, _random_stores

from sawquant.kernels import decode
from sawquant.kernels.plans import DEFAULT_DECODE_TUNING, DecodePlan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--kernel", choices=("mma", "triton"), default="mma")
    p.add_argument("--repeat", type=int, default=4)
    args = p.parse_args()
    dev = torch.device("cuda")
    ks, vs, table = _random_stores(args.batch, args.context, QWEN3_8B, 16, dev)
    plan = DecodePlan.build(ks, vs, dev)
    q = torch.randn(args.batch, 32, 128, device=dev, dtype=torch.bfloat16)
    lens = torch.full((args.batch,), args.context, dtype=torch.int32, device=dev)
    tune = replace(DEFAULT_DECODE_TUNING, mma=args.kernel == "mma", mma_min_tokens=0)
    for _ in range(args.repeat):
        decode.paged_decode_attention(
            q, ks, vs, table, lens, softmax_scale=0.088, plan=plan, tuning=tune
        )
    torch.cuda.synchronize()
    print(dict(decode.LAUNCHES))


if __name__ == "__main__":
    main()
