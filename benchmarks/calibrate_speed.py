"""How long ``sawquant calibrate`` takes, and how much memory, on a real model's shape.

    python benchmarks/calibrate_speed.py                       # Qwen2.5-0.5B shape, qwen2 recipe
    python benchmarks/calibrate_speed.py --samples 2 --profile calib.prof   # profile, fewer windows
    python benchmarks/calibrate_speed.py --cli                 # the sawquant calibrate command
    python benchmarks/calibrate_speed.py --shape qwen3-8b --device cuda   # 8B on a GPU

Builds a Qwen2-architecture checkpoint of the Qwen2.5-0.5B shape (24 layers, hidden 896, 14
query / 2 KV heads, head_dim 64, intermediate 4864, vocabulary 151,936, tied embeddings) with
**random weights**, saves it (safetensors, float32, with the demo model's tokenizer: its ids
are all below the vocabulary size) in a temporary directory that later runs reuse, then
calibrates it in a fresh process through ``calibrate_checkpoint``, the library function behind
the CLI, with the threads the CLI sets and the recipe the family selects (``qwen2``: 8 windows
x 1024 tokens, 2 with the Fisher backward). Reports the wall time of every stage (load,
tokenize, the channel-statistics pass, each window, selection), the time inside the forward,
forward+backward and statistics calls, and the peak RSS. ``--cli`` runs ``sawquant calibrate
CKPT`` instead and reports its wall time, the child's peak RSS and its progress lines.

``--shape qwen3-8b`` builds the Qwen3-8B shape instead (36 layers, hidden 4096, 32 query / 8 KV
heads, head_dim 128, intermediate 12288, vocabulary 151,936; bfloat16, built on the GPU when
``--device cuda``) and calibrates it with the ``qwen3`` recipe; the report adds the GPU's peak
memory. ``--data FILE`` and ``--tokenizer DIR`` stand in for the demo's text and tokenizer
where their packages are not installed (a GPU machine without them).

Random weights carry none of a trained model's outliers, so the *chosen config* means nothing
here; the compute (forward, backward, every candidate measured) is the same as for the real
checkpoint, which is what this measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN25_05B = dict(
    num_hidden_layers=24,
    hidden_size=896,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    sliding_window=None,
    use_sliding_window=False,
)
QWEN3_8B = dict(
    num_hidden_layers=36,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=12288,
    vocab_size=151936,
    tie_word_embeddings=False,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
# name: (architecture, its config fields, weights dtype)
SHAPES = {
    "qwen2.5-0.5b": ("qwen2", QWEN25_05B, "float32"),
    "qwen3-8b": ("qwen3", QWEN3_8B, "bfloat16"),
}


def build_checkpoint(out: Path, shape: str, device: str, tokenizer: Path | None) -> Path:
    """The random-weight checkpoint (built once; reused while its marker file exists)."""
    marker = f"{shape}-shape-random-v1"
    if (out / marker).is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    arch, fields, dtype = SHAPES[shape]
    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    config = config_cls(**fields, torch_dtype=dtype)
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device(device):  # an 8B model initialises in seconds on a GPU, minutes on a CPU
        model = model_cls(config)  # transformers' init: normal(0, 0.02), RMSNorm weights 1
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    model.save_pretrained(tmp)
    if tokenizer is None:
        from sawquant.demo import demo_checkpoint_dir

        tokenizer = demo_checkpoint_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, tmp / name)
    (tmp / marker).write_text(f"random weights, {shape} shape\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def measure(
    ckpt: Path, samples: int | None, profile: str | None, passive: bool, device: str,
    data: str | None,
) -> dict:  # fmt: skip
    """Calibrate ``ckpt`` in this (fresh) process; stage timings from the progress callback.
    Threads as the CLI sets them (OpenMP waiting passively unless ``passive`` is false, the
    thread count from OMP_NUM_THREADS or the idle cores)."""
    if passive and not os.environ.get("OMP_WAIT_POLICY"):  # what the CLI does (any --source)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    from sawquant.devices import configure_threads

    configure_threads()

    from sawquant.calibration import calibrate_checkpoint

    marks: list[tuple[float, str, int, int]] = []
    start = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        marks.append((now, stage, done, total, peak))
        print(f"[{now:7.1f}s] {stage} {done}/{total}", file=sys.stderr, flush=True)

    # Where the time goes: the forward passes, the Fisher forward+backward passes and the
    # statistics callback (which runs inside both) are timed by wrapping them.
    from sawquant.calibration import api, stats

    spent = {"forward": 0.0, "forward+backward": 0.0, "statistics": 0.0}

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t

        return wrapper

    api._forward = timed("forward", api._forward)
    api._forward_backward = timed("forward+backward", api._forward_backward)
    stats.StatsAccumulator.__call__ = timed("statistics", stats.StatsAccumulator.__call__)

    def run():
        return calibrate_checkpoint(
            ckpt, samples=samples, device=device, data=data, progress=progress
        )

    if profile:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(run)
        prof.dump_stats(profile)
    else:
        result = run()
    total = time.perf_counter() - start
    stages: list[dict] = []
    prev = 0.0
    for t, stage, done, n, peak in marks:
        if done == 0:
            prev = t
            continue
        stages.append({"stage": stage, "step": f"{done}/{n}", "seconds": round(t - prev, 2),
                       "peak_rss_gib_so_far": round(peak, 3)})  # fmt: skip
        prev = t
    stages.append({"stage": "select + report", "step": "", "seconds": round(total - prev, 2)})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "peak_gpu_allocated_gib": None if gpu is None else round(gpu, 3),
        "wall_s": round(total, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 3),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"),
        "stages": stages,
        # forward and forward+backward include the statistics computed inside them
        "seconds_in": {k: round(v, 2) for k, v in spent.items()},
        "windows": result.stats["windows"],
        "fisher_windows": result.stats["fisher_windows"],
        "seq_len": result.stats["seq_len"],
        "recipe": result.recipe.name,
        "avg_bits": round(result.avg_bits, 4),
        "calibrate_wall_s": result.stats["wall_s"],
    }


def run_cli(ckpt: Path, samples: int | None, device: str, data: str | None) -> dict:
    out = Path(tempfile.mkdtemp()) / "calibration.json"
    cmd = [sys.executable, "-m", "sawquant.cli.main", "calibrate", str(ckpt), "-o", str(out)]
    cmd += ["--device", device] + (["--samples", str(samples)] if samples else [])
    cmd += ["--data", data] if data else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"calibrate failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    return {
        "command": " ".join(cmd[1:]),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 3),
        "progress_lines": proc.stderr.splitlines(),
        "summary": proc.stdout.splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="where the random checkpoint lives")
    parser.add_argument("--samples", type=int, default=None, help="windows (default: recipe's)")
    parser.add_argument("--profile", default=None, help="write a cProfile of the calibration")
    parser.add_argument("--cli", action="store_true", help="run the sawquant calibrate command")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--data", default=None, help="calibration text file (default: recipe's)")
    parser.add_argument(
        "--tokenizer", default=None, help="a directory with tokenizer.json (default: the demo's)"
    )
    parser.add_argument(
        "--no-passive-wait", action="store_true", help="leave OpenMP's wait policy alone"
    )
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child processes
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--source",
        default=None,
        help="measure the sawquant package under this directory (A/B against an older "
        "commit: mkdir D; git archive REV sawquant | tar -x -C D; git archive REV recipes | "
        "tar -x -C D/sawquant)",
    )
    args = parser.parse_args()
    if args.build:
        tok = Path(args.tokenizer) if args.tokenizer else None
        build_checkpoint(Path(args.build), args.shape, args.device, tok)
        return
    if args.source:  # an unpacked tree (git archive REV sawquant recipes) instead of this one
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
        sys.path.insert(0, args.source)
    if args.measure:
        report = measure(
            Path(args.measure), args.samples, args.profile, not args.no_passive_wait,
            args.device, args.data,
        )  # fmt: skip
        print("REPORT " + json.dumps(report), flush=True)
        return

    default = Path(tempfile.gettempdir()) / f"sawquant-bench-{args.shape}"
    ckpt = Path(args.checkpoint or default)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    # A separate process, so that building the model does not count in the peak RSS.
    build = [sys.executable, __file__, "--build", str(ckpt), "--shape", args.shape]
    build += ["--device", args.device] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    subprocess.run(build, check=True)
    print(f"checkpoint {ckpt} ready in {time.perf_counter() - t:.1f} s", flush=True)
    if args.cli:
        report = run_cli(ckpt, args.samples, args.device, args.data)
    else:
        cmd = [sys.executable, __file__, "--measure", str(ckpt), "--device", args.device]
        cmd += ["--data", args.data] if args.data else []
        cmd += ["--samples", str(args.samples)] if args.samples else []
        cmd += ["--profile", args.profile] if args.profile else []
        cmd += ["--no-passive-wait"] if args.no_passive_wait else []
        cmd += ["--source", args.source] if args.source else []
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
        report = json.loads(line[len("REPORT ") :])
        for row in report["stages"]:
            peak = row.get("peak_rss_gib_so_far")
            peak = f"  (peak RSS so far {peak:.2f} GiB)" if peak else ""
            print(f"  {row['stage']:10s} {row['step']:>6s} {row['seconds']:8.2f} s{peak}")
        print("  time in: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds_in"].items()))
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report.update(
        source=args.source or "this tree",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=_device_name(args.device),
        load_average_after=load,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        shape={"name": args.shape, **SHAPES[args.shape][1]},
        weights=f"random (transformers init), {SHAPES[args.shape][2]}",
    )
    print(f"wall {report['wall_s']:.1f} s, cpu {report['cpu_s']:.0f} s, "
          f"peak RSS {report['peak_rss_gib']:.2f} GiB")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))}, {os.cpu_count()} CPU cores"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
