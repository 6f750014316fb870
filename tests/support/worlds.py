"""What the multi-process Megatron layout tests share: running a test file as a ``torchrun`` script in
the world of one layout (``run_world``), and the token-weighted losses their workers train with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_world(script: Path, ranks: int, tmp: Path, layout: str, mode: str, ckpt: Path | None = None,
              timeout_s: int = 300) -> dict:
    """``script`` as a torchrun script of ``ranks`` processes (its argv: layout, mode, output file,
    checkpoint dir); returns what rank 0 saved. Runs from the repository root, under a timeout."""
    import torch

    from support.net import free_port

    out = tmp / f"out_{mode}_{layout}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", str(script), layout, mode, str(out), str(ckpt or "")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=script.parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


def pg_loss(logprobs, micro):
    """A policy-gradient loss, mean over the micro-batch's response tokens (``agg = "token"``)."""
    mask = micro.response_mask.bool()
    return -(logprobs * micro.advantages)[mask].sum() / mask.sum(), {}


def value_loss(values, micro):
    """The squared error to the returns, mean over the micro-batch's response tokens."""
    mask = micro.response_mask.bool()
    return ((values - micro.returns) ** 2)[mask].sum() / mask.sum(), {}


pg_loss.agg = "token"
value_loss.agg = "token"


def train_or_load(backends: dict, batch, losses: dict, mode: str, ckpt: str, keys: dict | None = None) -> dict:
    """A layout worker's part every layout test shares. ``mode`` "train": each role's outputs before
    (``res[key]``) and after (``res[key + "_after"]``) one ``train_step`` and its metrics; "load": the
    roles loaded from ``ckpt``. Then every role's exported weights; with ``ckpt``, the roles saved there
    (when trained) and the actor's outputs after one more step (``key + "_after_2nd"``, the optimizer
    state's check). ``keys``: role -> result name (default the role)."""
    from pathlib import Path

    keys = keys or {role: role for role in backends}

    def forward(role):
        b = backends[role]
        return b.forward_values(batch) if b.role == "critic" else b.forward_logprobs(batch)

    res = {}
    if mode == "load":
        for role, b in backends.items():
            b.load(Path(ckpt) / role)
    else:
        for role, b in backends.items():
            res[keys[role]] = forward(role)
            res[f"{role}_metrics"] = b.train_step(batch, losses[role])
            res[f"{keys[role]}_after"] = forward(role)
    for role, b in backends.items():
        res[f"{role}_weights"] = dict(b.export_weights(dtype=None))
    if ckpt:
        if mode != "load":
            for role, b in backends.items():
                b.save(Path(ckpt) / role)
        backends["actor"].train_step(batch, pg_loss)
        res[f"{keys['actor']}_after_2nd"] = backends["actor"].forward_logprobs(batch)
    return res


def finish_world(res: dict, out_path: str) -> None:
    """A layout worker's end: rank 0 saves ``res`` for the test, every rank leaves the world."""
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(res, out_path)
    dist.barrier()
    dist.destroy_process_group()
