"""Benchmark one training step of the actor and the critic on the Megatron backend (Qwen3-shaped).

For each role (actor, critic), precision (bf16, FP8) and phase it prints a Markdown row and, with
``--csv PATH``, writes a CSV row:

  fwd      ``forward_logprobs`` / ``forward_values`` (no grad): the old-log-prob and value passes
  train    ``train_step`` with the product's losses (GSPO for the actor, the clipped value loss for the
           critic): forward + backward of every micro-batch, then clip and the optimizer step

  s/step          mean over ``--steps`` timed steps (``--warmup`` steps before are not timed)
  tokens/s/GPU    real tokens of a step / s/step / GPUs (all ranks of the world)
  TFLOP/s/GPU     model FLOPs (``tempo_mega.telemetry.flops``: PaLM's 6N + 12 L H Q T per token for
                  training, a third of it forward only, attention included, no causal halving; the
                  critic without the LM head) / s/step / GPUs
  MFU             TFLOP/s/GPU over the card's dense BF16 peak (``flops.PEAK_FLOPS``, picked from
                  ``torch.cuda.get_device_name`` or ``--peak``); FP8 rows use the same BF16 peak, so
                  their MFU ratio to bf16 equals the tokens/s ratio (the FP8 dense peak is twice it)
  peak GiB        ``torch.cuda.max_memory_allocated`` over the timed steps of the phase (weights and,
                  once created by the first train step, optimizer state included)

and the ratios measured in this process: FP8 / bf16 tokens/s (Megatron), and Megatron bf16 / the torch
backend (transformers Qwen3, SDPA, bf16 autocast; single process only) at the same shape, where it fits.
``--backends megatron`` or ``--backends torch`` runs one side alone (scripts/gpu_check.sh runs each under its
own timeout); ``--spec local`` builds megatron's local layer spec even where Transformer Engine imports.

The model is Qwen3-8B's layer (hidden 4096, MLP 12288, 32 query heads, 8 KV heads, head_dim 128,
vocabulary 151,936, untied) with fewer layers (``--layers``, default 4 of 36) so that weights,
optimizer state, activations of a 16K-token sequence and its [tokens, vocab] logits fit one 80 GB card;
the script says so in its output. ``--model qwen3_30b_a3b``: Qwen3-30B-A3B's layer (hidden 2048, 32 query
heads, 4 KV heads, 128 experts of 768, top-8), default 4 of 48 layers, expert parallel ``--ep`` with
``--dispatcher``; FLOPs and MFU count the parameters a token is multiplied with (router + its 8 experts:
``param_counts``' active ones), as MoE MFU is quoted. Weights are megatron's random init. Each sequence is ``--seq-len``
real tokens (a ``--prompt-len`` prompt and the rest response, no padding); a step is ``--seqs``
sequences, one optimizer step, micro-batched by ``--micro-tokens``.

FP8 runs through Transformer Engine (``MegatronConfig(fp8=..., fp8_recipe=...)``) on CUDA cards of
compute capability >= 8.9; without them the FP8 rows say "skipped" and why, and nothing is reported in
their place. A shape that does not fit is reported as "oom". Nothing here is estimated: every number is
measured by this run. Performance is never asserted.

    python scripts/bench_train_step.py --csv runs/bench_train_step.csv            # one H100
    torchrun --nproc-per-node 2 scripts/bench_train_step.py --tp 2 --layers 8     # TP=2

Critic value regression under FP8 (``--value-steps K``, default 5; 0 turns it off): a bf16 critic is
built (megatron's random init) and its weights exported (``export_weights(dtype=None)``: bf16 trunk,
float32 value head); an FP8 critic per ``--value-fp8-recipes`` is then built from exactly those weights.
Each critic in turn (one alive at a time, so the check needs one critic's memory) does, K times: values
of the batch (``forward_values``), then ``train_step`` with the controller's value loss
(``algo.losses.critic_loss``, sequence-level clip 0.1, old values = its own values of that step, as the
controller does) on fixed synthetic returns (rows alternate a 0/1 outcome reward, broadcast over the
response tokens: gamma = lambda = 1), critic lr ``--value-lr``, weight decay 0.01, grad clip 1.0; then
values once more. Both critics hold bf16 parameters with fp32 master weights in megatron's optimizer;
FP8 changes only Transformer Engine's GEMMs. For every step 0..K it reports each critic's value MSE to
the returns and, between the FP8 and the bf16 critic on the same batch: MSE, max abs difference and
relative RMS (rms(diff) / rms(bf16 values)). Step 0 is the forward alone (same weights, precision the
only difference; each critic runs one discarded forward of the batch first, so that delayed scaling has
an amax history). ``--value-check-baseline`` also runs the same comparison with a second bf16 critic in
the FP8 one's place: it checks the comparison itself (step 0 should be exactly 0) and shows the
run-to-run noise floor that FP8's numbers are to be read against. Without FP8 the FP8 comparison says
"skipped" and why, and reports no number.

``--device cpu`` runs the same path at toy shapes as a wiring check (no MFU; CPU seconds are not GPU
numbers). megatron-core itself needs CUDA: on CPU its rows only run inside the test suite, which
redirects megatron's CUDA calls (tests/support/megatron_cpu.py); elsewhere they report the error.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tempo_mega.telemetry.flops import (
    PEAK_FLOPS,
    forward_flops_per_token,
    param_counts,
    train_flops_per_token,
)

ROLES = ("actor", "critic")
PRECISIONS = ("bf16", "fp8")
PHASES = ("fwd", "train")
QWEN3_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "num_hidden_layers": 36}
DEFAULT_LAYERS = 4  # of Qwen3-8B's 36: fits one 80 GB card at 16K tokens per sequence (see the module doc)
# Qwen3-30B-A3B's layer (its config.json): 128 experts of 768, top-8, every layer sparse, no shared expert
QWEN3_30B_A3B = {"hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_hidden_layers": 48,
                 "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768}
MODELS = {"qwen3_8b": QWEN3_8B, "qwen3_30b_a3b": QWEN3_30B_A3B}
MODEL_NAMES = {"qwen3_8b": "Qwen3-8B", "qwen3_30b_a3b": "Qwen3-30B-A3B"}
DISPATCHERS = ("alltoall", "allgather", "flex")
DEFAULT_MOE_LAYERS = 4  # of Qwen3-30B-A3B's 48: 3.1B parameters (2.4B of them experts), ~56 GB of state
# FP8 choices as MegatronConfig spells them (kept here so --help works without megatron installed)
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
RECOMPUTE = ("none", "selective", "full")
BACKENDS = ("megatron", "torch")
SPECS = ("auto", "te", "local")


@dataclass
class Row:
    """One (backend, role, precision, phase) measurement; ``status`` is "ok", "oom", "skipped: why",
    "not run: why" or "error: what"; the numbers are NaN unless ``status == "ok"``."""

    backend: str
    role: str
    precision: str
    phase: str
    status: str = "ok"
    tokens_per_step: int = 0
    step_s: float = math.nan
    tokens_per_s_per_gpu: float = math.nan
    tflops_per_gpu: float = math.nan
    mfu: float = math.nan
    peak_mem_gib: float = math.nan

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- shape and card
def qwen3_config(args: argparse.Namespace):
    """A transformers ``Qwen3Config`` (``Qwen3MoeConfig`` for ``--model qwen3_30b_a3b``): the model's dims
    unless overridden. With ``--hidden`` alone, the other dims follow Qwen3-8B's ratios: head_dim 128,
    heads = hidden / 128, KV heads = heads / 4, MLP = 3 x hidden."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    base = MODELS[args.model]
    hidden = args.hidden or base["hidden_size"]
    custom = args.hidden is not None and args.hidden != base["hidden_size"]
    head_dim = args.head_dim or base["head_dim"]
    heads = args.heads or (base["num_attention_heads"] if not custom else max(1, hidden // head_dim))
    kv_heads = args.kv_heads or (base["num_key_value_heads"] if not custom else max(1, heads // 4))
    if heads % kv_heads:
        raise ValueError(f"--kv-heads {kv_heads} does not divide --heads {heads}")
    common = dict(
        hidden_size=hidden,
        intermediate_size=args.intermediate or (3 * hidden if custom else base["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=args.vocab or base["vocab_size"],
        num_hidden_layers=args.layers,
        max_position_embeddings=max(40960, args.seq_len),
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if "num_experts" not in base:
        return Qwen3Config(**common)
    experts = args.experts or base["num_experts"]
    top_k = args.top_k or base["num_experts_per_tok"]
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k {top_k} must be in 1..--experts {experts}")
    return Qwen3MoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                          moe_intermediate_size=args.moe_intermediate or base["moe_intermediate_size"],
                          decoder_sparse_step=1, mlp_only_layers=[])


def is_model_layer(cfg, model: str) -> bool:
    """Whether ``cfg`` has ``model``'s layer (any number of layers)."""
    return all(getattr(cfg, k, None) == v for k, v in MODELS[model].items() if k != "num_hidden_layers")


def is_qwen3_8b_layer(cfg) -> bool:
    return is_model_layer(cfg, "qwen3_8b")


def peak_key(device_name: str) -> str | None:
    """The ``PEAK_FLOPS`` key of a card's dense BF16 peak from its CUDA name, or None when the table
    has no entry for it (an H100 NVL, say: pass ``--peak``)."""
    name = device_name.upper()
    if "H100" in name:
        if "NVL" in name:
            return None
        return "h100_pcie_bf16" if "PCIE" in name else "h100_sxm_bf16"
    if "H200" in name:
        return "h200_bf16"
    if "A100" in name:
        return "a100_bf16"
    return None


def resolve_peak(arg: str | None, device: torch.device, device_name: str) -> tuple[float | None, str]:
    """(dense BF16 peak FLOP/s per GPU or None, how it was chosen)."""
    if arg:
        if arg in PEAK_FLOPS:
            return PEAK_FLOPS[arg], arg
        try:
            tflops = float(arg)
        except ValueError:
            raise ValueError(f"--peak {arg!r}: a key of PEAK_FLOPS ({', '.join(PEAK_FLOPS)}) or TFLOP/s") from None
        if not tflops > 0:
            raise ValueError(f"--peak must be > 0 TFLOP/s, got {arg}")
        return tflops * 1e12, f"--peak {tflops:g} TFLOP/s"
    if device.type != "cuda":
        return None, "no MFU on CPU"
    key = peak_key(device_name)
    if key is None:
        return None, f"no MFU: no dense peak known for {device_name!r} (pass --peak TFLOP/s)"
    return PEAK_FLOPS[key], key


# ----------------------------------------------------------------------------- availability
def megatron_unavailable() -> str | None:
    try:
        import megatron.core  # noqa: F401
    except Exception as e:  # a broken install raises more than ImportError
        return f"megatron-core does not import here ({type(e).__name__}: {e}); pip install -e '.[megatron]'"
    return None


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 rows cannot run here, or None. FP8 GEMMs exist only in Transformer Engine, on CUDA cards
    of compute capability >= 8.9 (Ada, Hopper and later)."""
    if device.type != "cuda":
        return "FP8 needs a CUDA GPU with Transformer Engine; this run is on CPU"
    from tempo_mega.backends.megatron.model import transformer_engine_available

    if not transformer_engine_available():
        return "Transformer Engine does not import here (pip install -e '.[te]', or the NGC container)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"FP8 needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} is {major}.{minor}"
    return None


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for label, module in (("megatron-core", "megatron.core"), ("transformer-engine", "transformer_engine")):
        try:
            mod = __import__(module, fromlist=["__version__"])
            parts.append(f"{label} {getattr(mod, '__version__', '?')}")
        except Exception:
            parts.append(f"{label} absent")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- batch and losses
def make_batch(args: argparse.Namespace, vocab_size: int):
    """``--seqs`` rows of ``--seq-len`` real tokens (prompt ``--prompt-len``, the rest response), random
    ids from a fixed seed; no padding, so every layout sees the same tokens."""
    from tempo_mega.batch import RolloutBatch

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (args.seqs, args.seq_len), generator=g)
    p = args.prompt_len
    batch = RolloutBatch.from_samples([r[:p].tolist() for r in ids], [r[p:].tolist() for r in ids],
                                      is_labeled=[True] * args.seqs, group_ids=list(range(args.seqs)),
                                      pad_token_id=0)
    shape = batch.response_mask.shape
    batch.advantages = torch.randn(shape, generator=g)
    batch.returns = torch.randn(shape, generator=g)
    return batch


def loss_fn(role: str):
    """The losses the controller trains with (``LossSpec``s over algo/losses.py, plain torch: the
    backend binds them, ``backends.base.bind_loss``), with the clip settings left at the losses' defaults."""
    from tempo_mega.algo.losses import LossSpec, critic_loss, gspo_policy_loss

    if role == "actor":
        return LossSpec(gspo_policy_loss, ("old_logprobs", "advantages"))
    return LossSpec(critic_loss, ("values", "returns"))


# ----------------------------------------------------------------------------- backends
def build_megatron(role: str, hf_config, args: argparse.Namespace, precision: str, optim, *,
                   hf_state_dict: dict[str, torch.Tensor] | None = None, fp8_recipe: str | None = None):
    """``hf_state_dict`` None: megatron's random init (``--seed``). ``fp8_recipe``: default ``--fp8-recipe``."""
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.megatron.config import MegatronConfig

    kw: dict[str, Any] = dict(tensor_parallel_size=args.tp, sequence_parallel=args.sequence_parallel,
                              recompute=args.recompute, params_dtype="bfloat16", fusions=args.fusions)
    if getattr(hf_config, "num_experts", None):
        kw.update(expert_model_parallel_size=args.ep, moe_token_dispatcher=args.dispatcher
                  or ("alltoall" if torch.cuda.is_available() else "allgather"))
    if precision == "fp8":
        kw.update(fp8=args.fp8_format, fp8_recipe=fp8_recipe or args.fp8_recipe)
    use_te = {"auto": None, "te": True, "local": False}[args.spec]
    return MegatronBackend(role, hf_config, MegatronConfig(**kw), optim, hf_state_dict=hf_state_dict,
                           seed=args.seed, use_te=use_te)


def build_torch(role: str, hf_config, args: argparse.Namespace, device: torch.device, optim):
    from tempo_mega.backends.torch import build_actor, build_critic

    kw = dict(dtype=torch.bfloat16, attn_implementation=args.torch_attn, device=device, seed=args.seed)
    if role == "actor":
        return build_actor(hf_config, optim, **kw)
    return build_critic(hf_config, optim, **kw)


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> tuple[float, float, Any]:
    """(mean seconds per step, peak GiB allocated over the timed steps or NaN off CUDA, fn's last output).
    CUDA: events around each step; elsewhere wall time."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return sum(seconds) / len(seconds), peak, out


def _free(device: torch.device) -> None:
    gc.collect()  # a backend's output-layer hook holds the backend: a cycle
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "oom"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {first[:160]}"


def bench_role(kind: str, role: str, precision: str, ctx: dict[str, Any]) -> list[Row]:
    """Rows for every requested phase of one backend instance; a failure marks its phase and leaves
    the later ones "not run"."""
    args, device, hf_config = ctx["args"], ctx["device"], ctx["hf_config"]
    rows = [Row(kind, role, precision, phase) for phase in args.phases]
    from tempo_mega.backends.base import OptimConfig

    optim = OptimConfig(lr=1e-6, mini_batch_size=args.seqs, max_tokens_per_micro_batch=args.micro_tokens)
    backend = batch = None
    current = rows[0]  # the phase under way: a build failure is the first one's
    try:
        backend = (build_megatron(role, hf_config, args, precision, optim) if kind == "megatron"
                   else build_torch(role, hf_config, args, device, optim))
        batch = make_batch(args, hf_config.vocab_size)
        forward = backend.forward_logprobs if role == "actor" else backend.forward_values
        tokens = batch.num_tokens()
        head = role == "actor"
        flops_per_token = {"fwd": forward_flops_per_token(hf_config, args.seq_len, include_lm_head=head),
                           "train": train_flops_per_token(hf_config, args.seq_len, include_lm_head=head)}
        loss = loss_fn(role)
        out = None
        for row in rows:
            current = row
            if row.phase == "fwd":
                step_s, peak, out = time_steps(lambda: forward(batch), args.warmup, args.steps, device)
            else:
                if out is None:  # the train losses need the old log-probs / values of these weights
                    out = forward(batch)
                if role == "actor":
                    batch.old_logprobs = out
                else:
                    batch.values = out
                step_s, peak, metrics = time_steps(lambda: backend.train_step(batch, loss),
                                                   args.warmup, args.steps, device)
                if metrics.get(f"{role}/skipped_steps", 0) > 0:  # timed without its optimizer step
                    row.status = "error: non-finite grad norm, optimizer step skipped"
            gpus = ctx["world_size"]
            row.tokens_per_step = tokens
            row.step_s = step_s
            row.tokens_per_s_per_gpu = tokens / step_s / gpus
            flops_per_s = tokens * flops_per_token[row.phase] / step_s / gpus
            row.tflops_per_gpu = flops_per_s / 1e12
            if ctx["peak_flops"]:
                row.mfu = flops_per_s / ctx["peak_flops"]
            row.peak_mem_gib = peak
    except Exception as e:
        current.status = _failure(e)
        if current.status != "oom":
            traceback.print_exc()  # the table keeps one line of it
        for later in rows[rows.index(current) + 1 :]:
            later.status = f"not run ({current.phase}: {current.status.split(':')[0]})"
    finally:
        backend = batch = forward = None
        _free(device)
    return rows


# ----------------------------------------------------------------------------- critic value regression
VALUE_WEIGHT_DECAY, VALUE_GRAD_CLIP = 0.01, 1.0  # the product's critic (configs/algo/*.yaml)


@dataclass
class ValueStep:
    """One step of one comparison of a candidate critic (FP8, or a second bf16 one) with the bf16
    reference built from the same weights, on the same batch. Step k: values after k train steps.
    ``status`` is "ok", "skipped: why" or "error: what"; the numbers are NaN unless "ok"."""

    comparison: str  # "fp8 vs bf16" or "bf16 vs bf16"
    candidate: str  # "fp8" or "bf16"
    fp8_format: str
    fp8_recipe: str
    step: int | None = None  # None: the comparison did not run
    status: str = "ok"
    ref_mse_to_returns: float = math.nan  # the bf16 critic's masked mean (V - R)^2
    cand_mse_to_returns: float = math.nan
    mse_vs_ref: float = math.nan  # masked mean (V_cand - V_bf16)^2
    max_abs_diff: float = math.nan  # max |V_cand - V_bf16| over response tokens
    rel_rms: float = math.nan  # rms(V_cand - V_bf16) / rms(V_bf16)
    note: str = ""  # an optimizer step skipped on a non-finite grad norm, say

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def value_batch(args: argparse.Namespace, vocab_size: int):
    """The benchmark's batch (same tokens) with fixed synthetic returns: row b's 0/1 outcome reward
    (1 for even b, 0 for odd) on every response token, what GAE gives with gamma = lambda = 1."""
    batch = make_batch(args, vocab_size)
    reward = (torch.arange(batch.batch_size) % 2 == 0).float()
    batch.returns = reward[:, None] * batch.response_mask.float()
    return batch


def value_stats(ref: torch.Tensor, cand: torch.Tensor, returns: torch.Tensor,
                mask: torch.Tensor) -> dict[str, float]:
    """Masked statistics over the response tokens, in float64: each critic's MSE to the returns, and
    the candidate's MSE, max abs difference and relative RMS against the reference."""
    m = mask.bool()
    r, c, ret = (t.detach().to("cpu", torch.float64)[m] for t in (ref, cand, returns))
    diff = c - r
    mse = float(diff.pow(2).mean())
    ref_rms = float(r.pow(2).mean().sqrt())
    return {"ref_mse_to_returns": float((r - ret).pow(2).mean()),
            "cand_mse_to_returns": float((c - ret).pow(2).mean()),
            "mse_vs_ref": mse, "max_abs_diff": float(diff.abs().max()),
            "rel_rms": math.sqrt(mse) / ref_rms if ref_rms > 0 else (0.0 if mse == 0 else math.inf)}


def value_trajectory(backend, batch, steps: int) -> tuple[list[torch.Tensor], list[bool]]:
    """(values after 0..steps train steps [B, L] on CPU, whether each step's optimizer step was
    skipped). Each step trains on the batch with old values = this critic's values of that step.
    One discarded forward first: FP8 delayed scaling quantizes with scales from earlier passes' amax
    history, so step 0 is the steady-state forward, not the first-ever one (for bf16 a no-op)."""
    loss = loss_fn("critic")
    backend.forward_values(batch)
    values, skipped = [], []
    for k in range(steps + 1):
        v = backend.forward_values(batch)
        values.append(v.detach().float().cpu())
        if k == steps:
            break
        batch.values = v.detach()
        metrics = backend.train_step(batch, loss)
        skipped.append(metrics.get("critic/skipped_steps", 0) > 0)
    batch.values = None
    return values, skipped


def value_check(ctx: dict[str, Any], comparisons: list[ValueStep]) -> list[ValueStep]:
    """Runs the comparisons not marked skipped: the bf16 reference once (its weights exported before
    it trains), then each candidate from those weights; returns one ValueStep per step per
    comparison (one per skipped or failed comparison)."""
    args, device, hf_config = ctx["args"], ctx["device"], ctx["hf_config"]
    todo = [c for c in comparisons if c.status == "ok"]
    if not todo:
        return comparisons
    from tempo_mega.backends.base import OptimConfig

    optim = OptimConfig(lr=args.value_lr, weight_decay=VALUE_WEIGHT_DECAY, grad_clip=VALUE_GRAD_CLIP,
                        mini_batch_size=args.seqs, max_tokens_per_micro_batch=args.micro_tokens)
    batch = value_batch(args, hf_config.vocab_size)
    backend = weights = None
    try:
        backend = build_megatron("critic", hf_config, args, "bf16", optim)
        weights = dict(backend.export_weights(dtype=None))  # bf16 trunk, float32 value head
        ref, ref_skipped = value_trajectory(backend, batch, args.value_steps)
    except Exception as e:
        traceback.print_exc()
        for c in todo:
            c.status = f"{_failure(e)} (bf16 reference)"
        return comparisons
    finally:
        backend = None
        _free(device)
    out: list[ValueStep] = []
    for c in comparisons:
        if c.status != "ok":
            out.append(c)
            continue
        try:
            backend = build_megatron("critic", hf_config, args, c.candidate, optim, hf_state_dict=weights,
                                     fp8_recipe=c.fp8_recipe if c.candidate == "fp8" else None)
            cand, cand_skipped = value_trajectory(backend, batch, args.value_steps)
        except Exception as e:
            traceback.print_exc()
            c.status = _failure(e)
            out.append(c)
            continue
        finally:
            backend = None
            _free(device)
        for k in range(args.value_steps + 1):
            notes = [f"{who}: the train step after step {k} skipped its optimizer step (non-finite grad norm)"
                     for who, sk in (("bf16", ref_skipped), (c.candidate, cand_skipped))
                     if k < len(sk) and sk[k]]
            out.append(ValueStep(c.comparison, c.candidate, c.fp8_format, c.fp8_recipe, step=k,
                                 note="; ".join(notes),
                                 **value_stats(ref[k], cand[k], batch.returns, batch.response_mask)))
    return out


def value_comparisons(args: argparse.Namespace, megatron_missing: str | None,
                      fp8_missing: str | None) -> list[ValueStep]:
    """The comparisons asked for, those that cannot run here already marked skipped with the reason."""
    fp8 = [ValueStep("fp8 vs bf16", "fp8", args.fp8_format, recipe) for recipe in args.value_fp8_recipes]
    base = [ValueStep("bf16 vs bf16", "bf16", "-", "-")] if args.value_check_baseline else []
    reason = None
    if "critic" not in args.roles:
        reason = "critic not in --roles"
    elif "megatron" not in args.backends:
        reason = "megatron not in --backends"
    elif megatron_missing:
        reason = megatron_missing
    fp8_reason = reason or ("fp8 not in --precision" if "fp8" not in args.precision else fp8_missing)
    for c in fp8:
        if fp8_reason:
            c.status = f"skipped: {fp8_reason}"
    for c in base:
        if reason:
            c.status = f"skipped: {reason}"
    return fp8 + base


def value_report(args: argparse.Namespace, steps: list[ValueStep]) -> list[str]:
    lines = [f"### Critic value regression: same weights, same batch, {args.value_steps} train steps "
             f"(critic lr {args.value_lr:g}, weight decay {VALUE_WEIGHT_DECAY}, clip {VALUE_GRAD_CLIP}; "
             "returns: rows' 0/1 reward on every response token)"]
    seen: list[tuple[str, str]] = []
    for s in steps:
        if (s.comparison, s.fp8_recipe) not in seen:
            seen.append((s.comparison, s.fp8_recipe))
    for comparison, recipe in seen:
        group = [s for s in steps if (s.comparison, s.fp8_recipe) == (comparison, recipe)]
        first = group[0]
        cand = "fp8" if first.candidate == "fp8" else "bf16 (2nd)"
        title = (f"fp8 ({first.fp8_format}, recipe {recipe}) vs bf16" if first.candidate == "fp8" else
                 "bf16 vs bf16 (baseline check: the comparison itself and run-to-run noise; not FP8)")
        if not first.ok:
            lines.append(f"- {title}: {first.status}")
            continue
        lines += ["", f"{title}:", "",
                  f"| step | value MSE to returns, bf16 | value MSE to returns, {cand} | "
                  f"value MSE, {cand} vs bf16 | max abs diff | rel RMS | note |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for s in group:
            lines.append(f"| {s.step} | {s.ref_mse_to_returns:.6g} | {s.cand_mse_to_returns:.6g} | "
                         f"{s.mse_vs_ref:.4g} | {s.max_abs_diff:.4g} | {s.rel_rms:.4g} | {s.note} |")
    return lines


def value_csv_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}_value{ext or '.csv'}"


# ----------------------------------------------------------------------------- report
def _num(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)


def short_status(status: str) -> str:
    """A skip's reason is said once below the table, not on every row."""
    return "skipped" if status.startswith("skipped") else status


def markdown_table(rows: list[Row]) -> str:
    lines = ["| backend | role | precision | phase | status | tokens/step | s/step | tokens/s/GPU | "
             "TFLOP/s/GPU | MFU | peak GiB |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.backend} | {r.role} | {r.precision} | {r.phase} | {short_status(r.status)} | "
                     f"{r.tokens_per_step if r.ok else '-'} | {_num(r.step_s, '.4f')} | "
                     f"{_num(r.tokens_per_s_per_gpu, ',.0f')} | {_num(r.tflops_per_gpu, '.2f')} | "
                     f"{_num(100 * r.mfu, '.1f') + ('%' if r.mfu == r.mfu else '')} | "
                     f"{_num(r.peak_mem_gib, '.2f')} |")
    return "\n".join(lines)


def ratios(rows: list[Row]) -> list[str]:
    """'name role phase: x' lines for FP8 / bf16 (Megatron) and Megatron / torch (bf16)."""
    by = {(r.backend, r.role, r.precision, r.phase): r for r in rows}
    pairs = [("fp8/bf16 tokens/s", by[key], by.get(("megatron", key[1], "bf16", key[3])))
             for key in by if key[0] == "megatron" and key[2] == "fp8"]
    pairs += [("megatron/torch tokens/s (bf16)", by[key], by.get(("torch", key[1], "bf16", key[3])))
              for key in by if key[0] == "megatron" and key[2] == "bf16"]
    out = []
    for name, r, base in pairs:
        if base is None:
            continue
        if r.ok and base.ok:
            value = f"{r.tokens_per_s_per_gpu / base.tokens_per_s_per_gpu:.2f}x"
        else:
            value = f"not measured ({short_status(r.status if not r.ok else base.status)})"
        out.append(f"- {name}, {r.role} {r.phase}: {value}")
    return out


def write_csv(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    records = [{**asdict(r), **meta} for r in rows]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


# ----------------------------------------------------------------------------- main
def _csv_list(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=tuple(MODELS), default="qwen3_8b",
                   help="whose layer: Qwen3-8B (dense) or Qwen3-30B-A3B (128 experts, top-8)")
    p.add_argument("--layers", type=int, default=None,
                   help=f"num_hidden_layers (default {DEFAULT_LAYERS} of Qwen3-8B's 36, {DEFAULT_MOE_LAYERS} of "
                        "Qwen3-30B-A3B's 48)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default Qwen3-8B's 4096)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 3 x hidden)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default hidden / head_dim)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default heads / 4)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 128)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default Qwen3's 151936)")
    p.add_argument("--seq-len", type=int, default=16384, help="real tokens per sequence")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens of each sequence")
    p.add_argument("--seqs", type=int, default=2, help="sequences per step (one optimizer step)")
    p.add_argument("--micro-tokens", type=int, default=None,
                   help="max real tokens per micro-batch (default: --seq-len, one sequence each)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--precision", type=_csv_list(PRECISIONS), default=list(PRECISIONS), help="bf16,fp8")
    p.add_argument("--roles", type=_csv_list(ROLES), default=list(ROLES), help="actor,critic")
    p.add_argument("--phases", type=_csv_list(PHASES), default=list(PHASES), help="fwd,train")
    p.add_argument("--tp", type=int, default=1, help="megatron tensor-parallel size")
    p.add_argument("--ep", type=int, default=1, help="megatron expert-parallel size (--model qwen3_30b_a3b)")
    p.add_argument("--dispatcher", choices=DISPATCHERS, default=None,
                   help="megatron.moe_token_dispatcher (default alltoall on a GPU, allgather on CPU)")
    p.add_argument("--experts", type=int, default=None, help="num_experts (default the model's)")
    p.add_argument("--top-k", type=int, default=None, help="num_experts_per_tok (default the model's)")
    p.add_argument("--moe-intermediate", type=int, default=None, help="moe_intermediate_size (default the model's)")
    p.add_argument("--sequence-parallel", action="store_true", help="megatron sequence parallel (TP >= 2, TE)")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none", help="megatron activation recompute")
    p.add_argument("--fusions", action="store_true",
                   help="megatron.fusions (GPU + TE): run once with and once without to measure them")
    p.add_argument("--fp8-format", choices=FP8_FORMATS, default="hybrid", help="megatron.fp8 of the FP8 rows")
    p.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed", help="megatron.fp8_recipe")
    p.add_argument("--backends", type=_csv_list(BACKENDS), default=list(BACKENDS),
                   help="megatron,torch: the torch backend (bf16, single process) is the baseline at the same shape")
    p.add_argument("--spec", choices=SPECS, default="auto",
                   help="megatron layer spec: te (Transformer Engine), local (megatron's own layers; no FP8), "
                        "auto (te where it imports)")
    p.add_argument("--torch-attn", default="sdpa", help="attn_implementation of the torch baseline")
    p.add_argument("--peak", default=None,
                   help="dense BF16 peak per GPU: a key of flops.PEAK_FLOPS or TFLOP/s (default: from the card)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu: a wiring check at toy shapes (no MFU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", metavar="PATH",
                   help="also write the rows as CSV, and the critic value-regression steps to PATH's stem + "
                        "'_value.csv' (runs/b.csv -> runs/b_value.csv: one row per comparison and step)")
    p.add_argument("--value-steps", type=int, default=5,
                   help="critic value regression, FP8 vs bf16 from the same weights: train steps (0: off)")
    p.add_argument("--value-lr", type=float, default=1e-6,
                   help="critic lr of the value regression (the Qwen3 experiments' critic lr)")
    p.add_argument("--value-fp8-recipes", type=_csv_list(FP8_RECIPES), default=None,
                   help="FP8 recipes to compare with bf16, e.g. delayed,tensorwise,blockwise "
                        "(unset: --fp8-recipe)")
    p.add_argument("--value-check-baseline", action="store_true",
                   help="also run the value comparison bf16 vs bf16 (checks the comparison: 0 at step 0; "
                        "shows the run-to-run noise floor; runs on CPU)")
    args = p.parse_args(argv)
    if args.micro_tokens is None:
        args.micro_tokens = args.seq_len
    if args.layers is None:
        args.layers = DEFAULT_LAYERS if args.model == "qwen3_8b" else DEFAULT_MOE_LAYERS
    for key in ("layers", "seq_len", "seqs", "micro_tokens", "steps", "tp", "ep"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.value_steps < 0:
        p.error(f"--value-steps must be >= 0, got {args.value_steps}")
    if not args.value_lr >= 0:
        p.error(f"--value-lr must be >= 0, got {args.value_lr}")
    if args.value_fp8_recipes is None:
        args.value_fp8_recipes = [args.fp8_recipe]
    if not 1 <= args.prompt_len < args.seq_len:
        p.error(f"--prompt-len must be in [1, --seq-len), got {args.prompt_len} for --seq-len {args.seq_len}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        if not torch.cuda.is_available():
            print("bench_train_step: no CUDA device here; train-step timings are measured on GPUs only "
                  "(--device cpu runs a wiring check at toy shapes)")
            return 0
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train_step: --device cuda, but CUDA is not available here")
        return 2
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    import torch.distributed as dist

    world_up_before = dist.is_initialized()
    world_size = dist.get_world_size() if world_up_before else int(os.environ.get("WORLD_SIZE", 1))
    rank = dist.get_rank() if world_up_before else int(os.environ.get("RANK", 0))
    hf_config = qwen3_config(args)
    peak_flops, peak_source = resolve_peak(args.peak, device, device_name)
    ctx = {"args": args, "device": device, "hf_config": hf_config, "world_size": world_size,
           "peak_flops": peak_flops}

    notes: list[str] = []
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"## bench_train_step: {device_name}, {world_size} GPU{'s' if world_size > 1 else ''}"
        if device.type == "cuda" else f"## bench_train_step: {device_name} (wiring check; not GPU numbers)")
    say(f"- {versions()}")
    c, name, full = hf_config, MODEL_NAMES[args.model], MODELS[args.model]["num_hidden_layers"]
    if is_model_layer(c, args.model):
        if c.num_hidden_layers < full:
            say(f"- {name}-shaped layers, num_hidden_layers REDUCED from {full} to "
                f"{c.num_hidden_layers} to fit one card (--layers)")
        else:
            say(f"- {name} shape, {c.num_hidden_layers} layers")
    else:
        say(f"- custom shape (not {name}): {c.num_hidden_layers} layers")
    counts = param_counts(c)
    if getattr(c, "num_experts", None):
        say(f"- mixture of experts: {c.num_experts} experts of {c.moe_intermediate_size}, top-{c.num_experts_per_tok}; "
            f"{counts['active_total']:,} of the {counts['total']:,} params active per token (the FLOPs and MFU "
            f"count the active ones); megatron EP {args.ep}, dispatcher "
            f"{args.dispatcher or ('alltoall' if torch.cuda.is_available() else 'allgather')}")
    head_share = 6 * counts["lm_head"] / train_flops_per_token(c, args.seq_len)
    say(f"- hidden {c.hidden_size}, MLP {c.intermediate_size}, heads {c.num_attention_heads} (KV "
        f"{c.num_key_value_heads}) x {c.head_dim}, vocab {c.vocab_size}; {counts['total']:,} params, "
        f"LM head {100 * head_share:.0f}% of the actor's training FLOPs")
    say(f"- {args.seqs} x {args.seq_len} tokens per step (prompt {args.prompt_len}), micro-batches of <= "
        f"{args.micro_tokens} tokens; {args.warmup} warm-up + {args.steps} timed steps per phase")
    say(f"- backends: {','.join(args.backends)}; megatron: layer spec {args.spec}, TP {args.tp}, sequence "
        f"parallel {args.sequence_parallel}, recompute {args.recompute}, params bf16; FP8 rows: "
        f"fp8={args.fp8_format}, recipe {args.fp8_recipe}")
    say("- MFU over the dense BF16 peak: "
        + (f"{peak_flops / 1e12:.0f} TFLOP/s ({peak_source})" if peak_flops else peak_source))

    megatron_missing = megatron_unavailable() if "megatron" in args.backends else None
    fp8_missing = None
    if megatron_missing:
        notes.append(f"Megatron rows skipped: {megatron_missing}")
    elif "fp8" in args.precision and "megatron" in args.backends:
        fp8_missing = ("the local layer spec (--spec local) has no FP8" if args.spec == "local"
                       else fp8_unavailable(device))
        if fp8_missing:
            notes.append(f"FP8 rows skipped: {fp8_missing}")

    rows: list[Row] = []
    for precision in args.precision if "megatron" in args.backends else ():
        for role in args.roles:
            reason = megatron_missing or (fp8_missing if precision == "fp8" else None)
            if reason:
                rows += [Row("megatron", role, precision, ph, status=f"skipped: {reason}") for ph in args.phases]
            else:
                rows += bench_role("megatron", role, precision, ctx)
    if "torch" in args.backends and "bf16" in args.precision:
        for role in args.roles:
            if world_size > 1:
                rows += [Row("torch", role, "bf16", ph, status="skipped: the torch backend is single-process")
                         for ph in args.phases]
            else:
                rows += bench_role("torch", role, "bf16", ctx)

    value_steps: list[ValueStep] = []
    if args.value_steps > 0:
        value_steps = value_check(ctx, value_comparisons(args, megatron_missing, fp8_missing))

    if not world_up_before and dist.is_initialized():  # what the backend brought up, taken down again
        if not megatron_missing:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()

    if rank == 0:
        print()
        print(markdown_table(rows))
        print()
        lines = ratios(rows)
        if lines:
            print("Ratios (same process, same shape):")
            print("\n".join(lines))
        for note in notes:
            print(f"NOTE: {note}")
        if value_steps:
            print()
            print("\n".join(value_report(args, value_steps)))
        if args.csv:
            meta = {"device": device_name, "world_size": world_size, "layers": c.num_hidden_layers,
                    "hidden": c.hidden_size, "seq_len": args.seq_len, "prompt_len": args.prompt_len,
                    "seqs": args.seqs, "tp": args.tp, "peak": peak_source}
            write_csv(args.csv, rows, meta)
            print(f"wrote {len(rows)} rows to {args.csv}")
            if value_steps:
                path = value_csv_path(args.csv)
                write_csv(path, value_steps, {**meta, "value_lr": args.value_lr})
                print(f"wrote {len(value_steps)} value-regression rows to {path}")
    failed = [r.status for r in rows] + [s.status for s in value_steps]
    return 1 if any(st.startswith("error") for st in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
