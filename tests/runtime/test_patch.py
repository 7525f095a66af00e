"""patch / unpatch / from_pretrained on tiny random models (Llama, Qwen3 with a sliding layer,
Gemma2 with soft-cap): the plumbing is exact with 16-bit pools, INT4 stays close, the pages are
really read, left-padded batches match one-by-one generation."""

from __future__ import annotations

import json

import pytest
import torch
from _builders import tiny_causal_lm
from transformers import DynamicCache

from sawquant.config import KVConfig, ModelFacts, SideConfig
from sawquant.errors import ConfigError
from sawquant.runtime import (
    CONFIG_KEY,
    KV_CONFIG_FILE,
    SawquantCache,
    from_pretrained,
    is_patched,
    patch,
    unpatch,
)
from sawquant.runtime.hf.compat import cache_kwargs, returned_cache

SMALL = dict(head_dim=16)  # with the shared tiny shape: 2 layers, 4 q / 2 KV heads, vocab 128


def _llama():
    return tiny_causal_lm("Llama", seed=0, **SMALL)


def _qwen3_sliding():
    return tiny_causal_lm(
        "Qwen3", seed=1, **SMALL, use_sliding_window=True, sliding_window=6,
        layer_types=["full_attention", "sliding_attention"],
    )  # fmt: skip


def _gemma2_softcap():
    return tiny_causal_lm(
        "Gemma2", seed=2, **SMALL, sliding_window=6, attn_logit_softcapping=5.0,
        query_pre_attn_scalar=16,
    )  # fmt: skip


def _config(model, **side) -> KVConfig:
    facts = ModelFacts(2, 2, 16, model.config.model_type)
    v = {k: x for k, x in side.items() if k != "rotation_block"}
    return KVConfig.uniform(facts, k=SideConfig(**side), v=SideConfig(**v))


