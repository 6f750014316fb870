"""``MegatronConfig``: how the Megatron backend shards and runs a model. Validated on construction;
checks that need the model (heads, layers) or the world size live in ``MegatronConfig.validate_for``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

RECOMPUTE = ("none", "selective", "full")
FP8 = ("none", "e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MegatronConfig:
    """Parallel layout and numerics of the Megatron backend (config key prefix ``megatron.``).

    The data-parallel size is what is left: ``world_size / (tp * pp * cp)``.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute: str = "none"  # "none" | "selective" (core attention) | "full" (whole layers)
    fp8: str = "none"  # "none" | "e4m3" | "hybrid" (TE only)
    fp8_recipe: str = "delayed"
    # null: the model's dtype (model.dtype in a run's config; bfloat16 where nothing names one), see resolved()
    params_dtype: str | None = None
    # actor log-probs: response tokens per chunk of vocab-parallel logits (recomputed in the backward),
    # so a micro-batch never holds more than [chunk, vocab / TP] fp32 logits
    logprob_chunk_tokens: int = 4096
    # megatron's kernel fusions (GPU with Transformer Engine): weight-gradient accumulation into the fp32
    # main grads (needs Apex for the output layer, as in the NGC container), fused SwiGLU, fused
    # bias-dropout-add and TE's fused RoPE. Off by default until measured on a GPU (scripts/bench_train_step.py
    # --fusions); with them off every op is the one the CPU tests check.
    fusions: bool = False

    def __post_init__(self) -> None:
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size", "logprob_chunk_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"megatron.{key} must be >= 1, got {getattr(self, key)}")
        vpp = self.virtual_pipeline_parallel_size
        if vpp is not None:
            if vpp < 1:
                raise ValueError(f"megatron.virtual_pipeline_parallel_size must be >= 1 or null, got {vpp}")
            if vpp > 1 and self.pipeline_parallel_size < 2:
                raise ValueError("megatron.virtual_pipeline_parallel_size > 1 needs "
                                 f"megatron.pipeline_parallel_size >= 2, got {self.pipeline_parallel_size}")
        if self.sequence_parallel and self.tensor_parallel_size < 2:
            raise ValueError("megatron.sequence_parallel needs megatron.tensor_parallel_size >= 2")
        for key, allowed in (("recompute", RECOMPUTE), ("fp8", FP8), ("fp8_recipe", FP8_RECIPES),
                             ("params_dtype", (*PARAMS_DTYPES, None))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"megatron.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.fp8 != "none" and self.params_dtype == "float32":
            raise ValueError("megatron.fp8 needs megatron.params_dtype bfloat16 or float16, got float32")

    def resolved(self, model_dtype: str | None = None) -> MegatronConfig:
        """This config with ``params_dtype`` set: its own, else ``model_dtype``, else bfloat16."""
        if self.params_dtype is not None:
            return self
        return dataclasses.replace(self, params_dtype=model_dtype or "bfloat16")

    @property
    def vpp(self) -> int | None:
        """Virtual stages per PP rank as megatron takes it: None without interleaving (null or 1)."""
        v = self.virtual_pipeline_parallel_size
        return v if v is not None and v > 1 else None

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by megatron.tensor_parallel_size "
                f"({self.tensor_parallel_size}) x megatron.pipeline_parallel_size "
                f"({self.pipeline_parallel_size}) x megatron.context_parallel_size ({self.context_parallel_size})")
        return world_size // self.model_parallel_size

    def validate_for(self, *, num_attention_heads: int, num_key_value_heads: int, num_layers: int,
                     vocab_size: int, world_size: int | None = None) -> None:
        """Checks against the model shape (and the world size when given), naming the config key."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if num_attention_heads % tp:
            raise ValueError(f"megatron.tensor_parallel_size={tp} does not divide the model's "
                             f"num_attention_heads={num_attention_heads}")
        if num_key_value_heads % tp:
            raise ValueError(f"megatron.tensor_parallel_size={tp} does not divide the model's "
                             f"num_key_value_heads={num_key_value_heads}")
        if vocab_size % tp:
            raise ValueError(f"megatron.tensor_parallel_size={tp} does not divide the model's "
                             f"vocab_size={vocab_size}")
        stages = pp * (self.virtual_pipeline_parallel_size or 1)
        if num_layers % stages:
            raise ValueError(f"megatron.pipeline_parallel_size={pp} x megatron.virtual_pipeline_parallel_size="
                             f"{self.virtual_pipeline_parallel_size} does not divide num_hidden_layers={num_layers}")
        if world_size is not None:
            self.data_parallel_size(world_size)
