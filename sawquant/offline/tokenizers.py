"""Tokenizers rebuilt from a GGUF file's metadata, the same under every supported transformers.

transformers' own GGUF tokenizer converters differ between releases (5.17 names <|im_start|>
as SmolLM2's EOS; for Gemma it finds no merges and tokenizes character by character), so the
offline models build theirs here from the vocabulary the GGUF stores. Each builder takes
``meta(key)`` (a GGUF metadata value, None when absent) and returns a transformers tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sawquant.errors import UnsupportedModelError

__all__ = ["Meta", "byte_level_bpe", "gemma_sentencepiece", "gguf_metadata"]

Meta = Callable[[str], Any]
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_metadata(gguf: Any) -> Meta:
    """``meta(key)`` over a GGUF file's metadata (one parse: ~20 s for a 262k vocabulary)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields

    def meta(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    return meta


def _require(meta: Meta, model: str, what: str) -> None:
    found = meta("tokenizer.ggml.model")
    if found != model:
        raise UnsupportedModelError(
            f"the GGUF has a {found!r} tokenizer where {what} was expected; only the offline "
            "models' own GGUF files are converted"
        )


def _token(meta: Meta, tokens: list[str], key: str) -> str | None:
    index = meta(f"tokenizer.ggml.{key}_token_id")
    return tokens[int(index)] if index is not None else None


def byte_level_bpe(meta: Meta) -> Any:
    """The GPT-2 style byte-level BPE tokenizer (SmolLM2): matches the original SmolLM2
    tokenizer, including llama.cpp's "smollm" pre-tokenizer, which splits digits one by one."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    _require(meta, "gpt2", "a GPT-2 style byte-level BPE")
    tokens: list[str] = meta("tokenizer.ggml.tokens")
    kinds: list[int] = meta("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, kinds)
            if k == _CONTROL
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_token(meta, tokens, "bos"),
        eos_token=_token(meta, tokens, "eos"),
        unk_token=_token(meta, tokens, "unknown"),
        pad_token=_token(meta, tokens, "padding"),
    )
    if meta("tokenizer.chat_template"):
        tokenizer.chat_template = meta("tokenizer.chat_template")
    return tokenizer


def gemma_sentencepiece(meta: Meta) -> Any:
    """Gemma's SentencePiece BPE (byte fallback, spaces as "▁", BOS added) as ``GemmaTokenizer``.

    The GGUF lists no merges: they are rebuilt from the vocabulary, best-first in the order the
    tokens appear in the file (Gemma's scores do not follow its merge order), and tokens of two or
    more spaces, which the file spells with real spaces, are respelled with "▁" first, so merges
    built from them match. This is what transformers 5.24's GGUF converter does; 5.17's does not.
    """
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    _require(meta, "llama", "Gemma's SentencePiece BPE")
    raw: list[str] = meta("tokenizer.ggml.tokens")
    kinds: list[int] = meta("tokenizer.ggml.token_type")
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    add_bos = meta("tokenizer.ggml.add_bos_token")
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=_token(meta, tokens, "bos"),
        eos_token=_token(meta, tokens, "eos"),
        unk_token=_token(meta, tokens, "unknown"),
        pad_token=_token(meta, tokens, "padding"),
        add_bos_token=True if add_bos is None else bool(add_bos),
        add_eos_token=bool(meta("tokenizer.ggml.add_eos_token")),
    )
    # Control tokens (<start_of_turn>, <unusedN>, ...) stay whole and special; user-defined ones
    # ("\n\n", "[multimodal]") stay whole but are ordinary text, except the respelled runs of
    # spaces, which the merges already reach (as transformers 5.24 does).
    backend = tokenizer.backend_tokenizer
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(raw, kinds) if k == _CONTROL]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(raw, kinds)
            if k == _USER_DEFINED and t in vocab
        ]
    )
    if meta("tokenizer.chat_template"):
        tokenizer.chat_template = meta("tokenizer.chat_template")
    return tokenizer
