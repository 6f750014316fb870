"""``MegatronConfig``: how the Megatron backend shards and runs a model. Validated on construction;
checks that need the model (heads, layers) or the world size live in ``MegatronConfig.validate_for``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

RECOMPUTE = ("none", "selective", "full")
FP8 = ("none", "e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")
MOE_DISPATCHERS = ("alltoall", "allgather", "flex")
MOE_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


@dataclass(frozen=True)
class MegatronConfig:
    """Parallel layout and numerics of the Megatron backend (config key prefix ``megatron.``).

    The data-parallel size is what is left: ``world_size / (tp * pp * cp)``. For a mixture of experts the
    expert layers are laid out again over the same ranks, as megatron-core defines it: expert-TP x EP x
    expert-DP x PP, expert-DP = ``world_size / (etp * ep * pp)`` (EP is carved out of DP x CP).
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
    # mixture of experts (Qwen3-MoE; ignored for a dense model). Expert parallel size (divides the
    # model's num_experts) and expert tensor parallel size (null: the tensor_parallel_size)
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    # how tokens reach their experts: "alltoall" (GPU), "allgather" (also on CPU), "flex" (DeepEP)
    moe_token_dispatcher: str = "alltoall"
    moe_grouped_gemm: bool = False  # Transformer Engine's grouped GEMM for the local experts (GPU)
    # router load-balancing loss (0: off, the RL default: the policy gradient alone moves the router)
    # and router z-loss (0: off); both are added to the loss the role trains with
    moe_aux_loss_coeff: float = 0.0
    moe_aux_loss_type: str = "aux_loss"  # per micro-batch | "seq_aux_loss" per sequence | "global_aux_loss"
    moe_z_loss_coeff: float = 0.0
    # null: no token is ever dropped (the trainer must route every token the sampler saw); a number
    # caps each expert at capacity_factor x its fair share and drops the rest (pretraining style)
    moe_expert_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size", "logprob_chunk_tokens",
                    "expert_model_parallel_size"):
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
        etp = self.expert_tensor_parallel_size
        if etp not in (None, 1, self.tensor_parallel_size):  # the two layouts the HF conversion writes
            raise ValueError(f"megatron.expert_tensor_parallel_size must be null (= tensor_parallel_size), 1 or "
                             f"tensor_parallel_size ({self.tensor_parallel_size}), got {etp}")
        for key, allowed in (("moe_token_dispatcher", MOE_DISPATCHERS), ("moe_aux_loss_type", MOE_AUX_LOSS_TYPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"megatron.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"megatron.{key} must be >= 0, got {getattr(self, key)}")
        cap = self.moe_expert_capacity_factor
        if cap is not None and not cap > 0:
            raise ValueError(f"megatron.moe_expert_capacity_factor must be > 0 or null, got {cap}")
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
    def etp(self) -> int:
        """Expert tensor parallel size as megatron takes it (null: the tensor parallel size)."""
        etp = self.expert_tensor_parallel_size
        return self.tensor_parallel_size if etp is None else etp

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by megatron.tensor_parallel_size "
                f"({self.tensor_parallel_size}) x megatron.pipeline_parallel_size "
                f"({self.pipeline_parallel_size}) x megatron.context_parallel_size ({self.context_parallel_size})")
        ep, etp, pp = self.expert_model_parallel_size, self.etp, self.pipeline_parallel_size
        if (ep > 1 or etp != self.tensor_parallel_size) and world_size % (etp * ep * pp):
            raise ValueError(
                f"world size {world_size} is not divisible by megatron.expert_tensor_parallel_size ({etp}) x "
                f"megatron.expert_model_parallel_size ({ep}) x megatron.pipeline_parallel_size ({pp})")
        return world_size // self.model_parallel_size

    def validate_for(self, *, num_attention_heads: int, num_key_value_heads: int, num_layers: int,
                     vocab_size: int, world_size: int | None = None, num_experts: int | None = None) -> None:
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
        if num_experts is not None and num_experts % self.expert_model_parallel_size:
            raise ValueError(f"megatron.expert_model_parallel_size={self.expert_model_parallel_size} does not "
                             f"divide the model's num_experts={num_experts}")
        if world_size is not None:
            self.data_parallel_size(world_size)