def _stepwise_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill 4 tokens, decode 4 one at a time, then a 2-token chunk: [B, 10, vocab]."""
    out = model(ids[:, :4], use_cache=True)
    cache, logits = returned_cache(out), [out.logits]
    for t in range(4, 8):
        logits.append(model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache)).logits)
    logits.append(model(ids[:, 8:10], use_cache=True, **cache_kwargs(model, cache)).logits)
    assert isinstance(cache, SawquantCache)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("make", [_llama, _qwen3_sliding, _gemma2_softcap])
def test_16bit_pools_are_exact_through_decode_and_chunked_prefill(make):
    model = make()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        patch(model, _config(model, bits=16, rotation_block=16))
        got = _stepwise_logits(model, ids)
    err = (got - full).abs().max().item()
    print(f"{model.config.model_type}: max |logit error| with 16-bit pools {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("make", [_llama, _gemma2_softcap])
def test_transforms_are_exact_through_decode_and_chunked_prefill(make):
    """Centering and smoothing (config v2) on K and V change nothing in exact arithmetic: with
    16-bit pools the logits equal full precision through decode and chunked prefill. (Key
    centering is exact only without a logit soft-cap: Gemma 2 gets key smoothing alone.)"""
    model = make()
    gen = torch.Generator().manual_seed(12)
    rows = lambda lo, hi: (torch.rand(2, 16, generator=gen) * (hi - lo) + lo).tolist()  # noqa: E731
    k_center = None if model.config.model_type == "gemma2" else rows(-3, 3)
    k = SideConfig(bits=16, rotation_block=16, center=k_center, smooth=rows(0.3, 3))
    v = SideConfig(bits=16, center=rows(-1, 1), smooth=rows(0.5, 2))
    config = KVConfig.uniform(ModelFacts(2, 2, 16, model.config.model_type), k=k, v=v)
    assert config.format_version == 2
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        patch(model, config)
        got = _stepwise_logits(model, ids)
    err = (got - full).abs().max().item()
    print(f"{model.config.model_type}: max |logit error|, 16-bit pools with transforms {err:.2e}")
    assert err < 1e-4


def test_key_centering_is_refused_where_a_soft_cap_makes_it_inexact():
    """softcap * tanh((s - q.mu) / softcap) is not softcap * tanh(s / softcap) shifted: with a
    logit soft-cap, key centering would change the attention, so patch refuses it."""
    model = _gemma2_softcap()
    centered = SideConfig(center=[[0.5] * 16] * 2)
    config = KVConfig.uniform(ModelFacts(2, 2, 16, "gemma2"), k=centered)
    with pytest.raises(ConfigError, match="soft-cap"):
        patch(model, config)
    assert not is_patched(model)


def test_int4_is_close_and_corrupting_a_page_changes_the_output():
    model = _llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        patch(model, _config(model, rotation_block=16))
        got = _stepwise_logits(model, ids)
        rel = ((got - full).norm() / full.norm()).item()
        print(f"INT4 block-16: relative logit error {rel:.4f}")
        assert 1e-4 < rel < 0.1  # quantized (not exact), but close

        out = model(ids[:, :8], use_cache=True)
        cache = returned_cache(out)
        clean = model(ids[:, 8:9], use_cache=True, **cache_kwargs(model, cache)).logits
        out = model(ids[:, :8], use_cache=True)
        cache = returned_cache(out)
        page = int(cache.plan.block_table[0, 0])
        for layer in range(2):
            for store in cache.stores(layer):  # K and V: every nibble of sequence 0's first page
                store.pools[4].codes[page] = ~store.pools[4].codes[page]
        broken = model(ids[:, 8:9], use_cache=True, **cache_kwargs(model, cache)).logits
    diff0 = (broken[0] - clean[0]).abs().max().item()
    diff1 = (broken[1] - clean[1]).abs().max().item()
    spread = clean[0].std().item()
    print(f"corrupted page: seq 0 logits moved {diff0:.3f} (std {spread:.3f}), seq 1 {diff1}")
    assert diff0 > 0.1 * spread
    assert diff1 == 0.0  # its pages were untouched


def test_left_padded_batch_generate_matches_single_sequences():
    model = patch(_llama(), _config(_llama(), rotation_block=16))
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(0, 128, (1, 9), generator=gen)
    b = torch.randint(0, 128, (1, 5), generator=gen)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kw)[:, 9:]
        alone = [model.generate(x, **kw)[:, x.shape[1] :] for x in (a, b)]
    print("batched", together.tolist(), "alone", [x.tolist() for x in alone])
    assert torch.equal(together, torch.cat(alone, 0))


def test_generate_uses_the_paged_cache_and_unpatch_restores():
    model = _llama()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        patch(model, _config(model, bits=16))
        out = model.generate(ids, **kw)
        cache = returned_cache(out)
        assert isinstance(cache, SawquantCache)
        assert cache.seq_lens().tolist() == [10]  # the last token is not cached
        assert torch.equal(out.sequences, ref.sequences)
        assert model.config._attn_implementation == "sawquant"
        unpatch(model)
        assert not is_patched(model) and model.config._attn_implementation == "sdpa"
        plain = returned_cache(model(ids, use_cache=True))
    assert isinstance(plain, DynamicCache)


def _count_dispatch(monkeypatch) -> dict[str, int]:
    """Count the calls that reach the kernels (or their twins) through the dispatcher."""
    from sawquant.runtime import dispatch

    counts = {"write_kv": 0, "decode_attention": 0, "prefill_attention": 0}
    for name in counts:
        real = getattr(dispatch, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(dispatch, name, counted)
    return counts


def test_generate_runs_the_sawquant_write_and_decode_on_this_transformers(monkeypatch):
    """What users run: generate() on a patched model must go through the sawquant write and
    decode every step, on every transformers the pins allow (the test runs on both ends)."""
    import warnings

    import transformers

    model = patch(_llama(), _config(_llama(), rotation_block=16))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    counts = _count_dispatch(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings():
        # Our own calls never use a deprecated argument name.
        warnings.simplefilter("error", FutureWarning)
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = returned_cache(out)
    print(f"transformers {transformers.__version__}: dispatch {counts}, cache {dict(cache.calls)}")
    # 1 prefill + 4 decode forwards (the 5th token is not fed back), 2 layers each.
    assert counts == {"write_kv": 10, "decode_attention": 8, "prefill_attention": 0}
    assert dict(cache.calls) == {"write": 10, "first_chunk": 2, "decode": 8}


def test_a_forward_that_bypasses_the_cache_raises(monkeypatch):
    """If transformers stops passing our cache through (a renamed argument, say), the step
    would run on a full-precision cache: that must raise, not silently serve."""
    import importlib

    from sawquant.errors import RuntimeBypassError

    patch_module = importlib.import_module("sawquant.runtime.hf.patch")  # the module, not patch()

    model = patch(_llama(), _config(_llama(), rotation_block=16))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(patch_module, "cache_kwargs", lambda m, c: {})  # the cache gets lost
    with torch.no_grad(), pytest.raises(RuntimeBypassError, match="sawquant cache"):
        model.generate(ids, max_new_tokens=3, do_sample=False)


def test_a_direct_decoder_forward_call_raises():
    """``decoder.forward(...)`` skips the pre-forward hook that hands the attention layers the
    step's cache: attention would see the new token only. It must raise, not answer wrongly."""
    from sawquant.errors import RuntimeBypassError

    model = patch(_llama(), _config(_llama(), rotation_block=16))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = model(ids, use_cache=True)  # a prompt through the hooks: the cache holds 6 tokens
        cache = returned_cache(out)
        step = dict(input_ids=ids[:, :1], use_cache=True, **cache_kwargs(model.model, cache))
        with pytest.raises(RuntimeBypassError, match="pre-forward hook"):
            model.model.forward(**step)
        model.model._sawquant_state.cache = cache  # what the hook does: now served
        cache.prepare_step(1, batch_size=1, device=ids.device)
        before = cache.calls["decode"]
        model.model.forward(**step)
    assert cache.calls["decode"] - before == 2  # both layers read the pages


