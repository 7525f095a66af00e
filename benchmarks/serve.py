"""Serving benchmark harness: BF16 vs plain INT4 vs sawquant KV caches under one KV memory budget.

**Wall clock** (the numbers to quote; ``--wallclock``, default concurrencies 1,8,64): for each
paged cache, ``c`` requests of ``--prompt`` random tokens arrive together and are served to
``--gen`` new tokens each by the continuous-batching engine of ``batching.py`` (real prefills,
decode steps over the running requests, pages freed as requests leave, CUDA-graph decode per
batch bucket, all under the KV budget); it reports tokens/s, TTFT and inter-token latency
p50/p99 from the clock on the wall. A short warm-up serve first compiles the kernels and
captures every bucket's graph, as an engine does at start-up. The contiguous ``bf16-sdpa``
cache has no paged engine: its wall-clock BF16 reference is ``bf16`` (16-bit pools, same
engine).

**Composed cross-check** (what earlier runs reported):

A benchmark harness, not a serving engine. Caches (``--caches``): ``bf16-sdpa`` (contiguous
BF16 buffers read by torch SDPA with native GQA: the usual BF16 path), ``bf16`` (the sawquant
paged runtime with 16-bit pools), ``int4`` (plain INT4, block 1), ``sawquant`` (a representative
calibrated config, see ``cache_configs``), ``sawquant-rot`` (its rotations without fallback
heads), ``sawquant-vfold`` (the config as ``sawquant export --fold-values`` writes it: V's
rotation in the weights, none at run time) and ``sawquant-g32`` (groups of 32 on every side).
What it measures on the device, per cache:

1. ``prefill_s``: one real prefill of a ``--prompt``-token request through the patched model
   (``model(ids, use_cache=True)``: full-precision SDPA on the chunk + the fused paged write),
   after a short warm-up prompt. This is the time to first token of a request served alone.
2. ``step_s[b]``: one real decode step of the whole model (``b`` sequences, one new token each,
   the fused write + paged decode kernels in every layer) with every sequence's cache holding
   ``prompt + gen/2`` tokens (the mean context of a request's decode phase). The caches are
   filled with synthetic K/V through the same write path (``prepare_step`` + ``Cache.update``)
   instead of running ``b`` 16k-token prefills, which the device budget does not allow.
   Timed two ways: ``eager`` (the plain transformers forward, Python overhead included, the
   median of several steps) and ``graph`` (the same step captured in a CUDA graph and replayed:
   the GPU time of a step).

A minimal scheduler (``simulate``) then serves ``c`` requests that arrive together: it admits a
request while the KV budget holds its ``prompt + gen`` tokens, prefills admitted requests one at
a time (prefill first, like common engines), and otherwise runs one decode step for every
running request; a request leaves after ``gen`` tokens and frees its pages. Its clock advances by
the measured ``prefill_s`` and ``step_s[b]`` (graph timings), so the reported tokens/s, time to
first token and per-token decode latency are composed from measured step costs, not a
wall-clock run of the whole workload. ``max_concurrency`` is how many requests the budget holds.

    python benchmarks/serve.py --out results.json                  # Qwen3-8B shape on CUDA
    python benchmarks/serve.py --shape tiny --device cpu --prompt 64 --gen 8 --budget-gib 0.01
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from sawquant.config import KVConfig, LayerConfig, ModelFacts, SideConfig
from sawquant.kernels import decode
from sawquant.runtime import SawquantCache, kv_memory, patch, unpatch
from sawquant.runtime.hf.compat import cache_kwargs, returned_cache

SHAPES = {
    # Qwen3-8B: 36 layers, 32 query / 8 KV heads, head_dim 128, hidden 4096.
    "qwen3-8b": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    ),
}


def cache_configs(facts: ModelFacts) -> dict[str, KVConfig]:
    """The three caches. sawquant: a representative calibrated config (random weights cannot be
    calibrated): K rotation blocks 32/64/128 cycling over layers with signs, V block 32 rotated
    at run time (not folded: the decode kernel un-rotates), and two fallback K heads (an INT8
    head in layer 0, a BF16 head in layer 1), so every code path of the kernels is timed.
    sawquant-vfold: the same after ``export --fold-values`` (V's rotation folded into v_proj /
    o_proj, so identity V rotations and ``values_folded``; with random weights the folded model
    is as random as the original, and the cache work is the folded export's)."""
    h = facts.num_kv_heads
    layers = []
    blocks = [b for b in (32, 64, 128) if facts.head_dim % b == 0] or [1]
    for i in range(facts.num_layers):
        fallback = {0: {h - 1: 8}, 1: {h - 1: 16}}.get(i, {})
        k = SideConfig(rotation_block=blocks[i % len(blocks)], sign_seed=i, fallback_heads=fallback)
        v = SideConfig(rotation_block=min(32, facts.head_dim))
        layers.append(LayerConfig(k=k, v=v))
    rot = [LayerConfig(k=replace(x.k, fallback_heads={}), v=x.v) for x in layers]
    grouped = [LayerConfig(k=replace(x.k, group_size=32), v=replace(x.v, group_size=32))
               for x in layers]  # fmt: skip
    folded = [LayerConfig(k=x.k, v=SideConfig()) for x in layers]
    return {
        "bf16": KVConfig.uniform(facts, k=SideConfig(bits=16), v=SideConfig(bits=16)),
        "int4": KVConfig.uniform(facts),
        "sawquant": KVConfig(model=facts, layers=tuple(layers)),
        # The same rotations without the two fallback heads: rotation cost alone.
        "sawquant-rot": KVConfig(model=facts, layers=tuple(rot)),
        # The same with groups of 32 on every INT4 side (what a 5.0-bit budget buys at
        # head_dim 128: 5.0 bits instead of 4.25).
        "sawquant-g32": KVConfig(model=facts, layers=tuple(grouped)),
        "sawquant-vfold": KVConfig(model=facts, layers=tuple(folded), values_folded=True),
    }


class ContiguousBF16Cache(Cache):
    """The BF16 baseline read by torch SDPA: one preallocated ``[B, H_kv, capacity, D]`` buffer
    per layer side (what a static transformers cache holds), no paging, no quantization.

    ``frozen`` (CUDA-graph replay) writes every step at the same position without advancing."""

    def __init__(self, num_layers: int, batch: int, heads: int, dim: int, capacity: int, **kw):
        super().__init__(layers=[_ContiguousLayer(batch, heads, dim, capacity, **kw)
                                 for _ in range(num_layers)])  # fmt: skip
        self.frozen = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].write(key_states, value_states, self.frozen)


