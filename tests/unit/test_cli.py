"""The CLI's edges: `train --help`, one-line errors for typos, missing optional extras and a missing GPU."""

import sys

import pytest
import torch

from tempo_mega import cli


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_train_help_shows_usage_presets_and_groups(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tempo-mega train")
    for text in ("debug_cpu", "qwen3_32b_tempo", "algo=", "empo | rlvr", "rollout=", "trainer.resume=auto"):
        assert text in out, text
    assert cli.main(["train", "-h"]) == 0


def test_typos_are_one_line_with_what_exists(tmp_path, capsys):
    assert cli.main(["train", "experiment=debug_cpuu", f"trainer.output_dir={tmp_path}"]) == 2
    assert "did you mean experiment=debug_cpu?" in one_line_error(capsys)
    assert cli.main(["train", "algo.lerning_rate=1", f"trainer.output_dir={tmp_path}"]) == 2
    assert "'algo.lerning_rate': no such key; did you mean algo.actor.lr" in one_line_error(capsys)


@pytest.mark.parametrize("module, overrides, extra", [
    ("wandb", ["trainer.loggers=[jsonl,wandb]"], "tempo-mega[wandb]"),
    ("sglang", ["rollout.engine=sglang"], "tempo-mega[sglang]"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, capsys, monkeypatch, module, overrides, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import wandb` fails, find_spec says it is absent
    assert cli.main(["train", "experiment=debug_cpu", f"trainer.output_dir={tmp_path}", *overrides]) == 2
    assert f"pip install '{extra}'" in one_line_error(capsys)
    assert not (tmp_path / "checkpoints").exists()


def test_an_extra_missing_deep_inside_a_command_is_one_line(capsys, monkeypatch):
    def needs_matplotlib():
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(cli, "_selfcheck", needs_matplotlib)
    assert cli.main(["selfcheck"]) == 2
    assert "pip install 'tempo-mega[plot]'" in one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_megatron_without_cuda_says_it_needs_a_gpu(tmp_path, capsys):
    pytest.importorskip("megatron.core")
    assert cli.main(["train", "experiment=debug_cpu", "backend=megatron", f"trainer.output_dir={tmp_path}"]) == 2
    assert "backend=megatron needs a CUDA GPU" in one_line_error(capsys)
