"""End-to-end runs of the EM loop on CPU with the debug preset (seconds each)."""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.runs import read_metrics

from tempo_mega.batch import RolloutBatch
from tempo_mega.config import load_config
from tempo_mega.data import make_synthetic_task, write_jsonl
from tempo_mega.rollout.base import SamplingParams
from tempo_mega.trainer import run_training, setup

REQUIRED = ("step", "actor/loss", "critic/loss", "rollout/score_mean", "perf/tokens_per_s", "timing/step_s",
            "rollout/tokens_per_s", "rollout/generated_tokens", "timing/rollout_wait_s")




def train(tmp: Path, *overrides: str):
    cfg = load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp}", *overrides])
    return run_training(cfg)


@contextlib.contextmanager
def against_a_fake_sglang(tmp: Path, *overrides: str):
    """A debug run trained for one step serves as the fake SGLang server's model; yields (the run of
    ``overrides`` against that server by URL, with disk weight sync, its metric lines, the server)."""
    from support.fake_sglang import FakeSGLangServer

    train(tmp / "base", "trainer.total_steps=1")
    actor_dir = tmp / "base" / "hf" / "actor"
    server = FakeSGLangServer(str(actor_dir))
    url = server.start()
    try:
        run = train(tmp / "sg", "rollout.engine=sglang", f"model.path={actor_dir}",
                    f"model.critic_path={tmp / 'base' / 'hf' / 'critic'}", f'rollout.sglang.urls=["{url}"]',
                    "rollout.sglang.weight_sync=disk", f"rollout.sglang.disk_dir={tmp / 'sync'}", *overrides)
        yield run, read_metrics(tmp / "sg"), server
    finally:
        server.stop()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tempo_mega.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_debug_run_then_resume(tmp_path):
    """``tempo-mega train`` as a user runs it, twice: the resume is a new process, so it can only continue
    from what the first one wrote to disk."""
    out = tmp_path / "run"
    r = cli("train", "experiment=debug_cpu", "trainer.total_steps=2", f"trainer.output_dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = read_metrics(out)
    assert [x["step"] for x in got] == [1, 2]
    for line in got:
        missing = [k for k in REQUIRED if k not in line]
        assert not missing, f"metrics line lacks {missing}"
        assert math.isfinite(line["actor/loss"]) and math.isfinite(line["critic/loss"])
        # every sample generated counts, those of dropped groups too
        kept = line["rollout/num_samples"] * line["rollout/response_len_mean"]
        assert line["rollout/generated_tokens"] >= kept - 1e-6 and line["rollout/tokens_per_s"] > 0
        assert line["rollout/retried_requests"] == 0.0  # the HF engine reports none: summed as 0
        assert "rollout/servers_up" not in line  # no servers: no gauge
        assert 0 < line["timing/rollout_wait_s"] <= line["timing/rollout_s"]
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    r = cli("train", "experiment=debug_cpu", "trainer.total_steps=3", f"trainer.output_dir={out}",
            "trainer.resume=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in read_metrics(out)] == [1, 2, 3]
    # the HF export loads with plain transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "hf" / "actor")
    AutoTokenizer.from_pretrained(out / "hf" / "actor")


def test_resume_equals_uninterrupted(tmp_path):
    full = train(tmp_path / "full", "trainer.total_steps=3")
    train(tmp_path / "cut", "trainer.total_steps=2")
    # killed after the last checkpoint was complete, before its rename: the resume publishes it
    ckpts = tmp_path / "cut" / "checkpoints"
    (ckpts / "step_00000002").rename(ckpts / ".tmp-step_00000002-99999")
    resumed = train(tmp_path / "cut", "trainer.total_steps=3", "trainer.resume=true")
    assert resumed.start_step == 2 and not (ckpts / ".tmp-step_00000002-99999").exists()
    keys = ("actor/loss", "critic/loss", "rollout/response_len_mean", "actor/grad_norm")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}
    for (n1, p1), (n2, p2) in zip(full.actor.model.state_dict().items(), resumed.actor.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    for p1, p2 in zip(full.critic.model.parameters(), resumed.critic.model.parameters()):
        assert torch.equal(p1, p2)


def test_resume_continues_the_wandb_run(tmp_path, fake_wandb):
    train(tmp_path, "trainer.total_steps=1", "trainer.loggers=[jsonl,wandb]")
    state = json.loads((tmp_path / "checkpoints" / "step_00000001" / "state.json").read_text())
    assert state["wandb_run_id"] == fake_wandb.runs[0].id and fake_wandb.runs[0].init_kwargs["id"] is None
    train(tmp_path, "trainer.total_steps=2", "trainer.loggers=[jsonl,wandb]", "trainer.resume=true")
    again = fake_wandb.runs[1].init_kwargs
    assert again["id"] == state["wandb_run_id"] and again["resume"] == "allow"
    assert [step for _, step in fake_wandb.runs[1].logged] == [2]


# Pinned from a fixed-seed run of the debug preset; a change to any part of the step (sampling,
# rewards, advantages, losses, optimizer) moves these numbers.
GOLDEN = {
    1: {"actor/loss": 0.0093909353017807, "critic/loss": 0.46396535634994507},
    2: {"actor/loss": 0.00034543871879577637, "critic/loss": 0.3622499704360962},
}


def test_golden_losses(tmp_path):
    train(tmp_path, "trainer.total_steps=2")
    for line in read_metrics(tmp_path):
        for key, want in GOLDEN[line["step"]].items():
            assert line[key] == pytest.approx(want, rel=1e-4, abs=2e-6), (line["step"], key)


@pytest.mark.parametrize("mode", ["tempo", "rlvr", "ttrl", "empo", "supervised_continuation"])
def test_every_mode_runs(tmp_path, mode):
    """`experiment=debug_cpu algo=<mode>` and nothing else: each mode's recipe sets its prompt split over
    the preset's counts (the half a mode does not use becomes 0)."""
    run = train(tmp_path, f"algo={mode}")
    got = read_metrics(tmp_path)
    assert len(got) == 2
    for line in got:
        assert math.isfinite(line["actor/loss"]) and line["actor/num_optimizer_steps"] >= 1
        assert line["critic/updated"] == 1.0 and math.isfinite(line["critic/loss"])
        assert "eval/avg@k" in got[-1] and "eval_initial/avg@k" in got[0]
    if mode in ("ttrl", "empo"):
        assert got[0]["rollout/labeled_frac"] == 0.0
    if mode in ("rlvr", "supervised_continuation"):
        assert got[0]["rollout/labeled_frac"] == 1.0
    assert run.ctrl.cfg.algo.mode == mode


def test_frozen_critic_and_periodic_e_step(tmp_path):
    before = setup(load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path / 'x'}"])).critic
    frozen = train(tmp_path / "frozen", "algo.e_step_every=0")
    for p0, p1 in zip(before.model.parameters(), frozen.critic.model.parameters()):
        assert torch.equal(p0, p1)
    assert [x["critic/updated"] for x in read_metrics(tmp_path / "frozen")] == [0.0, 0.0]
    train(tmp_path / "every2", "algo.e_step_every=2", "trainer.total_steps=3")
    assert [x["critic/updated"] for x in read_metrics(tmp_path / "every2")] == [1.0, 0.0, 1.0]


def test_padded_and_packed_layouts_train_alike(tmp_path):
    train(tmp_path / "padded", "trainer.layout=padded")
    train(tmp_path / "packed", "trainer.layout=packed")
    for x, y in zip(read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "packed")):
        for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-5), key


