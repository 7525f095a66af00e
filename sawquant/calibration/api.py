"""``calibrate``: measure a model's KV cache on calibration windows and choose its KV config.

``calibration.json`` (written by :meth:`CalibrationResult.save`, read by :func:`load_calibration`)::

    {"config":   <KVConfig.to_dict()>,            # what export/runtime consume
     "avg_bits": 4.93,                            # per cached element, scales included
     "model": "path or name", "data": "demo",
     "recipe":   <Recipe.to_dict()>,
     "stats": {"candidates": [{"bits", "block", "sign_seed", "group_size"}, ...],
               "windows": 16, "seq_len": 512, "tokens": 8192, "query_samples": 128,
               "wall_s": 95.1, "peak_memory": {"rss_bytes", "cuda_bytes", "stats_bytes"},
               "layers": [{"k": {"absmax": [H], "outlier_ratio": [H], "kurtosis": [H],
                                 "sqnr_db": [[H] per candidate], "attn_err": [[H] per candidate],
                                 "naive_err": [H], "int4_err": [H], "chosen_err": [H]},
                           "v": {...}}, ...]}}

Errors are relative attention-output errors ``||O_hat - O|| / ||O||`` (not squared).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sawquant.calibration.capture import intercept_attention
from sawquant.calibration.recipe import Recipe
from sawquant.calibration.select import SideChoice, select
from sawquant.calibration.stats import SIDES, Candidate, StatsAccumulator, make_candidates
from sawquant.config import KVConfig, LayerConfig, SideConfig
from sawquant.errors import ConfigError, InputError
from sawquant.fileio import write_text_atomic
from sawquant.simulate import input_device

__all__ = [
    "CalibrationResult",
    "LayerSummary",
    "calibrate",
    "calibrate_checkpoint",
    "load_calibration",
]

Progress = Callable[[int, int], None]
StageProgress = Callable[[str, int, int], None]
# Text sources that are held out for evaluation: calibrating on them would make every accuracy
# figure measured on them meaningless.
HELD_OUT_SOURCES = ("demo:evaluation", "pydocs")


@dataclass(frozen=True)
class LayerSummary:
    """One row of the summary table."""

    layer: int
    k_choice: str
    v_choice: str
    k_fallback: dict[int, int]
    v_fallback: dict[int, int]
    naive_err: float  # relative attention-output error, K and V errors combined (rms)
    chosen_err: float


@dataclass
class CalibrationResult:
    config: KVConfig
    stats: dict = field(default_factory=dict)
    recipe: Recipe | None = None
    model: str = ""
    data: str = ""

    @property
    def avg_bits(self) -> float:
        return self.config.average_bits()

    def layer_summaries(self) -> list[LayerSummary]:
        rows = []
        layer_stats = self.stats.get("layers") or [{} for _ in self.config.layers]
        for i, (layer, st) in enumerate(zip(self.config.layers, layer_stats)):

            def rms(key: str) -> float:
                vals = [e * e for s in SIDES for e in st.get(s, {}).get(key, [])]
                return math.sqrt(sum(vals) / len(vals)) if vals else float("nan")

            rows.append(
                LayerSummary(
                    layer=i,
                    k_choice=_describe(layer.k),
                    v_choice=_describe(layer.v),
                    k_fallback=dict(layer.k.fallback_heads),
                    v_fallback=dict(layer.v.fallback_heads),
                    naive_err=rms("naive_err"),
                    chosen_err=rms("chosen_err"),
                )
            )
        return rows

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "avg_bits": round(self.avg_bits, 6),
            "model": self.model,
            "data": self.data,
            "recipe": self.recipe.to_dict() if self.recipe else None,
            "stats": self.stats,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationResult:
        if not isinstance(data, dict):
            raise ConfigError("calibration file must hold a JSON object; re-run sawquant calibrate")
        if "config" not in data:  # a bare KVConfig (sawquant_kv.json)
            return cls(config=KVConfig.from_dict(data))
        recipe = data.get("recipe")
        return cls(
            config=KVConfig.from_dict(data["config"]),
            stats=data.get("stats") or {},
            recipe=Recipe.from_dict(recipe, "calibration recipe") if recipe else None,
            model=data.get("model") or "",
            data=data.get("data") or "",
        )

    @classmethod
    def from_json(cls, text: str) -> CalibrationResult:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"calibration file is not valid JSON ({err}); re-run sawquant calibrate"
            ) from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file in the same directory, then rename)."""
        return write_text_atomic(path, self.to_json() + "\n", "calibration output")


