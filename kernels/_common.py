"""Dispatch between a Triton kernel and its torch reference (``impl="auto" | "triton" | "torch"``)."""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("tempo_mega.kernels")

IMPLS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be set before ``import triton``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that raises on import
        return False
    return True


def resolve_impl(impl: str, *tensors: torch.Tensor, name: str = "kernel") -> str:
    """"triton" or "torch" for these inputs. "auto" takes Triton on CUDA tensors when Triton imports,
    the torch reference otherwise; "triton" on CPU tensors needs TRITON_INTERPRET=1 (tiny shapes only)."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{name}: impl='triton' but triton is not installed (pip install 'tempo-mega[triton]')")
    if not on_cuda and not interpreting():
        raise RuntimeError(f"{name}: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return "triton"
