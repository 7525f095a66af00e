"""Where a decode step's device time goes: per-kernel device time of one whole-model decode step
for each cache, from torch's profiler (CUPTI), eager steps on a filled cache.

The graph replay of ``serve.py`` / ``generate_latency.py`` gives one number per step; this
splits it by kernel, so a difference between two caches (say sawquant vs plain INT4) can be
traced to the kernels that cause it. Kernel names are shortened to the function name; the
table lists per step the device microseconds and launches of each name, both caches side by
side, sorted by the difference.

    python benchmarks/profile_step.py --caches int4,sawquant --batch 1 --context 4096
    python benchmarks/profile_step.py --shape tiny --device cpu --context 64   # a dry run
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SHAPES, build_model, cache_configs, filled_cache  # noqa: E402

from sawquant.config import ModelFacts  # noqa: E402
from sawquant.runtime import patch, unpatch  # noqa: E402
from sawquant.runtime.hf.compat import cache_kwargs  # noqa: E402


def short_name(name: str) -> str:
    """A kernel's function name without templates, arguments or Triton's suffixes."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name.strip().split(" ")[-1][:80]


def profile_steps(model, cache, batch: int, steps: int, device: torch.device) -> dict:
    """Per kernel name: (device us per step, launches per step) over ``steps`` eager steps."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def step():
        model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        for _ in range(3):  # compile and warm
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for ev in prof.events():
        if device.type == "cuda" and ev.device_type.name != "CUDA":
            continue
        if device.type != "cuda" and ev.cpu_parent is not None:
            continue  # on the CPU: top-level operators only
        key = short_name(ev.name)
        per[key][0] += ev.device_time if device.type == "cuda" else ev.cpu_time
        per[key][1] += 1
    return {k: {"us": v[0] / steps, "launches": v[1] / steps} for k, v in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--caches", default="int4,sawquant,sawquant-rot")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.shape, device, dtype)
    cfg = model.config
    facts = ModelFacts(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.model_type)
    configs = cache_configs(facts)
    report = {"args": vars(args), "device": str(device), "torch": torch.__version__, "caches": {}}
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
    for name in args.caches.split(","):
        patch(model, configs[name])
        cache = filled_cache(configs[name], args.batch, args.context, 64, device, dtype)
        kernels = profile_steps(model, cache, args.batch, args.steps, device)
        entry = {"kernels": kernels, "total_us": sum(k["us"] for k in kernels.values())}
        report["caches"][name] = entry
        print(f"{name}: {entry['total_us']:.1f} us of kernels per eager step", flush=True)
        del cache
        unpatch(model)
    names = list(report["caches"])
    base = report["caches"][names[0]]["kernels"]
    for other in names[1:]:
        ker = report["caches"][other]["kernels"]
        rows = []
        for k in set(base) | set(ker):
            a, b = base.get(k, {"us": 0, "launches": 0}), ker.get(k, {"us": 0, "launches": 0})
            rows.append((b["us"] - a["us"], k, a, b))
        rows.sort(key=lambda r: -abs(r[0]))
        print(f"\n{other} vs {names[0]} (us per step, launches per step), largest differences:")
        for diff, k, a, b in rows[:15]:
            print(f"  {diff:+8.1f}  {k:60s} {a['us']:8.1f} ({a['launches']:4.0f})  "
                  f"{b['us']:8.1f} ({b['launches']:4.0f})")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
