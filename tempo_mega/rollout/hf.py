"""HFRolloutEngine: the CPU reference sampler, a transformers causal LM behind the RolloutEngine seam.

Same contract as the SGLang engine, computed the plain way, so any GPU result can be checked against it:

- Batched decoding with a KV cache. Prompts are left-padded, positions count real tokens only
  (``cumsum(mask) - 1``), so a row's logits do not depend on how much padding its batch needs.
  One prefill forward, then one forward per new token over the last token only.
- Log-probs are ``log_softmax(logits / temperature)`` in float32 over the *full* vocabulary, read at
  the sampled token: the distribution after temperature and before top-k/top-p truncation, which is
  what the trainer recomputes (``Sample.logprobs``). Truncation only decides what may be sampled.
- Randomness is per sample, not per batch: sample ``g`` of a request (``g = prompt_index * n + j``)
  draws its uniforms from its own generator seeded from ``(sampling.seed, g)``. So the same seed gives
  the same samples however the request is chunked (``max_batch_size``) and whichever rows finished
  early; only the floating-point noise of different batch shapes can differ.
- Finished rows (a stop token, or ``max_response_tokens``) leave the active batch: their cache rows are
  dropped (``Cache.batch_select_indices``), and a chunk ends once every row has finished.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tempo_mega.models.moe_names import to_module_names
from tempo_mega.rollout.base import (
    Sample,
    SamplingParams,
    check_generate_args,
    expert_ids,
    generation_metrics,
)

__all__ = ["HFRolloutEngine", "filter_logits", "sample_from_logits"]


def filter_logits(logits: Tensor, top_k: int = -1, top_p: float = 1.0) -> Tensor:
    """Top-k, then top-p (nucleus) truncation of (temperature-scaled) logits.

    logits: [B, V] float. Returns [B, V] with removed tokens set to ``-inf``. Top-k keeps the k largest
    (ties with the k-th are kept); top-p then keeps the smallest set of most likely tokens, under the
    distribution renormalized after top-k, whose mass reaches ``top_p`` (the most likely token always
    stays). ``top_k=-1`` / ``top_p=1.0`` switch a filter off.
    """
    vocab = logits.shape[-1]
    if top_k != -1 and top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_from_logits(logits: Tensor, sampling: SamplingParams, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """One sampling step.

    logits: [B, V] (any float dtype); uniforms: [B] float64 in [0, 1), one per row.
    Returns (tokens [B] long, logprobs [B] float32), the log-prob taken under the temperature-scaled
    full distribution (before truncation). Sampling is by inverse CDF on the truncated distribution,
    so a row's token is a function of its logits and its own uniform only.
    """
    scaled = logits.float() / sampling.temperature
    logprobs_full = torch.log_softmax(scaled, dim=-1)
    filtered = filter_logits(scaled, sampling.top_k, sampling.top_p)
    # float64 CDF: the target u * total then never reaches the end of the CDF by rounding, and
    # zero-probability (truncated) tokens, where the CDF is flat, can never be picked.
    cdf = filtered.softmax(dim=-1).double().cumsum(dim=-1)
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    return tokens, logprobs_full.gather(-1, tokens[:, None]).squeeze(-1)


def _sample_seed(base_seed: int, sample_index: int) -> int:
    """A 63-bit seed for one sample's generator, mixed so (seed, index) pairs never collide by arithmetic."""
    state = np.random.SeedSequence([base_seed, sample_index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


class HFRolloutEngine:
    """Rollout engine over a transformers causal LM (e.g. ``Qwen3ForCausalLM``).

    ``model`` becomes the engine's own copy: pass a separate instance from the trainer's actor, since
    rollout weights change only through ``update_weights``. ``dtype`` casts it (None keeps its dtype).
    ``max_batch_size`` bounds the sequences (prompts x n) decoded together.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
        dtype: torch.dtype | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"HFRolloutEngine: max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        if dtype is not None:
            model = model.to(dtype)
        self.model: torch.nn.Module | None = model.to(self.device).eval()
        self.vocab_size = model.get_input_embeddings().num_embeddings
        if not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(
                f"HFRolloutEngine: pad_token_id {pad_token_id} outside the vocabulary [0, {self.vocab_size})"
            )
        # transformers renamed `past_key_values` to `cache`; pass whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are needed after the prefill
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._released = False

    # the sampler is a second copy of the actor, not an allocator that shares the trainer's memory
    release_during_training = False
    # one model in this process, updated only by update_weights: nothing to probe, nothing ever restarts
    probe_ids = None
    probe_tolerance = 0.0
    max_resyncs = 0

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> tuple[list[Sample], dict[str, float]]:
        """(samples, metrics): n samples per prompt, prompt-major (samples ``i*n .. i*n+n-1`` belong to
        prompt i), and ``generation_metrics`` of the call (no servers here, so no fault counters)."""
        model = self._live_model("generate")
        if self._released:
            raise RuntimeError("HFRolloutEngine.generate: memory is released; call resume_memory() first")
        prompts = check_generate_args("HFRolloutEngine", prompt_ids, n)
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(
                    f"HFRolloutEngine.generate: prompt {i} has a token id outside the vocabulary [0, {self.vocab_size})"
                )
        # seed None: fresh entropy per call; a negative seed is folded into SeedSequence's unsigned range
        base_seed = sampling.seed % 2**64 if sampling.seed is not None else secrets.randbits(63)
        rows = [(i, i * n + j) for i in range(len(prompts)) for j in range(n)]  # (prompt_index, sample index)
        samples: list[Sample] = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                samples.extend(self._generate_chunk(model, prompts, chunk, sampling, base_seed))
        return samples, generation_metrics(samples, time.perf_counter() - t0)

    def _generate_chunk(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        rows: list[tuple[int, int]],
        sampling: SamplingParams,
        base_seed: int,
    ) -> list[Sample]:
        dev = self.device
        b = len(rows)
        width = max(len(prompts[i]) for i, _ in rows)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        for r, (i, _) in enumerate(rows):
            input_ids[r, width - len(prompts[i]) :] = torch.as_tensor(prompts[i])
            attention_mask[r, width - len(prompts[i]) :] = 1
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        next_position = attention_mask.sum(-1, keepdim=True)  # [b, 1]: position of the next token

        generators = [torch.Generator().manual_seed(_sample_seed(base_seed, g)) for _, g in rows]
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=dev)
        responses: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finish: list[str] = ["length"] * b
        active = list(range(b))  # chunk rows still decoding, in the order of the batch dimension

        record = sampling.return_routed_experts
        if record and not getattr(model.config, "num_experts", None):
            raise ValueError("HFRolloutEngine.generate: return_routed_experts needs a mixture-of-experts model")
        routed: list[list[Tensor]] = [[] for _ in rows]  # per row: [tokens, layers, k] pieces, in order

        cache = self._new_cache(model)
        logits, ids = self._forward(model, record, input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, cache=cache, prefill=True)
        if record:  # the prompt's tokens: each row's last len(prompt) positions
            ids = ids.view(b, width, -1, model.config.num_experts_per_tok)
            for r, (i, _) in enumerate(rows):
                routed[r].append(ids[r, width - len(prompts[i]) :])
        for step in range(sampling.max_response_tokens):
            # uniforms drawn on the CPU from each row's own generator (one tiny copy per step)
            uniforms = torch.cat(
                [torch.rand(1, generator=generators[r], dtype=torch.float64) for r in active]
            )
            tokens, token_logprobs = sample_from_logits(logits, sampling, uniforms)
            stopped = torch.isin(tokens, stop_ids)
            for r, t, lp, s in zip(active, tokens.tolist(), token_logprobs.tolist(), stopped.tolist()):
                responses[r].append(t)
                logprobs[r].append(lp)
                if s:
                    finish[r] = "stop"
            if step + 1 == sampling.max_response_tokens or bool(stopped.all()):
                break
            if bool(stopped.any()):
                keep = (~stopped).nonzero().flatten()
                cache.batch_select_indices(keep)
                attention_mask = attention_mask[keep]
                next_position = next_position[keep]
                tokens = tokens[keep]
                active = [active[k] for k in keep.tolist()]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=-1)
            logits, ids = self._forward(model, record, input_ids=tokens[:, None], attention_mask=attention_mask,
                                        position_ids=next_position, cache=cache)
            if record:  # the token just fed, of each row still decoding
                for k, r in enumerate(active):
                    routed[r].append(ids[k : k + 1])
            next_position = next_position + 1
        experts = [expert_ids(torch.cat(p).cpu(), model.config.num_experts) if record else None for p in routed]
        return [
            Sample(prompt_index=i, response_ids=responses[r], logprobs=logprobs[r], finish_reason=finish[r],
                   routed_experts=experts[r])
            for r, (i, _) in enumerate(rows)
        ]

    def _forward(self, model: torch.nn.Module, record: bool, *, input_ids: Tensor, attention_mask: Tensor,
                 position_ids: Tensor, cache: Any, prefill: bool = False) -> tuple[Tensor, Tensor | None]:
        """(last position's logits [b, V], [tokens, layers, k] expert ids of the fed tokens or None). The
        experts come from the router logits of the decoder (transformers' ``output_router_logits`` on
        the base model: the causal-LM head would also compute its load-balancing loss, which a cached
        decode step cannot); the top k of the logits are the top k of the router's softmax."""
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                  **{self._cache_kwarg: cache})
        if not record:
            return model(**kw, **(self._prefill_kwargs if prefill else {})).logits[:, -1], None
        out = model.model(**kw, output_router_logits=True)
        logits = model.lm_head(out.last_hidden_state[:, -1])
        k = model.config.num_experts_per_tok
        return logits, torch.stack([x.topk(k, dim=-1).indices for x in out.router_logits], dim=1)

    @staticmethod
    def _new_cache(model: torch.nn.Module):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=model.config)
        except TypeError:  # transformers < 4.56 builds it without a config
            return DynamicCache()

    # ------------------------------------------------------------------ weights and memory
    @property
    def weights_device(self) -> torch.device:
        """Where ``update_weights`` is best given its tensors: this engine's device."""
        return self.device

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> int:
        """Copy HF-named tensors (names as in ``model.state_dict()``; any iterable, streamed) into the
        model, cast to each target's dtype. A subset is fine (bucketed pushes); with tied embeddings
        ``lm_head.weight`` may be present or absent. An unknown name or a shape mismatch raises
        ``ValueError`` naming the tensor; tensors before it are already loaded. Returns how many
        tensors were loaded."""
        model = self._live_model("update_weights")
        targets = model.state_dict()  # detached views of the live parameters and persistent buffers
        loaded = 0
        with torch.no_grad():
            # a mixture of experts' per-expert names (an exporter's, a checkpoint's) fused as the model holds them
            for name, tensor in to_module_names(named_tensors, targets):
                target = targets.get(name)
                if target is None:
                    raise ValueError(
                        f"HFRolloutEngine.update_weights: unknown tensor {name!r} (not in the model's state_dict)"
                    )
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"HFRolloutEngine.update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                loaded += 1
        return loaded

    def resync_stale(self, named_tensors: Iterable[tuple[str, Tensor]]) -> list[str]:
        """Nothing of this engine restarts without its weights: [] (the stream is not read)."""
        return []

    @torch.inference_mode()
    def prompt_logprobs(self, ids: Sequence[int]) -> list[list[float]]:
        """[len(ids) - 1] log-probs of ``ids[1:]`` at temperature 1, for the one model (a one-item list)."""
        model = self._live_model("prompt_logprobs")
        x = torch.tensor([list(ids)], device=self.device)
        logits = model(input_ids=x).logits[0, :-1].float()
        return [torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1).tolist()]

    def release_memory(self) -> None:
        """Move the model off the accelerator (a no-op move on CPU); ``generate`` refuses until resumed."""
        model = self._live_model("release_memory")
        if self.device.type != "cpu":
            model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._released = True

    def resume_memory(self) -> None:
        model = self._live_model("resume_memory")
        if self.device.type != "cpu":
            model.to(self.device)
        self._released = False

    def shutdown(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _live_model(self, what: str) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"HFRolloutEngine.{what}: the engine was shut down")
        return self.model
