"""One micro-batch as the packed stream a Megatron model chunk takes, and this context-parallel rank's
part of it. Pure tensor code (no process group), so every layout is checked on the CPU.

The stream holds the real tokens of the micro-batch's rows, one sequence after another, then a filler
segment up to the length the schedule asks for (a multiple of what TP, CP and FP8 need). With context
parallelism (CP = c) each rank holds 2 of the 2c equal chunks, chunk r and chunk 2c - 1 - r (causal
attention costs the same on every rank):

- ``per_sequence=False`` (the local layer spec): chunks of the whole stream, the layout megatron's own
  RoPE slicing assumes for one sequence of the stream's length; RoPE being relative, positions counted
  over the stream give every sequence its own scores.
- ``per_sequence=True`` (Transformer Engine's THD attention): every sequence is padded to a multiple
  of 2c and split into 2c chunks of its own, as ``thd_get_partitioned_indices`` does; ``cu_seqlens``
  count the real tokens, ``cu_seqlens_padded`` the padded ones.

The response outputs (log-probs, values) of the micro-batch are read at the stream position before
each response token; ``owned`` says which of them (row-major, like ``mask[mask]``) this rank computes,
``select`` where in its local tokens they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tempo_mega.batch import RolloutBatch


@dataclass
class PackedMicro:
    input_ids: Tensor  # [1, t_local] long
    position_ids: Tensor  # [1, t_local] long: position inside its sequence (0 on padding)
    cu_seqlens: Tensor  # [S + 1] int32, real tokens per segment (the filler segment included)
    cu_seqlens_padded: Tensor  # [S + 1] int32, the segments as laid out in the stream
    max_seqlen: int  # longest padded segment
    local_index: Tensor  # [t_local] stream positions this rank holds, in its order
    gathered_index: Tensor  # [T] stream positions in the order of an all-gather over CP ranks
    segment: Tensor  # [T] segment of every stream position
    select: Tensor  # [n_owned] local positions of this rank's response outputs
    owned: Tensor  # [N] bool over the micro-batch's response outputs
    padding: Tensor  # [1, t_local] bool: True where the stream holds no token of a row (filler, padding)
    real_pos: Tensor  # [N_real] stream position of every real token of the rows, row-major

    def block_causal_mask(self) -> Tensor:
        """[1, 1, t_local, T] bool, True = masked out: a local token sees the earlier tokens of its own
        segment, among all CP ranks' tokens in all-gather order (all tokens when CP = 1)."""
        q, k = self.local_index, self.gathered_index
        allowed = (self.segment[q][:, None] == self.segment[k][None, :]) & (k[None, :] <= q[:, None])
        return ~allowed[None, None]


def _ceil_to(x: Tensor | int, m: int):
    return -(-x // m) * m


def stream_length(batch: RolloutBatch, *, cp_size: int = 1, per_sequence: bool = False) -> int:
    """Tokens of the micro-batch's stream before the filler: real tokens, or with ``per_sequence``
    and CP every sequence padded to a multiple of 2 x CP."""
    lengths = batch.attention_mask.sum(-1)
    if per_sequence and cp_size > 1:
        return int(_ceil_to(lengths, 2 * cp_size).sum())
    return int(lengths.sum())


def pack_micro_batch(batch: RolloutBatch, *, tokens: int | None = None, cp_size: int = 1, cp_rank: int = 0,
                     per_sequence: bool = False) -> PackedMicro:
    """This rank's part of the micro-batch's stream, ``tokens`` long in all (a filler segment added;
    None: no filler). ``tokens`` must be a multiple of 2 x CP when CP > 1."""
    packed = batch.to_packed()
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
    pad_to = 2 * cp_size if (per_sequence and cp_size > 1) else 1
    padded = _ceil_to(lengths, pad_to)
    used = int(padded.sum())
    total = max(tokens or used, used)
    if cp_size > 1 and total % (2 * cp_size):
        raise ValueError(f"pack_micro_batch: {total} tokens do not split into 2 x CP = {2 * cp_size} chunks")
    if total > used:  # the filler: a segment of its own, real (it is computed on) and unpadded
        lengths = torch.cat([lengths, torch.tensor([total - used])])
        padded = torch.cat([padded, torch.tensor([total - used])])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    cu[1:] = lengths.cumsum(0)
    cu_pad = torch.zeros(len(padded) + 1, dtype=torch.long)
    cu_pad[1:] = padded.cumsum(0)

    # stream position of every real token of the rows (fillers and padding stay token 0, position 0)
    n_rows = batch.batch_size
    row_of_real = torch.repeat_interleave(torch.arange(n_rows), lengths[:n_rows])
    offset_in_row = torch.arange(int(lengths[:n_rows].sum())) - cu[:-1][row_of_real]
    real_pos = cu_pad[:-1][row_of_real] + offset_in_row
    ids = torch.zeros(total, dtype=packed.input_ids.dtype)
    ids[real_pos] = packed.input_ids
    positions = torch.zeros(total, dtype=torch.long)
    positions[real_pos] = packed.position_ids
    if total > used:
        positions[used:] = torch.arange(total - used)
    segment = torch.repeat_interleave(torch.arange(len(padded)), padded)

    def part(rank: int) -> Tensor:
        if cp_size == 1:
            return torch.arange(total)
        starts, sizes = (cu_pad[:-1], padded) if per_sequence else (torch.tensor([0]), torch.tensor([total]))
        pieces = []
        for start, size in zip(starts.tolist(), sizes.tolist()):
            chunk = size // (2 * cp_size)
            for c in (rank, 2 * cp_size - 1 - rank):
                pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
        return torch.cat(pieces)

    local = part(cp_rank)
    gathered = torch.cat([part(r) for r in range(cp_size)]) if cp_size > 1 else local
    # response outputs: at the stream position before each valid response token
    read_at = real_pos[packed.response_index - 1]
    where = torch.full((total,), -1, dtype=torch.long)
    where[local] = torch.arange(len(local))
    owned = where[read_at] >= 0
    padding = torch.ones(total, dtype=torch.bool)
    padding[real_pos] = False
    return PackedMicro(
        input_ids=ids[local][None], position_ids=positions[local][None], cu_seqlens=cu.to(torch.int32),
        cu_seqlens_padded=cu_pad.to(torch.int32), max_seqlen=int(padded.max()), local_index=local,
        gathered_index=gathered, segment=segment, select=where[read_at[owned]], owned=owned,
        padding=padding[local][None], real_pos=real_pos)
