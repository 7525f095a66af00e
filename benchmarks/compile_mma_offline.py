"""Compile the tensor-core decode kernel for sm_90a without a GPU; print ptxas's registers and
spills. Needs triton 3.6 (the GPU image's) in the running interpreter: a register or spill
count of a kernel change can be checked here before any device time is spent.

    DECODE_MMA=kernels/decode_mma.py python benchmarks/compile_mma_offline.py [K_ROT 0|1]
    EXTRA="{'NH': 16, 'GROUP': 16}" OPTS="{'maxnreg': 128}" \
        python benchmarks/compile_mma_offline.py 1
    EXTRA="{'K_WPG': 4, 'V_WPG': 4}" OPTS="{'maxnreg': 168}" \
        python benchmarks/compile_mma_offline.py 1    # groups of 32 on both sides
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

POINTERS = {
    "Q": "*bf16", "KC": "*u8", "KS": "*fp16", "KZ": "*fp16", "VC": "*u8", "VS": "*fp16",
    "VZ": "*fp16", "BT": "*i32", "LENS": "*i32", "HEADS": "*i32", "KIDX": "*i32",
    "VIDX": "*i32", "ROT": "*fp16", "SMOOTH": "*fp32", "ML": "*fp32", "ACC": "*fp32",
}  # fmt: skip
FLOATS = ("qk_scale", "k_rot_scale", "softcap")


def main() -> None:
    path = os.environ.get("DECODE_MMA", "kernels/decode_mma.py")
    spec = importlib.util.spec_from_file_location("decode_mma_offline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernel = module._mma_split_kernel
    k_rot = bool(int(sys.argv[1])) if len(sys.argv) > 1 else True
    constexprs = dict(GROUP=4, NH=8, PAGE=16, NT=16, K_ROT=k_rot, K_SMOOTH=False,
                      HAS_WINDOW=False, HAS_SOFTCAP=False, Q_SPLIT=False, DEPTH=1,
                      K_WPG=16, V_WPG=16, K_BITS=4, V_BITS=4)  # fmt: skip
    constexprs.update(ast.literal_eval(os.environ.get("EXTRA", "{}")))
    signature, values, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            values[(i,)] = constexprs[name]
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith(("stride_kc", "stride_vc", "stride_btb", "stride_q")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=4)
    options.update(ast.literal_eval(os.environ.get("OPTS", "{}")))
    source = GluonASTSource(kernel, signature, values, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    cap = options.get("maxnreg")
    cmd = [ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull]
    cmd += [f"--maxrregcount={cap}"] if cap else []
    result = subprocess.run(cmd, capture_output=True, text=True)
    print(constexprs, options)
    print(" ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", result.stderr)))


if __name__ == "__main__":
    main()
