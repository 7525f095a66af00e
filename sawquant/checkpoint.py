"""The exported envelope: how a Hugging Face checkpoint carries its sawquant KV config.

An export adds two things to a checkpoint, and this module is the only code that writes or
reads them (export, the transformers runtime, verify and the vLLM plugin all call it):

* ``config.json`` gets the top-level key ``"kv_cache_quantization": {"method": "sawquant",
  "format_version": n, "config_file": "sawquant_kv.json"}``; every other key is kept;
* ``sawquant_kv.json`` holds the :class:`~sawquant.config.KVConfig`.

``config_file`` must name a plain file inside the checkpoint directory: a checkpoint from
elsewhere can never make sawquant read an arbitrary path on disk.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from sawquant.config import KVConfig
from sawquant.errors import ConfigError, InputError

__all__ = [
    "CONFIG_KEY",
    "KV_CONFIG_FILE",
    "envelope",
    "is_export",
    "local_checkpoint",
    "read_config_json",
    "read_kv_config",
]

CONFIG_KEY = "kv_cache_quantization"  # the config.json key an exported checkpoint carries
KV_CONFIG_FILE = "sawquant_kv.json"
# A Hugging Face Hub repository id, "owner/name" (letters, digits, -, _, .). A bare "name" is
# taken as a local directory: the legacy one-part Hub ids all have owner/name aliases now.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def envelope(config: KVConfig) -> dict[str, Any]:
    """The value of ``config.json[CONFIG_KEY]`` for an export of ``config``."""
    return {
        "method": config.method,
        "format_version": config.format_version,
        "config_file": KV_CONFIG_FILE,
    }


def local_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` as a local directory, or None when it names a Hub repository.

    Anything that is not shaped like a Hub id (a bare name, an absolute path, ``./``, ``~``,
    more than one ``/``) and does not exist raises InputError at once, as does a file: a typo
    never turns into a network lookup.
    """
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise InputError(f"{text} is a file, not a checkpoint directory; pass its directory")
    if isinstance(path, Path) or not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise InputError(
            f"no such directory: {text}; pass a Hugging Face checkpoint directory (or a Hub "
            "repository id such as owner/name)"
        )
    return None


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise InputError(f"{what} {path} is not readable JSON ({reason}); repair or replace it")
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} is not a JSON object; repair or replace it")
    return data


def read_config_json(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (InputError when missing or not an object)."""
    path = directory / "config.json"
    if not path.is_file():
        raise InputError(
            f"{directory} has no config.json; pass a Hugging Face checkpoint directory"
        )
    return _read_json_object(path, "config file")


def _config_file(directory: Path, entry: dict[str, Any]) -> Path:
    """The config file an envelope names, checked to be a plain file inside ``directory``."""
    name = entry.get("config_file", KV_CONFIG_FILE)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ConfigError(
            f"config.json {CONFIG_KEY}.config_file is {name!r}; it must be a file name inside "
            "the checkpoint (re-export the checkpoint with sawquant export)"
        )
    path = directory / name
    root = directory.resolve()
    if path.exists() and not path.resolve().is_relative_to(root):
        raise ConfigError(
            f"{path} points outside the checkpoint directory; sawquant reads the KV config only "
            "from inside it (re-export the checkpoint)"
        )
    return path


def _entry(hf_json: dict[str, Any], where: str) -> dict[str, Any] | None:
    entry = hf_json.get(CONFIG_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("method") != "sawquant":
        raise ConfigError(
            f"{where} config.json {CONFIG_KEY} is {entry!r}, not a sawquant entry; re-export "
            "the checkpoint with sawquant export"
        )
    return entry


def read_kv_config(path: str | os.PathLike, **hub_kwargs: Any) -> KVConfig | None:
    """The KVConfig a checkpoint carries, or None when its config.json has no
    ``kv_cache_quantization`` key. ``path`` is a local directory or a Hub id (``hub_kwargs``:
    revision, token, cache_dir). Raises InputError / ConfigError with a one-line fix."""
    directory = local_checkpoint(path)
    if directory is None:
        return _read_hub_kv_config(os.fspath(path), hub_kwargs)
    entry = _entry(read_config_json(directory), str(directory))
    if entry is None:
        return None
    file = _config_file(directory, entry)
    if not file.is_file():
        raise ConfigError(
            f"config.json names {file.name!r} but {directory} has no such file; re-export the "
            "checkpoint with sawquant export"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {file} ({type(err).__name__}); re-export it") from None
    return KVConfig.from_json(text)


def _read_hub_kv_config(repo: str, hub_kwargs: dict[str, Any]) -> KVConfig | None:
    from transformers.utils import cached_file

    hub = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir")}

    def fetch(name: str) -> Path | None:
        resolved = cached_file(repo, name, _raise_exceptions_for_missing_entries=False, **hub)
        return Path(resolved) if resolved else None

    config = fetch("config.json")
    if config is None:
        raise InputError(f"{repo} has no config.json; pass a Hugging Face checkpoint")
    entry = _entry(_read_json_object(config, "config file"), repo)
    if entry is None:
        return None
    file = _config_file(config.parent, entry)
    body = fetch(file.name)
    if body is None:
        raise ConfigError(f"config.json names {file.name!r} but {repo} has no such file")
    return KVConfig.from_json(body.read_text(encoding="utf-8"))


def is_export(directory: str | os.PathLike) -> bool:
    """True when ``directory`` is a sawquant export (config.json with our key, and the
    config file it names). Used to decide what ``export --force`` may replace."""
    directory = Path(directory)
    try:
        entry = _entry(read_config_json(directory), str(directory))
        return entry is not None and _config_file(directory, entry).is_file()
    except (InputError, ConfigError):
        return False