def test_user_files_jsonl_and_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    train_recs, test_recs = make_synthetic_task(40, 8, seed=3)
    write_jsonl(train_recs, tmp_path / "train.jsonl")
    pq.write_table(pa.table({"problem": [r.prompt for r in test_recs], "answer": [r.hidden_answer for r in test_recs]}),
                   tmp_path / "test.parquet")
    # a single path as a plain string works, and giving files switches the default synthetic data off
    run = train(tmp_path / "out", f"data.train_files={tmp_path / 'train.jsonl'}",
                f"data.test_files=[{tmp_path / 'test.parquet'}]", "data.test_field_map=aime",
                "trainer.total_steps=1")
    assert len(run.pool.train) == 40 and len(run.pool.test) == 8
    assert all(r.answer is None and r.hidden_answer for r in run.pool.test)  # test answers only for evaluation
    assert read_metrics(tmp_path / "out")[0]["rollout/labeled_frac"] > 0


def test_bad_data_row_and_bad_config_fail_before_building(tmp_path, capsys):
    """In process (``cli.main(argv)``): both fail in config and data checks, before a model is built."""
    from tempo_mega.cli import main

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"answer": "3"}\n')
    rc = main(["train", "experiment=debug_cpu", "data=files", f"data.train_files=[{bad}]",
               f"data.test_files=[{bad}]", f"trainer.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:2" in err and "'prompt'" in err
    rc = main(["train", "experiment=debug_cpu", "algo.clip_low=-1", f"trainer.output_dir={tmp_path / 'o'}"])
    assert rc == 2 and "algo.clip_low" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_rollout_logprobs_equal_trainer_logprobs(tmp_path):
    cfg = load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path}", "rollout.temperature=0.7",
                       "rollout.max_response_tokens=10"])
    run = setup(cfg)
    src = run.pool.source()
    prompts = [p for p, _ in run.pool.draw("labeled", 3)]
    samples, _ = run.rollout.generate(prompts, 2, SamplingParams(temperature=0.7, max_response_tokens=10,
                                                              stop_token_ids=src.stop_token_ids, seed=5))
    batch = RolloutBatch.from_samples([prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples],
                                      is_labeled=[True] * len(samples), group_ids=[s.prompt_index for s in samples],
                                      pad_token_id=src.pad_token_id, rollout_logprobs=[s.logprobs for s in samples])
    trainer_lp = run.actor.forward_logprobs(batch)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(trainer_lp[mask], batch.rollout_logprobs[mask], atol=1e-5, rtol=0)


