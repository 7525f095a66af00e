"""What a user of ``model.generate()`` sees: time to first token and per-token decode latency,
wall-clock, for BF16 and the INT4 caches on one model shape (random weights).

Per case (cache x batch), ``generate`` runs with ``1`` and with ``--new`` new tokens on the
same ``--prompt``-token prompts (``min_new_tokens`` forces the length); per-token latency is
``(t(new) - t(1)) / (new - 1)``, the median over ``--repeats`` pairs, and TTFT is ``t(1)``.
Everything a user pays is inside: transformers' generate loop, the prefill, the host work of
every step, the kernels. Caches:

* ``bf16``: the unpatched model, transformers' default ``DynamicCache`` and SDPA (eager);
* ``bf16-static``: ``cache_implementation="static"``, which transformers compiles with
  ``torch.compile`` (CUDA graphs) on its own: its best BF16 generate (``--static``; slow to
  compile);
* ``bf16-paged``: 16-bit pools in sawquant's paged runtime, CUDA-graph decode (the same
  machinery as the INT4 caches, so it isolates what the INT4 format costs or saves);
* ``int4``: plain INT4 (block 1) through sawquant's runtime, CUDA-graph decode;
* ``sawquant``: the representative calibrated config of ``serve.py``, CUDA-graph decode;
* ``sawquant-eager``: the same with ``cuda_graphs=False``;
* ``sawquant-vfold`` (not in the default list): that config as ``export --fold-values`` writes
  it, V's rotation in the weights.

For the INT4 caches the greedy tokens with and without graphs are compared (they run the same
kernels, so they must match).

    python benchmarks/generate_latency.py --out latency.json        # Qwen3-8B shape, CUDA
    python benchmarks/generate_latency.py --shape tiny --device cpu --prompt 32 --new 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SHAPES, _bench, _sync, build_model, cache_configs  # noqa: E402

from sawquant.config import ModelFacts  # noqa: E402
from sawquant.runtime import patch, unpatch  # noqa: E402
from sawquant.runtime.hf.compat import returned_cache  # noqa: E402


def _generate(model, ids, new: int, **kwargs):
    _sync(ids.device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kwargs,
        )  # fmt: skip
    _sync(ids.device)
    return time.perf_counter() - t, out


def _pairs(model, ids, new: int, repeats: int, fresh: bool, **kwargs):
    """``repeats`` (t(1), t(new)) pairs; ``fresh``: every call allocates its pools and captures
    its graphs (the leftovers of the previous call are released first), as a first call does.
    Otherwise a call takes the previous one's (``sawquant.runtime.hf.reuse``): no output is
    kept alive between calls, as in a user's loop over ``generate``."""
    release = getattr(model, "sawquant_release", None)
    firsts, fulls, out = [], [], None
    for i in range(repeats):
        for n, times in ((1, firsts), (new, fulls)):
            out = None  # the last call's cache dies (and leaves its pools) before this call
            if fresh and release is not None:
                release()  # after that death, or the leftovers would be taken after all
            t, out = _generate(model, ids, n, **kwargs)
            times.append(t)
    return firsts, fulls, out


def measure(model, ids, new: int, repeats: int, **kwargs) -> dict:
    _generate(model, ids, 4, **kwargs)  # warm-up: kernels compiled, graphs of short tables
    fresh = None
    if hasattr(model, "sawquant_release") and model._sawquant_state.reuse is not None:
        f1, fn, _ = _pairs(model, ids, new, repeats, True, **kwargs)
        fresh = [(f - s) / (new - 1) for f, s in zip(fn, f1)]
        _generate(model, ids, new, **kwargs)  # the widths a full call needs, captured once
    else:  # torch.compile (bf16-static) compiles once per cache length: both lengths untimed
        _generate(model, ids, 1, **kwargs)
        _generate(model, ids, new, **kwargs)
    firsts, fulls, out = _pairs(model, ids, new, repeats, False, **kwargs)
    per_token = [(f - s) / (new - 1) for f, s in zip(fulls, firsts)]
    cache = returned_cache(out)
    calls = dict(getattr(cache, "calls", {}))
    graphs = list(getattr(cache, "graphs", {}).values())
    # Device time of one captured step (replays rewrite the same token: harmless).
    device_ms = 1000 * _bench(lambda: graphs[-1].replay(cache), ids.device) if graphs else None
    return {
        "graph_step_device_ms": device_ms,
        "ttft_s": statistics.median(firsts),
        "per_token_ms": 1000 * statistics.median(per_token),
        "per_token_ms_all": [1000 * x for x in per_token],
        # Every call capturing its own graphs (no leftovers of the call before): a first call.
        "per_token_ms_fresh": None if fresh is None else 1000 * statistics.median(fresh),
        "calls_last_run": calls,
        "tokens": out.sequences[:, ids.shape[1] :].cpu(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--caches", default="bf16,bf16-paged,int4,sawquant,sawquant-eager")
    p.add_argument("--static", action="store_true", help="also bf16-static (torch.compile)")
    p.add_argument("--out")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.shape, device, dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    s = SHAPES[args.shape]
    facts = ModelFacts(s["num_hidden_layers"], s["num_key_value_heads"], s["head_dim"], "qwen3")
    configs = cache_configs(facts)
    caches = args.caches.split(",") + (["bf16-static"] if args.static else [])
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
        "results": {},
    }
    gen = torch.Generator().manual_seed(0)
    for b in (int(x) for x in args.batch.split(",")):
        ids = torch.randint(0, s["vocab_size"], (b, args.prompt), generator=gen).to(device)
        tokens = {}
        for name in caches:
            kwargs = {}
            if name == "bf16-static":
                kwargs["cache_implementation"] = "static"
            elif name != "bf16":
                config = configs[{"bf16-paged": "bf16"}.get(name, name.removesuffix("-eager"))]
                patch(model, config, cuda_graphs=False if name.endswith("-eager") else None)
            t0 = time.perf_counter()
            try:
                r = measure(model, ids, args.new, args.repeats, **kwargs)
            except Exception as err:  # report and go on with the other caches
                r = {"error": f"{type(err).__name__}: {err}"[:400]}
            finally:
                unpatch(model)
            r["measure_s"] = time.perf_counter() - t0
            if "tokens" in r:
                tokens[name] = r.pop("tokens")
            if name == "sawquant-eager" and "sawquant" in tokens and name in tokens:
                r["same_tokens_as_graphs"] = bool(torch.equal(tokens[name], tokens["sawquant"]))
            report["results"][f"{name} b{b}"] = r
            line = {k: v for k, v in r.items() if k != "per_token_ms_all"}
            print(f"[{name} b{b}] {json.dumps(line)}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2))
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"\n{report['device']}: prompt {args.prompt}, {args.new} new tokens, greedy")
    base = {k.split()[1]: v for k, v in report["results"].items() if k.startswith("bf16 ")}
    for key, r in report["results"].items():
        if "error" in r:
            print(f"{key:22} error: {r['error'][:80]}")
            continue
        ref = base.get(key.split()[1], {}).get("per_token_ms")
        ratio = f"{r['per_token_ms'] / ref:.2f}x bf16" if ref else ""
        ms = r["per_token_ms"]
        fresh = r.get("per_token_ms_fresh")
        first = f"  (each call capturing its own graphs: {fresh:.2f})" if fresh else ""
        print(f"{key:22} TTFT {r['ttft_s'] * 1000:8.1f} ms  {ms:7.2f} ms/token {ratio}{first}")


if __name__ == "__main__":
    main()
