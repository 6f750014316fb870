"""The rollout side of the seam: what a sampler takes and gives back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = no top-k
    max_response_tokens: int = 16384
    stop_token_ids: tuple[int, ...] = ()  # EOS and other stop tokens; the stop token is kept in the response
    seed: int | None = None
    # a mixture of experts: also return the experts the sampler routed every token to (Sample.routed_experts),
    # for routing replay (algo.routing_replay=r3)
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_response_tokens < 1:
            raise ValueError(f"sampling.max_response_tokens must be >= 1, got {self.max_response_tokens}")


@dataclass
class Sample:
    """One generated response. ``logprobs[t]`` is the sampler's log-prob of ``response_ids[t]`` under
    the distribution it sampled from (after temperature, before top-p/top-k truncation)."""

    prompt_index: int
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token was produced) | "length" (max_response_tokens reached)
    extra: dict = field(default_factory=dict)
    # with SamplingParams.return_routed_experts: [len(prompt) + len(response) - 1, layers, top-k] expert ids
    # of every token the sampler ran through the model (the prompt's and the response's but the last,
    # which was sampled and never fed back), in SGLang's layout; ``expert_ids`` dtype
    routed_experts: Tensor | None = None


def expert_ids(ids: Tensor | Sequence, num_experts: int) -> Tensor:
    """Expert ids in the smallest integer dtype that holds ``num_experts`` (uint8 up to 256: Qwen3-MoE's
    128 experts x 48 layers x top-8 are 384 B per token, not SGLang's 1.5 KiB of int32)."""
    t = torch.as_tensor(ids)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_experts):
        raise ValueError(f"expert ids outside [0, {num_experts}): min {int(t.min())}, max {int(t.max())}")
    return t.to(torch.uint8 if num_experts <= 256 else torch.int16)


def check_generate_args(engine: str, prompt_ids: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """The prompts as lists, after the checks every engine makes (n >= 1, no empty prompt)."""
    if n < 1:
        raise ValueError(f"{engine}.generate: n must be >= 1, got {n}")
    prompts = [list(p) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"{engine}.generate: prompt {i} is empty")
    return prompts


def generation_metrics(samples: Sequence[Sample], elapsed_s: float) -> dict[str, float]:
    """What every engine reports of a ``generate`` call: its speed, response lengths and truncation."""
    lens = [len(s.response_ids) for s in samples]
    tokens = sum(lens)
    return {
        "rollout/tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "rollout/response_len_mean": tokens / len(lens) if lens else 0.0,
        "rollout/response_len_max": float(max(lens, default=0)),
        "rollout/truncation_rate": sum(s.finish_reason == "length" for s in samples) / len(samples) if samples else 0.0,
        "timing/rollout_s": elapsed_s,
    }


class RolloutNeedsWeights(RuntimeError):
    """Raised by ``generate`` when a restarted part of the engine runs without the trainer's current weights
    and the engine keeps no copy to restore them from. The caller streams them to it with
    ``resync_stale(named_tensors)`` (the weights it last gave ``update_weights``) and calls ``generate``
    again; no sample of the failed call is returned, so none is lost or given twice."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the controller and the run layer call on a sampler. Engines are one-way: told weights and
    prompts, asked for samples and log-probs; none holds a model of the trainer's or a closure into it.

    - ``release_during_training``: the controller calls ``release_memory`` after the rollout, and the
      engine takes its memory back at the next weight update (colocated SGLang).
    - ``weights_device``: where ``update_weights`` wants its tensors; the trainer exports them there.
    - ``probe_ids`` / ``probe_tolerance``: the token ids whose ``prompt_logprobs`` the controller compares
      with the trainer's after each weight push, and the largest difference allowed (None: no probe,
      for an engine that is a copy of the actor).
    - ``max_resyncs``: how often one ``generate`` may raise ``RolloutNeedsWeights`` and be retried after
      ``resync_stale``.
    - optional ``start_generate(calls)`` / ``finish_generate(handle)``: ``generate`` calls in the
      background (``rollout.background``, rollout.async_steps); an engine without them has its
      ``generate`` run on a thread.
    """

    release_during_training: bool
    weights_device: str | torch.device
    probe_ids: tuple[int, ...] | None
    probe_tolerance: float
    max_resyncs: int

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> tuple[list[Sample], dict[str, float]]:
        """(samples, metrics): n samples per prompt, prompt-major (samples ``i*n .. i*n+n-1`` belong to
        prompt i), and what the engine measured of the call (``generation_metrics``, plus an engine's
        fault counters: requests resubmitted, server aborts)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load HF-named tensors (streamed) into the sampler's model."""
        ...

    def resync_stale(self, named_tensors: Iterable[tuple[str, Tensor]]) -> list[str]:
        """Push the weights last given to ``update_weights`` to what came back without them (after
        ``generate`` raised ``RolloutNeedsWeights``); returns what was re-synced ([] for none)."""
        ...

    def prompt_logprobs(self, ids: Sequence[int]) -> list[list[float]]:
        """Log-probs of ``ids[1:]``, each after its prefix, at temperature 1: one list per replica (server)."""
        ...

    def release_memory(self) -> None: ...

    def resume_memory(self) -> None: ...

    def shutdown(self) -> None: ...
