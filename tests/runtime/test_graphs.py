"""The CUDA-graph decode path's logic on the CPU (``DecodeGraphs(simulate=True)``: replays run
the captured call again with the host state frozen at capture, as a graph would): generate with
graphs equals generate without them, token for token, under left padding, sampling, beam search
and pool growth, and the graphs really serve the steps. The graphs themselves run on the GPU in
benchmarks/gpu_check.py."""

from __future__ import annotations

import pytest
import torch
from _builders import tiny_causal_lm

from sawquant.config import KVConfig, ModelFacts, SideConfig
from sawquant.errors import ConfigError
from sawquant.runtime import SawquantCache, patch, unpatch
from sawquant.runtime.hf.compat import cache_kwargs, returned_cache
from sawquant.runtime.hf.patch import install_graphs


def _config(model) -> KVConfig:
    facts = ModelFacts(2, 2, 16, model.config.model_type)
    k = SideConfig(rotation_block=16, sign_seed=0, fallback_heads={1: 8})
    return KVConfig.uniform(facts, k=k, v=SideConfig(rotation_block=16))


def _models(kind="Llama", **overrides):
    """The same random model twice: patched eagerly, and patched with simulated graphs."""
    pair = []
    for graphs in (False, True):
        model = tiny_causal_lm(kind, seed=0, head_dim=16, **overrides)
        patch(model, _config(model), page_size=4)
        if graphs:
            install_graphs(model._sawquant_state, model.model, simulate=True)
        pair.append(model)
    return pair


def _inputs():
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


def _generate(model, seed=0, **kwargs):
    ids, mask = _inputs()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, pad_token_id=0,
            return_dict_in_generate=True, **kwargs,
        )  # fmt: skip
    return out


@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(do_sample=False, num_beams=2)],
    ids=["greedy", "sampling", "beams"],
)
def test_generate_with_graphs_equals_eager(mode):
    eager, graphed = _models()
    a, b = _generate(eager, **mode), _generate(graphed, **mode)
    assert torch.equal(a.sequences, b.sequences)
    cache, eager_cache = returned_cache(b), returned_cache(a)
    assert isinstance(cache, SawquantCache)
    # 11 decode steps, all replays (a key's first step is captured, then replayed); both
    # layers wrote and decoded in every step, as in the eager run.
    assert cache.calls["graph_replay"] == 11 and len(cache.graphs) >= 1
    assert cache.calls["decode"] == eager_cache.calls["decode"] == 2 * 11
    assert cache.calls["write"] == eager_cache.calls["write"]


def test_graphs_serve_steps_across_pool_growth_and_new_table_widths():
    eager, graphed = _models()
    for model in (eager, graphed):
        model._sawquant_state.page_size = 2  # many pages: the table widens, the pools grow
    grown, pools_after = [], []
    original = SawquantCache._grow

    def spy(self, n):
        grown.append(n)
        self.graph_pool = "pool of the dropped graphs"  # a CUDA capture sets it; never reused
        original(self, n)
        pools_after.append(self.graph_pool)

    SawquantCache._grow = spy
    try:
        a, b = _generate(eager), _generate(graphed)
    finally:
        SawquantCache._grow = original
    assert torch.equal(a.sequences, b.sequences)
    assert len(grown) >= 2  # both caches grew during decode
    assert pools_after == [None] * len(grown)  # the next capture starts a fresh pool
    assert returned_cache(b).calls["graph_replay"] >= 5


def test_a_stale_static_plan_would_be_caught():
    """Graphs that skipped the in-place refresh would write every token into one slot: the
    tokens then differ from eager ones (what the equality test above guards against)."""
    eager, graphed = _models()
    graphs = graphed._sawquant_state.graphs
    refresh = graphs._replay

    def no_refresh(graph, cache, kwargs):
        saved = {n: getattr(cache.plan, n) for n in ("slots", "seq_lens")}
        for n in saved:  # keep the captured step's slots and lengths
            setattr(cache.plan, n, getattr(graph.plan, n).clone())
        try:
            return refresh(graph, cache, kwargs)
        finally:
            for n, t in saved.items():
                setattr(cache.plan, n, t)

    graphs._replay = no_refresh
    assert not torch.equal(_generate(eager).sequences, _generate(graphed).sequences)


def test_steps_a_graph_cannot_carry_run_eagerly_and_say_so():
    eager, graphed = _models()
    with pytest.warns(UserWarning, match="without CUDA graphs.*output_hidden_states"):
        b = _generate(graphed, output_hidden_states=True)
    a = _generate(eager, output_hidden_states=True)
    assert torch.equal(a.sequences, b.sequences)
    assert returned_cache(b).calls["graph_replay"] == 0


def test_graph_switch():
    model = tiny_causal_lm("Llama", seed=0, head_dim=16)
    with pytest.raises(ConfigError, match="cuda_graphs=True.*not on a CUDA device"):
        patch(model, _config(model), cuda_graphs=True)
    patch(model, _config(model))  # default on a CPU: no graphs, the forward untouched
    assert model._sawquant_state.graphs is None and "forward" not in model.model.__dict__
    install_graphs(model._sawquant_state, model.model, simulate=True)
    assert "forward" in model.model.__dict__
    unpatch(model)
    assert "forward" not in model.model.__dict__


