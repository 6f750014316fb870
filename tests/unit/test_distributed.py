"""tempo_mega.distributed in a real 2-process gloo world (and as a 1-process run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.net import free_port

from tempo_mega import distributed


def test_one_process_answers():
    assert (distributed.rank(), distributed.world_size(), distributed.is_rank0()) == (0, 1, True)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()


def _worker(out: str) -> None:
    """One rank of the torchrun world (run as this file's __main__)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = {
        "rank": distributed.rank(), "world": distributed.world_size(),
        "one_signalled": distributed.any_rank(rank == 1),  # a signal that reached rank 1 only
        "none_signalled": distributed.any_rank(False),
        "from_rank0": distributed.broadcast_object(f"name-{rank}"),
    }
    distributed.barrier()
    Path(out, f"rank{rank}.txt").write_text(repr(res))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in (0, 1):
        res = eval((tmp_path / f"rank{r}.txt").read_text())
        assert res == {"rank": r, "world": 2, "one_signalled": True, "none_signalled": False,
                       "from_rank0": "name-0"}


if __name__ == "__main__":
    _worker(sys.argv[1])
