"""The packed micro-batch the Megatron backend feeds the model: the stream, its sequence boundaries
(THD ``PackedSeqParams`` under Transformer Engine, a block-diagonal causal mask on the local spec) and
the positions whose outputs become the response tokens' log-probs and values. Pure tensor code, so the
GPU path's inputs are checked here on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from tempo_mega.backends.megatron.backend import MegatronBackend  # noqa: E402
from tempo_mega.batch import RolloutBatch  # noqa: E402


def batch() -> RolloutBatch:
    prompts = [[11, 12, 13], [21], [31, 32]]
    responses = [[14, 15], [22, 23, 24], [33]]
    return RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * 3, group_ids=[0, 1, 2], pad_token_id=0)


def packed(te: bool, tokens: int | None = None):
    owner = SimpleNamespace(device=torch.device("cpu"), te_layout=te)
    return MegatronBackend._packed_inputs(owner, batch(), tokens)


@pytest.mark.parametrize("te", [True, False])
def test_stream_and_selected_positions(te):
    ids, positions, _, select = packed(te)
    assert ids.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23, 24, 31, 32, 33]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    # the output for response token t is read at the token before it, in the rows' order
    assert ids[0, select + 1].tolist() == [14, 15, 22, 23, 24, 33]
    assert select.tolist() == [2, 3, 5, 6, 7, 10]


def test_thd_params_carry_the_sequence_boundaries():
    _, _, kwargs, _ = packed(True)
    p = kwargs["packed_seq_params"]
    assert kwargs["attention_mask"] is None and p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 5, 9, 12] and p.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(p.cu_seqlens_kv, p.cu_seqlens_q) and torch.equal(p.cu_seqlens_q_padded, p.cu_seqlens_q)
    assert p.max_seqlen_q == p.max_seqlen_kv == 5


def test_padding_to_a_length_is_a_segment_of_its_own():
    ids, _, kwargs, select = packed(True, tokens=16)
    assert ids.shape == (1, 16) and ids[0, 12:].tolist() == [0] * 4
    assert kwargs["packed_seq_params"].cu_seqlens_q.tolist() == [0, 5, 9, 12, 16]
    _, _, local, _ = packed(False, tokens=16)
    mask = local["attention_mask"][0, 0]  # True = masked out
    assert mask[12:, :12].all() and not mask[15, 12:].any()  # the filler sees only itself
    assert select.tolist() == [2, 3, 5, 6, 7, 10]


def test_local_mask_is_block_diagonal_causal():
    _, _, kwargs, _ = packed(False)
    allowed = ~kwargs["attention_mask"][0, 0]
    seg = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    want = (seg[:, None] == seg[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.equal(allowed, want)
