"""Runtime tests may run the Triton kernels in the interpreter when no CUDA device is present.

The variable must be set before triton is first imported (as in tests/kernels/conftest.py).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
