"""``sawquant verify OUT --engine vllm`` end to end (three engines on a small text)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_verify_through_vllm_reports_full_fp8_and_sawquant(demo_export_path, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "sawquant.cli.main", "verify", str(demo_export_path),
           "--engine", "vllm", "--tokens", "1024", "--seq-len", "256",
           "--json", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    print({m: (round(r["ppl"], 3), r["kv_tokens"]) for m, r in rows.items()})
    assert report["engine"] == "vllm" and report["windows"] == 4 and report["passed"]
    assert report["served_calls"]["prefill"] >= 4 * 30
    # The memory claim, measured by vLLM itself: sawquant fits > 3x the tokens of the 16-bit
    # cache and more than FP8 does, in the same bytes.
    assert rows["sawquant"]["kv_tokens"] > 3 * rows["full"]["kv_tokens"]
    assert rows["sawquant"]["kv_tokens"] > rows["fp8"]["kv_tokens"]
    assert 0 <= rows["sawquant"]["ppl_increase_pct"] < 5
    assert "sawquant" in run.stdout and "vLLM FP8" in run.stdout
