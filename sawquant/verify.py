"""Prove a quantized checkpoint's accuracy through the real runtime path.

``verify`` measures, on held-out text:

1. **Simulated** perplexity (the papers' convention: every cached K/V quantized during one
   full-window forward) for full precision, naive INT4 (no rotation, no fallback), the paper's
   fixed configuration (rotation block = head_dim on K only) and the checkpoint's own config.
2. **Runtime** accuracy, what a deployment sees: each window's prefix is prefilled through the
   installed runtime, then the rest is teacher-forced one token at a time through the paged INT4
   cache and the decode kernel (its torch twin on CPU). Every scored position is a decode step:
   perplexity, mean KL divergence of the next-token distribution against full precision, and
   top-1 agreement.
3. A **verdict**: the runtime perplexity increase must stay under ``max_ppl_increase`` percent
   and the recovery (the share of naive INT4's simulated loss that the config wins back) must
   reach ``min_recovery`` percent.

The library never prints; ``progress(stage, done, total)`` reports progress to a caller.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sawquant.accuracy import recovery, recovery_with_ci
from sawquant.checkpoint import is_export
from sawquant.config import SUPPORTED_BLOCKS, KVConfig, ModelFacts, SideConfig
from sawquant.errors import InputError, RuntimeBypassError

__all__ = [
    "DEFAULT_MAX_PPL_INCREASE",
    "DEFAULT_MIN_RECOVERY",
    "DEFAULT_DECODED",
    "DEFAULT_PREFIX",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_TOKENS",
    "default_prefix",
    "RuntimeScores",
    "demo_export",
    "demo_export_dir",
    "VerifyReport",
    "fixed_config",
    "held_out_text",
    "held_out_windows",
    "naive_config",
    "recovery",
    "runtime_scores",
    "verify",
]

# Defaults: 16 windows of 1024 tokens, enough windows for a bootstrap interval that means
# something (the accuracy standard of the project), the last 63 positions of each teacher-forced
# through the decode path (1008 scored positions per runtime, as many as the earlier 8 x 512
# default's 1016). Time on the demo: docs/verify.md.
DEFAULT_TOKENS = 16 * 1024
DEFAULT_SEQ_LEN = 1024
DEFAULT_DECODED = 63  # decoded positions per window when no prefix is given
DEFAULT_PREFIX = None  # seq_len - 1 - DEFAULT_DECODED (at least 1)


def default_prefix(seq_len: int) -> int:
    """The prefill length when none is given: all but the last DEFAULT_DECODED + 1 tokens."""
    return max(1, seq_len - 1 - DEFAULT_DECODED)


# Thresholds from the same measurements: calibrated demo configs at +0.3 to +3.1% runtime
# perplexity and 74-94% recovery, naive INT4 at +7.6 to +8.2% and 0% by definition, the paper's
# fixed block at 54% recovery; a runtime that reads keys with the wrong rotation: +78,000%.
DEFAULT_MAX_PPL_INCREASE = 5.0  # percent, runtime sawquant vs runtime full precision
DEFAULT_MIN_RECOVERY = 50.0  # percent of naive INT4's simulated loss won back

Progress = Callable[[str, int, int], None]


# -- baselines ------------------------------------------------------------------------------
def naive_config(facts: ModelFacts) -> KVConfig:
    """INT4 on every head of K and V: no rotation, no fallback."""
    return KVConfig.uniform(facts, SideConfig(bits=4), SideConfig(bits=4))


def fixed_config(facts: ModelFacts) -> KVConfig:
    """The paper's fixed configuration: K rotated with block = head_dim, V plain INT4.

    For a head_dim that is not a supported block (80, 96, 192) the largest supported block that
    divides it is used.
    """
    block = max(b for b in SUPPORTED_BLOCKS if facts.head_dim % b == 0)
    return KVConfig.uniform(facts, SideConfig(bits=4, rotation_block=block), SideConfig(bits=4))


# -- runtime measurement --------------------------------------------------------------------
@dataclass(frozen=True)
class RuntimeScores:
    """Runtime accuracy on the teacher-forced positions of every window."""

    ppl_full: float  # full precision, same positions
    ppl: float  # through the runtime
    kl: float  # mean KL(full || runtime) of next-token distributions, nats
    top1_agreement: float  # share of positions where both argmaxes agree
    positions: int  # scored positions over all windows
    # Full precision over every prediction of the windows (N * (L - 1)): the same number as
    # ``simulated_perplexity(model, windows, None)``, from the reference forward it needs anyway.
    ppl_full_windows: float = math.nan
    # The same predictions' summed NLL per window ([N] float64): the full-precision side of the
    # bootstrap interval of the recovery.
    full_window_nlls: torch.Tensor | None = None
    # Layer-steps the sawquant paged decode served (0 when the runtime is not sawquant's), and
    # the one-token forward passes that should have produced them (one per layer each).
    decode_calls: int = 0
    decode_steps: int = 0


def _full_logprobs(model, windows: torch.Tensor, start: int) -> tuple[torch.Tensor, list[float]]:
    """Full-precision next-token log-probs at positions start..L-2 of every window, and each
    window's summed NLL of all its L - 1 predictions.

    windows: [N, L] -> ([N, L - 1 - start, V] float32, N floats) (position t predicts t + 1).
    """
    out, nlls = [], []
    for row in windows:
        logits = model(input_ids=row[None], use_cache=False).logits  # [1, L, V]
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # [L - 1, V]
        nlls.append(-logp.gather(-1, row[1:, None]).sum().item())
        out.append(logp[start:])
    return torch.stack(out), nlls


def _runtime_logprobs(
    model, windows: torch.Tensor, prefix: int, progress: Progress | None, score: Callable
) -> int:
    """Log-probs of the runtime model: prefill ``prefix`` tokens, then one token per step.

    windows: [N, L]. Step j feeds token prefix + j (j = 0..L-2-prefix) through the decode path
    and hands its prediction of token prefix + j + 1 to ``score(j, logp)`` (logp: [N, V]
    float32), which keeps what it needs: no [N, steps, vocab] tensor is ever held (1 GB per
    runtime at Gemma's 262k vocabulary). All windows decode together as one batch (one
    sequence each in the paged cache). Returns the layer steps the sawquant decode served.
    """
    from sawquant.runtime.hf.compat import cache_kwargs, returned_cache

    n, length = windows.shape
    # Only the cache is needed from the prefill: its logits for every prompt position would be
    # [N, prefix, vocab] floats (3.2 GB at Gemma's vocabulary, 8 x 384 tokens).
    out = model(input_ids=windows[:, :prefix], use_cache=True, logits_to_keep=1)
    past = returned_cache(out)
    steps = length - 1 - prefix
    for j in range(steps):
        tok = windows[:, prefix + j : prefix + j + 1]  # [N, 1]
        out = model(input_ids=tok, use_cache=True, **cache_kwargs(model, past))
        past = returned_cache(out)
        score(j, torch.log_softmax(out.logits[:, -1].float(), dim=-1))  # [N, V]
        if progress is not None:
            progress("runtime", j + 1, steps)
    # How many layer steps the sawquant decode served: the proof the INT4 path ran.
    return past.calls["decode"] if hasattr(past, "calls") else 0


def runtime_scores(
    model,
    windows: torch.Tensor,
    *,
    prefix: int,
    patches: Mapping[str, Callable[[Any], None]],
    unpatch: Callable[[Any], None],
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, RuntimeScores]:
    """Score each runtime ``patches[name](model)`` installs against the unpatched model.

    windows: [N, L] token ids on the model's device; ``0 < prefix < L - 1``. Windows are decoded
    ``batch_size`` at a time; the full-precision reference forward runs once per batch for all
    runtimes (memory: ``batch_size * L * vocab`` floats). The model is unpatched after each
    runtime, also on error. Returns ``{name: RuntimeScores}``.
    """
    n, length = windows.shape
    if not 0 < prefix < length - 1:
        raise InputError(
            f"prefix {prefix} must be between 1 and {length - 2} for windows of {length} tokens; "
            "use a shorter prefix"
        )
    steps = length - 1 - prefix
    # Per runtime: nll full, nll runtime, kl, top-1 agreements (sums over positions).
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in patches}
    decode_calls = dict.fromkeys(patches, 0)
    decode_steps = 0  # forward passes of one token per sequence, per runtime
    nll_windows: list[float] = []
    total = -(-n // batch_size) * len(patches) * steps
    done = 0

    def step_progress(stage: str, step: int, _total: int) -> None:
        if progress is not None:
            progress(stage, done + step, total)

    for start in range(0, n, batch_size):
        rows = windows[start : start + batch_size]  # [B, L]
        decode_steps += steps
        targets = rows[:, prefix + 1 :, None]  # [B, C, 1] tokens predicted by the decode steps
        with torch.inference_mode():
            ref, nlls = _full_logprobs(model, rows, prefix)  # [B, C, V]
            nll_windows += nlls
            for name, patch in patches.items():
                acc = sums[name]

                def score(j: int, got: torch.Tensor, acc=acc) -> None:
                    r, t = ref[:, j], targets[:, j]  # [B, V], [B, 1]
                    acc += torch.tensor(
                        [
                            -r.gather(-1, t).sum().item(),
                            -got.gather(-1, t).sum().item(),
                            (r.exp() * (r - got)).sum().item(),  # KL(full || runtime)
                            (r.argmax(-1) == got.argmax(-1)).sum().item(),
                        ],
                        dtype=torch.float64,
                    )

                patch(model)
                try:
                    decode_calls[name] += _runtime_logprobs(
                        model, rows, prefix, step_progress, score
                    )
                finally:
                    unpatch(model)
                done += steps
    count = n * steps
    ppl_windows = math.exp(sum(nll_windows) / (n * (length - 1)))
    full_nlls = torch.tensor(nll_windows, dtype=torch.float64)
    scores = {}
    for name, total_ in sums.items():
        nll_ref, nll_got, kl_mean, agree = (total_ / count).tolist()
        scores[name] = RuntimeScores(
            ppl_full=math.exp(nll_ref),
            ppl=math.exp(nll_got),
            kl=max(kl_mean, 0.0),  # >= 0 in exact arithmetic; float noise can dip below
            top1_agreement=agree,
            positions=count,
            ppl_full_windows=ppl_windows,
            full_window_nlls=full_nlls,
            decode_calls=decode_calls[name],
            decode_steps=decode_steps,
        )
    return scores


# -- the report -----------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """Everything ``verify`` measured. ``to_dict()`` is the JSON report."""

    model: str
    tokens: int
    simulated: dict[str, dict[str, float]]  # full / naive_int4 / saw_fixed / sawquant
    runtime: dict[str, dict[str, float]]  # full / sawquant (/ naive_int4)
    recovery: float
    passed: bool
    ppl_increase_pct: float  # runtime sawquant vs runtime full, percent
    max_ppl_increase_pct: float
    min_recovery_pct: float
    windows: int
    seq_len: int
    prefix: int
    scored_positions: int
    data: str
    config_source: str  # "checkpoint", a calibration file, or "fixed"
    config_summary: dict[str, Any]
    device: str
    timings_s: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    recovery_ci95: tuple[float, float] | None = None  # bootstrap over windows

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable report (stable keys first; extras after)."""
        return {
            "model": self.model,
            "tokens": self.tokens,
            "simulated": self.simulated,
            "runtime": self.runtime,
            "recovery": self.recovery,
            "recovery_ci95": None if self.recovery_ci95 is None else list(self.recovery_ci95),
            "passed": self.passed,
            "ppl_increase_pct": self.ppl_increase_pct,
            "thresholds": {
                "max_ppl_increase_pct": self.max_ppl_increase_pct,
                "min_recovery_pct": self.min_recovery_pct,
            },
            "failures": list(self.failures),
            "windows": self.windows,
            "seq_len": self.seq_len,
            "prefix": self.prefix,
            "scored_positions": self.scored_positions,
            "data": self.data,
            "config_source": self.config_source,
            "config": self.config_summary,
            "device": self.device,
            "timings_s": self.timings_s,
        }


