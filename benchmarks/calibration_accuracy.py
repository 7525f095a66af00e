"""Simulated perplexity on held-out demo text: full precision vs naive INT4 vs the paper's fixed
K rotation vs the calibrated config.

    python benchmarks/calibration_accuracy.py                       # calibrates first (demo recipe)
    python benchmarks/calibration_accuracy.py -c calibration.json   # or reuses a calibration

Fairness: every config is scored on the same windows of the *evaluation* split of the KJV text
(``sawquant.data.evaluation_text``: books never used for calibration), all K/V of every layer
fake-quantized exactly as the paged cache stores them (``sawquant.simulate``). Prints a table and
writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from sawquant import data
from sawquant.architectures import model_facts
from sawquant.calibration import calibrate, load_calibration, load_recipe
from sawquant.config import KVConfig, SideConfig
from sawquant.models import load_model
from sawquant.simulate import simulated_perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--calibration", help="calibration.json (default: calibrate now)")
    parser.add_argument("--recipe", default="demo", help="recipe when calibrating now")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--extra", action="store_true", help="also score uniform K+V rotations")
    parser.add_argument("--out", default="calibration_accuracy.json")
    args = parser.parse_args()

    model, tokenizer = load_model(None, device_map="cpu")
    facts = model_facts(model.config)
    d = facts.head_dim
    if args.calibration:
        result = load_calibration(args.calibration)
        calib_wall = None
    else:
        recipe = load_recipe(args.recipe)
        text = data.load_text(recipe.data)
        windows = data.token_windows(tokenizer, text, num=recipe.samples, seq_len=recipe.seq_len)
        start = time.perf_counter()
        result = calibrate(model, tokenizer, windows, recipe, model_name="demo", data_name="demo")
        calib_wall = time.perf_counter() - start

    configs: dict[str, KVConfig | None] = {
        "full precision": None,
        "naive INT4 (no rotation)": KVConfig.uniform(facts),
        f"K block {d} only (paper default)": KVConfig.uniform(facts, SideConfig(rotation_block=d)),
    }
    if args.extra:
        both = SideConfig(rotation_block=d)
        configs[f"K+V block {d}"] = KVConfig.uniform(facts, both, both)
        g32 = SideConfig(rotation_block=d, group_size=32)
        configs[f"K+V block {d}, group 32"] = KVConfig.uniform(facts, g32, g32)
    configs["sawquant calibrated"] = result.config

    # Held-out text only: the evaluation split shares no book with the calibration split.
    windows = data.token_windows(
        tokenizer, data.evaluation_text(), num=args.windows, seq_len=args.seq_len
    )
    rows = []
    for name, cfg in configs.items():
        start = time.perf_counter()
        ppl = simulated_perplexity(model, windows, cfg)
        bits = 16.0 if cfg is None else cfg.average_bits()
        rows.append(
            {
                "config": name,
                "perplexity": ppl,
                "avg_bits": bits,
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"{name:34s} ppl {ppl:8.4f}  avg bits {bits:6.3f}", flush=True)

    fp, naive = rows[0]["perplexity"], rows[1]["perplexity"]
    for row in rows:
        lost = naive - fp
        row["recovered_vs_naive"] = (naive - row["perplexity"]) / lost if lost > 0 else None
    print()
    print(f"{'config':34s} {'perplexity':>10s} {'avg bits':>9s} {'recovered':>10s}")
    for row in rows:
        rec = row["recovered_vs_naive"]
        rec_s = "-" if rec is None or row is rows[0] else f"{100 * rec:.1f}%"
        print(f"{row['config']:34s} {row['perplexity']:10.4f} {row['avg_bits']:9.3f} {rec_s:>10s}")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "eval": {"split": "evaluation", "windows": args.windows, "seq_len": args.seq_len},
        "calibration": {
            "source": args.calibration or f"recipe {args.recipe}",
            "wall_s": calib_wall,
            "stats_wall_s": result.stats.get("wall_s"),
            "peak_memory": result.stats.get("peak_memory"),
        },
        "rows": rows,
    }
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