def test_config_for_another_shape_is_refused():
    model = _llama()
    wrong = KVConfig.uniform(ModelFacts(2, 2, 32, "llama"))
    with pytest.raises(ConfigError, match="calibrate this model"):
        patch(model, wrong)
    assert not is_patched(model)


def test_from_pretrained_reads_the_checkpoint_key(tmp_path):
    model = _llama()
    plain, exported = tmp_path / "plain", tmp_path / "exported"
    model.save_pretrained(plain)
    model.save_pretrained(exported)
    config = _config(model, rotation_block=16)
    (exported / KV_CONFIG_FILE).write_text(config.to_json())
    hf = json.loads((exported / "config.json").read_text())
    hf[CONFIG_KEY] = {"method": "sawquant", "format_version": 1, "config_file": KV_CONFIG_FILE}
    (exported / "config.json").write_text(json.dumps(hf))

    loaded = from_pretrained(exported)
    assert is_patched(loaded) and loaded.sawquant_config == config
    mem = loaded.sawquant_memory()
    print("tiny model KV ratio", mem.ratio)
    assert mem.ratio == pytest.approx((2 * 2 * 2 * 12 + 0.25) / (2 * 2 * 2 * 32))

    with pytest.warns(UserWarning, match="sawquant found no KV config"):
        normal = from_pretrained(plain)
    assert not is_patched(normal)


def test_from_pretrained_never_reads_outside_the_checkpoint(tmp_path):
    """config_file comes from a downloaded config.json: it may not name another path."""
    model = _llama()
    model.save_pretrained(tmp_path / "ckpt")
    outside = tmp_path / "secret.json"
    outside.write_text(_config(model, rotation_block=16).to_json())
    hf_path = tmp_path / "ckpt" / "config.json"
    hf = json.loads(hf_path.read_text())
    for name in (str(outside), "../secret.json", "/etc/passwd"):
        hf[CONFIG_KEY] = {"method": "sawquant", "format_version": 1, "config_file": name}
        hf_path.write_text(json.dumps(hf))
        with pytest.raises(ConfigError, match="file name inside the checkpoint"):
            from_pretrained(tmp_path / "ckpt")
    # A symlink inside the checkpoint that points out is refused too.
    (tmp_path / "ckpt" / "kv.json").symlink_to(outside)
    hf[CONFIG_KEY]["config_file"] = "kv.json"
    hf_path.write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="outside the checkpoint"):
        from_pretrained(tmp_path / "ckpt")