def load_calibration(path: str | os.PathLike) -> CalibrationResult:
    """Read ``calibration.json`` (or a bare KV config JSON); ``result.config`` is the KVConfig."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(
            f"calibration file {str(path)!r} does not exist; create it with sawquant calibrate"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(
            f"calibration file {str(path)!r} is not a text JSON file ({type(err).__name__}); "
            "give the calibration.json written by sawquant calibrate"
        ) from None
    return CalibrationResult.from_json(text)


def _describe(side: SideConfig) -> str:
    if side.bits != 4:
        return "INT8 (whole)" if side.bits == 8 else "BF16 (whole)"
    seed = "" if side.sign_seed is None else f"+s{side.sign_seed}"
    group = "" if side.group_size is None else f" g{side.group_size}"
    extra = (" +center" if side.center is not None else "") + (
        " +smooth" if side.smooth is not None else ""
    )
    return f"b{side.rotation_block}{seed}{group}{extra}"


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _forward(model: Any, ids: torch.Tensor) -> None:
    try:
        # Only the attention inputs matter: skip the vocabulary projection of all positions.
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except TypeError:
        model(input_ids=ids, use_cache=False)


FISHER_POSITIONS = 256  # predictions whose loss the Fisher backward differentiates


def _forward_backward(model: Any, ids: torch.Tensor, acc: StatsAccumulator) -> None:
    """Forward and backward of the summed next-token loss, so that the output hooks see
    dL/dO at every attention layer. Gradients flow from the input embeddings only (the caller
    freezes the parameters): no weight gradients are allocated. Only the last
    ``FISHER_POSITIONS`` predictions enter the loss: their gradient still reaches every
    earlier position's attention output through the keys and values, while the vocabulary
    logits (152k wide for Qwen2, the largest activation) stay small.

    Memory: every decoder layer is checkpointed (:func:`_recompute_layers`), so the forward
    keeps only each layer's input and the backward recomputes one layer at a time; the
    accumulator is paused meanwhile, so the recomputed attention calls are not measured again.
    """
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    keep = min(FISHER_POSITIONS + 1, ids.shape[1])
    with _recompute_layers(model):
        try:
            logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep: every position, then the last ones
            logits = model(inputs_embeds=emb, use_cache=False).logits[:, -keep:]
        target = ids[0, -keep + 1 :].to(logits.device)
        loss = summed_cross_entropy(logits[0, :-1], target)
        del logits
        acc.paused = True
        try:
            loss.backward()
        finally:
            acc.paused = False


LOSS_CHUNK = 64  # predictions per log-softmax in summed_cross_entropy


def summed_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, chunk: int = LOSS_CHUNK
) -> torch.Tensor:
    """``cross_entropy(logits.float(), target, reduction="sum")`` for [n, V] logits, ``chunk``
    rows at a time, each chunk checkpointed: autograd keeps no float32 log-softmax of all
    rows (at vocabulary 152k, 156 MB per 256 rows, and as much again for its gradient) but
    recomputes each chunk's during the backward. Equal to the unchunked loss up to the order
    of the final sum; so are its gradients."""
    from torch.utils.checkpoint import checkpoint

    def part(lg: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(lg.float(), tg, reduction="sum")

    parts = [
        checkpoint(part, lg, tg, use_reentrant=False) if lg.requires_grad else part(lg, tg)
        for lg, tg in zip(logits.split(chunk), target.split(chunk))
    ]
    return torch.stack(parts).sum()


def _decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The modules that hold each attention module (the decoder layers), in layer order."""
    from sawquant.architectures import attention_modules

    names = {id(m): n for n, m in model.named_modules()}
    layers = []
    for attn in attention_modules(model):
        parent = names[id(attn)].rpartition(".")[0]
        layer = model.get_submodule(parent) if parent else None
        if layer is None or layer is model:
            return []  # attention directly under the model: nothing to checkpoint
        if not layers or layers[-1] is not layer:
            layers.append(layer)
    return layers