def verdict(
    *, ppl_increase_pct: float, recovery_: float, max_ppl_increase: float, min_recovery: float
) -> list[str]:
    """The failed checks, one sentence each (empty = pass)."""
    failures = []
    if not ppl_increase_pct <= max_ppl_increase:  # also catches NaN
        failures.append(
            f"runtime perplexity increase {ppl_increase_pct:.2f}% exceeds {max_ppl_increase:g}%"
        )
    if not recovery_ * 100 >= min_recovery:
        failures.append(
            f"recovery {recovery_ * 100:.1f}% of naive INT4's loss is below {min_recovery:g}%"
        )
    return failures


def config_summary(config: KVConfig) -> dict[str, Any]:
    """A short description of a config for the report."""
    heads = config.model.num_kv_heads
    fallback = sum(len(getattr(lc, s).fallback_heads) for lc in config.layers for s in "kv")
    blocks: dict[str, int] = {}
    for lc in config.layers:
        key = str(lc.k.rotation_block)
        blocks[key] = blocks.get(key, 0) + 1
    return {
        "avg_bits": config.average_bits(),
        "values_folded": config.values_folded,
        "k_rotation_blocks": blocks,  # block -> number of layers
        "fallback_heads": fallback,
        "kv_heads_total": 2 * heads * config.model.num_layers,
    }


