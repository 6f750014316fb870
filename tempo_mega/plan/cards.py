"""What ``tempo-mega plan`` sizes a run for: the GPU cards and the assumptions behind its estimates.

``CARDS`` holds each card's total memory (as ``nvidia-smi`` reports it), its datasheet HBM bandwidth and
the key of its dense BF16 peak in ``telemetry.flops.PEAK_FLOPS``; ``card_for_device_name`` maps a CUDA
device name to a key. ``Assumptions`` are the knobs of the estimates (MFU, HBM efficiency, prompt and
response lengths, SGLang placement, ...), each a ``tempo-mega plan`` option. ``GIB`` is the unit the plan
prints sizes in.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Card:
    name: str
    memory_bytes: int  # total memory as nvidia-smi reports it
    hbm_bytes_per_s: float  # datasheet peak HBM bandwidth
    peak_key: str  # dense BF16 tensor peak, a key of telemetry.flops.PEAK_FLOPS


MIB = 2**20
CARDS: dict[str, Card] = {
    # H100 SXM5 80 GB: 81,559 MiB, 3.35 TB/s; H200 SXM 141 GB: 143,771 MiB, 4.8 TB/s; A100 SXM 80 GB:
    # 81,920 MiB, 2.04 TB/s; B200: 183,359 MiB, 8 TB/s (NVIDIA datasheets; nvidia-smi totals)
    "h100-80gb": Card("h100-80gb", 81_559 * MIB, 3.35e12, "h100_sxm_bf16"),
    "h200-141gb": Card("h200-141gb", 143_771 * MIB, 4.8e12, "h200_bf16"),
    "a100-80gb": Card("a100-80gb", 81_920 * MIB, 2.039e12, "a100_bf16"),
    "b200": Card("b200", 183_359 * MIB, 8.0e12, "b200_bf16"),
}


def card_for_device_name(name: str, default: str = "h100-80gb") -> str:
    """The CARDS key for a ``torch.cuda.get_device_name()`` string ("NVIDIA H200" -> "h200-141gb"),
    ``default`` for a card the table does not hold."""
    name = name.lower()
    return next((k for k, key in (("h200-141gb", "h200"), ("a100-80gb", "a100"), ("b200", "b200"),
                                  ("h100-80gb", "h100")) if key in name), default)


@dataclass(frozen=True)
class Assumptions:
    """What the estimates assume (each a ``tempo-mega plan`` option)."""

    mfu: float = 0.4  # train phases: model FLOPs utilization
    hbm_efficiency: float = 0.7  # decode: share of peak HBM bandwidth achieved
    prompt_tokens: int = 256  # mean prompt length
    mean_response_tokens: int | None = None  # None: half of rollout.max_response_tokens
    concurrency: int | None = None  # sequences decoding at once per engine; None: the engine's share of a step
    reserve_gib: float = 2.0  # CUDA context, NCCL buffers, allocator slack per GPU
    sglang_placement: str = "colocated"  # colocated | separate
    sglang_nodes: int = 1  # separate placement: nodes given to SGLang
    gen_batches: float = 1.0  # generation batches per step (group-filter refills make it more)