class _ContiguousLayer(CacheLayerMixin):
    def __init__(self, batch, heads, dim, capacity, *, device, dtype):
        super().__init__()
        self.keys = torch.randn(batch, heads, capacity, dim, device=device, dtype=dtype)
        self.values = torch.randn_like(self.keys)
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.write(key_states, value_states, False)

    def write(self, k, v, frozen: bool):
        t = k.shape[2]
        self.keys[:, :, self.length : self.length + t] = k
        self.values[:, :, self.length : self.length + t] = v
        end = self.length + t
        if not frozen:
            self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self):
        return self.length

    def get_mask_sizes(self, query_length):
        return self.length + query_length, 0

    def get_max_length(self):
        return self.keys.shape[2]


def sdpa_gqa_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Plain torch SDPA with native GQA (no K/V repetition, no mask for one query token):
    the fastest BF16 decode path torch offers, registered for the BF16 baseline."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t, n = query.shape[2], key.shape[2]
    mask = None  # one query token, or a first chunk (is_causal) need no mask
    if 1 < t < n:  # a later chunk: causal aligned to the end of the keys
        mask = torch.ones(t, n, dtype=torch.bool, device=query.device).tril(n - t)
    causal = t > 1 and mask is None
    out = sdpa(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_prefill(model, prompt: int, device: torch.device, repeats: int = 2) -> float:
    """Median seconds of a real ``prompt``-token prefill (one request, fresh cache)."""
    vocab = model.config.vocab_size
    warm = torch.randint(0, vocab, (1, min(prompt, 512)), device=device)
    ids = torch.randint(0, vocab, (1, prompt), device=device)
    with torch.no_grad():
        model(warm, use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - t)
            del out
    return statistics.median(times)


def filled_cache(
    config: KVConfig, batch: int, context: int, room: int, device, dtype, chunk: int = 2048
) -> SawquantCache:
    """A cache holding ``context`` synthetic tokens per sequence, with pages for ``room`` more,
    written through the public write path (``prepare_step`` + ``update``) chunk by chunk."""
    m = config.model
    pages = batch * math.ceil((context + room) / 16)
    cache = SawquantCache(config, page_size=16, num_pages=pages, grow=False)
    gen = torch.Generator(device=device).manual_seed(0)
    kv = torch.randn(batch, m.num_kv_heads, chunk, m.head_dim, device=device, generator=gen)
    kv = kv.to(dtype)
    done = 0
    while done < context:
        t = min(chunk, context - done)
        cache.prepare_step(t, batch_size=batch, device=device)
        for layer in range(m.num_layers):
            cache.update(kv[:, :, :t], kv[:, :, :t], layer)
        done += t
    return cache


def time_decode(model, cache, device, steps: int, graph: bool) -> dict:
    """Seconds per decode step of ``cache``'s batch: eager median, and CUDA-graph replay."""
    batch = cache.layers[0].keys.shape[0] if isinstance(cache, ContiguousBF16Cache) else None
    batch = batch or cache.batch_size
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    res: dict = {}
    with torch.no_grad():
        times = []
        for _ in range(steps):
            _sync(device)
            t = time.perf_counter()
            model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - t)
        res["eager_s"] = statistics.median(times[1:] or times)
        if graph and device.type == "cuda":
            try:
                res["graph_s"] = _graph_step(model, cache, ids, device)
            except Exception as err:  # report, keep the eager number
                res["graph_error"] = f"{type(err).__name__}: {err}"[:300]
            if isinstance(cache, SawquantCache):
                res.update(_attention_only(model, cache, device))
    return res