# -- inputs ---------------------------------------------------------------------------------
def _check_sizes(tokens: int, seq_len: int, prefix: int) -> None:
    if tokens < seq_len:
        raise InputError(
            f"--tokens {tokens} is shorter than one window of {seq_len} tokens; "
            f"use --tokens {seq_len} or more"
        )
    if not 0 < prefix < seq_len - 1:
        raise InputError(
            f"prefix {prefix} must be between 1 and {seq_len - 2} for windows of {seq_len} "
            "tokens; use a shorter prefix"
        )


def held_out_text(data: str | Path) -> tuple[str, str]:
    """(text, description). ``"demo"`` is the demo's evaluation split, disjoint from calibration."""
    from sawquant import data as text_data

    if str(data) == "demo":
        return text_data.evaluation_text(), "demo (evaluation split)"
    return text_data.load_text(data), str(data)


def held_out_windows(tokenizer, text: str, *, tokens: int, seq_len: int) -> torch.Tensor:
    from sawquant import data as text_data

    num = tokens // seq_len
    try:
        return text_data.token_windows(tokenizer, text, num=num, seq_len=seq_len)
    except InputError as err:
        found = str(err).split(";")[0]  # "text has X tokens, needs Y"
        raise InputError(
            f"{found}: verify needs {num} windows of {seq_len} tokens; "
            "pass a smaller --tokens or a longer --data text"
        ) from None


