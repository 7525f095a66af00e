"""``sawquant calibrate``: measure a checkpoint's KV outliers and choose its per-layer KV config."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table


def _fallbacks(fb: dict[int, int]) -> str:
    return " ".join(f"h{h}:{'int8' if b == 8 else 'bf16'}" for h, b in sorted(fb.items())) or "-"


@click.command()
@click.argument("model", required=False)
@click.option(
    "--data",
    "data_source",
    default=None,
    metavar="PATH|demo",
    help="Calibration text: a .txt file, a .jsonl file with a 'text' field, or demo "
    "(the KJV calibration split). Default: the recipe's.",
)
@click.option("--samples", type=int, default=None, help="Number of windows (default: recipe).")
@click.option("--seq-len", type=int, default=None, help="Tokens per window (default: recipe).")
@click.option(
    "--recipe",
    "recipe_name",
    default=None,
    metavar="NAME|PATH",
    help="A shipped recipe (default, llama, qwen3, demo) or a YAML file. "
    "Default: chosen from the model family.",
)
@click.option(
    "--max-bits",
    "max_bits",
    type=float,
    default=None,
    help="Bit budget per cached K/V element, scales included (4.5 = plain INT4's memory). "
    "Default: the recipe's.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (accelerate device_map='auto' on GPUs, else CPU), cpu, cuda or cuda:N.",
)
@click.option(
    "--max-memory",
    default=None,
    metavar="SPEC",
    help="Per-device memory for accelerate, e.g. '0=70GiB,1=70GiB,cpu=200GiB'.",
)
@click.option(
    "-o",
    "--output",
    default="calibration.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where to write the calibration JSON.",
)
@click.option(
    "--plot",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write a PNG heatmap of per-layer/per-head outlier strength.",
)
def calibrate(
    model, data_source, samples, seq_len, recipe_name, max_bits, device, max_memory, output, plot
):
    """Profile MODEL's post-RoPE K/V outliers and choose, per layer, the Hadamard block size, the
    group size and the heads that fall back to INT8/BF16. MODEL is a local Hugging Face
    checkpoint directory or an offline model's name (gemma3-270m: docs/models.md); without it,
    the embedded demo model."""
    from sawquant.calibration import calibrate_checkpoint, load_recipe
    from sawquant.calibration.report import check_plotting, plot_outliers
    from sawquant.cli.progress import StageProgress
    from sawquant.fileio import check_output_file

    # Resolved now, so click's test runner captures it too; wide enough for the table in logs.
    out = Console(file=sys.stdout)
    out.width = max(out.width, 110)
    # Everything that can be wrong with the arguments fails before a model is loaded.
    check_output_file(output, "calibration output")
    if plot:
        check_plotting()
        check_output_file(plot, "plot")
    recipe = load_recipe(recipe_name) if recipe_name else None
    labels = {
        "load": "loading the model",
        "tokenize": "tokenizing calibration text",
        "capture": "capturing K/V/Q (forward passes)",
    }
    with StageProgress(labels) as progress:
        result = calibrate_checkpoint(
            model,
            recipe=recipe,
            data=data_source,
            samples=samples,
            seq_len=seq_len,
            max_avg_bits=max_bits,
            device=device,
            max_memory=max_memory,
            progress=progress,
        )
    recipe = result.recipe
    path = result.save(output)

    table = Table(
        title=f"sawquant calibrate: {result.model} (recipe {recipe.name})",
        caption="K/V: rotation block (+s: random signs, g: group size); naive/chosen: relative "
        "INT4 attention-output error, K and V combined",
    )
    for name, justify in (
        ("layer", "right"),
        ("K", "left"),
        ("V", "left"),
        ("K fallback", "left"),
        ("V fallback", "left"),
        ("naive", "right"),
        ("chosen", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)
    for row in result.layer_summaries():
        better = "green" if row.chosen_err < row.naive_err else "yellow"
        table.add_row(
            str(row.layer),
            row.k_choice,
            row.v_choice,
            _fallbacks(row.k_fallback),
            _fallbacks(row.v_fallback),
            f"{row.naive_err:.4f}",
            f"[{better}]{row.chosen_err:.4f}[/]",
        )
    out.print(table)
    stats = result.stats
    mem = stats["peak_memory"]
    peak = max(mem["rss_bytes"], mem["cuda_bytes"])
    out.print(
        f"average bits per cached element (scales included): [bold]{result.avg_bits:.3f}[/] "
        f"(budget {recipe.max_avg_bits}); {stats['windows']} windows x {stats['seq_len']} tokens "
        f"in {stats['wall_s']:.1f} s; peak memory {peak / 2**30:.2f} GiB "
        f"(statistics {mem['stats_bytes'] / 2**20:.2f} MiB)"
    )
    out.print(
        f"wrote [bold]{path}[/]; next: sawquant export {model or ''} -c {path} -o OUT".replace(
            "  ", " "
        )
    )
    if plot:
        out.print(f"wrote [bold]{plot_outliers(result, plot)}[/]")