def test_a_manual_decode_loop_without_position_ids_matches_eager():
    """Without position ids the model counts positions from the cache's length, a host value a
    graph would bake in; the graph path passes the step's positions as an input instead."""
    eager, graphed = _models("Qwen3")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    logits = []
    for model in (eager, graphed):
        with torch.no_grad():
            out = model(ids[:, :4], use_cache=True)
            cache, got = returned_cache(out), []
            for t in range(4, 9):
                step = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache))
                got.append(step.logits)
        logits.append(torch.cat(got, dim=1))
    assert cache.calls["graph_replay"] == 5
    assert torch.equal(logits[0], logits[1])


def test_a_cache_with_graphs_is_freed_without_the_cyclic_collector():
    """No reference cycle through the graphs: a dead cache (its pools, its CUDA graphs) is
    freed at once, never by a collection that could run in the middle of another capture."""
    import gc
    import weakref

    _, graphed = _models()
    gc.disable()
    try:
        cache = returned_cache(_generate(graphed))
        assert cache.graphs
        ref = weakref.ref(cache)
        del cache
        assert ref() is None
    finally:
        gc.enable()


def _captures(monkeypatch, graphs) -> list:
    seen = []
    capture = graphs._capture

    def counted(cache, kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return capture(cache, kwargs)

    monkeypatch.setattr(graphs, "_capture", counted)
    return seen


def test_a_second_generate_reuses_the_first_ones_pools_and_graphs(monkeypatch):
    eager, graphed = _models()
    state = graphed._sawquant_state
    captured = _captures(monkeypatch, state.graphs)
    first = _generate(graphed).sequences  # the output (and its cache) dies here
    n_first = len(captured)
    assert n_first >= 1 and state.reuse.spare is not None
    out = _generate(graphed)
    assert len(captured) == n_first  # no capture: the first call's graphs serve every step
    assert state.reuse.reused == 1
    assert out.past_key_values.calls["graph_replay"] == 11
    assert torch.equal(out.sequences, first)
    assert torch.equal(out.sequences, _generate(eager).sequences)


def test_a_cache_the_user_holds_is_never_shared(monkeypatch):
    _, graphed = _models()
    state = graphed._sawquant_state
    held = _generate(graphed)  # return_dict_in_generate: the cache stays alive
    assert state.reuse.spare is None
    again = _generate(graphed)
    assert state.reuse.reused == 0
    a, b = returned_cache(held), returned_cache(again)
    assert a.layers[0].kv is not b.layers[0].kv and a.graphs is not b.graphs
    assert torch.equal(held.sequences, again.sequences)


def test_moved_weights_drop_the_leftovers_and_release_frees_them(monkeypatch):
    eager, graphed = _models()
    state = graphed._sawquant_state
    captured = _captures(monkeypatch, state.graphs)
    _generate(graphed)
    n_first = len(captured)
    for model in (eager, graphed):
        model.to(torch.bfloat16)  # new parameter tensors: captured graphs would read the old ones
    out = _generate(graphed)
    assert state.reuse.reused == 0 and len(captured) > n_first
    assert torch.equal(out.sequences, _generate(eager).sequences)
    del out
    assert state.reuse.spare is not None
    graphed.sawquant_release()
    assert state.reuse.spare is None
    unpatch(graphed)
    assert not hasattr(graphed, "sawquant_release")


def test_weights_swapped_while_a_cache_is_held_drop_its_leftovers():
    """The graphs bake the weights they were captured with: a cache that outlives a weight
    swap must not hand its graphs on when it finally dies."""
    eager, graphed = _models()
    state = graphed._sawquant_state
    held = _generate(graphed)
    for model in (eager, graphed):
        layer = model.model.layers[0].mlp.down_proj
        layer.weight = torch.nn.Parameter(layer.weight.detach() * 1.5)  # a new tensor
    del held  # dies now, after the swap
    out = _generate(graphed)
    assert state.reuse.reused == 0
    assert torch.equal(out.sequences, _generate(eager).sequences)


def test_a_longer_second_prompt_grows_the_adopted_pools_and_matches_eager():
    eager, graphed = _models()
    for model in (eager, graphed):
        model._sawquant_state.page_size = 2  # few tokens per page: the second call must grow
    _generate(graphed)
    ids = torch.randint(0, 128, (3, 30), generator=torch.Generator().manual_seed(3))
    outs = []
    for model in (eager, graphed):
        with torch.no_grad():
            outs.append(
                model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=0, return_dict_in_generate=True)
            )  # fmt: skip
    assert graphed._sawquant_state.reuse.reused == 1
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert returned_cache(outs[1]).calls["graph_replay"] == 11


def test_a_shallow_copy_of_a_cache_hands_nothing_on():
    import copy

    _, graphed = _models()
    state = graphed._sawquant_state
    out = _generate(graphed)
    cache = returned_cache(out)
    twin = copy.copy(cache)
    assert twin.layers[0].kv is cache.layers[0].kv  # shared pools
    del out, cache
    assert state.reuse.spare is None  # the original died while its copy still uses the pools
    del twin
    assert state.reuse.spare is None


def test_a_step_under_autocast_does_not_replay_a_graph_captured_without_it(monkeypatch):
    _, graphed = _models()
    captured = _captures(monkeypatch, graphed._sawquant_state.graphs)
    _generate(graphed)
    plain = len(captured)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _generate(graphed)  # takes the leftovers, but needs graphs of its own
    assert graphed._sawquant_state.reuse.reused == 1 and len(captured) > plain