def test_demo_pipeline_tiny(tmp_path):
    """The README's main job at a few steps: stages chain through HF exports; table and plot appear."""
    from tempo_mega.cli import main

    out = tmp_path / "demo"
    # in process, through the CLI's own argument handling: the process boundary adds nothing here
    assert main(["demo", "--out", str(out), "--warm-start-steps", "2", "--stage1-steps", "1", "--ttt-steps", "2",
                 "trainer.eval_every=1", "trainer.eval_max_prompts=2", "trainer.eval_num_samples=2",
                 "algo.num_samples_per_prompt=2", "algo.labeled_prompts_per_step=2",
                 "algo.unlabeled_prompts_per_step=2", "algo.mini_batch_prompts=2", "algo.filter_groups=false",
                 "rollout.max_response_tokens=6", "data.synthetic_num_train=40", "data.synthetic_num_test=10",
                 "trainer.loggers=[jsonl]"]) == 0
    table = (out / "results.md").read_text()
    for name in ("stage 1 (RLVR)", "tempo", "ttrl"):
        assert f"| {name} | before |" in table and f"| {name} | after |" in table
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "tempo" / "hf" / "actor" / "model.safetensors").exists()


def test_preemption_signal_checkpoints_then_resume_finishes(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "tempo_mega.cli", "train", "experiment=debug_cpu", "trainer.total_steps=40",
            "trainer.save_every=0", "trainer.eval_every=0", f"trainer.output_dir={out}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 85, stdout + stderr
    done = [x["step"] for x in read_metrics(out)]
    assert 1 <= len(done) < 40 and done == list(range(1, len(done) + 1))
    assert (out / "checkpoints" / f"step_{len(done):08d}" / "COMPLETE").exists()
    r = cli("train", "experiment=debug_cpu", f"trainer.total_steps={len(done) + 2}", f"trainer.output_dir={out}",
            "trainer.resume=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in read_metrics(out)] == list(range(1, len(done) + 3))


def test_profiler_trace_for_listed_steps(tmp_path):
    train(tmp_path, "trainer.total_steps=2", "profile.steps=[1]")
    traces = sorted((tmp_path / "profile").glob("*.json"))
    assert [t.name for t in traces] == ["step_000001.json"]
    assert json.loads(traces[0].read_text())["traceEvents"]


def test_kernels_enabled_train_like_plain_torch(tmp_path):
    """kernels.enable=true routes the heads and losses through tempo_mega.kernels (on CPU their torch
    paths: chunked log-probs, fused norm + value head, packed losses); the run must match plain torch."""
    plain = train(tmp_path / "plain", "kernels.enable=false")
    fused = train(tmp_path / "fused", "kernels.enable=true")
    assert fused.actor.use_kernels and fused.critic.use_kernels and not plain.actor.use_kernels
    for x, y in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fused")):
        for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm", "critic/value_mse"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


def test_study_script_tiny(tmp_path):
    """scripts/study.py in its tiny configuration: every method runs from one Stage-1 checkpoint."""
    from tempo_mega.study import METHODS, main

    assert main(["--out", str(tmp_path), "--tiny", "--seeds", "0", "--steps", "2"]) == 0
    table = (tmp_path / "study.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
        assert len(read_metrics(tmp_path / method / "seed0")) == 2
    assert (tmp_path / "study_curves.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "study.json").read_text())
    assert set(summary) == set(METHODS)


def test_sglang_engine_switch_runs_the_loop_against_a_fake_server(tmp_path):
    """rollout.engine=sglang and nothing else changes: the loop runs against the fake SGLang server
    (HTTP /generate with log-probs, disk weight sync, the post-sync probe)."""
    with against_a_fake_sglang(tmp_path, "trainer.total_steps=2") as (run, got, server):
        assert [x["step"] for x in got] == [1, 2]
        for line in got:  # the sampler's log-probs are the trainer's, through HTTP and disk sync
            assert line["rollout/logprob_diff_max"] < 1e-3
            assert math.isfinite(line["actor/loss"])
            assert line["rollout/servers_up"] == line["rollout/servers"] == 1.0
            assert 0 < line["timing/rollout_wait_s"] <= line["timing/rollout_s"]
        assert type(run.rollout).__name__ == "SGLangRolloutEngine"
        # colocated: released after each step's rollout, taken back by the push (which the fake refuses
        # into released weights) and by generate; every resume matched a release (SGLang fails others)
        counts = server.state.counts
        assert counts["/release_memory_occupation"] == 2 and counts["/resume_memory_occupation"] == 4


def test_truncated_importance_sampling_weights():
    from tempo_mega.algo.correction import truncated_is

    batch = RolloutBatch.from_samples([[1, 2]], [[3, 4, 5]], is_labeled=[True], group_ids=[0], pad_token_id=0,
                                      rollout_logprobs=[[-1.0, -2.0, -3.0]])
    batch.old_logprobs = torch.tensor([[-1.0, -1.0, -3.5]])
    batch.advantages = torch.tensor([[1.0, 1.0, 1.0]])
    batch.advantages, m = truncated_is(batch.advantages, batch.old_logprobs, batch.rollout_logprobs,
                                       batch.response_mask, cap=2.0)
    # weights exp(0) = 1, exp(1) = 2.718 -> capped at 2, exp(-0.5) = 0.607
    torch.testing.assert_close(batch.advantages, torch.tensor([[1.0, 2.0, math.exp(-0.5)]]))
    assert m["rollout/tis_clip_frac"] == pytest.approx(1 / 3)


def test_tis_run_matches_plain_when_sampler_equals_trainer(tmp_path):
    train(tmp_path / "plain")
    train(tmp_path / "tis", "algo.tis_cap=2.0")
    for x, y in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "tis")):
        assert y["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert x["actor/loss"] == pytest.approx(y["actor/loss"], rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("mode", ["optimizer", "all"])
def test_offload_during_rollout_trains_exactly_like_without(tmp_path, mode):
    """trainer.offload_during_rollout: the trainer's state leaves its device for every rollout (eval's
    included) and comes back for the step, the checkpoint and the export: the run is the same run."""
    base = train(tmp_path / "base", "trainer.total_steps=2")
    off = train(tmp_path / "off", "trainer.total_steps=2", f"trainer.offload_during_rollout={mode}")
    keys = ("actor/loss", "critic/loss", "actor/grad_norm", "rollout/response_len_mean", "eval/accuracy")
    a, b = read_metrics(tmp_path / "base"), read_metrics(tmp_path / "off")
    for x, y in zip(a, b):
        assert {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}
        assert "perf/offloaded_gib" not in x
    # torch's AdamW makes its moments at the first step: nothing but the weights to move before it
    assert b[1]["perf/offloaded_gib"] > 0 and (b[0]["perf/offloaded_gib"] > 0) == (mode == "all")
    assert not off.ctrl.offload.active  # back on its device at the end (the export read it)
    for (n1, p1), (n2, p2) in zip(base.actor.model.state_dict().items(), off.actor.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    s1, s2 = base.actor.optimizer.state_dict()["state"], off.actor.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)


def test_offload_with_sglang_takes_the_kv_cache_back_after_the_hand_over(tmp_path):
    """With trainer.offload_during_rollout the push leaves the server's KV cache released (the trainer
    still holds its memory then: test_rollout_sglang's resume_after_push test); the probe's engine side
    runs at the next rollout, after the hand-over, and is logged with that step; the samples are the
    trainer's."""
    with against_a_fake_sglang(tmp_path, "trainer.total_steps=2", "trainer.offload_during_rollout=all") as (
            _, got, server):
        assert [x["step"] for x in got] == [1, 2]
        for line in got:
            assert line["rollout/probe_logprob_diff_max"] < 1e-4 and line["rollout/logprob_diff_max"] < 1e-3
            assert line["perf/offloaded_gib"] > 0
        assert server.state.counts["/release_memory_occupation"] == 2  # after each step's rollout


def test_one_step_off_trains_on_the_weights_before_with_exact_tis(tmp_path):
    """rollout.async_steps=1: step t's samples were drawn (in the background, while step t-1 trained) from
    the weights step t-1 started from: their log-probs are those weights', not the current ones; the TIS
    weights logged are exactly min(exp(trainer - sampler), cap) over the response tokens; staleness is
    logged (0 for the first step, sampled in the foreground)."""
    import copy

    from tempo_mega.backends.torch import build_actor

    cap = 2.0
    cfg = load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path}", "trainer.total_steps=3",
                       "rollout.async_steps=1", f"algo.tis_cap={cap}"])
    run = setup(cfg)
    ctrl, seen = run.ctrl, []
    advantages = ctrl.advantages

    def spy(batch):  # the batch as the step trains on it, before TIS reweights its advantages
        seen.append((batch.rollout_logprobs.clone(), batch.old_logprobs.clone(), batch.response_mask.clone(),
                     copy.deepcopy(batch)))
        return advantages(batch)

    ctrl.advantages = spy
    before = [copy.deepcopy(run.actor.model)]  # the actor's weights at the start of each step
    lines = []
    for step in range(3):
        lines.append(ctrl.step(step))
        before.append(copy.deepcopy(run.actor.model))
    assert [x["rollout/staleness"] for x in lines] == [0.0, 1.0, 1.0]
    assert ctrl._pending is None and ctrl._prefetched is None  # nothing prefetched past the last step
    for step, (rollout_lp, trainer_lp, mask, batch) in enumerate(seen):
        m = mask.bool()
        sampled_with = before[max(step - 1, 0)]  # step 0 sampled in the foreground, with its own weights
        ref = build_actor(sampled_with, temperature=cfg.rollout.temperature).forward_logprobs(batch)
        torch.testing.assert_close(rollout_lp[m], ref[m], atol=1e-5, rtol=0)
        if step:
            assert (trainer_lp[m] - rollout_lp[m]).abs().max() > 1e-3  # one update apart
        w = torch.exp(trainer_lp - rollout_lp)[m].clamp(max=cap)
        assert lines[step]["rollout/tis_weight_mean"] == pytest.approx(float(w.double().mean()), abs=1e-9)
        assert lines[step]["timing/rollout_wait_s"] >= 0


