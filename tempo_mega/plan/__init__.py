"""``tempo-mega plan``: per-GPU memory and an estimated step time of a run, from the same config as ``train``.

    tempo-mega plan experiment=qwen3_32b_tempo --nodes 4 --gpu h100-80gb [hydra overrides...]

What is counted, per GPU (the busiest one: DP rank 0 of the first pipeline stage, on rank 0's node, which
also holds a colocated SGLang engine, as every node does with ``rollout.sglang.launch_on=every_node``):

- **Exact** (bytes the backends allocate): each role's weights, gradient buffers and optimizer state.
  backend=megatron: bf16 (``megatron.params_dtype``) weights, megatron's fp32 gradient buffer
  (``grad_reduce_in_fp32``), and with a 16-bit model fp32 master weights + Adam moments (float32 models:
  the moments only); the distributed optimizer holds the master weights and moments of its DP shard of
  each buffer, and pads every buffer as megatron-core 0.16 does (parameter starts to 64 elements, buffer
  ends to lcm(DP, 128)); one fp32 ``step`` scalar per optimizer tensor. backend=torch: weights, gradients
  and AdamW moments in the model dtype (the critic's value head float32). The model's parameter count
  is the real checkpoint's (``telemetry.flops.param_counts``). The test builds the tiny model with both
  backends and counts their tensors' bytes against these.
- **Estimated** (formulas, labelled so): activations of one micro-batch of
  ``algo.<role>.max_tokens_per_micro_batch`` tokens under ``megatron.recompute``, the chunked log-prob
  logits (``megatron.logprob_chunk_tokens``), SGLang's KV cache as SGLang 0.5 sizes it (weights + KV
  cache = ``mem_fraction_static`` x the memory free when the server starts: the trainer's steady state
  taken off when colocated), and the step time: train phases from model FLOPs (``telemetry.flops``, the
  one FLOP model) over the card's dense BF16 peak at an assumed MFU, decoding from the bytes each decode
  step reads (weights once, each sequence's KV cache) over HBM bandwidth at an assumed efficiency.

Sizes are printed in GiB (2^30 bytes); cards' capacities are what ``nvidia-smi`` reports as total memory.

The parts: ``plan.cards`` (the cards and the assumptions), ``plan.memory`` (the byte arithmetic),
``plan.report`` (the ``Plan`` record and its printing); ``plan`` below puts them together for a config
and estimates the step time. Their names stay importable from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

from tempo_mega.algo.recipes import recipe
from tempo_mega.plan.cards import CARDS, GIB, MIB, Assumptions, Card, card_for_device_name
from tempo_mega.plan.memory import (
    RoleMemory,
    activation_bytes,
    kv_bytes_per_token,
    layer_activation_bytes_per_token,
    logit_bytes,
    megatron_role_memory,
    sglang_weight_bytes,
    torch_role_memory,
)
from tempo_mega.plan.report import Plan
from tempo_mega.telemetry.flops import (
    PEAK_FLOPS,
    TransformerShape,
    forward_flops_per_token,
    generate_flops_per_token,
    param_counts,
    train_flops_per_token,
)

__all__ = [
    "CARDS",
    "GIB",
    "MIB",
    "NO_CHECKPOINT",
    "QWEN3_VOCAB_SIZE",
    "Assumptions",
    "Card",
    "Plan",
    "RoleMemory",
    "activation_bytes",
    "card_for_device_name",
    "headline_for_run",
    "kv_bytes_per_token",
    "layer_activation_bytes_per_token",
    "logit_bytes",
    "main",
    "megatron_role_memory",
    "model_shape",
    "plan",
    "sglang_weight_bytes",
    "torch_role_memory",
]

QWEN3_VOCAB_SIZE = 151_936  # every Qwen3 checkpoint's config.json
NO_CHECKPOINT = "PLAN_WITHOUT_CHECKPOINT"  # model.path when planning without one: shape from configs/model


def _vocab_size(cfg: Any) -> int:
    """The vocabulary of a model without a checkpoint config: the synthetic tokenizer's for a fresh model."""
    if cfg.model.path is None:
        from tempo_mega.data.pool import load_tokenizer

        return len(load_tokenizer(cfg))
    return QWEN3_VOCAB_SIZE


