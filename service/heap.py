"""Giving freed heap back to the operating system.

Parsing a tokenizer.json (Gemma-3's is 33 MB; the `tokenizers` library's JSON parse allocates
~300 MB on the way) leaves glibc's heap full of freed chunks that it keeps mapped: a process
that loaded one looks ~0.3 GB bigger than what it holds. `malloc_trim(0)` returns every free
page of the heap, not only its top. Called once after start-up work (worker front ends, the
gateway's ensemble assets), never on a request's path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def release_freed_memory() -> bool:
    """malloc_trim(0) where glibc provides it; False elsewhere (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def release_in_engine(worker: object) -> bool:
    """The same in vLLM's model-runner process, sent there by `collective_rpc` (vLLM passes the
    worker first). With the one-process executor that is the engine core, where the weights
    were loaded, the warm-up ran and the tokenizer was parsed."""
    import gc

    del worker
    gc.collect()
    return release_freed_memory()
