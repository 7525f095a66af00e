"""sawquant.offline.cache and the registry: one atomic, locked build per cached copy; names
resolve to converted copies only where no such path exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sawquant import offline
from sawquant.errors import InputError
from sawquant.offline.cache import build_once


def _fake_build(calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"")

    return build


def test_build_once_is_atomic_and_builds_once(tmp_path):
    root = tmp_path / "cache"
    target = root / "thing-file-123-v2"
    calls, announced = [], []

    def crash(tmp):
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")  # half written, then the process dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(target, crash, prefix="thing")
    assert sorted(p.name for p in root.iterdir()) == [".thing.lock"]
    # A run killed outright (no cleanup) leaves a temp dir: the next build removes it; an older
    # version of the copy goes once the new one is in place, and other entries stay.
    (root / ".thing-tmp-killed").mkdir()
    (root / "thing-file-123-v1").mkdir()
    (root / "other-export").mkdir()
    build = _fake_build(calls)
    first = build_once(
        target, build, prefix="thing", stale="thing-file-*", announce=lambda: announced.append(1)
    )
    assert first == target and (target / "model.safetensors").is_file()
    assert build_once(target, build, prefix="thing", announce=lambda: announced.append(1)) == first
    assert len(calls) == 2 and announced == [1]  # the second call reused the copy, silently
    assert sorted(p.name for p in root.iterdir()) == [".thing.lock", "other-export", target.name]
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_names_resolve_to_converted_copies_and_paths_win(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(offline, "checkpoint_dir", lambda name: seen.append(name) or tmp_path)
    assert offline.resolve_model(None) is None
    assert offline.resolve_model("gemma3-270m") == tmp_path and seen == ["gemma3-270m"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").mkdir()  # a local directory of that name is what the user meant
    assert offline.resolve_model("gemma3-270m") == Path("gemma3-270m")
    assert offline.resolve_model("no-such-model") == Path("no-such-model")
    assert seen == ["gemma3-270m"]


def test_registry_names_and_cache_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SAWQUANT_CACHE", str(tmp_path))
    assert sorted(offline.OFFLINE_MODELS) == ["gemma3-270m", "smollm2-135m"]
    with pytest.raises(InputError, match="unknown offline model 'nope'"):
        offline.offline_model("nope")
    assert not offline.is_converted("gemma3-270m")
    monkeypatch.setattr(type(offline.GEMMA3_270M.source), "size", lambda self: 42)
    assert offline.GEMMA3_270M.target() == tmp_path / "gemma3-270m-gemma-3-270m-q4_k_m-42-v1"
