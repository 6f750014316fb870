"""The packed micro-batch the Megatron backend feeds a model chunk (``backends/megatron/packing.py``):
the stream, its sequence boundaries, the filler, each context-parallel rank's part of it in both
layouts (whole stream for the local spec, per sequence for Transformer Engine's THD attention), and the
positions whose outputs become the response tokens' log-probs and values. Pure tensor code: the GPU
path's inputs are checked here against hand-written cases."""

from __future__ import annotations

import pytest
import torch

from tempo_mega.backends.megatron.packing import pack_micro_batch, stream_length
from tempo_mega.batch import RolloutBatch


def batch() -> RolloutBatch:
    prompts = [[11, 12, 13], [21], [31, 32]]
    responses = [[14, 15], [22, 23, 24], [33]]
    return RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * 3, group_ids=[0, 1, 2], pad_token_id=0)


RESPONSE = [14, 15, 22, 23, 24, 33]  # row-major, like mask[mask]


def outputs_read_before_responses(pm, stream: torch.Tensor) -> list[int]:
    """The token after each of this rank's selected positions, in the stream."""
    return stream[pm.local_index[pm.select] + 1].tolist()


@pytest.mark.parametrize("per_sequence", [False, True])
def test_one_rank_stream_and_selected_positions(per_sequence):
    pm = pack_micro_batch(batch(), per_sequence=per_sequence)
    assert pm.input_ids.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23, 24, 31, 32, 33]]
    assert pm.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert pm.select.tolist() == [2, 3, 5, 6, 7, 10] and pm.owned.all()
    assert pm.cu_seqlens.tolist() == pm.cu_seqlens_padded.tolist() == [0, 5, 9, 12]
    assert pm.cu_seqlens.dtype == torch.int32 and pm.max_seqlen == 5
    assert outputs_read_before_responses(pm, pm.input_ids[0]) == RESPONSE


def test_filler_is_a_segment_of_its_own():
    pm = pack_micro_batch(batch(), tokens=16)
    assert pm.input_ids.shape == (1, 16) and pm.input_ids[0, 12:].tolist() == [0] * 4
    assert pm.cu_seqlens.tolist() == [0, 5, 9, 12, 16]
    allowed = ~pm.block_causal_mask()[0, 0]
    seg = torch.tensor([0] * 5 + [1] * 4 + [2] * 3 + [3] * 4)
    assert torch.equal(allowed, (seg[:, None] == seg[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril())


def test_whole_stream_context_parallel_split():
    """CP = 2, local spec: the 12-token stream in 4 chunks of 3; rank 0 holds chunks 0 and 3, rank 1
    chunks 1 and 2 (megatron's RoPE slicing); between them they compute every response output once."""
    full = pack_micro_batch(batch(), tokens=12).input_ids[0]
    parts = [pack_micro_batch(batch(), tokens=12, cp_size=2, cp_rank=r) for r in (0, 1)]
    assert parts[0].local_index.tolist() == [0, 1, 2, 9, 10, 11]
    assert parts[1].local_index.tolist() == [3, 4, 5, 6, 7, 8]
    for pm in parts:
        assert torch.equal(pm.input_ids[0], full[pm.local_index])
        assert pm.gathered_index.tolist() == [0, 1, 2, 9, 10, 11, 3, 4, 5, 6, 7, 8]
    assert (parts[0].owned ^ parts[1].owned).all()  # each output on exactly one rank
    got = {}
    for pm in parts:
        for k, tok in zip(pm.owned.nonzero()[:, 0].tolist(), outputs_read_before_responses(pm, full)):
            got[k] = tok
    assert [got[k] for k in range(6)] == RESPONSE
    # rank 1's token 4 (stream position 7, row 2's third token) sees its row's tokens 5..7 only
    mask = ~parts[1].block_causal_mask()[0, 0]
    seen = parts[1].gathered_index[mask[4]].tolist()
    assert sorted(seen) == [5, 6, 7]


def test_per_sequence_context_parallel_split_like_thd():
    """CP = 2, TE's THD layout: every sequence padded to a multiple of 4 and split in 4 chunks of its
    own, rank r taking chunks r and 3 - r of each (as thd_get_partitioned_indices does)."""
    assert stream_length(batch(), cp_size=2, per_sequence=True) == 8 + 4 + 4
    parts = [pack_micro_batch(batch(), tokens=16, cp_size=2, cp_rank=r, per_sequence=True) for r in (0, 1)]
    pm0, pm1 = parts
    assert pm0.cu_seqlens.tolist() == [0, 5, 9, 12] and pm0.cu_seqlens_padded.tolist() == [0, 8, 12, 16]
    # sequence 0 (8 padded: chunks of 2), sequence 1 (4: chunks of 1), sequence 2 (4: chunks of 1)
    assert pm0.local_index.tolist() == [0, 1, 6, 7, 8, 11, 12, 15]
    assert pm1.local_index.tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    stream = torch.zeros(16, dtype=torch.long)
    for pm in parts:
        stream[pm.local_index] = pm.input_ids[0]
    assert stream.tolist() == [11, 12, 13, 14, 15, 0, 0, 0, 21, 22, 23, 24, 31, 32, 33, 0]
    assert (pm0.owned ^ pm1.owned).all()
    got = {}
    for pm in parts:
        for k, tok in zip(pm.owned.nonzero()[:, 0].tolist(), outputs_read_before_responses(pm, stream)):
            got[k] = tok
    assert [got[k] for k in range(6)] == RESPONSE


def test_split_needs_whole_chunks():
    with pytest.raises(ValueError, match="2 x CP"):
        pack_micro_batch(batch(), tokens=14, cp_size=2)
