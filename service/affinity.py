"""Pinning a worker's engine processes to a set of cores (Linux CPU lists, e.g. "0-3,8").

Why: vLLM's engine core process busy-waits (`sched_yield` in a loop, for a second after each
message) on its model-runner process while that one computes. With two workers on a small box
whose processes float, one model's spinner lands on the core the other model is computing on,
and an ensemble step, which runs both models' forwards at once, waits for the slower of two
slowed-down forwards. Pinned, each model's spinner yields to its own model runner. Measured on
2 cores, smollm2 + gemma3 byte-level ensemble, three texts each, same workers with the
affinity switched between runs: 10.3 / 10.7 / 12.8 bytes/s unpinned, 15.2 / 15.8 / 16.6 with
each model's engine processes on its own core; pinning only the model runner (what vLLM's
`VLLM_CPU_OMP_THREADS_BIND` does) gave 10.7 / 12.0 / 12.4.

Only the engine processes are pinned: they are spawned by the thread that builds the engine,
and a Linux child inherits the affinity of the thread that forks it, so `on_cpus` sets that
thread's affinity for the duration of the call and restores it. The worker's HTTP front end
keeps every core; only the threads the engine client starts while it is built (its ZMQ I/O)
share the engine's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def parse_cpu_list(text: str) -> frozenset[int]:
    """ "0-3,8" -> {0, 1, 2, 3, 8}; ValueError on anything else (empty, reversed ranges)."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty entry in CPU list {text!r}")
        low_text, dash, high_text = part.partition("-")
        if not low_text.isdigit() or (dash and not high_text.isdigit()):
            raise ValueError(f"CPU list entries are N or N-M, got {part!r}")
        low = int(low_text)
        high = int(high_text) if dash else low
        if high < low:
            raise ValueError(f"reversed CPU range {part!r}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 3, 8} -> "0-3,8" (the inverse of parse_cpu_list)."""
    ordered = sorted(set(cpus))
    if not ordered:
        raise ValueError("an empty CPU set")
    runs: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(runs)


def usable_cpus() -> list[int]:
    """The cores this process may run on (its affinity, which a container's cpuset bounds)."""
    return sorted(os.sched_getaffinity(0))


def on_cpus(cpus: frozenset[int] | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in this thread with its affinity set to ``cpus`` (None: unchanged), so that
    processes it spawns start pinned; the thread's own affinity is restored afterwards."""
    if cpus is None:
        return fn()
    missing = cpus - set(usable_cpus())
    if missing:
        raise ValueError(
            f"CPUs {format_cpu_list(missing)} are not available to this process "
            f"(available: {format_cpu_list(usable_cpus())})"
        )
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return fn()
    finally:
        os.sched_setaffinity(0, before)


# CPU features with bfloat16 arithmetic in hardware (x86: AVX512-BF16, AMX-BF16; Arm: BF16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of this machine's CPUs (`flags` on x86, `Features` on Arm), from
    /proc/cpuinfo; empty when it cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively. Without it, oneDNN converts every
    bfloat16 operand to float32 and back: a router forward took 2x as long as in float32."""
    return bool((cpu_flags() if flags is None else flags) & NATIVE_BF16_FLAGS)
