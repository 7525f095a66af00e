"""``sawquant export``: write a calibrated KV config into a checkpoint (optionally folding V)."""

from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table


@click.command()
@click.argument("model", required=False)
@click.option(
    "-c",
    "--calibration",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="calibration.json from `sawquant calibrate` (or a bare sawquant_kv.json config).",
)
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output checkpoint directory (created atomically; the source is never modified).",
)
@click.option(
    "--fold-values/--no-fold-values",
    default=False,
    show_default=True,
    help="Fold each layer's value rotation into v_proj/o_proj (exact; no V rotation at run time).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it is an earlier sawquant export (never any other directory).",
)
@click.option(
    "--check-weights/--no-check-weights",
    default=True,
    show_default=True,
    help="Read every weight once before writing and refuse unreadable or NaN/Inf weights.",
)
def export(
    model: str | None,
    calibration: Path,
    out: Path,
    fold_values: bool,
    force: bool,
    check_weights: bool,
) -> None:
    """Export MODEL (a checkpoint directory or an offline model's name such as gemma3-270m;
    default: the demo model) with its KV config to OUT."""
    from sawquant.calibration import load_calibration
    from sawquant.cli.progress import StageProgress
    from sawquant.export import export_checkpoint

    console = Console()
    config = load_calibration(calibration).config
    with StageProgress({"weights": "checking the weights"}) as progress:
        result = export_checkpoint(
            model,
            config=config,
            out=out,
            fold_values=fold_values,
            force=force,
            protect=[calibration],
            check_weights=check_weights,
            progress=progress,
        )

    cfg = result.config
    m = cfg.model
    table = Table(title=f"exported {result.out}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # long paths wrap instead of being cut
    table.add_row("source", str(result.source))
    table.add_row(
        "model",
        f"{m.model_type or '?'}: {m.num_layers} layers, "
        f"{m.num_kv_heads} KV heads, head_dim {m.head_dim}",
    )
    table.add_row(
        "files",
        f"{len(result.linked)} hard-linked, {len(result.copied)} copied, "
        f"{len(result.rewritten)} rewritten, {len(result.written)} written",
    )
    if result.rewritten:
        table.add_row("rewritten", ", ".join(result.rewritten))
    for side in ("k", "v"):
        # The calibrated rotations (the written config has identity V rotations once folded).
        blocks = Counter(getattr(layer, side).rotation_block for layer in config.layers)
        fallbacks = sum(len(getattr(layer, side).fallback_heads) for layer in cfg.layers)
        summary = ", ".join(f"block {b} x{n}" for b, n in sorted(blocks.items()))
        if side == "v" and cfg.values_folded:
            summary += " (folded into the weights)"
        table.add_row(f"{side.upper()} rotation", f"{summary}; {fallbacks} fallback head(s)")
    folded = (
        f"yes ({len(result.folded_layers)} layer(s) folded into v_proj/o_proj)"
        if cfg.values_folded
        else "no (the runtime rotates V)"
    )
    table.add_row("values folded", folded)
    table.add_row("average bits", f"{cfg.average_bits():.2f} per cached K/V element")
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    # How to serve it (docs/runtime.md, docs/vllm.md): the plugin reads the config from OUT.
    out_arg = shlex.quote(str(result.out))
    console.print("serve it:", highlight=False)
    console.print(f"  vllm serve {out_arg}   (after: pip install \"sawquant\\[vllm]\")",
                  highlight=False, soft_wrap=True)  # fmt: skip
    console.print(f"  sawquant.from_pretrained({str(result.out)!r})   (transformers generate)",
                  highlight=False, soft_wrap=True, markup=False)  # fmt: skip
