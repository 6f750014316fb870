"""Checkpoint directory management, independent of what is saved in a checkpoint.

Layout under a root directory::

    root/step_00000100/COMPLETE      {"step": 100, "time": ..., "files": {relpath: {"bytes", "sha256"}}}:
                                     written last, so its presence means every other file is on disk
    root/step_00000100/...           the checkpoint (any files: the backends', megatron's dist-checkpoint)
    root/.tmp-step_00000200-<pid>/   a checkpoint being written (or left by a crash): never read
    root/corrupt-step_00000300-<t>/  a checkpoint that failed verification, kept for inspection, never read

Checksums: the marker lists the size and SHA-256 of every file in the checkpoint (a generic walk, so
megatron's dist-checkpoint shards are covered as well as the torch backend's files), and
``verify_checkpoint`` re-reads them before a resume, so a truncated or corrupted file is found by name
instead of as a traceback from safetensors or torch.load. SHA-256 because it is the fastest of
hashlib's digests on CPUs with SHA extensions (about 1.5 GB/s per core measured on this project's CI
machine, blake2b 0.56 GB/s); files are hashed on up to ``HASH_THREADS`` threads (hashlib releases the
GIL), so a checkpoint costs one extra read of its bytes at save and at resume: seconds for the CPU
runs, a few minutes for a multi-hundred-GB Qwen3-32B checkpoint with its optimizer state, where shared
storage bandwidth rather than hashing is usually the limit. Sizes are compared before any hashing, so
a truncated file is reported without reading the rest.

``atomic_checkpoint`` writes into a hidden temporary directory and renames it into place only after
its contents and the ``COMPLETE`` marker are fsynced, so a crash at any point leaves either the
previous state or a complete ``step_*`` directory. Directories being deleted are renamed to a hidden
name first, so a crash half-way through a delete never leaves a partial ``step_*`` directory either.
``recover_interrupted`` tidies what a crash left behind (at the start of a run, before any save): it
publishes a temporary directory that was complete, puts back a checkpoint moved aside, and deletes the
rest.

One process manages the directory (rank 0 in a distributed run). When several ranks write shards
into one checkpoint, rank 0 enters ``atomic_checkpoint``, broadcasts the temporary path, and the
ranks meet at a barrier before rank 0 leaves the block.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "COMPLETE_MARKER",
    "atomic_checkpoint",
    "atomic_write_text",
    "checksum_manifest",
    "latest_checkpoint",
    "list_checkpoints",
    "load_json",
    "prune_checkpoints",
    "recover_interrupted",
    "rng_state",
    "save_json",
    "set_rng_state",
    "has_checkpoint",
    "quarantine_checkpoint",
    "verify_checkpoint",
]

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(directory: Path) -> None:
    """Make a rename or create inside ``directory`` durable; a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows, some network filesystems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for dirpath, _, filenames in os.walk(directory):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _remove_dir(path: Path) -> None:
    """Delete a directory by first renaming it to a hidden name, so a crash mid-delete leaves no
    partially deleted ``step_*`` directory behind."""
    doomed = path.with_name(f".del-{path.name}-{os.getpid()}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file beside it, fsync, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (readers see the old file or the new one)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a malformed file raises ``ValueError`` naming it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


@contextmanager
def atomic_checkpoint(root: str | Path, step: int) -> Iterator[Path]:
    """Yield a temporary directory to write the checkpoint of ``step`` into; publish it on success.

    On a clean exit: fsync everything written, write the ``COMPLETE`` marker, and rename the directory
    to ``root/step_{step:08d}`` (an existing checkpoint of the same step is renamed aside first, then
    deleted). On an exception: remove the temporary directory and re-raise.

    In a multi-process run every rank enters with the same ``step`` and gets the same directory (rank
    0's name): each writes its part (e.g. its shards of a megatron dist-checkpoint), and rank 0
    publishes once all have finished. Shared storage is assumed, as for any distributed checkpoint.
    """
    from tempo_mega.distributed import barrier, broadcast_object, is_rank0

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    root = Path(root)
    final = root / _step_dir_name(step)
    tmp = root / broadcast_object(f".tmp-{final.name}-{os.getpid()}")
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by an earlier crash of a process that had the same pid
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    try:
        yield tmp
        barrier()  # every rank has written its part
        if is_rank0():
            _publish(root, tmp, final, step)
        barrier()
    except BaseException:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


HASH_THREADS = 8
_HASH_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` but the marker, as sorted POSIX relative paths."""
    found = []
    for dirpath, _, filenames in os.walk(directory):
        for filename in filenames:
            path = Path(dirpath) / filename
            rel = path.relative_to(directory).as_posix()
            if rel != COMPLETE_MARKER and not path.is_symlink():
                found.append(rel)
    return sorted(found)


def _hash_all(directory: Path, rels: list[str]) -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(rels), os.cpu_count() or 1))) as pool:
        return dict(zip(rels, pool.map(lambda rel: _sha256(directory / rel), rels)))


def checksum_manifest(directory: str | Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes": size, "sha256": hex}} for every file under ``directory`` but the marker."""
    directory = Path(directory)
    rels = _checkpoint_files(directory)
    digests = _hash_all(directory, rels)
    return {rel: {"bytes": (directory / rel).stat().st_size, "sha256": digests[rel]} for rel in rels}


def verify_checkpoint(directory: str | Path) -> str | None:
    """None when every file the ``COMPLETE`` marker lists is there with its size and checksum; otherwise
    what is wrong, naming the file (the first found). A marker without a file list (a checkpoint written
    before checksums existed) verifies; files not in the list (added later by hand) are ignored."""
    directory = Path(directory)
    try:
        marker = load_json(directory / COMPLETE_MARKER)
    except (OSError, ValueError) as e:
        return f"{directory / COMPLETE_MARKER}: unreadable marker ({e})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not files:
        return None
    for rel, want in sorted(files.items()):  # sizes first: a truncated file costs no hashing
        path = directory / rel
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path}: {size} bytes, {want['bytes']} when written (truncated or overwritten)"
    digests = _hash_all(directory, sorted(files))
    for rel, got in digests.items():
        if got != files[rel]["sha256"]:
            return f"{directory / rel}: checksum mismatch (sha256 {got[:12]}..., {files[rel]['sha256'][:12]}... when written)"
    return None


def quarantine_checkpoint(path: str | Path) -> Path:
    """Move a checkpoint that failed verification to ``corrupt-<name>-<time>`` beside it: never read or
    pruned again (not a ``step_*`` name), kept for inspection. Returns the new path."""
    path = Path(path)
    stamp = int(time.time())
    target = path.with_name(f"corrupt-{path.name}-{stamp}")
    n = 1
    while target.exists():  # the same step quarantined twice within a second: never rename onto it
        target = path.with_name(f"corrupt-{path.name}-{stamp}-{n}")
        n += 1
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def _publish(root: Path, tmp: Path, final: Path, step: int) -> None:
    _fsync_tree(tmp)
    save_json(tmp / COMPLETE_MARKER, {"step": step, "time": time.time(), "files": checksum_manifest(tmp)})
    if final.exists():
        # POSIX rename cannot replace a non-empty directory: move the old one aside. A crash
        # between the two renames leaves no step_{step} at all; recover_interrupted publishes the
        # complete temporary directory at the next start.
        old = root / f".old-{final.name}-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)  # put the previous checkpoint back
            raise
        _fsync_dir(root)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
        _fsync_dir(root)


_LEFTOVER = re.compile(r"^\.(tmp|old|del)-(step_\d+)-\d+$")


def recover_interrupted(root: str | Path) -> list[str]:
    """Finish or undo what a crashed ``atomic_checkpoint`` / ``prune_checkpoints`` left under ``root``.

    Call it from the one process that manages ``root`` while no save is in progress (the trainer does, on
    rank 0, before it looks for a checkpoint to resume from). For each ``step_N``:

    - ``.tmp-step_N-<pid>`` holding the ``COMPLETE`` marker (a crash after the marker was written, before
      or between the renames that publish it) becomes ``step_N`` if there is none: it is the newest
      complete state of that step;
    - ``.old-step_N-<pid>`` (a checkpoint moved aside to be replaced) becomes ``step_N`` again if there is
      still none and it is complete;
    - everything else (unfinished ``.tmp-*``, superseded ``.old-*``, ``.del-*`` half-deleted) is deleted.

    Returns one line per action, for the log. Directories that do not match these names are not touched.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    actions: list[str] = []
    leftovers = sorted(
        (e for e in root.iterdir() if e.is_dir() and _LEFTOVER.match(e.name)),
        # per step: complete temporaries first (newest first), then the moved-aside copies
        key=lambda e: (_LEFTOVER.match(e.name)[1] != "tmp", -e.stat().st_mtime),
    )
    for entry in leftovers:
        kind, step_name = _LEFTOVER.match(entry.name).groups()
        final = root / step_name
        complete = (entry / COMPLETE_MARKER).is_file()
        if kind in ("tmp", "old") and complete and not final.exists():
            os.rename(entry, final)
            _fsync_dir(root)
            actions.append(f"{entry.name}: complete, published as {step_name}")
            continue
        shutil.rmtree(entry)
        why = "half-deleted" if kind == "del" else f"{step_name} exists" if final.exists() else "incomplete"
        actions.append(f"{entry.name}: {why}, deleted")
    return actions


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first; [] when root is missing."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def has_checkpoint(root: str | Path) -> bool:
    """Whether ``root`` holds a complete checkpoint, counting one that ``recover_interrupted`` would
    publish (a complete ``.tmp-*`` / ``.old-*`` left by a crash). Reads only."""
    root = Path(root)
    if list_checkpoints(root):
        return True
    return root.is_dir() and any(
        e.is_dir() and (m := _LEFTOVER.match(e.name)) and m[1] in ("tmp", "old") and (e / COMPLETE_MARKER).is_file()
        for e in root.iterdir())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Temporary and unmarked dirs are ignored."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (``keep_last <= 0`` keeps all).

    Directories without a ``COMPLETE`` marker are not touched. Returns the deleted paths.
    """
    if keep_last <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(root)[:-keep_last]]
    for path in doomed:
        _remove_dir(path)
    return doomed


def rng_state() -> dict[str, Any]:
    """The global RNG states of python ``random``, numpy, torch CPU and every CUDA device (if any).

    Plain python containers and tensors only, so ``torch.save`` / ``torch.load(weights_only=True)``
    round-trip it. Explicit ``numpy.random.Generator`` or ``torch.Generator`` objects are not covered.
    """
    import numpy as np
    import torch

    np_state = np.random.get_state(legacy=False)
    if np_state["bit_generator"] != "MT19937":  # np.random.seed always uses MT19937
        raise ValueError(f"unsupported numpy global bit generator {np_state['bit_generator']!r}")
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {
        "python": random.getstate(),
        "numpy": {
            "key": [int(x) for x in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states returned by ``rng_state``. A CUDA state is restored on as many devices as both
    the saved state and this machine have; a mismatch is reported with a warning."""
    import numpy as np
    import torch

    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}; expected the dict returned by rng_state()")
    python_state = state["python"]
    # pickling/JSON may turn the nested tuples into lists; random.setstate needs tuples
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np.asarray(np_state["key"], dtype=np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["gauss"]),
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        warnings.warn(
            "checkpoint holds CUDA RNG states but CUDA is not available: not restored", stacklevel=2
        )
        return
    num_devices = torch.cuda.device_count()
    if len(cuda) != num_devices:
        warnings.warn(
            f"checkpoint holds CUDA RNG states for {len(cuda)} devices, this process sees {num_devices}: "
            f"restoring the first {min(len(cuda), num_devices)}",
            stacklevel=2,
        )
    for device, device_state in enumerate(cuda[:num_devices]):
        torch.cuda.set_rng_state(device_state, device)
