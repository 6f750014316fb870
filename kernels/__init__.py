"""Triton kernels for the memory-bound tails of a TEMPO step, installed as ``tempo_mega.kernels``.

Every public function takes ``impl="auto" | "triton" | "torch"``: "triton" runs the Triton kernel (on
CPU only under ``TRITON_INTERPRET=1``), "torch" the plain reference, "auto" Triton on CUDA and the
reference elsewhere. Each kernel module holds the Triton code, its ``torch.autograd.Function`` and the
torch reference side by side. Importing this package imports neither triton nor a kernel module: they
load on first use.

This folder must never be importable as a top-level ``kernels`` module (transformers probes for a hub
package of that name).
"""

from __future__ import annotations

import importlib

from tempo_mega.kernels._common import IMPLS, resolve_impl, triton_available

_LAZY = {
    "fused_value_head": "value_head",
    "value_head_reference": "value_head",
    "gspo_loss": "seq_losses",
    "seq_clipped_value_loss": "seq_losses",
    "pack_padded": "seq_losses",
    "fused_linear_logprob": "logprob",
    "fused_linear_logprob_reference": "logprob",
}

__all__ = ["IMPLS", "resolve_impl", "triton_available", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"tempo_mega.kernels.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'tempo_mega.kernels' has no attribute {name!r}")