def _graph_step(model, cache, ids, device, replays: int = 20) -> float:
    """Capture one decode step (same slots every replay) and time its replays."""
    paged = isinstance(cache, SawquantCache)
    state = getattr(model.model, "_sawquant_state", None)
    if paged:
        cache.prepare_step(1, batch_size=ids.shape[0], device=device)
        cache.reuse_plan = True
        state.cache = cache  # what the skipped pre-hook does besides planning: the attention
        # layers find the step's cache through the patch state
    else:
        cache.frozen = True
    kw = dict(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)

    def step():
        # The decoder's forward, not __call__: the runtime's pre-hook (host planning, a copy
        # to the device) must not run inside the capture; then the head on the last position.
        hidden = model.model.forward(**kw).last_hidden_state
        return model.lm_head(hidden[:, -1:])

    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        g.replay()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / replays
    finally:
        if paged:
            cache.reuse_plan = False
            state.cache = None
        else:
            cache.frozen = False


def _bench(fn, device, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000 / reps


def _attention_only(model, cache: SawquantCache, device) -> dict:
    """One layer's decode attention alone: the paged kernel on this cache, and torch SDPA on a
    contiguous BF16 cache of the same lengths (the usual BF16 decode path) for reference."""
    from sawquant.runtime import dispatch

    plan = cache.plan
    b = plan.seq_lens.shape[0]
    cfg = model.config
    h_q, h_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = torch.randn(b, h_q, d, device=device, dtype=torch.bfloat16)
    layer = cache.layer_kv(0)

    def paged():
        dispatch.decode_attention(q, layer, plan.block_table, plan.seq_lens, softmax_scale=d**-0.5)

    out = {"attn_layer_s": _bench(paged, device)}
    length = int(plan.seq_lens.max())
    try:
        k = torch.randn(b, h_kv, length, d, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q4 = q[:, :, None]  # [B, H_q, 1, D]
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def dense():
            sdpa(q4, k, v, enable_gqa=True)

        out["sdpa_bf16_layer_s"] = _bench(dense, device)
    except torch.OutOfMemoryError:
        out["sdpa_bf16_layer_s"] = None  # the contiguous copy does not fit next to the cache
    return out


@dataclass
class Served:
    concurrency: int
    max_concurrency: int
    tokens_per_s: float
    ttft_mean_s: float
    ttft_max_s: float
    decode_ms_per_token: float  # mean step time seen by a decoding request
    makespan_s: float


def simulate(requests: int, max_conc: int, prefill_s: float, step_s: dict, gen: int) -> Served:
    """Serve ``requests`` simultaneous requests with at most ``max_conc`` in KV memory."""
    if max_conc < 1:
        raise ValueError("the KV budget does not hold a single request")
    clock, waiting, running = 0.0, requests, []  # running: tokens still to generate
    ttft, step_costs = [], []
    while waiting or running:
        if waiting and len(running) < max_conc:
            clock += prefill_s  # the prefill produces the first token
            ttft.append(clock)
            waiting -= 1
            running.append(gen - 1)
            continue
        cost = step_s[len(running)]
        clock += cost
        step_costs.extend([cost] * len(running))
        running = [r - 1 for r in running if r > 1]
    return Served(
        concurrency=requests,
        max_concurrency=max_conc,
        tokens_per_s=requests * gen / clock,
        ttft_mean_s=statistics.mean(ttft),
        ttft_max_s=max(ttft),
        decode_ms_per_token=1000 * statistics.mean(step_costs) if step_costs else 0.0,
        makespan_s=clock,
    )


def batches_needed(concurrency: list[int], max_conc: int) -> list[int]:
    """Batch sizes the scheduler runs decode steps at (full waves and the last partial one)."""
    need = set()
    for c in concurrency:
        need.add(min(c, max_conc))
        if c > max_conc and c % max_conc:
            need.add(c % max_conc)
    return sorted(need)


def sanity_check(device: torch.device, dtype: torch.dtype) -> dict:
    """The runtime on this device against the plain model, on the tiny shape: prefill 12 tokens,
    decode 6 one at a time, then a 4-token chunk; relative logit error per cache config."""
    model = build_model("tiny", device, dtype)
    s = SHAPES["tiny"]
    facts = ModelFacts(s["num_hidden_layers"], s["num_key_value_heads"], s["head_dim"], "qwen3")
    ids = torch.randint(0, s["vocab_size"], (3, 22), device=device)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.float()
        errors = {}
        for name, config in cache_configs(facts).items():
            patch(model, config)
            out = model(ids[:, :12], use_cache=True)
            cache, logits = returned_cache(out), [out.logits]
            for t in range(12, 18):
                logits.append(model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits)
            logits.append(model(ids[:, 18:22], **cache_kwargs(model, cache)).logits)
            got = torch.cat(logits, 1).float()
            errors[name] = ((got - full).norm() / full.norm()).item()
            unpatch(model)
        # The BF16 baseline's cache and attention function, same steps.
        original = model.config._attn_implementation
        model.set_attn_implementation("sdpa_gqa")
        cache = ContiguousBF16Cache(
            facts.num_layers, 3, facts.num_kv_heads, facts.head_dim, 22, device=device, dtype=dtype
        )
        logits = [model(ids[:, :12], **cache_kwargs(model, cache)).logits]
        for t in range(12, 18):
            logits.append(model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits)
        logits.append(model(ids[:, 18:22], **cache_kwargs(model, cache)).logits)
        got = torch.cat(logits, 1).float()
        errors["bf16-sdpa"] = ((got - full).norm() / full.norm()).item()
        model.set_attn_implementation(original)
    return errors


def _dump(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def wallclock(model, config: KVConfig, args, device) -> dict:
    """Serve ``c`` simultaneous requests per concurrency with the continuous-batching engine."""
    from batching import Engine, Request, summarize

    mem = kv_memory(config)
    page = 16
    num_pages = int(args.budget_gib * 2**30 // (mem.bytes_per_token * page))
    engine = Engine(
        model, config, num_pages=num_pages, page_size=page, max_len=args.prompt + args.gen
    )
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    conc = [int(c) for c in args.wallclock.split(",")]
    # Warm-up: kernels compiled, and staggered lengths so the batch shrinks one request at a
    # time through every bucket the measured runs can use (each captures its graph once).
    fits = (num_pages - 1) // engine.pages_for(args.prompt + args.gen)
    most = min(max(conc), fits)
    warm = [Request(torch.randint(0, vocab, (16,), generator=gen), 2 + i) for i in range(most)]
    # And one request of the measured prompt length: a long prefill launches kernel variants
    # (the write kernel's row layout, the prefill and decode split counts) that 16-token
    # prompts never compile, and compiling them inside the first measured TTFT cost 5-24 s.
    warm.append(Request(torch.randint(0, vocab, (args.prompt,), generator=gen), 2))
    engine.serve(warm)
    out = {"num_pages": num_pages, "max_concurrency": fits}
    for c in conc:
        reqs = [
            Request(torch.randint(0, vocab, (args.prompt,), generator=gen), args.gen)
            for _ in range(c)
        ]
        calls, launches = dict(engine.cache.calls), dict(decode.LAUNCHES)
        makespan = engine.serve(reqs)
        ran = {k: v - calls.get(k, 0) for k, v in engine.cache.calls.items()}
        # Which decode kernel the host launched (eager steps and graph captures; a graph's
        # replays launch what its capture recorded)
        kernels = {k: v - launches.get(k, 0) for k, v in decode.LAUNCHES.items()}
        out[str(c)] = {**summarize(reqs, makespan), "calls": ran, "decode_launches": kernels}
        print(f"  wall clock c={c}: {json.dumps(out[str(c)])}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-gib", type=float, default=40.0, help="KV memory for every cache")
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--concurrency", default="1,8,32,64,128")
    p.add_argument("--steps", type=int, default=6, help="eager decode steps timed per point")
    p.add_argument("--caches", default="bf16-sdpa,bf16,int4,sawquant,sawquant-rot")
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--wallclock", default="1,8,64", help="concurrencies served wall-clock")
    p.add_argument("--no-composed", action="store_true", help="skip the composed cross-check")
    p.add_argument("--out", default=None, help="write every number as JSON here")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    conc = [int(c) for c in args.concurrency.split(",")]
    model = build_model(args.shape, device, dtype)
    s = SHAPES[args.shape]
    facts = ModelFacts(s["num_hidden_layers"], s["num_key_value_heads"], s["head_dim"], "qwen3")
    budget = int(args.budget_gib * 2**30)
    per_request = math.ceil((args.prompt + args.gen) / 16) * 16  # whole pages
    context = args.prompt + args.gen // 2
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
        "caches": {},
    }
    AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
    report["sanity_rel_logit_error"] = sanity_check(device, dtype)
    print("sanity (relative logit error vs the plain model):", report["sanity_rel_logit_error"])
    configs = cache_configs(facts)
    for name in args.caches.split(","):
        contiguous = name == "bf16-sdpa"
        config = configs["bf16" if contiguous else name]
        mem = kv_memory(config)
        per_token = mem.bf16_bytes_per_token if contiguous else mem.bytes_per_token
        max_conc = int(budget // per_token) // per_request
        original = model.config._attn_implementation
        t0 = time.perf_counter()
        walled = None
        if not contiguous and args.wallclock:
            patch(model, config)  # as a user gets it: CUDA-graph decode on a GPU
            walled = wallclock(model, config, args, device)
            unpatch(model)
        if args.no_composed:
            report["caches"][name] = {"bytes_per_token": per_token, "wallclock": walled}
            _dump(report, args.out)
            continue
        if contiguous:
            model.set_attn_implementation("sdpa_gqa")
        else:
            patch(model, config, cuda_graphs=False)  # time_decode captures its own graphs
        prefill = time_prefill(model, args.prompt, device)
        steps = {}
        for b in batches_needed(conc, max_conc):
            if contiguous:
                cache = ContiguousBF16Cache(
                    facts.num_layers, b, facts.num_kv_heads, facts.head_dim,
                    context + args.steps + 8, device=device, dtype=dtype,
                )  # fmt: skip
                for layer in cache.layers:
                    layer.length = context
            else:
                cache = filled_cache(config, b, context, args.steps + 8, device, dtype)
            steps[b] = time_decode(model, cache, device, args.steps, not args.no_graph)
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        step_s = {b: r.get("graph_s", r["eager_s"]) for b, r in steps.items()}
        served = [asdict(simulate(c, max_conc, prefill, step_s, args.gen)) for c in conc]
        if contiguous:
            model.set_attn_implementation(original)
        else:
            unpatch(model)
        report["caches"][name] = {
            "bytes_per_token": per_token,
            "ratio_to_bf16": per_token / mem.bf16_bytes_per_token,
            "max_concurrency": max_conc,
            "prefill_s": prefill,
            "decode": {str(b): r for b, r in steps.items()},
            "served_composed_cross_check": served,
            "wallclock": walled,
            "measure_s": time.perf_counter() - t0,
        }
        print(f"[{name}] done in {time.perf_counter() - t0:.0f}s", flush=True)
        _dump(report, args.out)  # after every cache, so a run cut short leaves its numbers

    print(f"\n{report['device']}: KV {args.budget_gib} GiB, prompt {args.prompt}, gen {args.gen}")
    print("wall clock (continuous batching):")
    print(f"{'cache':13}{'conc':>5}{'fits':>5}{'tok/s':>9}{'TTFT p50':>9}{'p99 s':>7}"
          f"{'ITL p50':>9}{'p99 ms':>8}")  # fmt: skip
    for name, r in report["caches"].items():
        walled = r.get("wallclock") or {}
        for c, w in ((c, w) for c, w in walled.items() if isinstance(w, dict)):
            print(
                f"{name:13}{c:>5}{walled['max_concurrency']:>5}{w['tokens_per_s']:>9.1f}"
                f"{w['ttft_p50_s']:>9.2f}{w['ttft_p99_s']:>7.2f}"
                f"{w['itl_p50_ms']:>9.2f}{w['itl_p99_ms']:>8.2f}"
            )
    if args.no_composed:
        return
    print("composed from measured step costs (cross-check only):")
    head = f"{'cache':13}{'conc':>5}{'fits':>5}{'tok/s':>9}{'TTFT s':>9}{'ms/tok':>8}"
    print(head + f"{'eager ms':>10}{'graph ms':>10}{'attn us':>9}{'sdpa us':>9}")
    for name, r in report["caches"].items():
        for sv in r["served_composed_cross_check"]:
            b = min(sv["concurrency"], r["max_concurrency"])
            d = r["decode"][str(b)]
            g = f"{1000 * d['graph_s']:.2f}" if "graph_s" in d else "-"
            a = f"{1e6 * d['attn_layer_s']:.0f}" if "attn_layer_s" in d else "-"
            sd = f"{1e6 * d['sdpa_bf16_layer_s']:.0f}" if d.get("sdpa_bf16_layer_s") else "-"
            print(
                f"{name:13}{sv['concurrency']:>5}{r['max_concurrency']:>5}"
                f"{sv['tokens_per_s']:>9.1f}{sv['ttft_mean_s']:>9.2f}"
                f"{sv['decode_ms_per_token']:>8.2f}{1000 * d['eager_s']:>10.2f}{g:>10}{a:>9}{sd:>9}"
            )


if __name__ == "__main__":
    main()
