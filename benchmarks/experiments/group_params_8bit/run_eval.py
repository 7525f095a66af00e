"""Per-window NLLs of the exp8 variants on the same windows; one file per (text, variant).

python run_eval.py --text demo:evaluation --windows 16 VARIANT [VARIANT ...]  (see run.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

OUT = os.environ.get("EXP8_OUT", "exp8_out")  # inputs and outputs of the runs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import params8  # noqa: E402

from sawquant import data  # noqa: E402
from sawquant.architectures import model_facts  # noqa: E402
from sawquant.calibration import load_calibration  # noqa: E402
from sawquant.config import KVConfig  # noqa: E402
from sawquant.models import load_model  # noqa: E402
from sawquant.simulate import window_nlls  # noqa: E402


def force_group(cfg: KVConfig, g) -> KVConfig:
    layers = []
    for layer in cfg.layers:
        sides = {}
        for s in ("k", "v"):
            side = getattr(layer, s)
            sides[s] = dataclasses.replace(side, group_size=g) if side.bits == 4 else side
        layers.append(dataclasses.replace(layer, **sides))
    return cfg.with_layers(layers)


def bits(cfg: KVConfig | None, enc_groups: set, hd: int) -> float:
    """Honest bits/element: INT4 groups in enc_groups pay 16 bits/group, others 32."""
    if cfg is None:
        return 16.0
    m = cfg.model
    tot = []
    for layer in cfg.layers:
        for s in ("k", "v"):
            side = getattr(layer, s)
            for b in side.head_bits(m.num_kv_heads):
                g = side.group_size or hd
                if b == 16:
                    tot.append(16.0)
                elif b == 4 and side.group_size in enc_groups:
                    tot.append(4 + 16 / g)
                else:
                    tot.append(b + 32 / g)
    return sum(tot) / len(tot)


def variants(facts):
    lean = load_calibration(f"{OUT}/lean.json").config
    demo5 = load_calibration(f"{OUT}/demo5.json").config
    V = {
        "full": (None, None, set()),
        "naive": (KVConfig.uniform(facts), None, set()),
        "lean": (lean, None, set()),
        "lean_g32_fp16": (force_group(lean, 32), None, set()),
        "lean_pt_fp16stats": (lean, "fp16", {None}),  # = lean, with error counters
        "demo5": (demo5, None, set()),
        "demo5_g32all_fp16": (force_group(demo5, 32), None, set()),
    }
    for enc in ("fp8dir", "e4m3int", "ue4m4int", "e4m3intj2", "e4m3intj3"):
        V[f"lean_g32_{enc}"] = (force_group(lean, 32), enc, {32})
        V[f"lean_pt_{enc}"] = (lean, enc, {None})  # per token, 8-bit params: 4.25 bits
        V[f"demo5_{enc}"] = (demo5, enc, {32})  # only its group-32 sides go 8-bit
        V[f"demo5_g32all_{enc}"] = (force_group(demo5, 32), enc, {32})
    V["lean_g32_fp16stats"] = (force_group(lean, 32), "fp16", {32})  # bits: really 5.0
    V["lean_g32_fp16int"] = (force_group(lean, 32), "fp16int", {32})  # bits: really 4.75
    V["demo5_fp16int"] = (demo5, "fp16int", {32})
    V["lean_pt_fp16int"] = (lean, "fp16int", {None})  # bits: really 4 + 24/64 = 4.375
    for j in ("fp16j1", "fp16j2", "fp16j3"):  # noise floor: bits as fp16 (5.0 / 4.5)
        V[f"lean_g32_{j}"] = (force_group(lean, 32), j, {32})
        V[f"lean_pt_{j}"] = (lean, j, {None})
    for enc in ("e4m3int", "ue4m4int", "fp8dir"):
        for rec in ("lean", "leanfix", "demo"):
            p = f"{OUT}/recal8_{rec}_{enc}.json"
            if os.path.exists(p):
                V[f"recal8_{rec}_{enc}"] = (load_calibration(p).config, enc, {32})
    return V


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="demo:evaluation")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("names", nargs="*")
    a = ap.parse_args()
    model, tok = load_model(None, device_map="cpu")
    facts = model_facts(model.config)
    V = variants(facts)
    if a.list:
        for n, (cfg, enc, groups) in V.items():
            print(f"{n:24s} hd64 {bits(cfg, groups, 64):.4f}  hd128 {bits(cfg, groups, 128):.4f}")
        return
    windows = data.token_windows(tok, data.load_text(a.text), num=a.windows, seq_len=a.seq_len)
    tag = a.text.replace(":", "_")
    for n in a.names:
        path = f"{OUT}/nll_{tag}_{a.windows}x{a.seq_len}_{n}.json"
        if os.path.exists(path):
            print("skip", path, flush=True)
            continue
        cfg, enc, groups = V[n]
        params8.STATS.clear()
        params8.install(enc, groups)
        t = time.perf_counter()
        nll = window_nlls(model, windows, cfg)
        dt = time.perf_counter() - t
        ppl = float(torch.exp(nll.sum() / (windows.numel() - windows.shape[0])))
        out = {
            "variant": n,
            "text": a.text,
            "ppl": ppl,
            "nll": nll.tolist(),
            "seconds": dt,
            "bits_hd64": bits(cfg, groups, 64),
            "stats": dict(params8.STATS),
            "windows": a.windows,
            "seq_len": a.seq_len,
        }
        with open(path, "w") as f:
            json.dump(out, f)
        print(f"{n:24s} ppl {ppl:.4f}  {dt:.0f}s  stats {dict(params8.STATS)}", flush=True)


if __name__ == "__main__":
    main()
