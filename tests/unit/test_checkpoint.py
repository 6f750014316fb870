"""Checkpoint directories: atomic publish, crash leftovers ignored, replacement, pruning, RNG state."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from tempo_mega import checkpoint
from tempo_mega.checkpoint import (
    atomic_checkpoint,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    load_json,
    prune_checkpoints,
    recover_interrupted,
    rng_state,
    save_json,
    set_rng_state,
)


def write_checkpoint(root, step, payload="weights"):
    with atomic_checkpoint(root, step) as tmp:
        (tmp / "model.bin").write_text(f"{payload}-{step}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "optim.bin").write_text("optim")
    return root / f"step_{step:08d}"


def test_atomic_checkpoint_publishes_complete_dir(tmp_path):
    root = tmp_path / "ckpt"
    with atomic_checkpoint(root, 7) as tmp:
        assert tmp.parent == root and tmp.name == f".tmp-step_00000007-{os.getpid()}"
        assert tmp.is_dir()
        assert latest_checkpoint(root) is None  # nothing visible while writing
        (tmp / "model.bin").write_text("w")
    final = root / "step_00000007"
    assert final.is_dir() and (final / "model.bin").read_text() == "w"
    marker = json.loads((final / "COMPLETE").read_text())
    assert marker["step"] == 7 and isinstance(marker["time"], float)
    assert latest_checkpoint(root) == final
    assert [p.name for p in root.iterdir()] == ["step_00000007"]  # no temp dir left


def test_crash_inside_context_leaves_nothing(tmp_path):
    write_checkpoint(tmp_path, 1)
    with pytest.raises(RuntimeError, match="disk full"), atomic_checkpoint(tmp_path, 2) as tmp:
        (tmp / "model.bin").write_text("half")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"


def test_killed_process_leftovers_are_ignored(tmp_path):
    write_checkpoint(tmp_path, 1)
    # what a SIGKILL leaves: a temp dir (even with a marker written) and a step dir without marker
    stale = tmp_path / ".tmp-step_00000003-99999"
    stale.mkdir()
    (stale / "COMPLETE").write_text('{"step": 3}')
    (tmp_path / "step_00000002").mkdir()
    (tmp_path / "step_00000002" / "model.bin").write_text("half")
    (tmp_path / "step_notanumber").mkdir()
    (tmp_path / "step_00000009").write_text("a file, not a dir")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


def test_latest_checkpoint_orders_by_step_number(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (9, 100, 10):
        write_checkpoint(tmp_path, step)
    # a step beyond 8 digits still sorts numerically
    write_checkpoint(tmp_path, 123456789)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_123456789"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 10, 100, 123456789]


def test_replacing_an_existing_step(tmp_path):
    final = write_checkpoint(tmp_path, 5, payload="old")
    (final / "stale_extra_file").write_text("x")
    write_checkpoint(tmp_path, 5, payload="new")
    assert (final / "model.bin").read_text() == "new-5"
    assert not (final / "stale_extra_file").exists()  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]


def test_failed_replacement_keeps_the_old_checkpoint(tmp_path):
    final = write_checkpoint(tmp_path, 5, payload="old")
    with pytest.raises(OSError), atomic_checkpoint(tmp_path, 5):
        raise OSError("write failed")
    assert (final / "model.bin").read_text() == "old-5"
    assert latest_checkpoint(tmp_path) == final


def test_failed_swap_restores_the_replaced_checkpoint(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 5, payload="old")
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".tmp-step_00000005-" + str(os.getpid())):
            raise KeyboardInterrupt  # killed after the old dir was moved aside
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 5, payload="new")
    monkeypatch.undo()
    # a SIGKILL at this point would leave only the hidden .old- dir, and step 4 would be the latest;
    # an exception puts the previous step 5 back
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    assert (tmp_path / "step_00000005" / "model.bin").read_text() == "old-5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]


def test_hidden_aside_dir_is_not_a_checkpoint(tmp_path):
    # what a SIGKILL between the two renames of a replacement leaves
    write_checkpoint(tmp_path, 4)
    aside = write_checkpoint(tmp_path, 5)
    os.rename(aside, tmp_path / ".old-step_00000005-12345")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"


def _aside(root, step, kind, pid, payload, complete=True):
    """A leftover ``.{kind}-step_N-pid`` directory as a killed save leaves it."""
    d = root / f".{kind}-step_{step:08d}-{pid}"
    d.mkdir(parents=True)
    (d / "model.bin").write_text(f"{payload}-{step}")
    if complete:
        (d / "COMPLETE").write_text(json.dumps({"step": step}))
    return d


def test_recover_publishes_a_complete_temporary_killed_between_the_renames(tmp_path):
    # killed after step 5 was moved aside, before the new step 5 was renamed into place
    write_checkpoint(tmp_path, 4)
    _aside(tmp_path, 5, "old", 111, "old")
    _aside(tmp_path, 5, "tmp", 111, "new")
    actions = recover_interrupted(tmp_path)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    assert (tmp_path / "step_00000005" / "model.bin").read_text() == "new-5"  # the newer state wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    assert actions == [
        ".tmp-step_00000005-111: complete, published as step_00000005",
        ".old-step_00000005-111: step_00000005 exists, deleted",
    ]
    assert recover_interrupted(tmp_path) == []  # nothing left to do


def test_recover_puts_back_a_checkpoint_moved_aside(tmp_path):
    write_checkpoint(tmp_path, 4)
    _aside(tmp_path, 5, "old", 222, "old")
    _aside(tmp_path, 5, "tmp", 222, "half", complete=False)  # the replacement never finished
    recover_interrupted(tmp_path)
    assert (tmp_path / "step_00000005" / "model.bin").read_text() == "old-5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]


def test_recover_deletes_unfinished_and_half_deleted_dirs_only(tmp_path):
    write_checkpoint(tmp_path, 1)
    _aside(tmp_path, 2, "tmp", 333, "half", complete=False)
    _aside(tmp_path, 0, "del", 333, "pruned")  # a prune killed mid-delete, marker and all
    _aside(tmp_path, 1, "tmp", 333, "dup")  # complete, but step 1 exists
    (tmp_path / "notes").mkdir()  # not ours: untouched
    (tmp_path / ".tmp-something-else").mkdir()
    (tmp_path / "step_00000003").mkdir()  # unmarked step dir: never read, never deleted here
    actions = recover_interrupted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-something-else", "notes", "step_00000001", "step_00000003"
    ]
    assert (tmp_path / "step_00000001" / "model.bin").read_text() == "weights-1"
    assert sorted(actions) == [
        ".del-step_00000000-333: half-deleted, deleted",
        ".tmp-step_00000001-333: step_00000001 exists, deleted",
        ".tmp-step_00000002-333: incomplete, deleted",
    ]
    assert recover_interrupted(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("keep_last", "kept"),
    [(2, [4, 5]), (1, [5]), (10, [1, 2, 3, 4, 5]), (0, [1, 2, 3, 4, 5]), (-1, [1, 2, 3, 4, 5])],
)
def test_prune_keeps_newest_complete(tmp_path, keep_last, kept):
    for step in (1, 2, 3, 4, 5):
        write_checkpoint(tmp_path, step)
    (tmp_path / "step_00000000").mkdir()  # incomplete: never touched by pruning
    deleted = prune_checkpoints(tmp_path, keep_last)
    assert [s for s, _ in list_checkpoints(tmp_path)] == kept
    assert sorted(p.name for p in deleted) == [f"step_{s:08d}" for s in (1, 2, 3, 4, 5) if s not in kept]
    assert (tmp_path / "step_00000000").is_dir()
    assert not any(p.name.startswith(".del-") for p in tmp_path.iterdir())


def test_atomic_checkpoint_rejects_bad_step(tmp_path):
    for step in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step"), atomic_checkpoint(tmp_path, step):
            pass


# --------------------------------------------------------------------------------------------- json


def test_save_and_load_json(tmp_path):
    obj = {"step": 3, "wandb_run_id": "abc", "nested": {"x": [1, 2.5, None]}}
    save_json(tmp_path / "state.json", obj)
    assert load_json(tmp_path / "state.json") == obj
    save_json(tmp_path / "state.json", {"step": 4})  # overwrite
    assert load_json(tmp_path / "state.json") == {"step": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(FileNotFoundError):
        load_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_json(tmp_path / "bad.json")


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    save_json(path, {"v": 1})

    def boom(*args):
        raise OSError("replace failed")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert load_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# ---------------------------------------------------------------------------------------------- rng


def draws():
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.standard_normal(1).tolist(),  # leaves a cached gaussian in the legacy state
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()  # move off the seeded state
    state = rng_state()
    expected = draws()
    draws()  # advance further
    set_rng_state(state)
    assert draws() == expected


def test_rng_state_survives_torch_save_weights_only(tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draws()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_set_rng_state_validates():
    with pytest.raises(ValueError, match="numpy"):
        set_rng_state({"python": random.getstate(), "torch": torch.get_rng_state()})
    state = rng_state()
    if not torch.cuda.is_available():
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
        with pytest.warns(UserWarning, match="CUDA is not available"):
            set_rng_state(state)


def test_marker_checksums_find_the_bad_file(tmp_path):
    from tempo_mega.checkpoint import verify_checkpoint

    ckpt = write_checkpoint(tmp_path, 1)
    files = json.loads((ckpt / "COMPLETE").read_text())["files"]
    assert set(files) == {"model.bin", "sub/optim.bin"} and files["model.bin"]["bytes"] == len("weights-1")
    assert verify_checkpoint(ckpt) is None
    (ckpt / "sub" / "optim.bin").write_text("optiM")  # same size, other bytes
    assert "sub/optim.bin: checksum mismatch" in verify_checkpoint(ckpt)
    (ckpt / "sub" / "optim.bin").write_text("opt")
    assert "sub/optim.bin: 3 bytes, 5 when written" in verify_checkpoint(ckpt)
    (ckpt / "model.bin").unlink()
    assert verify_checkpoint(ckpt).endswith("model.bin: missing")
    # a checkpoint written before checksums existed still loads
    (ckpt / "COMPLETE").write_text('{"step": 1, "time": 0.0}')
    assert verify_checkpoint(ckpt) is None


def test_has_checkpoint_counts_what_recovery_would_publish(tmp_path):
    from tempo_mega.checkpoint import has_checkpoint

    assert not has_checkpoint(tmp_path / "missing") and not has_checkpoint(tmp_path)
    write_checkpoint(tmp_path, 2).rename(tmp_path / ".tmp-step_00000002-99999")
    assert has_checkpoint(tmp_path) and latest_checkpoint(tmp_path) is None
