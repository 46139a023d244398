"""How many threads torch's intra-op pool gets in the simulator: one decision, printed.

Torch defaults to one thread per core. On a machine whose cores are busy with other work (a shared CI
runner, other jobs) those threads spin against each other: measured here, the default fedit
experiment took 109-156 s with torch's two threads on a loaded 2-core machine and 20-22 s with one.
So ``--threads 0`` (auto) takes the cores this process may use, less the load already on them, and
never fewer than one; an explicit ``--threads N`` or ``OMP_NUM_THREADS`` wins. That is the caller's
thread (the centralized reference, scoring when there is one worker).

A round's clients go further: ``--workers 0`` (auto) trains them on one worker thread per usable core,
each with one torch thread and its own copy of the model (sim/pool.py), which neither thrashes under
load nor waits at intra-op barriers when idle.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """(threads, why): ``requested`` if > 0, else ``OMP_NUM_THREADS`` if set, else the idle cores."""
    if requested > 0:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, round(cores - load))
    return min(cores, idle), f"{cores} core(s), 1-minute load {load:.1f}"


def choose_workers(
    requested: int, threads: int, device: str, poolable: bool, per_round: int
) -> tuple[int, str]:
    """(workers, why): client workers of one torch thread each, for the in-process eager trainer on
    the CPU (``poolable``). ``requested`` > 0 wins; auto takes one per usable core, unless the torch
    threads were set explicitly (``--threads`` / ``OMP_NUM_THREADS``: the user sized the process)."""
    if not poolable or device != "cpu":
        return 1, "clients in turn" + ("" if device == "cpu" else f" on {device}")
    if requested > 0:
        return min(requested, per_round), "--workers"
    if threads > 0 or os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return 1, "torch threads set explicitly"
    cores = usable_cores()
    return max(1, min(cores, per_round)), f"one per core of {cores}"


def apply_threads(requested: int = 0) -> str:
    """Set torch's intra-op threads; returns the line to print."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    return f"torch threads: {threads} ({why})"


def choose_device(requested: str = "auto") -> tuple[str, str]:
    """(device, why) where the simulator trains and scores: ``auto`` takes CUDA when torch sees it.

    ``cuda`` without a CUDA device is an error (a silent CPU run would be a wrong measurement).
    """
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine")
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {requested!r}")
    if requested == "auto":
        device = "cuda" if available else "cpu"
        return device, "auto: " + (torch.cuda.get_device_name(0) if available else "no CUDA device")
    return requested, f"--device {requested}"
