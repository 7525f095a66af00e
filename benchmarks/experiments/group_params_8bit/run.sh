#!/usr/bin/env bash
# The runs behind benchmarks/RESULTS.md "8-bit group parameters" (2026-12-02, one CPU core each,
# about 2.5 hours in all). Outputs go to $EXP8_OUT (default ./exp8_out). Exploratory: these
# scripts monkeypatch sawquant.simulate._round_trip (and, in recal8.py, the calibrator's cost and
# error model) to try storage formats the runtime does not have.
set -euo pipefail
here=$(dirname "$0")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 EXP8_OUT=${EXP8_OUT:-exp8_out}
mkdir -p "$EXP8_OUT"
sawquant calibrate --recipe demo-lean -o "$EXP8_OUT/lean.json"
sawquant calibrate --recipe demo -o "$EXP8_OUT/demo5.json"
python "$here/recal8.py" demo-lean e4m3int "$EXP8_OUT/recal8_leanfix_e4m3int.json"
python "$here/recal8.py" demo e4m3int "$EXP8_OUT/recal8_demo_e4m3int.json"
python "$here/run_eval.py" --list > "$EXP8_OUT/bits.txt"
python "$here/run_eval.py" --text demo:evaluation --windows 16 \
  full naive lean demo5 lean_g32_e4m3int lean_g32_fp8dir lean_g32_ue4m4int lean_g32_fp16 \
  lean_g32_fp16int lean_pt_e4m3int lean_pt_fp16int demo5_e4m3int demo5_fp8dir \
  demo5_g32all_e4m3int demo5_g32all_fp16 recal8_leanfix_e4m3int recal8_demo_e4m3int \
  lean_pt_fp16j1 lean_pt_fp16j2 lean_pt_fp16j3 lean_g32_fp16j1 lean_g32_fp16j2 lean_g32_fp16j3 \
  lean_g32_e4m3intj2 lean_g32_e4m3intj3
python "$here/run_eval.py" --text pydocs --windows 16 \
  full naive lean demo5 lean_g32_e4m3int lean_g32_fp8dir lean_g32_ue4m4int lean_g32_fp16 \
  lean_g32_fp16int recal8_leanfix_e4m3int recal8_demo_e4m3int
python "$here/analyze.py"
