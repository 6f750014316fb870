"""tempo_mega.distributed in a real 2-process gloo world (and as a 1-process run)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_cpu_support import free_port  # noqa: E402

from tempo_mega import distributed  # noqa: E402


def test_one_process_answers():
    assert (distributed.rank(), distributed.world_size(), distributed.is_rank0()) == (0, 1, True)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {
        "rank": distributed.rank(), "world": distributed.world_size(),
        "one_signalled": distributed.any_rank(rank == 1),  # a signal that reached rank 1 only
        "none_signalled": distributed.any_rank(False),
        "from_rank0": distributed.broadcast_object(f"name-{rank}"),
    }
    distributed.barrier()
    Path(out, f"rank{rank}.txt").write_text(repr(res))
    dist.destroy_process_group()


def test_two_ranks_agree(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        res = eval((tmp_path / f"rank{r}.txt").read_text())
        assert res == {"rank": r, "world": 2, "one_signalled": True, "none_signalled": False,
                       "from_rank0": "name-0"}