def model_shape(cfg: Any, vocab_size: int | None = None) -> TransformerShape:
    """The model's shape: the checkpoint's config.json where ``model.path`` has one, else ``model.*``
    (with the synthetic tokenizer's vocabulary for a fresh model, Qwen3's otherwise)."""
    m = cfg.model
    if m.path and m.path != NO_CHECKPOINT and os.path.isfile(os.path.join(m.path, "config.json")):
        with open(os.path.join(m.path, "config.json")) as f:
            return TransformerShape.of(json.load(f))
    fields = {k: getattr(m, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                         "num_attention_heads", "num_key_value_heads", "head_dim",
                                         "tie_word_embeddings")}
    if m.num_experts:
        fields.update({k: getattr(m, k) for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size")})
    return TransformerShape(vocab_size=vocab_size or _vocab_size(cfg), **fields)


def plan(cfg: Any, *, nodes: int = 1, gpus_per_node: int = 8, gpu: str = "h100-80gb",
         assumptions: Assumptions | None = None, vocab_size: int | None = None) -> Plan:
    """The plan of ``cfg`` (a ``TrainConfig`` from ``load_config``) on ``nodes`` x ``gpus_per_node`` ``gpu``s."""
    from tempo_mega.config import megatron_config

    a = assumptions or Assumptions()
    if gpu not in CARDS:
        raise ValueError(f"--gpu: unknown card {gpu!r} (one of {', '.join(CARDS)})")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be >= 1")
    if a.sglang_placement == "colocated" and cfg.rollout.placement == "separate":  # the run's own, unless told
        a = dataclasses.replace(a, sglang_placement="separate", sglang_nodes=cfg.rollout.rollout_nodes)
    if a.sglang_placement not in ("colocated", "separate"):
        raise ValueError(f"--sglang-placement must be colocated or separate, got {a.sglang_placement!r}")
    card, s = CARDS[gpu], model_shape(cfg, vocab_size)
    world = nodes * gpus_per_node
    notes: list[str] = []
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}
    al, r = cfg.algo, cfg.rollout
    if cfg.backend == "megatron":
        mc = megatron_config(cfg)
        tp, pp, cp, vpp = mc.tensor_parallel_size, mc.pipeline_parallel_size, mc.context_parallel_size, mc.vpp or 1
        try:
            dp = mc.data_parallel_size(world)
            mc.validate_for(num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
                            num_layers=s.num_hidden_layers, vocab_size=s.vocab_size,
                            num_experts=s.num_experts or None)
        except ValueError as e:
            raise ValueError(f"config key 'megatron': {e} (--nodes {nodes} x --gpus-per-node {gpus_per_node})") from None
        db = dtype_bytes[mc.params_dtype]
        ep, etp = (mc.expert_model_parallel_size, mc.etp) if s.num_experts else (1, tp)
        edp = world // (etp * ep * pp)
        by_stage = [{role: megatron_role_memory(s, role, dtype_bytes=db, tp=tp, pp=pp, vpp=vpp, dp=dp,
                                                distributed_optimizer=mc.use_distributed_optimizer, pp_rank=stage,
                                                ep=ep, etp=etp, expert_dp=edp)
                     for role in ("actor", "critic")} for stage in sorted({0, pp - 1})]
        roles = max(by_stage, key=lambda rs: sum(rm.state for rm in rs.values()))  # the fuller stage
        recompute, chunk_tokens, sp = mc.recompute, mc.logprob_chunk_tokens, mc.sequence_parallel
        layout = {"backend": "megatron", "tp": tp, "pp": pp, "vpp": vpp, "cp": cp, "dp": dp, "recompute": recompute,
                  "distributed_optimizer": mc.use_distributed_optimizer}
        if s.num_experts:
            layout.update(ep=ep, etp=etp, expert_dp=edp)
    else:
        if world != 1:
            notes.append("backend=torch trains in one process on one GPU: only GPU 0 is planned")
        tp = pp = cp = vpp = dp = 1
        db = dtype_bytes[cfg.model.dtype]
        roles = {role: torch_role_memory(s, role, dtype_bytes=db) for role in ("actor", "critic")}
        recompute = "full" if cfg.model.gradient_checkpointing else "none"
        chunk_tokens, sp = 4096, False
        layout = {"backend": "torch", "tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 1, "recompute": recompute,
                  "distributed_optimizer": False}
    memory: dict[str, float] = {}
    for role, rm in roles.items():
        memory[f"{role}_weights"], memory[f"{role}_grads"], memory[f"{role}_optimizer"] = \
            rm.weights, rm.grads, rm.optimizer
    memory["trainer_state"] = sum(rm.state for rm in roles.values())
    # activations: the larger role's micro-batch (the actor's, with its logits); CP splits the sequence
    act_tp = tp if sp else 1
    layers_per_rank = s.num_hidden_layers // pp
    in_flight = pp  # 1F1B: the first stage holds PP micro-batches
    tokens = {role: getattr(al, role).max_tokens_per_micro_batch // cp for role in ("actor", "critic")}
    acts = {role: activation_bytes(s, recompute, tokens[role], act_tp, layers_per_rank, in_flight)
            for role in tokens}
    last_stage_logits = logit_bytes(s, chunk_tokens, tokens["actor"], tp)
    memory["activations"] = max(acts.values())
    memory["logits"] = last_stage_logits
    memory["reserve"] = a.reserve_gib * GIB
    memory["train_peak"] = memory["trainer_state"] + memory["activations"] + memory["logits"] + memory["reserve"]
    if pp > 1:
        notes.append("PP > 1: activations are the first stage's (PP micro-batches in flight), logits the last "
                     "stage's; both are added, an upper bound for either stage")

    # SGLang
    sg = r.sglang
    sg_tp, engines = sg.tp_size, sg.num_engines
    frac = sg.mem_fraction_static
    if frac is None:
        frac = 0.85
        notes.append("rollout.sglang.mem_fraction_static is null (SGLang picks one at launch): planned with 0.85")
    kv_db = 1 if sg.kv_cache_dtype.startswith("fp8") else 2
    release = sg.release_during_training
    samples = int(round((al.labeled_prompts_per_step + al.unlabeled_prompts_per_step) * al.num_samples_per_prompt
                        * a.gen_batches))
    mean_resp = a.mean_response_tokens or r.max_response_tokens // 2
    # trainer.offload_during_rollout: what leaves the GPU while SGLang holds its memory (the servers launch
    # while it is away, so their KV cache is sized without it), and pinned host memory per node for it
    offload = cfg.trainer.offload_during_rollout
    parts = {"none": (), "optimizer": ("optimizer",), "all": ("weights", "grads", "optimizer")}[offload]
    memory["offloaded"] = sum(memory[f"{role}_{p}"] for role in roles for p in parts)
    resident = memory["trainer_state"] - memory["offloaded"]
    if offload != "none":
        notes.append(f"trainer.offload_during_rollout={offload}: {memory['offloaded'] / GIB:.1f} GiB per GPU to pinned "
                     f"host memory during rollout ({memory['offloaded'] * gpus_per_node / GIB:.0f} GiB per node)")
    if a.sglang_placement == "colocated":
        free_at_launch = card.memory_bytes - memory["reserve"] - resident
        if engines * sg_tp > gpus_per_node:
            raise ValueError(f"rollout.sglang.num_engines={engines} x rollout.sglang.tp_size={sg_tp} GPUs do not fit "
                             f"on a node of {gpus_per_node} GPUs (colocated)")
        # servers launched by the trainer: on every node (rollout.sglang.launch_on=every_node, backend=megatron),
        # else on rank 0's; servers given by URL are counted by whoever started them (here: one node's worth)
        every = sg.launch_on == "every_node" and cfg.backend == "megatron" and not sg.urls and sg.mode == "server"
        total_engines = engines * (nodes if every else 1)
    else:
        free_at_launch = card.memory_bytes - memory["reserve"]
        total_engines = engines * a.sglang_nodes
    sg_weights = sglang_weight_bytes(s, sg_tp) if r.engine == "sglang" else 0.0
    static = frac * max(free_at_launch, 0.0)
    kv = max(static - sg_weights, 0.0) if r.engine == "sglang" else 0.0
    cell = kv_bytes_per_token(s, sg_tp, kv_db)
    kv_tokens = kv / cell
    per_engine = math.ceil(samples / max(total_engines, 1))
    conc = a.concurrency or per_engine
    longest = max(int(kv_tokens // conc) - a.prompt_tokens, 0)
    full_at_once = int(kv_tokens // (a.prompt_tokens + r.max_response_tokens))
    memory["sglang_weights"], memory["sglang_kv"] = sg_weights, kv
    memory["sglang_rest"] = (1 - frac) * max(free_at_launch, 0.0) if r.engine == "sglang" else 0.0
    fits: dict[str, bool] = {}
    headroom: dict[str, float] = {}
    headroom["training"] = card.memory_bytes - memory["train_peak"]
    if a.sglang_placement == "colocated" and r.engine == "sglang" and not release:
        headroom["training"] -= static
        notes.append("rollout.sglang.release_during_training=false: SGLang's memory stays during training")
    if r.engine == "sglang":
        # rollout: SGLang needs its weights to fit inside its static share, and a KV cache
        headroom["rollout"] = static - sg_weights
        if a.sglang_placement == "colocated" and offload != "none":
            # the push: the trainer's whole state is back (it exports the weights) while SGLang takes its own
            headroom["weight_push"] = card.memory_bytes - memory["reserve"] - memory["trainer_state"] - sg_weights
    fits = {k: v > 0 for k, v in headroom.items()}
    if "rollout" in fits:  # and room for at least one whole response
        fits["rollout"] = kv / kv_bytes_per_token(s, sg_tp, kv_db) >= a.prompt_tokens + r.max_response_tokens
    if r.engine != "sglang":
        notes.append(f"rollout.engine={r.engine}: the HF engine holds a copy of the actor on rank 0; not sized here")
    sglang = {"engine": r.engine, "placement": a.sglang_placement, "engines": total_engines, "tp": sg_tp, "mem_fraction_static": frac,
              "kv_cache_dtype": sg.kv_cache_dtype, "kv_bytes_per_token": cell, "kv_tokens_per_engine": kv_tokens,
              "concurrency": conc, "longest_response": longest, "full_length_at_once": full_at_once,
              "samples": samples, "mean_response": mean_resp, "free_at_launch": free_at_launch}

    # step time (estimates)
    peak = PEAK_FLOPS[card.peak_key] * a.mfu
    seq = a.prompt_tokens + mean_resp
    step_tokens = samples * seq
    labeled_frac = al.labeled_prompts_per_step / max(al.labeled_prompts_per_step + al.unlabeled_prompts_per_step, 1)
    recompute_factor = 4 / 3 if recompute == "full" else 1.0  # one more forward per layer (hardware FLOPs)
    bubble = 1.0
    if pp > 1:
        rows_per_mb = max(1, tokens["actor"] * cp // seq)
        micro = max(1, al.mini_batch_prompts * al.num_samples_per_prompt // (dp * rows_per_mb))
        bubble = 1 + (pp - 1) / (vpp * micro)
    train = lambda flops: flops / (world * peak)  # noqa: E731
    step_s = {}
    step_s["logprob"] = train(step_tokens * (forward_flops_per_token(s, seq)
                                             + forward_flops_per_token(s, seq, include_lm_head=False))) * bubble
    critic_trains = al.e_step_every > 0 and al.critic.lr > 0
    critic_tokens = step_tokens * (labeled_frac if recipe(al.mode).critic_rows == "labeled" else 1.0)
    if critic_trains:
        step_s["e_step"] = train(al.critic.epochs * critic_tokens * train_flops_per_token(s, seq, include_lm_head=False)
                                 * recompute_factor) * bubble
    else:
        step_s["e_step"] = train(critic_tokens * forward_flops_per_token(s, seq, include_lm_head=False)) * bubble
        notes.append("critic frozen (algo.critic.lr=0 or algo.e_step_every=0): its E-step is a forward for the loss")
    step_s["m_step"] = train(al.actor.epochs * step_tokens * train_flops_per_token(s, seq) * recompute_factor) * bubble
    if r.engine == "sglang" and fits["rollout"]:
        c = max(1, min(conc, int(kv_tokens // seq)))
        waves = math.ceil(per_engine / c)
        kv_read = c * (a.prompt_tokens + mean_resp / 2) * cell  # mean KV length over a response
        bw_s = (sg_weights + kv_read) / (card.hbm_bytes_per_s * a.hbm_efficiency)
        fl_s = c * generate_flops_per_token(s, a.prompt_tokens, mean_resp) / sg_tp / peak
        step_s["rollout"] = waves * mean_resp * max(bw_s, fl_s)
        sglang["decode_batch"] = c
    else:
        step_s["rollout"] = float("nan")
    step_s["total"] = sum(v for v in step_s.values() if not math.isnan(v))
    exact = tuple(k for k in memory if k.startswith(("actor_", "critic_")) or k == "trainer_state")
    return Plan(experiment=cfg.experiment or "(no preset)", card=card, nodes=nodes, gpus_per_node=gpus_per_node,
                world=world, layout=layout, params_total=param_counts(s)["total"],
                params_active=param_counts(s)["active_total"], memory=memory, exact_keys=exact,
                fits=fits, headroom=headroom, sglang=sglang, step_s=step_s, assumptions=a, notes=notes)


def headline_for_run(cfg: Any, vocab_size: int | None = None) -> str:
    """One line for the start of ``train``: the plan at this run's world size, on the card it runs on (an
    H100 when it cannot tell). ``vocab_size``: the run's tokenizer's, so it is not loaded again."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", min(world, 8)))
    gpu, where = "h100-80gb", " (no GPU here: sized as one)"
    try:
        import torch

        if torch.cuda.is_available():
            where = ""
            gpu = card_for_device_name(torch.cuda.get_device_name())
    except Exception:  # the headline never stops a run
        pass
    try:
        return plan(cfg, nodes=max(1, world // per_node), gpus_per_node=per_node, gpu=gpu,
                    vocab_size=vocab_size).headline() + where
    except Exception as e:  # a headline for the log: it never stops a run
        return f"plan: not available ({type(e).__name__}: {e})"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tempo-mega plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(CARDS))
    defaults = Assumptions()
    kinds = {"float": float, "int": int, "int | None": int, "str": str}
    for f in dataclasses.fields(Assumptions):
        p.add_argument("--" + f.name.replace("_", "-"), type=kinds[str(f.type)], default=getattr(defaults, f.name))
    p.add_argument("--json", action="store_true", help="the numbers as one JSON object")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        p.error(f"unknown option {bad[0]}")
    from tempo_mega.config import load_config

    try:
        cfg = load_config(overrides)
    except ValueError as e:  # a preset that wants a checkpoint: planned from configs/model's shape
        if "'model.path'" not in str(e) or any(o.startswith("model.path=") for o in overrides):
            raise
        cfg = load_config([*overrides, f"model.path={NO_CHECKPOINT}"])
    assumptions = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})
    result = plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu, assumptions=assumptions)
    if args.json:
        step_s = {k: None if math.isnan(v) else round(v, 1) for k, v in result.step_s.items()}
        print(json.dumps({**result.numbers(), "step_s": step_s}))
    else:
        print(result.table())
        print(result.headline())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
