"""RolloutBatch: the one record that flows through a TEMPO step.

Padded layout (the canonical one)::

    input_ids      [B, P + L]  prompt left-padded to P, response right-padded to L
    attention_mask [B, P + L]  1 on real prompt and response tokens
    response_mask  [B, L]      1 on valid response tokens, left-aligned (response token t in column t)

so ``input_ids[:, P:]`` are the response tokens, the log-prob of response token t is read from the
logits at position ``P + t - 1`` and the critic value V_t ("before response token t") from the
hidden state at the same position: ``values[:, -L-1:-1]`` over prompt + response.

Packed layout (``to_packed``): the real tokens of every row concatenated into one 1-D stream with
``cu_seqlens`` (int32, [B + 1]) and per-sequence ``position_ids``; no padding anywhere.

Per-row fields: ``is_labeled`` [B] bool, ``scores`` [B] float (verified +-1 for labeled rows, the
chosen reward for unlabeled rows once known), ``group_ids`` [B] long (which prompt a sample came
from). Per-token fields, all [B, L] and aligned with ``response_mask``: ``rollout_logprobs`` (from the
sampler), ``old_logprobs`` and ``values`` (trainer, weights before the step), ``advantages``,
``returns``. Non-tensor side data (answers, texts) lives in ``meta`` as lists of length B.

A mixture of experts sampled with ``return_routed_experts`` also carries ``routed_experts``: per row, the
[real tokens - 1, layers, top-k] expert ids the sampler routed the row's tokens (prompt then response,
all but the last) to, ragged like the rows (``rollout.base.Sample.routed_experts``), for routing replay.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

_ROW_TENSORS = ("is_labeled", "scores", "group_ids")
_TOKEN_TENSORS = ("rollout_logprobs", "old_logprobs", "values", "advantages", "returns")


def flat_numbers(rows: Sequence[Sequence[Any]], dtype: type, total: int) -> np.ndarray:
    """The rows' ``total`` items concatenated, converted in C (``np.fromiter`` over a chain); tensor
    rows are turned into lists first."""
    rows = [r.tolist() if isinstance(r, Tensor) else r for r in rows]
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=total)


@dataclass
class PackedBatch:
    """Real tokens of every row in one stream. ``response_index`` [N_resp] maps each valid response
    token (row-major) into the stream; ``logit_index = response_index - 1`` is where its log-prob and
    value are read."""

    input_ids: Tensor  # [N] long
    position_ids: Tensor  # [N] long, restarting at 0 for every sequence
    cu_seqlens: Tensor  # [B + 1] int32
    response_index: Tensor  # [N_resp] long, positions of valid response tokens in the stream
    max_seqlen: int

    def scatter_to_padded(self, per_token: Tensor, response_mask: Tensor) -> Tensor:
        """Put a per-stream-position quantity read at ``response_index - 1`` back into [B, L]."""
        out = per_token.new_zeros(response_mask.shape)
        return out.masked_scatter(response_mask.bool(), per_token[self.response_index - 1])


@dataclass
class RolloutBatch:
    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    is_labeled: Tensor
    scores: Tensor
    group_ids: Tensor
    rollout_logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    meta: dict[str, list[Any]] = field(default_factory=dict)
    routed_experts: list[Tensor] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_samples(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        *,
        is_labeled: Sequence[bool],
        group_ids: Sequence[int],
        pad_token_id: int,
        rollout_logprobs: Sequence[Sequence[float]] | None = None,
        scores: Sequence[float] | None = None,
        meta: dict[str, list[Any]] | None = None,
        routed_experts: Sequence[Tensor] | None = None,
    ) -> RolloutBatch:
        """Build the padded layout from ragged token lists (one entry per sample)."""
        b = len(prompt_ids)
        if not (len(response_ids) == len(is_labeled) == len(group_ids) == b):
            raise ValueError(
                f"RolloutBatch.from_samples: length mismatch: {b} prompts, {len(response_ids)} responses, "
                f"{len(is_labeled)} is_labeled, {len(group_ids)} group_ids"
            )
        prompt_lens = torch.tensor([len(x) for x in prompt_ids], dtype=torch.long)
        resp_lens = torch.tensor([len(x) for x in response_ids], dtype=torch.long)
        if b and bool((prompt_lens == 0).any()):
            i = int((prompt_lens == 0).nonzero()[0])
            raise ValueError(f"RolloutBatch.from_samples: sample {i} has an empty prompt")
        p = int(prompt_lens.max()) if b else 0
        resp_len = int(resp_lens.max()) if b else 0
        # every token list is converted once, in C, and scattered into place with masks: no Python
        # work per token (scripts/bench_host_step.py)
        cols_p = torch.arange(p)
        cols_r = torch.arange(resp_len)
        prompt_mask = cols_p[None, :] >= (p - prompt_lens)[:, None]  # left-padded
        response_valid = cols_r[None, :] < resp_lens[:, None]  # right-padded
        response_mask = response_valid.long()
        prompt_flat = torch.from_numpy(flat_numbers(prompt_ids, np.int64, int(prompt_lens.sum())))
        resp_flat = torch.from_numpy(flat_numbers(response_ids, np.int64, int(resp_lens.sum())))
        input_ids = torch.full((b, p + resp_len), pad_token_id, dtype=torch.long)
        input_ids[:, :p].masked_scatter_(prompt_mask, prompt_flat)
        input_ids[:, p:].masked_scatter_(response_valid, resp_flat)
        attention_mask = torch.cat([prompt_mask.long(), response_mask], dim=1)
        lp = None
        if rollout_logprobs is not None:
            if len(rollout_logprobs) != b:
                raise ValueError(f"RolloutBatch.from_samples: {len(rollout_logprobs)} log-prob lists for {b} samples")
            lp_lens = torch.tensor([len(x) for x in rollout_logprobs], dtype=torch.long)
            bad = (lp_lens != resp_lens).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(
                    f"RolloutBatch.from_samples: sample {i} has {int(resp_lens[i])} response tokens but "
                    f"{int(lp_lens[i])} log-probs"
                )
            lp = torch.zeros((b, resp_len), dtype=torch.float32)
            lp.masked_scatter_(response_valid, torch.from_numpy(flat_numbers(rollout_logprobs, np.float32, int(resp_lens.sum()))))
        if routed_experts is not None:
            routed_experts = list(routed_experts)
            if len(routed_experts) != b:
                raise ValueError(f"RolloutBatch.from_samples: {len(routed_experts)} routed-expert tensors for {b} samples")
            for i, (t, n) in enumerate(zip(routed_experts, (prompt_lens + resp_lens).tolist())):
                if t is None or t.dim() != 3 or t.shape[0] != n - 1:
                    got = "none" if t is None else tuple(t.shape)
                    raise ValueError(f"RolloutBatch.from_samples: sample {i} has {n} tokens, so [{n - 1}, layers, "
                                     f"top-k] routed experts, got {got}")
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            is_labeled=torch.as_tensor(list(is_labeled), dtype=torch.bool),
            scores=torch.as_tensor(list(scores) if scores is not None else [0.0] * b, dtype=torch.float32),
            group_ids=torch.as_tensor(list(group_ids), dtype=torch.long),
            rollout_logprobs=lp,
            meta={k: list(v) for k, v in (meta or {}).items()},
            routed_experts=routed_experts,
        )

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    @property
    def position_ids(self) -> Tensor:
        """Positions counting real tokens only, so left padding does not shift RoPE."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    def num_tokens(self) -> int:
        """Real (prompt + response) tokens in the batch."""
        return int(self.attention_mask.sum())

    def row_tokens(self) -> Tensor:
        """Real tokens per row, [B]."""
        return self.attention_mask.sum(-1)

    # ------------------------------------------------------------------ selection
    def _tensor_fields(self) -> Iterator[tuple[str, Tensor]]:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                yield f.name, v

    def select(self, index: Tensor | Sequence[int]) -> RolloutBatch:
        """Rows ``index`` (a long index or a bool mask [B]), with ``meta`` lists selected alike."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            if idx.shape != (self.batch_size,):
                raise ValueError(f"RolloutBatch.select: bool mask of shape {tuple(idx.shape)} for {self.batch_size} rows")
            idx = idx.nonzero().flatten()
        idx = idx.long()
        kw = {name: t[idx] for name, t in self._tensor_fields()}
        il = idx.tolist()
        kw["meta"] = {k: [v[i] for i in il] for k, v in self.meta.items()}
        if self.routed_experts is not None:
            kw["routed_experts"] = [self.routed_experts[i] for i in il]
        return dataclasses.replace(self, **kw)

    def trim(self) -> RolloutBatch:
        """Drop all-padding columns on the left (prompt) and right (response)."""
        p = self.prompt_len
        first = int((self.attention_mask[:, :p].sum(0) > 0).long().argmax()) if p else 0
        if p and self.attention_mask[:, :p].sum() == 0:
            first = p
        resp_keep = int(self.response_lengths().max()) if self.batch_size else 0
        cols = slice(first, p + resp_keep)
        kw = {"input_ids": self.input_ids[:, cols], "attention_mask": self.attention_mask[:, cols]}
        for name in ("response_mask",) + _TOKEN_TENSORS:
            t = getattr(self, name)
            if t is not None:
                kw[name] = t[:, :resp_keep]
        return dataclasses.replace(self, **kw)

    def split(self, rows: int) -> list[RolloutBatch]:
        """Consecutive chunks of at most ``rows`` rows."""
        if rows <= 0:
            raise ValueError(f"RolloutBatch.split: rows must be positive, got {rows}")
        return [self.select(torch.arange(s, min(s + rows, self.batch_size))) for s in range(0, self.batch_size, rows)]

    def split_by_tokens(self, max_tokens: int) -> list[RolloutBatch]:
        """Consecutive micro-batches whose real-token count stays within ``max_tokens`` (a row longer
        than the budget gets a micro-batch of its own). Rows keep their order."""
        if max_tokens <= 0:
            raise ValueError(f"RolloutBatch.split_by_tokens: max_tokens must be positive, got {max_tokens}")
        sizes = self.row_tokens().tolist()
        chunks, start, acc = [], 0, 0
        for i, n in enumerate(sizes):
            if i > start and acc + n > max_tokens:
                chunks.append((start, i))
                start, acc = i, 0
            acc += n
        if start < len(sizes):
            chunks.append((start, len(sizes)))
        # each micro-batch copied once at its trimmed width: later passes (to_packed's boolean indexing
        # above all) are several times slower on strided views
        return [self.rows(a, b).trim().contiguous() for a, b in chunks]

    def contiguous(self) -> RolloutBatch:
        return dataclasses.replace(self, **{n: t.contiguous() for n, t in self._tensor_fields()})

    def rows(self, start: int, stop: int) -> RolloutBatch:
        """Rows ``start:stop`` as views of this batch's tensors (no copy; ``select`` copies)."""
        kw = {name: t[start:stop] for name, t in self._tensor_fields()}
        kw["meta"] = {k: v[start:stop] for k, v in self.meta.items()}
        if self.routed_experts is not None:
            kw["routed_experts"] = self.routed_experts[start:stop]
        return dataclasses.replace(self, **kw)

    @staticmethod
    def cat(batches: Sequence[RolloutBatch], pad_token_id: int = 0) -> RolloutBatch:
        """Concatenate rows, re-padding prompts (left) and responses (right) to the widest. Each field
        is allocated once at its final size and every batch copied into place (one pass over the
        data, not a padded copy and then a concatenated one)."""
        if not batches:
            raise ValueError("RolloutBatch.cat: nothing to concatenate")
        p = max(b.prompt_len for b in batches)
        resp = max(b.response_len for b in batches)
        rows = sum(b.batch_size for b in batches)
        offsets = [0]
        for b in batches:
            offsets.append(offsets[-1] + b.batch_size)

        def place(name: str, fill: float, left_padded: bool) -> Tensor:
            first = getattr(batches[0], name)
            width = (p if left_padded else 0) + resp
            out = torch.full((rows, width), fill, dtype=first.dtype, device=first.device)
            for b, o in zip(batches, offsets):
                t = getattr(b, name)
                start = p - b.prompt_len if left_padded else 0
                out[o : o + b.batch_size, start : start + t.shape[1]] = t
            return out

        kw: dict[str, Any] = {}
        kw["input_ids"] = place("input_ids", pad_token_id, True)
        kw["attention_mask"] = place("attention_mask", 0, True)
        kw["response_mask"] = place("response_mask", 0, False)
        for name in _ROW_TENSORS:
            kw[name] = torch.cat([getattr(b, name) for b in batches])
        for name in _TOKEN_TENSORS:
            ts = [getattr(b, name) for b in batches]
            if all(t is not None for t in ts):
                kw[name] = place(name, 0.0, False)
            elif any(t is not None for t in ts):
                raise ValueError(f"RolloutBatch.cat: field {name!r} is set on some batches and not on others")
        keys = set(batches[0].meta)
        if any(set(b.meta) != keys for b in batches):
            raise ValueError("RolloutBatch.cat: batches carry different meta keys")
        kw["meta"] = {k: [x for b in batches for x in b.meta[k]] for k in keys}
        routed = [b.routed_experts for b in batches]
        if all(r is not None for r in routed):
            kw["routed_experts"] = [t for r in routed for t in r]
        elif any(r is not None for r in routed):
            raise ValueError("RolloutBatch.cat: routed_experts is set on some batches and not on others")
        return RolloutBatch(**kw)

    def to(self, device: torch.device | str) -> RolloutBatch:
        return dataclasses.replace(self, **{n: t.to(device) for n, t in self._tensor_fields()})

    # ------------------------------------------------------------------ packed layout
    def to_packed(self) -> PackedBatch:
        mask = self.attention_mask.bool()
        lengths = mask.sum(-1)
        cu = torch.zeros(self.batch_size + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        input_ids = self.input_ids[mask]
        starts = cu[:-1].long()
        position_ids = torch.arange(input_ids.numel()) - torch.repeat_interleave(starts, lengths)
        # first response token of row b sits at starts[b] + prompt tokens of row b
        prompt_real = self.attention_mask[:, : self.prompt_len].sum(-1)
        t = torch.arange(self.response_len).expand(self.batch_size, -1)
        stream_pos = starts[:, None] + prompt_real[:, None] + t
        response_index = stream_pos[self.response_mask.bool()]
        return PackedBatch(
            input_ids=input_ids,
            position_ids=position_ids,
            cu_seqlens=cu,
            response_index=response_index,
            max_seqlen=int(lengths.max()) if self.batch_size else 0,
        )
