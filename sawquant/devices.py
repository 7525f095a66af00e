"""Where work runs: the device a command's ``--device`` names, and CPU thread counts.

Thread counts matter on small machines: with as many threads as cores and the cores already
busy, torch's worker threads wait on each other (measured: ``sawquant verify`` on the demo took
23 min with 2 threads on a loaded 2-core machine, 4 min 38 s with 1). So unless the user set
``OMP_NUM_THREADS`` or ``SAWQUANT_NUM_THREADS``, sawquant uses the cores that are idle now.

The idle count is a one-minute average and the user may have set 2 threads anyway, so the
command line also makes OpenMP's waiting threads sleep instead of spin
(:func:`prefer_passive_waiting`): a spinning thread holds the core that the thread it waits for
needs. Measured on the shared 2-core machine (another process busy on one core), ``sawquant
calibrate`` of the demo with 2 threads: 5:00 spinning, 0:55 sleeping, 0:44 with 1 thread.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sawquant.errors import InputError

__all__ = [
    "available_cpus",
    "choose_num_threads",
    "configure_threads",
    "default_device_map",
    "device_map_for",
    "prefer_passive_waiting",
]


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask, cgroup-limited containers included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def choose_num_threads(cpus: int | None = None, load: float | None = None) -> int:
    """Threads for torch: the user's setting, else the CPUs not busy over the last minute."""
    for var in ("SAWQUANT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise InputError(f"{var}={value!r} is not a number; set it to e.g. 1 or 4")
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows
            load = 0.0
    return max(1, min(cpus, round(cpus - load)))


def prefer_passive_waiting() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy: OpenMP threads that wait
    at a barrier sleep instead of spinning. OpenMP reads it once, when torch loads it, so this
    only takes effect before torch is imported; returns whether it did."""
    if os.environ.get("OMP_WAIT_POLICY") or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def configure_threads() -> int:
    """Set torch's intra-op thread count with :func:`choose_num_threads`; returns it."""
    import torch

    threads = choose_num_threads()
    torch.set_num_threads(threads)
    return threads


def default_device_map() -> str:
    """Where a model goes when nobody says: the first CUDA device if there is one, else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_map_for(device: str) -> Any:
    """A ``--device`` value (auto, cpu, cuda, cuda:N) as a transformers ``device_map``."""
    import torch

    if device == "auto":  # accelerate's spreading over GPUs, or the CPU without one
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"--device {device!r} unknown; use auto, cpu, cuda or cuda:N")
    return device
