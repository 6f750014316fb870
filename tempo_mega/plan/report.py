"""The result of ``tempo-mega plan``: the ``Plan`` record and the three ways it is shown.

``Plan.numbers`` gives the flat, machine-checkable numbers (what ``--json`` prints and the presets'
``plan:`` comment lines quote), ``Plan.headline`` the one line ``train`` logs at its start, and
``Plan.table`` the full per-GPU breakdown: each memory item, whether training and rollout fit, SGLang's
KV cache and the estimated step time by phase with the assumptions it rests on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tempo_mega.plan.cards import GIB, Assumptions, Card
from tempo_mega.telemetry.flops import PEAK_FLOPS

# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    experiment: str
    card: Card
    nodes: int
    gpus_per_node: int
    world: int
    layout: dict[str, int | bool | str]
    params_total: int
    params_active: int  # per token (a mixture of experts: router + top-k experts; dense: params_total)
    memory: dict[str, float]  # bytes per GPU, by item
    exact_keys: tuple[str, ...]
    fits: dict[str, bool]
    headroom: dict[str, float]
    sglang: dict[str, Any]
    step_s: dict[str, float]
    assumptions: Assumptions
    notes: list[str] = field(default_factory=list)

    def numbers(self) -> dict[str, Any]:
        """Flat machine-checkable numbers (what the presets' ``plan:`` comment lines quote), GiB to 0.1."""
        g = {k: round(v / GIB, 1) for k, v in self.memory.items()}
        moe = {"active_params_b": round(self.params_active / 1e9, 2), "ep": self.layout.get("ep", 1),
               "expert_dp": self.layout.get("expert_dp", self.layout["dp"])} \
            if self.params_active != self.params_total else {}
        return {
            "params_b": round(self.params_total / 1e9, 2),
            **moe,
            "dp": self.layout["dp"],
            "trainer_state_gib": g["trainer_state"],
            "train_peak_gib": g["train_peak"],
            "activations_gib": g["activations"],
            "logits_gib": g["logits"],
            **({"offloaded_gib": g["offloaded"]} if self.memory.get("offloaded") else {}),
            "sglang_weights_gib": g["sglang_weights"],
            "sglang_kv_gib": g["sglang_kv"],
            "kv_tokens_per_engine": int(round(self.sglang["kv_tokens_per_engine"], -3)),
            "longest_response": int(self.sglang["longest_response"]),
            "fits": "yes" if all(self.fits.values()) else "no",
        }

    def headline(self) -> str:
        n = self.numbers()
        fit = "fits" if n["fits"] == "yes" else "DOES NOT FIT"
        worst = self.headroom["training"] / GIB
        kv = (f", SGLang KV {n['sglang_kv_gib']} GiB ({n['kv_tokens_per_engine']:,} tokens per engine)"
              if self.sglang["engine"] == "sglang" else "")
        return (f"plan ({self.card.name} x {self.world}, DP {n['dp']}): trainer state {n['trainer_state_gib']} GiB "
                f"+ activations/logits {n['activations_gib'] + n['logits_gib']:.1f} GiB per GPU{kv}; {fit}, "
                f"training headroom {worst:.1f} GiB; step ~{self.step_s['total']:.0f} s (estimate)")

    def table(self) -> str:
        L, g = self.layout, lambda b: f"{b / GIB:8.2f}"
        a = self.assumptions
        lines = [
            f"tempo-mega plan: {self.experiment} on {self.nodes} node(s) x {self.gpus_per_node} {self.card.name} "
            f"({self.card.memory_bytes / GIB:.1f} GiB each, {self.world} GPUs)",
            f"layout: backend {L['backend']}, TP {L['tp']}, PP {L['pp']} (virtual {L['vpp']}), CP {L['cp']}, "
            f"DP {L['dp']}, recompute {L['recompute']}, distributed optimizer {L['distributed_optimizer']}; "
            f"model {self.params_total:,} parameters",
            *([f"experts: EP {L['ep']}, expert TP {L['etp']}, expert DP {L['expert_dp']}; "
               f"{self.params_active:,} parameters active per token"] if "ep" in L else []),
            "",
            "per GPU (the busiest: fuller pipeline stage, DP rank 0, rank 0's node)         GiB",
        ]
        labels = {
            "actor_weights": "actor weights", "actor_grads": "actor gradient buffer",
            "actor_optimizer": "actor optimizer (fp32 master + Adam moments, DP-sharded)",
            "critic_weights": "critic weights", "critic_grads": "critic gradient buffer",
            "critic_optimizer": "critic optimizer", "trainer_state": "= trainer state (both roles)",
            "activations": "activations, one micro-batch (estimate)",
            "logits": "log-prob logits chunk + gathered hidden (estimate)",
            "reserve": "reserved: CUDA context, NCCL, allocator (assumed)",
            "train_peak": "= training peak",
            "offloaded": "off the GPU while SGLang generates (trainer.offload_during_rollout)",
            "sglang_weights": f"SGLang weights (TP {self.sglang['tp']})",
            "sglang_kv": f"SGLang KV cache (mem_fraction_static {self.sglang['mem_fraction_static']})",
            "sglang_rest": "SGLang's own activations and graphs (1 - mem_fraction_static)",
        }
        for key, label in labels.items():
            if key in self.memory and not (key == "offloaded" and not self.memory[key]):
                lines.append(f"  {label:<76}{g(self.memory[key])}")
        lines.append("")
        for phase, ok in self.fits.items():
            room = {"training": "headroom", "weight_push": "headroom with the trainer's state back and SGLang's "
                    "weights in:"}.get(phase, "KV cache beside the weights in SGLang's share:")
            lines.append(f"{phase}: {'fits' if ok else 'DOES NOT FIT'}, {room} {self.headroom[phase] / GIB:.2f} GiB")
        sg = self.sglang
        lines += [
            f"SGLang ({sg['placement']}): {sg['engines']} engine(s) x TP {sg['tp']}, KV {sg['kv_bytes_per_token']:,} "
            f"B/token/GPU ({sg['kv_cache_dtype']}): {sg['kv_tokens_per_engine']:,.0f} tokens per engine",
            f"  concurrency {sg['concurrency']} sequences per engine: longest response that fits "
            f"{sg['longest_response']:,} tokens (prompt {a.prompt_tokens}); "
            f"{sg['full_length_at_once']} responses of max_response_tokens at once",
            "",
            f"step time (estimate: MFU {a.mfu:.0%} of {PEAK_FLOPS[self.card.peak_key] / 1e12:.0f} TFLOP/s, HBM at "
            f"{a.hbm_efficiency:.0%} of {self.card.hbm_bytes_per_s / 1e12:.2f} TB/s; {sg['samples']} samples of "
            f"{a.prompt_tokens} + {sg['mean_response']} tokens)",
        ]
        for phase, sec in self.step_s.items():
            lines.append(f"  {phase:<12}{sec:10.1f} s")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