@contextlib.contextmanager
def _recompute_layers(model: Any) -> Iterator[None]:
    """Within the block, every decoder layer runs under non-reentrant activation checkpointing
    when gradients are enabled: its activations are dropped after the forward and recomputed
    during the backward. The autograd graph stays the forward's (gradient hooks on its
    tensors fire as usual), and checkpoint restores the RNG state, so the recomputation
    repeats the forward exactly."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    for layer in _decoder_layers(model):
        inner = layer.forward  # the class's, or an instance wrapper (accelerate's hooks)

        def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        patched.append((layer, layer.__dict__.get("forward")))
        layer.forward = forward
    try:
        yield
    finally:
        for layer, previous in patched:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def calibrate(
    model: Any,
    tokenizer: Any,
    windows: torch.Tensor,
    recipe: Recipe,
    progress: Progress | None = None,
    *,
    model_name: str = "",
    data_name: str = "",
) -> CalibrationResult:
    """Capture K/V/Q over ``windows`` ([N, L] token ids), measure every candidate, choose a config.

    ``progress(done, total)`` is called once before the first window (``done`` 0) and after
    each. Memory stays bounded: statistics are per-head sums, and windows run one at a time
    without a KV cache; the first ``recipe.fisher_windows`` windows also run one backward
    pass, with every decoder layer checkpointed (each layer's input kept, its activations
    recomputed) and the loss's log-softmax computed in chunks.
    """
    from sawquant.architectures import model_facts

    del tokenizer  # the windows are already tokenized; kept for a uniform signature
    facts = model_facts(model.config)
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise InputError(f"windows must be [num, seq_len] token ids, got {tuple(windows.shape)}")
    candidates = make_candidates(
        facts.head_dim, recipe.blocks, recipe.sign_seeds, recipe.group_sizes, recipe.transforms
    )
    acc = StatsAccumulator(
        num_layers=facts.num_layers,
        num_kv_heads=facts.num_kv_heads,
        head_dim=facts.head_dim,
        candidates=candidates,
        query_samples=recipe.query_samples,
        seed=recipe.seed,
    )
    device = input_device(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    total = windows.shape[0]
    n_fisher = min(recipe.fisher_windows, total)
    # Phases: the channel statistics of the transforms (a cheap forward of the first windows),
    # then every window measured, all candidates on the first pilot windows and the most
    # promising ones after. The first n_fisher windows also run backward (the Fisher weights);
    # the statistics of every window come from the same forward.
    n_transform = min(recipe.transform_windows, total) if acc.transform_phase else 0
    steps = n_transform + total
    if progress is not None:
        progress(0, steps)
    with _frozen(model), intercept_attention(model, acc, on_output=acc.observe_output):
        with torch.inference_mode():
            for i in range(n_transform):
                _forward(model, windows[i : i + 1].to(device))
                if progress is not None:
                    progress(i + 1, steps)
        if n_transform:
            acc.finish_transforms()
        for i in range(total):
            acc.new_window()
            ids = windows[i : i + 1].to(device)
            if i < n_fisher:
                with torch.enable_grad():
                    _forward_backward(model, ids, acc)
            else:
                with torch.inference_mode():
                    _forward(model, ids)
            if i + 1 == recipe.pilot_windows and i + 1 < total:
                acc.prune(recipe.keep_candidates)
            if progress is not None:
                progress(n_transform + i + 1, steps)
    errs = [{s: acc.attn_err(layer, s) for s in SIDES} for layer in range(facts.num_layers)]
    loss = [{s: acc.loss_err(layer, s) for s in SIDES} for layer in range(facts.num_layers)]
    objective = loss if n_fisher and all(v is not None for d in loss for v in d.values()) else None
    choices = select(errs, candidates, recipe, head_dim=facts.head_dim, objective=objective)
    layers = tuple(_layer_config(c, acc.tables[i]) for i, c in enumerate(choices))
    config = KVConfig(model=facts, layers=layers)
    stats = _stats_dict(acc, candidates, choices, errs)
    if objective is not None:
        # Second-order estimate of the loss increase (nats per token), naive INT4 vs chosen.
        stats["predicted_loss_increase"] = {
            "naive": _round(sum(sum(c[s].naive_obj) for c in choices for s in SIDES), 6),
            "chosen": _round(sum(sum(c[s].head_obj) for c in choices for s in SIDES), 6),
        }
    stats.update(
        windows=int(total),
        fisher_windows=int(n_fisher),
        objective="fisher" if objective is not None else "attn_err",
        seq_len=int(windows.shape[1]),
        wall_s=round(time.perf_counter() - start, 3),
        peak_memory={
            "rss_bytes": _peak_rss_bytes(),
            "cuda_bytes": int(torch.cuda.max_memory_allocated())
            if torch.cuda.is_available()
            else 0,
            "stats_bytes": acc.nbytes(),
        },
    )
    return CalibrationResult(
        config=config, stats=stats, recipe=recipe, model=model_name, data=data_name
    )


def _layer_config(choice: dict[str, SideChoice], tables: dict) -> LayerConfig:
    """A layer's config from its choice; per-head transforms become config rows (a head that
    does not center gets zeros, one that does not smooth gets ones)."""

    def rows(c: SideChoice, side: str, which: int, name: str, neutral: float):
        if not any(t[which] for t in c.head_transforms):
            return None
        table = tables[side][name]  # [H, D] float32
        return tuple(
            tuple(float(x) for x in table[h].tolist()) if used[which] else
            (neutral,) * table.shape[1]
            for h, used in enumerate(c.head_transforms)
        )  # fmt: skip

    def side(c: SideChoice, name: str) -> SideConfig:
        if c.whole is not None:  # the whole side at INT8 / BF16: nothing else applies
            return SideConfig(bits=c.whole)
        cand = c.candidate
        return SideConfig(
            bits=4,
            rotation_block=cand.block,
            sign_seed=cand.sign_seed,
            group_size=cand.group_size,
            fallback_heads=dict(c.fallback_heads),
            center=rows(c, name, 0, "center", 0.0),
            smooth=rows(c, name, 1, "smooth", 1.0),
        )

    return LayerConfig(k=side(choice["k"], "k"), v=side(choice["v"], "v"))


def _round(values: Any, digits: int = 5) -> Any:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, list):
        return [_round(v, digits) for v in values]
    return round(float(values), digits) if math.isfinite(values) else None


def _stats_dict(
    acc: StatsAccumulator,
    candidates: list[Candidate],
    choices: list[dict[str, SideChoice]],
    errs: list[dict[str, torch.Tensor]],
) -> dict:
    layers = []
    for layer, choice in enumerate(choices):
        entry = {}
        for s in SIDES:
            st, c = acc.sides[layer][s], choice[s]
            entry[s] = {
                "absmax": _round(st.absmax),
                "outlier_ratio": _round(st.outlier_ratio()),
                "kurtosis": _round(st.kurtosis()),
                "sqnr_db": _round(st.sqnr_db(), 3),
                "attn_err": _round(errs[layer][s].clamp(min=0).sqrt()),
                "naive_err": _round([math.sqrt(e) for e in c.naive_err]),
                "int4_err": _round([math.sqrt(e) for e in c.int4_err]),
                "chosen_err": _round([math.sqrt(e) for e in c.head_err]),
            }
            loss = acc.loss_err(layer, s)
            if loss is not None:  # expected nats/token per candidate and head (Fisher)
                entry[s]["loss_err"] = [
                    [float(f"{x:.4g}") if math.isfinite(x) else None for x in row]
                    for row in loss.tolist()
                ]
        layers.append(entry)
    return {
        "candidates": [c.to_dict() for c in candidates],
        "tokens": int(acc.tokens),
        "query_samples": acc.query_samples,
        "layers": layers,
    }


def calibrate_checkpoint(
    model_path: str | os.PathLike | None = None,
    *,
    recipe: str | os.PathLike | Recipe | None = None,
    data: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    max_avg_bits: float | None = None,
    device: str = "auto",
    max_memory: str | dict | None = None,
    progress: StageProgress | None = None,
) -> CalibrationResult:
    """The whole ``sawquant calibrate``: load ``model_path`` (None: the demo), pick its
    family's recipe unless one is given, override the recipe's data/samples/seq_len/budget
    with the arguments that are not None, tokenize the calibration text and calibrate.

    ``progress(stage, done, total)`` reports "load", "tokenize" and "capture". Refuses text
    that is held out for evaluation (``demo:evaluation``).
    """
    from sawquant import data as text_data
    from sawquant.architectures import model_facts
    from sawquant.calibration.recipe import default_recipe_name, load_recipe
    from sawquant.devices import device_map_for
    from sawquant.models import load_model

    def step(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    chosen = recipe if isinstance(recipe, Recipe) or recipe is None else load_recipe(recipe)
    if data is not None and str(data) in HELD_OUT_SOURCES:
        raise InputError(
            f"{data} is the held-out text verify measures accuracy on; calibrate on demo (the "
            "calibration split) or your own text, never on the evaluation text"
        )
    if data is not None:  # a missing text file fails before the model is loaded
        text_data.check_source(data)
    device_map = device_map_for(device)
    step("load", 0, 1)
    model, tokenizer = load_model(model_path, device_map=device_map, max_memory=max_memory)
    step("load", 1, 1)
    facts = model_facts(model.config)
    if chosen is None:
        chosen = load_recipe(default_recipe_name(facts.model_type, demo=_is_demo(model_path)))
    chosen = chosen.replace(data=data, samples=samples, seq_len=seq_len, max_avg_bits=max_avg_bits)
    if chosen.data in HELD_OUT_SOURCES:
        raise InputError(
            f"recipe {chosen.name!r} calibrates on {chosen.data}, the held-out evaluation text; "
            "set its data to demo or your own text"
        )
    step("tokenize", 0, 1)
    text = text_data.load_text(chosen.data)
    windows = text_data.token_windows(tokenizer, text, num=chosen.samples, seq_len=chosen.seq_len)
    step("tokenize", 1, 1)
    name = str(model_path) if model_path is not None else "demo (SmolLM2-135M-Instruct)"
    return calibrate(
        model,
        tokenizer,
        windows,
        chosen,
        lambda done, total: step("capture", done, total),
        model_name=name,
        data_name=chosen.data,
    )


def _is_demo(model_path) -> bool:
    """No MODEL, or the demo's offline name (not a local directory of that name): the demo
    recipe, tuned on it, rather than its family's."""
    from pathlib import Path

    from sawquant.offline import SMOLLM2_135M

    return model_path is None or (
        str(model_path) == SMOLLM2_135M.name and not Path(model_path).expanduser().exists()
    )
