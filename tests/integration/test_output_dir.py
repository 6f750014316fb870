"""What a run does with the folder it is given (trainer.resume auto | true | false, trainer.overwrite),
and with a checkpoint that is marked complete but is corrupt (checksums, fallback), on the debug preset."""

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from support.runs import read_metrics

from tempo_mega.checkpoint import COMPLETE_MARKER, checksum_manifest, save_json
from tempo_mega.config import load_config
from tempo_mega.trainer import run_training


def train(out: Path, *overrides: str):
    return run_training(load_config(["experiment=debug_cpu", f"trainer.output_dir={out}", "trainer.keep_last=3",
                                     *overrides]))


def steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_fresh_run_into_a_used_folder_errors_auto_resumes_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, "trainer.total_steps=2")
    with pytest.raises(ValueError) as e:
        train(out, "trainer.total_steps=1", "trainer.resume=false")
    for part in (str(out), "trainer.resume=true", "trainer.output_dir", "trainer.overwrite=true"):
        assert part in str(e.value), part
    assert [x["step"] for x in read_metrics(out)] == [1, 2]  # the old run is untouched
    capsys.readouterr()
    run = train(out, "trainer.total_steps=3")  # trainer.resume=auto, the default
    assert run.start_step == 2
    assert f"resumed from step 2 ({out / 'checkpoints' / 'step_00000002'})" in capsys.readouterr().out
    assert [x["step"] for x in read_metrics(out)] == [1, 2, 3]
    train(out, "trainer.total_steps=1", "trainer.overwrite=true")
    assert [x["step"] for x in read_metrics(out)] == [1] and steps(out) == ["step_00000001"]


def test_resume_true_with_nothing_to_resume_is_an_error(tmp_path):
    (tmp_path / "logs").mkdir()  # not the trainer's: a folder holding only this holds no run
    with pytest.raises(ValueError, match=r"trainer\.resume=true.*no complete checkpoint"):
        train(tmp_path, "trainer.resume=true")
    with pytest.raises(ValueError, match=r"trainer\.overwrite"):
        load_config(["trainer.resume=true", "trainer.overwrite=true"])
    with pytest.raises(ValueError, match=r"trainer\.output_dir.*empty"):
        load_config(["trainer.output_dir="])
    assert not (tmp_path / "checkpoints").exists()


def _rewrite_marker(ckpt: Path) -> None:
    """The marker as if the checkpoint had been written with its current files (a file swapped in)."""
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    marker["files"] = checksum_manifest(ckpt)
    save_json(ckpt / COMPLETE_MARKER, marker)


class NotAllowed:  # anything a weights_only load refuses: a full unpickle would construct it
    pass


def test_corrupt_checkpoint_falls_back_and_resume_files_are_weights_only(tmp_path, caplog):
    out = tmp_path / "run"
    train(out, "trainer.total_steps=2")
    ckpts = out / "checkpoints"
    # every resume file loads without unpickling code
    pt_files = sorted(ckpts.rglob("*.pt"))
    assert {p.name for p in pt_files} >= {"trainer_state.pt", "optimizer.pt"}
    for path in pt_files:
        torch.load(path, weights_only=True)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(out, poisoned)

    # a truncated weights file in the newest checkpoint: one warning naming it, the one before is used
    bad = ckpts / "step_00000002" / "actor" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])
    caplog.set_level(logging.WARNING, logger="tempo_mega")
    run = train(out, "trainer.total_steps=3", "trainer.resume=true")
    assert run.start_step == 1
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0], warnings
    assert [x["step"] for x in read_metrics(out)] == [1, 2, 3]
    assert any(p.name.startswith("corrupt-step_00000002") for p in ckpts.iterdir())

    # every checkpoint corrupt: an error naming the file, no traceback from safetensors
    for ckpt in (ckpts / "step_00000001", ckpts / "step_00000002", ckpts / "step_00000003"):
        (ckpt / "critic" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no usable checkpoint.*critic/optimizer\.pt"):
        train(out, "trainer.total_steps=4", "trainer.resume=true")

    # a trainer_state.pt that holds an arbitrary object (checksums updated, as a shared folder could be):
    # the resume refuses to unpickle it rather than running its code
    for ckpt in (poisoned / "checkpoints").glob("step_*"):
        torch.save({"samplers": {}, "rng": NotAllowed()}, ckpt / "trainer_state.pt")
        _rewrite_marker(ckpt)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(poisoned, "trainer.total_steps=3")
