"""Host memory of a trainer process: large buffers kept for the next step instead of returned.

A paper-scale step builds padded [2,048, 16K] tensors (134-268 MB each) on the host, a few dozen of
them between the sampler's output and the GPU passes. glibc's malloc serves every buffer over 32 MB
with a fresh ``mmap`` and gives it back on free, so each step pays the kernel's page faults for every
such buffer again: on a 2-core VM, first touch writes at ~2.7 GB/s against ~22 GB/s into pages already
mapped (``scripts/bench_host_step.py`` measures the step both ways). ``retain_host_memory`` tells malloc
to serve buffers up to ``mmap_threshold`` from its heap and to keep freed memory there, the way a
CUDA caching allocator keeps device memory: the process's RSS stays at its peak instead of falling
between steps. ``trainer.host_memory: system`` leaves malloc as it is.

Only glibc is changed (``mallopt``); with another C library, or where the call is refused, nothing
is and the function says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MODES = ("retain", "system")


def _mallopt():
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        fn = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only: musl also has a mallopt (a no-op)
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def retain_host_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Serve host buffers up to ``mmap_threshold`` bytes from malloc's heap and trim the heap only when
    more than ``trim_threshold`` bytes are free at its top. Returns whether glibc took both settings.
    Process-wide and idempotent; call it once, early (``trainer.setup`` does, per rank)."""
    mallopt = _mallopt()
    if mallopt is None:
        log.info("host memory: not glibc, malloc left as it is")
        return False
    limit = (1 << 31) - 1  # mallopt takes a C int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, limit))) and bool(
        mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, limit)))
    if not ok:
        log.warning("host memory: glibc refused mallopt(mmap_threshold=%d, trim_threshold=%d); malloc left as it is",
                    mmap_threshold, trim_threshold)
    return ok


def apply_host_memory(mode: str) -> bool:
    """``trainer.host_memory``: ``retain`` (``retain_host_memory``) or ``system`` (nothing)."""
    if mode not in MODES:
        raise ValueError(f"trainer.host_memory must be one of {', '.join(MODES)}, got {mode!r}")
    return retain_host_memory() if mode == "retain" else False