def test_one_step_off_resume_equals_uninterrupted(tmp_path):
    """The prefetched samples of the next step are in the checkpoint: a run resumed after step 2 trains on
    the samples the uninterrupted run trained on (sampled while step 2 trained), bit for bit."""
    from tempo_mega.trainer import save_checkpoint

    over = ["rollout.async_steps=1", "algo.tis_cap=2.0", "trainer.total_steps=4", "trainer.eval_every=0"]
    full = train(tmp_path / "full", *over)
    # a 4-step run stopped after its 2nd step's checkpoint (as a preemption stops it): step 3's samples,
    # sampled while step 2 trained, are in that checkpoint
    cut = setup(load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path / 'cut'}", *over]))
    for step in range(2):
        cut.sink.log(cut.ctrl.step(step), step=step + 1)
    assert cut.ctrl._prefetched["step"] == 2
    save_checkpoint(cut, 2)
    cut.sink.close()
    resumed = train(tmp_path / "cut", "trainer.resume=true", *over)
    assert resumed.start_step == 2
    keys = ("actor/loss", "critic/loss", "actor/grad_norm", "rollout/response_len_mean", "rollout/staleness",
            "rollout/tis_weight_mean")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}
    for (n1, p1), (n2, p2) in zip(full.actor.model.state_dict().items(), resumed.actor.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("overrides, key", [
    (["rollout.async_steps=1"], "algo.tis_cap"),
    (["rollout.async_steps=2", "algo.tis_cap=2"], "rollout.async_steps"),
    (["rollout.async_steps=1", "algo.tis_cap=2", "rollout.engine=sglang", "model.path=/m"], "rollout.async_steps"),
    (["rollout.async_steps=1", "algo.tis_cap=2", "trainer.offload_during_rollout=optimizer"],
     "trainer.offload_during_rollout"),
])
def test_one_step_off_config_is_checked_by_key(tmp_path, overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path}", *overrides])


def test_one_step_off_against_a_fake_sglang_server(tmp_path):
    """rollout.async_steps=1 with SGLang servers of their own (given by URL): the next step's requests go
    out while the step trains, the servers keep their memory (nothing to hand to the trainer), and the
    sampler-vs-trainer gap is the one update between them, which TIS corrects."""
    with against_a_fake_sglang(tmp_path, "trainer.total_steps=3", "rollout.async_steps=1", "algo.tis_cap=2.0") as (
            _, got, server):
        assert [x["rollout/staleness"] for x in got] == [0.0, 1.0, 1.0]
        assert got[0]["rollout/logprob_diff_max"] < 1e-3 < got[1]["rollout/logprob_diff_max"]
        assert all(0 < x["rollout/tis_weight_mean"] <= 2.0 for x in got)
        assert "/release_memory_occupation" not in server.state.counts
        assert server.state.counts["/update_weights_from_disk"] == 4  # at the start and after each step
