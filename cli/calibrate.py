"""``sawquant calibrate``: measure a checkpoint's KV outliers and choose its per-layer KV config."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sawquant.errors import InputError


def _fallbacks(fb: dict[int, int]) -> str:
    return " ".join(f"h{h}:{'int8' if b == 8 else 'bf16'}" for h, b in sorted(fb.items())) or "-"


def _device_map(device: str):
    import torch

    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"--device {device!r} unknown; use auto, cpu, cuda or cuda:N")
    return device


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
def calibrate(model, data_source, samples, seq_len, recipe_name, device, max_memory, output, plot):
    """Profile MODEL's post-RoPE K/V outliers and choose, per layer, the Hadamard block size, the
    group size and the heads that fall back to INT8/BF16. MODEL is a local Hugging Face
    checkpoint directory; without it, the embedded demo model."""
    from sawquant import data as text_data
    from sawquant.architectures import model_facts
    from sawquant.calibration import calibrate as run_calibration
    from sawquant.calibration import default_recipe_name, load_recipe
    from sawquant.calibration.report import check_plotting, plot_outliers
    from sawquant.models import load_model

    err = Console(file=sys.stderr)
    # Resolved now, so click's test runner captures it too; wide enough for the table in logs.
    out = Console(file=sys.stdout)
    out.width = max(out.width, 110)
    if plot:
        check_plotting()
    # A bad recipe fails before a large model is loaded.
    recipe = load_recipe(recipe_name) if recipe_name else None
    with err.status("loading model..."):
        mdl, tokenizer = load_model(model, device_map=_device_map(device), max_memory=max_memory)
    facts = model_facts(mdl.config)
    if recipe is None:
        recipe = load_recipe(default_recipe_name(facts.model_type, demo=model is None))
    recipe = recipe.replace(data=data_source, samples=samples, seq_len=seq_len)
    with err.status("tokenizing calibration text..."):
        text = text_data.load_text(recipe.data)
        windows = text_data.token_windows(
            tokenizer, text, num=recipe.samples, seq_len=recipe.seq_len
        )

    columns = (
        SpinnerColumn(),
        TextColumn("[bold]capturing K/V/Q"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("calibrate", total=recipe.samples)
        result = run_calibration(
            model=mdl,
            tokenizer=tokenizer,
            windows=windows,
            recipe=recipe,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            model_name=model or "demo (SmolLM2-135M-Instruct)",
            data_name=recipe.data,
        )
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
