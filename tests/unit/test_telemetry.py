"""Metric sinks (jsonl, wandb through a fake module, progress bar, fan-out) and the phase timer."""

from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest
import torch

from tempo_mega.telemetry import JsonlSink, MetricSink, MultiSink, PhaseTimer, ProgressSink, WandbSink


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -------------------------------------------------------------------------------------------- jsonl


def test_jsonl_one_line_per_step(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log({"actor/loss": 0.5, "rollout/score_mean": -0.25}, step=1)
    # flushed per line: readable before close
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "actor/loss": 0.5, "rollout/score_mean": -0.25}
    ]
    sink.log({"actor/loss": 0.4, "note": "ok", "n": 3}, step=2)
    sink.close()
    sink.close()  # idempotent
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "actor/loss": 0.5, "rollout/score_mean": -0.25},
        {"step": 2, "actor/loss": 0.4, "note": "ok", "n": 3},
    ]


def test_jsonl_directory_path_and_appending(tmp_path):
    with_dir = JsonlSink(tmp_path, fsync=True)
    assert with_dir.path == tmp_path / "metrics.jsonl"
    with_dir.log({"a": 1.0}, step=1)
    with_dir.close()
    again = JsonlSink(tmp_path / "metrics.jsonl")
    again.log({"a": 2.0}, step=2)
    again.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_jsonl_non_finite_values_are_null_and_scalars_unwrapped(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    sink.log(
        {
            "nan": float("nan"),
            "inf": float("inf"),
            "ninf": -math.inf,
            "np": np.float32(0.5),
            "np_int": np.int64(7),
            "torch": torch.tensor(1.5),
            "torch_nan": torch.tensor(float("nan")),
        },
        step=3,
    )
    sink.close()
    text = (tmp_path / "m.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    record = json.loads(text)
    assert record == {
        "step": 3,
        "nan": None,
        "inf": None,
        "ninf": None,
        "np": 0.5,
        "np_int": 7,
        "torch": 1.5,
        "torch_nan": None,
    }
    assert type(record["np_int"]) is int


def test_jsonl_rejects_bad_metrics(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="'step'"):
        sink.log({"step": 1}, step=1)
    with pytest.raises(ValueError, match="'vec'"):
        sink.log({"vec": torch.ones(3)}, step=1)
    with pytest.raises(ValueError, match="'obj'"):
        sink.log({"obj": object()}, step=1)
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.log({"a": 1}, step=1)


def test_jsonl_truncates_steps_after_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(1, 7):
        sink.log({"actor/loss": float(step)}, step=step)
    sink.close()
    # crash while writing step 7: a torn last line
    with open(path, "a") as f:
        f.write('{"step": 7, "actor/lo')

    resumed = JsonlSink(path, truncate_after_step=4)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    for step in (5, 6):
        resumed.log({"actor/loss": -float(step)}, step=step)
    resumed.close()
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["actor/loss"] for r in records] == [1.0, 2.0, 3.0, 4.0, -5.0, -6.0]
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temp file left


def test_jsonl_truncate_of_missing_file_and_torn_line_without_truncation(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    JsonlSink(path, truncate_after_step=10).close()
    assert path.read_text() == ""
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
    sink = JsonlSink(path)  # no truncation: the torn line stays, new records start on a fresh line
    sink.log({"a": 3.0}, step=3)
    sink.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1 and json.loads(lines[-1]) == {"step": 3, "a": 3.0}


# -------------------------------------------------------------------------------------------- wandb


def test_wandb_sink_logs_with_step_offline_by_default(fake_wandb, tmp_path):
    import os

    sink = WandbSink("tempo", "run-a", {"lr": 1e-6}, tmp_path / "wandb")
    assert os.environ["WANDB_MODE"] == "offline"
    assert (tmp_path / "wandb").is_dir()
    run = fake_wandb.runs[0]
    assert run.init_kwargs["project"] == "tempo" and run.init_kwargs["name"] == "run-a"
    assert run.init_kwargs["config"] == {"lr": 1e-6}
    assert run.init_kwargs["mode"] == "offline"
    assert run.init_kwargs["id"] is None and run.init_kwargs["resume"] is None
    sink.log({"actor/loss": 0.5}, step=1)
    sink.log({"actor/loss": 0.25, "critic/loss": 1.0}, step=2)
    assert run.logged == [({"actor/loss": 0.5}, 1), ({"actor/loss": 0.25, "critic/loss": 1.0}, 2)]
    assert sink.run_id == "run123"
    sink.close()
    sink.close()
    assert run.finished == 1


def test_wandb_sink_respects_user_mode_and_resumes(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    sink = WandbSink("tempo", "run-a", {}, tmp_path, mode="offline", resume_id="abc")
    run = fake_wandb.runs[0]
    assert run.init_kwargs["mode"] == "online"
    assert run.init_kwargs["id"] == "abc" and run.init_kwargs["resume"] == "allow"
    assert sink.run_id == "abc"


def test_wandb_missing_raises_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'tempo-mega\[wandb\]'"):
        WandbSink("tempo", "run-a", {}, tmp_path)


# ----------------------------------------------------------------------------------------- progress


def test_progress_sink_shows_step_and_chosen_keys():
    out = io.StringIO()
    sink = ProgressSink(10, mininterval=0.0, file=out)
    sink.log({"rollout/score_mean": 0.123456, "actor/loss": 2.0, "critic/loss": 3.5, "other": 9.0}, step=3)
    sink.log({"rollout/score_mean": 0.5}, step=4)
    assert sink.bar.n == 4
    sink.close()
    text = out.getvalue()
    assert "3/10" in text and "4/10" in text
    # "loss" would collide between actor and critic, so those keep their full names
    assert "score_mean=0.1235" in text and "actor/loss=2" in text and "critic/loss=3.5" in text
    assert "other" not in text


def test_progress_sink_disabled_writes_nothing():
    out = io.StringIO()
    sink = ProgressSink(5, disable=True, file=out)
    sink.log({"actor/loss": 1.0}, step=1)
    sink.close()
    assert out.getvalue() == ""


# ------------------------------------------------------------------------------------------- multi


class RecordingSink:
    def __init__(self, fail_close=False):
        self.logged = []
        self.closed = False
        self.fail_close = fail_close

    def log(self, metrics, step):
        self.logged.append((dict(metrics), step))

    def close(self):
        self.closed = True
        if self.fail_close:
            raise RuntimeError("close failed")


def test_multi_sink_fans_out_and_closes_all(tmp_path):
    a, b = RecordingSink(), RecordingSink(fail_close=True)
    jsonl = JsonlSink(tmp_path / "m.jsonl")
    multi = MultiSink([a, jsonl, b])
    assert all(isinstance(s, MetricSink) for s in (a, jsonl, multi))
    multi.log({"x": 1.0}, step=1)
    multi.log({"x": 2.0}, step=2)
    assert a.logged == b.logged == [({"x": 1.0}, 1), ({"x": 2.0}, 2)]
    assert [r["x"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1.0, 2.0]
    c = RecordingSink()
    multi.sinks.append(c)
    with pytest.raises(RuntimeError, match="close failed"):
        multi.close()
    assert a.closed and b.closed and c.closed


# ------------------------------------------------------------------------------------------- timer


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_phase_timer_accumulates_with_fake_clock():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock, nvtx=False)
    with timer.phase("rollout"):
        clock.advance(2.0)
    with timer.phase("actor"):
        clock.advance(0.5)
    with timer.phase("rollout"):
        clock.advance(1.0)
    assert timer.metrics() == {"timing/rollout_s": 3.0, "timing/actor_s": 0.5}
    timer.reset()
    assert timer.metrics() == {}


def test_phase_timer_nesting_and_exceptions():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock, nvtx=False)
    with timer.phase("step"):
        clock.advance(1.0)
        with timer.phase("reward"):
            clock.advance(0.25)
    with pytest.raises(KeyError), timer.phase("critic"):
        clock.advance(4.0)
        raise KeyError("boom")
    assert timer.metrics() == {"timing/step_s": 1.25, "timing/reward_s": 0.25, "timing/critic_s": 4.0}


def test_phase_timer_syncs_before_each_clock_read():
    events = []
    clock = FakeClock()

    def reading_clock():
        events.append("clock")
        return clock()

    timer = PhaseTimer(sync=lambda: events.append("sync"), clock=reading_clock, nvtx=False)
    with timer.phase("actor"):
        events.append("work")
    assert events == ["sync", "clock", "work", "sync", "clock"]


def test_phase_timer_nvtx_ranges_when_cuda_available(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    timer = PhaseTimer(clock=FakeClock())
    with timer.phase("rollout"):
        pass
    assert calls == [("push", "rollout"), ("pop",)]


def test_phase_timer_skips_nvtx_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def fail(*args):
        raise AssertionError("nvtx called without CUDA")

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", fail)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", fail)
    timer = PhaseTimer(clock=FakeClock())
    with timer.phase("rollout"):
        pass
    assert "timing/rollout_s" in timer.metrics()


def test_progress_sink_clock_starts_at_the_first_step(monkeypatch):
    """Time spent before the first step (warm start, initial evaluation) must not enter the rate: the
    demo's bar read ``1/40 [02:21<1:31:57]`` because the warm start counted as step 1's duration."""
    import time as _time

    out = io.StringIO()
    sink = ProgressSink(40, mininterval=0.0, file=out)
    assert out.getvalue() == ""  # nothing shown, no clock running, until the loop starts
    _time.sleep(0.3)  # stands for the warm start
    sink.restart_clock()
    sink.log({"actor/loss": 1.0}, step=1)
    assert sink.bar.format_dict["elapsed"] < 0.25
    sink.close()