def load_config_file(path: str | Path) -> KVConfig:
    """The KV config in a calibration file (``sawquant calibrate`` output) or a bare config."""
    from sawquant.calibration import load_calibration

    return load_calibration(path).config


def no_config_message(path: str | Path) -> str:
    return (
        f"{path} is not a sawquant export (no KV config in it), so there is no config to verify; "
        f"compare on it with `sawquant verify {path} --config calibration.json` "
        f"(or `--config fixed` for the plain full / naive INT4 / fixed-block comparison), "
        f"or export it first with `sawquant export {path} -c calibration.json -o OUT`"
    )


# -- the demo export ------------------------------------------------------------------------
def demo_export_dir() -> Path:
    """Where the demo export lives in the sawquant cache. The name changes with everything that
    shapes it (sawquant version, demo conversion, demo recipe), so a stale one is never reused."""
    import hashlib

    import sawquant
    from sawquant.calibration import load_recipe
    from sawquant.demo import cache_root, demo_checkpoint_dir

    key = json.dumps(
        [sawquant.__version__, demo_checkpoint_dir().name, load_recipe("demo").to_dict()],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_root() / f"demo-sawquant-export-{digest}"


def demo_export(progress: Progress | None = None) -> Path:
    """The demo model exported with its calibrated config; built on first use, then reused.

    Calibrates with the demo recipe on the calibration split (disjoint from the evaluation
    split verify reads) and exports without folding, so baselines run on the original weights.
    The export is atomic, so an interrupted build leaves nothing half-written behind.
    """
    from sawquant.calibration import calibrate_checkpoint, load_recipe
    from sawquant.export import export_checkpoint

    target = demo_export_dir()
    if is_export(target):
        return target

    def step(stage: str, done: int, total: int) -> None:
        if progress is not None and stage == "capture":
            progress("demo", done, total)

    result = calibrate_checkpoint(None, recipe=load_recipe("demo"), progress=step)
    export_checkpoint(None, result.config, target, force=True, check_weights=False)
    return target


# -- the entry point ------------------------------------------------------------------------
def verify(
    model_path: str | Path | None,
    *,
    data: str | Path = "demo",
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    prefix: int | None = DEFAULT_PREFIX,
    max_ppl_increase: float = DEFAULT_MAX_PPL_INCREASE,
    min_recovery: float = DEFAULT_MIN_RECOVERY,
    config: str | Path | KVConfig | None = None,
    runtime_baseline: bool = True,
    progress: Progress | None = None,
) -> VerifyReport:
    """Measure a sawquant checkpoint's accuracy, simulated and through the runtime.

    ``model_path`` is a checkpoint exported by sawquant (None: the demo model exported with its
    calibrated config, built once into the user cache). ``config`` overrides the checkpoint's
    config: a KVConfig, a calibration / ``sawquant_kv.json`` file, or ``"fixed"`` (the paper's
    fixed configuration); with it, ``model_path`` may be any supported HF checkpoint.
    ``tokens`` held-out tokens are cut into ``tokens // seq_len`` windows; the last
    ``seq_len - prefix - 1`` positions of each are teacher-forced through the decode path
    (``prefix`` None: :func:`default_prefix`, the last 63 positions).
    ``runtime_baseline`` also runs naive INT4 through the runtime (``runtime.naive_int4``), so
    the runtime numbers can be compared with the simulated ones in direction.
    Raises InputError / ConfigError for bad input.
    """
    from sawquant import models, runtime
    from sawquant.architectures import model_facts
    from sawquant.simulate import window_nlls

    prefix = default_prefix(seq_len) if prefix is None else prefix
    _check_sizes(tokens, seq_len, prefix)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if model_path is None:
        path = demo_export(progress=progress)
        label = "demo"
    else:
        from sawquant.offline import resolve_model

        path = resolve_model(model_path)  # an offline model's name: its plain converted copy
        if not path.exists():
            raise InputError(f"checkpoint {path} does not exist; pass a sawquant export directory")
        label = str(model_path)
    times["prepare"] = time.perf_counter() - t0

    # The config: the checkpoint's own, read as from_pretrained reads it, or the override.
    t0 = time.perf_counter()
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; pass a checkpoint directory from export")
    stored = runtime.read_kv_config(path)
    if stored is None and config is None:
        raise InputError(no_config_message(path if model_path is not None else "the demo"))
    # A config file is read before the model is loaded, so a bad path fails fast.
    from_file = None
    if config is not None and not isinstance(config, KVConfig) and str(config) != "fixed":
        from_file = load_config_file(config)
    model, tokenizer = models.load_model(path)
    facts = model_facts(model.config)
    if isinstance(config, KVConfig):
        cfg, source = config, "given"
    elif from_file is not None:
        cfg, source = from_file, str(config)
    elif config is not None:
        cfg, source = fixed_config(facts), "fixed"
    else:
        cfg, source = stored, "checkpoint"
    cfg.check_model(facts.num_layers, facts.num_kv_heads, facts.head_dim)
    device = model.get_input_embeddings().weight.device  # where input ids go (device_map too)
    model.eval()
    times["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text, data_label = held_out_text(data)
    windows = held_out_windows(tokenizer, text, tokens=tokens, seq_len=seq_len).to(device)
    times["data"] = time.perf_counter() - t0

    # 1. runtime (its full-precision reference forward also gives the simulated "full")
    t0 = time.perf_counter()
    naive = naive_config(facts)
    patches = {"sawquant": lambda m: runtime.patch(m, cfg)}
    if runtime_baseline:
        patches["naive_int4"] = lambda m: runtime.patch(m, naive)
    all_scores = runtime_scores(
        model, windows, prefix=prefix, patches=patches, unpatch=runtime.unpatch, progress=progress
    )
    scores = all_scores["sawquant"]
    if not math.isfinite(scores.ppl_full):
        raise InputError(
            f"the model's own full-precision perplexity is {scores.ppl_full} on this text, so "
            "there is nothing to compare against; the weights are broken (NaN/Inf) or the model "
            "overflows in its dtype (load it in float32 or bfloat16)"
        )
    times["runtime"] = time.perf_counter() - t0

    # 2. simulated: every cached K/V quantized in a full-window forward
    t0 = time.perf_counter()
    cases = {"naive_int4": naive, "saw_fixed": fixed_config(facts), "sawquant": cfg}
    simulated: dict[str, dict[str, float]] = {"full": {"ppl": scores.ppl_full_windows}}
    predictions = seq_len - 1
    nlls = {"full": scores.full_window_nlls}
    with torch.inference_mode():
        for i, (name, case) in enumerate(cases.items()):
            if progress is not None:
                progress("simulated", i, len(cases))
            nlls[name] = window_nlls(model, windows, case)
            ppl = math.exp(float(nlls[name].sum()) / (windows.shape[0] * predictions))
            simulated[name] = {"ppl": ppl}
    if progress is not None:
        progress("simulated", len(cases), len(cases))
    simulated["sawquant"]["avg_bits"] = cfg.average_bits()
    times["simulated"] = time.perf_counter() - t0

    # 3. verdict
    rec = recovery(
        simulated["full"]["ppl"], simulated["naive_int4"]["ppl"], simulated["sawquant"]["ppl"]
    )
    interval = recovery_with_ci(nlls["full"], nlls["naive_int4"], nlls["sawquant"], predictions)
    increase = (scores.ppl / scores.ppl_full - 1.0) * 100.0
    failures = verdict(
        ppl_increase_pct=increase,
        recovery_=rec,
        max_ppl_increase=max_ppl_increase,
        min_recovery=min_recovery,
    )
    expected_calls = scores.decode_steps * facts.num_layers
    for name, sc in all_scores.items():
        if sc.decode_calls != expected_calls:
            raise RuntimeBypassError(
                f"the {name} runtime served {sc.decode_calls} of {expected_calls} decode layer "
                "steps through the sawquant paged cache; its scores would not be the INT4 "
                "cache's (report this with your transformers version)"
            )
    runtime_report = {
        name: {
            "ppl": sc.ppl,
            "kl": sc.kl,
            "top1_agreement": sc.top1_agreement,
            "decode_calls": sc.decode_calls,
        }
        for name, sc in all_scores.items()
    }
    return VerifyReport(
        model=label,
        tokens=int(windows.numel()),
        simulated=simulated,
        runtime={"full": {"ppl": scores.ppl_full}, **runtime_report},
        recovery=rec,
        passed=not failures,
        ppl_increase_pct=increase,
        max_ppl_increase_pct=float(max_ppl_increase),
        min_recovery_pct=float(min_recovery),
        windows=int(windows.shape[0]),
        seq_len=seq_len,
        prefix=prefix,
        scored_positions=scores.positions,
        data=data_label,
        config_source=source,
        config_summary=config_summary(cfg),
        device=str(device),
        timings_s={k: round(v, 2) for k, v in times.items()},
        failures=failures,
        recovery_ci95=(interval.low, interval.high),
    )