def test_from_pretrained_on_a_mistyped_path_fails_at_once(tmp_path):
    import time

    from sawquant.errors import InputError

    start = time.perf_counter()
    for path in (str(tmp_path / "nope"), "smollm2-sawquant-typo", "./typo", "~/typo"):
        with pytest.raises(InputError, match="no such directory"):
            from_pretrained(path)
    assert time.perf_counter() - start < 2  # no network lookups, no retries


def test_top_level_names():
    import sawquant

    assert sawquant.patch is patch and sawquant.from_pretrained is from_pretrained


def test_beam_search_matches_with_16bit_pools():
    model = _llama()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=20, num_beams=3, do_sample=False, early_stopping=True)
    kw["attention_mask"] = torch.ones_like(ids)  # every one of the 20 steps reorders the beams
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        patch(model, _config(model, bits=16, rotation_block=16))
        out = model.generate(ids, **kw)
    print("beam search, plain:", ref[:, 7:].tolist(), "sawquant 16-bit:", out[:, 7:].tolist())
    assert torch.equal(out, ref)


@pytest.mark.parametrize("path", ["twins", "triton"])
def test_nan_keys_are_refused_on_every_path(path, monkeypatch):
    """A model whose activations overflow must not fill the cache with NaN: the twins raise
    in the write, the Triton path flags it and the step raises (checked once per forward)."""
    from sawquant.errors import NonFiniteKVError
    from sawquant.runtime import dispatch

    model = _llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    # A BF16 fallback head: the pool that used to store NaN silently.
    patch(model, _config(model, rotation_block=16, fallback_heads={0: 16}))
    if path == "triton":
        monkeypatch.setattr(dispatch, "use_triton", lambda t: True)  # interpreted on CPU
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    # The twin raises in the write; the kernel's flag names the layer after the step.
    match = "element\\(s\\) are NaN/Inf" if path == "twins" else "layer 1 produced NaN/Inf"
    with torch.no_grad(), pytest.raises(NonFiniteKVError, match=match):
        model.generate(ids, max_new_tokens=3, do_sample=False)


def test_the_runtime_runs_where_triton_cannot_be_imported():
    """macOS / Windows have no triton: importing sawquant, patching a model and a cached
    generate must all work on the torch twins (they used to raise ImportError)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    code = f"""
import sys
sys.modules["triton"] = None  # any import of triton now raises ImportError
sys.path.insert(0, {str(tests)!r})
import torch
from _builders import tiny_causal_lm
import sawquant
from sawquant.config import KVConfig, ModelFacts, SideConfig
model = tiny_causal_lm("Llama", head_dim=16)
k = SideConfig(rotation_block=16, sign_seed=1, fallback_heads={{1: 8}})
sawquant.patch(model, KVConfig.uniform(ModelFacts(2, 2, 16, "llama"), k=k))
ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
from sawquant.runtime.hf.compat import returned_cache
print(dict(returned_cache(out).calls), "triton" in sys.modules and sys.modules["triton"])
"""
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    print(res.stdout, res.stderr[-2000:])
    assert res.returncode == 0
    assert "'decode': 6" in res.stdout and res.stdout.strip().endswith("None")


def test_nothing_outside_the_kernels_imports_triton():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "sawquant"
    offenders = [
        str(p.relative_to(root.parent))
        for p in root.rglob("*.py")
        if "import triton" in p.read_text() or "from triton" in p.read_text()
    ]
    assert offenders == []


def test_a_direct_call_of_the_decoder_is_served_too():
    """The hooks sit on the decoder stack, so model.model(...) with a cache uses the pages."""
    model = _llama()
    patch(model, _config(model, bits=16, rotation_block=16))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full = model.model(ids, use_cache=False).last_hidden_state
        first = model.model(ids[:, :5], use_cache=True)
        cache = returned_cache(first)
        assert isinstance(cache, SawquantCache)
        rest = model.model(ids[:, 5:6], use_cache=True, **cache_kwargs(model.model, cache))
    err = (rest.last_hidden_state[:, 0] - full[:, 5]).abs().max().item()
    print("decoder call, 16-bit pools: max |hidden error|", err, dict(cache.calls))
    assert cache.calls["decode"] == 2 and err < 1e-4
