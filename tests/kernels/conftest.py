"""Kernel tests run the Triton kernels in the interpreter when no CUDA device is present.

The variable must be set before triton is first imported, which pytest guarantees by loading
this conftest before the test modules of this folder.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
