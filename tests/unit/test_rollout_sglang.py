"""SGLangRolloutEngine against a fake SGLang server (support.fake_sglang) on 127.0.0.1: the fake
runs a real tiny Qwen3, so samples, weight updates and the probe are checked against plain transformers."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
import threading
import time
import types

import pytest
import torch
from support.net import free_port
from support.sglang import (
    PAD,
    PROMPTS,
    SAMPLING,
    STOP,
    VOCAB,
    probe_gap,
    stats,
    tiny_qwen3,
    url_cfg,
)

from tempo_mega.backends.torch import build_actor
from tempo_mega.rollout.base import RolloutEngine, RolloutNeedsWeights, SamplingParams
from tempo_mega.rollout.sglang import (
    SGLangConfig,
    SGLangRolloutEngine,
    SGLangServerError,
    bucket_named_tensors,
    build_sglang_engine,
    redact_command,
)
from tempo_mega.rollout.sglang.transport import _http
from tempo_mega.weight_sync import WeightSync

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------- config


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="rollout.sglang.weight_sync"):
        SGLangConfig(urls=("http://x",), weight_sync="nfs")
    with pytest.raises(ValueError, match="rollout.sglang.model_path"):  # a launch needs a checkpoint
        SGLangConfig().check_launchable()
    with pytest.raises(ValueError, match="rollout.sglang.model_path"):
        build_sglang_engine(SGLangConfig(), pad_token_id=PAD)
    SGLangConfig(urls=("http://x",)).check_launchable()  # running servers: nothing to launch
    with pytest.raises(ValueError, match="rollout.sglang.kv_cache_dtype"):
        SGLangConfig(model_path="m", kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="rollout.sglang.launch_on"):
        SGLangConfig(model_path="m", launch_on="node0")
    for key, bad in (("watchdog_interval_s", -1.0), ("watchdog_timeout_s", 0.0), ("watchdog_failures", 0)):
        with pytest.raises(ValueError, match=f"rollout.sglang.{key}"):
            SGLangConfig(model_path="m", **{key: bad})
    assert SGLangConfig(model_path="m", watchdog_interval_s=0).watchdog_interval_s == 0  # off
    cfg = SGLangConfig(model_path="m", kv_cache_dtype="fp8_e4m3", quantization="fp8", extra_args=["--x", "1"])
    assert cfg.extra_args == ("--x", "1") and hash(cfg)


def test_launch_command_carries_the_settings():
    cfg = SGLangConfig(
        model_path="/m",
        tp_size=2,
        mem_fraction_static=0.7,
        chunked_prefill_size=8192,
        disable_cuda_graph=True,
        kv_cache_dtype="fp8_e4m3",
        return_routed_experts=True,
        ep_size=2,
        extra_args=("--context-length", "20480", "--hf-token=hf_secret"),
    )
    eng = SGLangRolloutEngine(cfg, pad_token_id=PAD, start=False)
    cmd = eng._launch_command(30001, 1, "/m")
    eng.shutdown()
    # a key made for this process goes to the servers we launch, and never into the logged command
    (flag,) = [a for a in cmd if a.startswith("--api-key")]
    key = flag.removeprefix("--api-key=")  # the '=' form: a key starting with '-' is not read as a flag
    assert flag.startswith("--api-key=") and len(key) >= 32 and key == eng._transport.api_key
    shown = " ".join(redact_command(cmd))
    assert key not in shown and "hf_secret" not in shown
    assert "--api-key=***" in shown and "--hf-token=***" in shown and "--context-length 20480" in shown
    joined = " ".join(cmd)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    for piece in (
        "--model-path /m",
        "--port 30001",
        "--tp-size 2",
        "--base-gpu-id 2",
        "--mem-fraction-static 0.7",
        "--chunked-prefill-size 8192",
        "--disable-cuda-graph",
        "--kv-cache-dtype fp8_e4m3",
        "--enable-memory-saver",
        "--enable-return-routed-experts",
        "--ep-size 2",
        "--context-length 20480",
    ):
        assert piece in joined


def test_helpers():
    named = [(f"t{i}", torch.zeros(i + 1, dtype=torch.float32)) for i in range(5)]  # 4..20 bytes
    buckets = list(bucket_named_tensors(named, bucket_bytes=12))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    a = torch.tensor([[0.0, -1.0, -2.0], [-0.5, 0.0, 0.0]])
    b = torch.tensor([[0.1, -1.0, -9.0], [-0.2, 0.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    from tempo_mega.algo.correction import logprob_mismatch

    m = logprob_mismatch(a, b, mask)
    assert m["rollout/logprob_diff_max"] == pytest.approx(0.3)
    assert m["rollout/logprob_diff_mean"] == pytest.approx(0.1)


def test_weights_are_exported_where_the_sync_takes_them(monkeypatch):
    from tempo_mega.rollout.sglang import sync_device

    cfg = {mode: url_cfg("http://x", weight_sync=mode) for mode in ("tensor", "distributed", "disk")}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [sync_device(c) for c in cfg.values()] == ["cuda", "cuda", "cpu"]  # IPC / NCCL take GPU tensors
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {sync_device(c) for c in cfg.values()} == {"cpu"}


# ---------------------------------------------------------------------------------------------- generate


@torch.inference_mode()
def reference_logprobs(model, prompt, response) -> list[float]:
    ids = torch.tensor([prompt + response])
    lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return [float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response)]


def test_generate_prompt_major_concurrent_and_exact(fake):
    a, b = fake(slow_s=0.3), fake(slow_s=0.3)
    eng = build_sglang_engine(url_cfg(a.url, b.url), pad_token_id=PAD)
    assert isinstance(eng, RolloutEngine)
    n = 3
    t0 = time.monotonic()
    samples, _ = eng.generate(PROMPTS, n, SAMPLING)
    elapsed = time.monotonic() - t0
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    # 4 prompts, 2 servers, 0.3 s each: overlapping requests on both servers, far below 4 x 0.3 s serial
    sa, sb = stats(a.url), stats(b.url)
    assert sa["generate_requests"] + sb["generate_requests"] == len(PROMPTS)
    assert sa["max_in_flight"] >= 2 and sb["max_in_flight"] >= 2
    assert elapsed < 1.0
    model = tiny_qwen3(0)
    for s in samples:
        assert len(s.response_ids) == len(s.logprobs) >= 1
        assert s.finish_reason in ("stop", "length")
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == STOP and STOP not in s.response_ids[:-1]
        else:
            assert len(s.response_ids) == SAMPLING.max_response_tokens and STOP not in s.response_ids
        ref = reference_logprobs(model, PROMPTS[s.prompt_index], s.response_ids)
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(ref), atol=1e-4, rtol=0)
    # the n samples of a prompt differ (own seeds); the same call again gives the same samples
    assert len({tuple(s.response_ids) for s in samples[:n]}) > 1
    again, m = eng.generate(PROMPTS, n, SAMPLING)
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]
    assert m["rollout/servers_up"] == m["rollout/servers"] == 2
    assert m["rollout/response_len_max"] == max(len(s.response_ids) for s in again)
    assert m["rollout/truncation_rate"] == sum(s.finish_reason == "length" for s in again) / len(again)
    assert m["rollout/tokens_per_s"] > 0
    eng.shutdown()


def test_finish_reasons_mapped(fake):
    s = fake()
    eng = build_sglang_engine(url_cfg(s.url), pad_token_id=PAD)
    # every token a stop token: one-token responses ending in "stop"
    all_stop = SamplingParams(max_response_tokens=4, stop_token_ids=tuple(range(VOCAB)))
    out, _ = eng.generate(PROMPTS[:2], 2, all_stop)
    assert all(x.finish_reason == "stop" and len(x.response_ids) == 1 for x in out)
    no_stop = SamplingParams(max_response_tokens=3)
    out, m = eng.generate(PROMPTS[:2], 2, no_stop)
    assert all(x.finish_reason == "length" and len(x.response_ids) == 3 for x in out)
    assert m["rollout/truncation_rate"] == 1.0
    eng.shutdown()


# ---------------------------------------------------------------------------------------------- weights


def test_disk_sync_changes_outputs_and_probe_passes(fake, model_dir):
    s = fake()
    new = tiny_qwen3(1)
    eng = build_sglang_engine(url_cfg(s.url), pad_token_id=PAD)
    before, _ = eng.generate(PROMPTS, 2, SAMPLING)
    eng.update_weights(new.state_dict().items())
    assert probe_gap(eng, new) < 1e-4
    after, _ = eng.generate(PROMPTS, 2, SAMPLING)
    assert [x.response_ids for x in after] != [x.response_ids for x in before]
    for x in after:
        ref = reference_logprobs(new, PROMPTS[x.prompt_index], x.response_ids)
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(ref), atol=1e-4, rtol=0)
    counts = stats(s.url)["counts"]
    assert counts["/update_weights_from_disk"] == 1 and counts["/flush_cache"] == 1
    eng.shutdown()


def test_probe_catches_a_wrong_weight(fake):
    """The controller's probe after a push: the engine answers its probe ids' log-probs, the trainer's
    are compared with them, and a push that did not give the server the trainer's weights is caught."""
    s = fake()
    good = tiny_qwen3(1)
    eng = build_sglang_engine(url_cfg(s.url), pad_token_id=PAD)
    sync = WeightSync(build_actor(good), eng, PAD)
    assert eng.probe_ids == (1, 2, 3, 4, 5, 6, 7, 8) and eng.probe_tolerance == 1e-2
    assert sync.push()["rollout/probe_logprob_diff_max"] < 1e-4  # the trainer's own weights pass
    corrupted = dict(good.state_dict())
    name = "model.layers.0.mlp.down_proj.weight"
    corrupted[name] = corrupted[name] * -3.0
    eng.update_weights(corrupted.items())
    with pytest.raises(RuntimeError, match=r"probe failed: max \|engine - trainer\| log-prob = "):
        sync.probe()
    assert len(eng.prompt_logprobs([1, 2, 3])) == 1 and len(eng.prompt_logprobs([1, 2, 3])[0]) == 2
    eng.shutdown()
    no_probe = build_sglang_engine(url_cfg(s.url, probe=False), pad_token_id=PAD)
    assert no_probe.probe_ids is None and WeightSync(build_actor(good), no_probe, PAD).probe() == {}
    no_probe.shutdown()


def test_release_resume_tracks_tags_as_sglang_does(fake):
    """SGLang fails a resume of a tag that is not released (the fake does too): each tag is released once
    and resumed only if released; generate and the weight push take back what they need themselves."""
    s = fake()
    new = tiny_qwen3(1)
    eng = build_sglang_engine(url_cfg(s.url), pad_token_id=PAD)
    eng.release_memory()
    assert stats(s.url)["released"] == ["cuda_graph", "kv_cache", "weights"]
    eng.release_memory(tags=["kv_cache"])  # already released: no request
    eng.resume_memory(tags=["kv_cache"])
    eng.resume_memory(tags=["kv_cache"])  # already resident: no request
    assert stats(s.url)["released"] == ["cuda_graph", "weights"]
    counts = stats(s.url)["counts"]
    assert counts["/release_memory_occupation"] == 1 and counts["/resume_memory_occupation"] == 1
    # the push resumes the weights (the fake refuses a push into released weights), then the rest, then probes
    eng.update_weights(new.state_dict().items())
    assert stats(s.url)["released"] == [] and probe_gap(eng, new) < 1e-4
    eng.release_memory()
    assert len(eng.generate(PROMPTS[:1], 2, SAMPLING)[0]) == 2  # generate takes its memory back
    with pytest.raises(ValueError, match="unknown memory tags"):
        eng.release_memory(tags=["activations"])
    assert eng.release_during_training and not build_sglang_engine(
        url_cfg(s.url, release_during_training=False), pad_token_id=PAD).release_during_training
    eng.shutdown()


def test_a_push_can_leave_the_kv_cache_released_until_the_next_request(fake):
    """resume_after_push=false (trainer.offload_during_rollout): the push takes back the weights only; the
    KV cache and CUDA graphs come back with the next probe or generate request, after the trainer handed
    its memory over."""
    s = fake()
    new = tiny_qwen3(1)
    eng = build_sglang_engine(url_cfg(s.url, resume_after_push=False), pad_token_id=PAD)
    eng.release_memory()
    eng.update_weights(new.state_dict().items())
    assert stats(s.url)["released"] == ["cuda_graph", "kv_cache"]
    assert probe_gap(eng, new) < 1e-4 and stats(s.url)["released"] == []  # the probe request takes them back
    eng.release_memory()
    eng.update_weights(new.state_dict().items())
    assert len(eng.generate(PROMPTS[:1], 2, SAMPLING)[0]) == 2 and stats(s.url)["released"] == []
    eng.shutdown()


# ---------------------------------------------------------------------------------------------- faults


def test_timed_out_requests_are_retried_then_an_error_names_them(fake):
    s = fake(slow_s=3.0)  # answers /health, but never a request within the timeout
    eng = build_sglang_engine(url_cfg(s.url, request_timeout_s=0.5, max_retries=1), pad_token_id=PAD)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"failed 2 times \(rollout.sglang.max_retries=1\).*timed out"):
        eng.generate(PROMPTS[:2], 2, SAMPLING)
    assert time.monotonic() - t0 < 5.0
    assert stats(s.url)["generate_requests"] == 4  # 2 prompts x 2 attempts
    eng.shutdown()


def test_hung_server_is_not_given_work_again(fake):
    s = fake(hang=True)  # blocks requests, and /health says so (503) while one is blocked
    eng = build_sglang_engine(url_cfg(s.url, request_timeout_s=0.5, max_retries=3), pad_token_id=PAD)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no SGLang server is healthy: .*timed out"):
        eng.generate(PROMPTS[:2], 2, SAMPLING)
    assert time.monotonic() - t0 < 5.0
    assert stats(s.url)["generate_requests"] == 2  # one attempt: the health check keeps it out after
    eng.shutdown()


def test_watchdog_finds_a_hung_server_long_before_the_request_timeout(fake):
    """A request may run for an hour (request_timeout_s), a hung server is found within seconds: the
    watchdog's /health_generate checks fail, the server is marked hung, its prompts go to the live one."""
    a = fake()
    ref, _ = build_sglang_engine(url_cfg(a.url), pad_token_id=PAD).generate(PROMPTS, 2, SAMPLING)
    b = fake(hang=True)
    eng = build_sglang_engine(url_cfg(a.url, b.url, request_timeout_s=120.0, watchdog_interval_s=0.2,
                                      watchdog_timeout_s=5.0, watchdog_failures=2), pad_token_id=PAD)
    t0 = time.monotonic()
    out, m = eng.generate(PROMPTS, 2, SAMPLING)
    assert time.monotonic() - t0 < 10.0
    assert [(x.prompt_index, x.response_ids) for x in out] == [(x.prompt_index, x.response_ids) for x in ref]
    assert not eng.servers[1].healthy and "hung: 2 /health_generate checks failed" in eng.servers[1].last_error
    assert m["rollout/retried_requests"] == 2  # prompts 1 and 3 had gone to the hung one
    assert (m["rollout/servers_up"], m["rollout/servers"]) == (1, 2)  # the hung one is still down
    eng.shutdown()


def test_down_url_server_work_moves_to_the_live_one(fake):
    a, b = fake(), fake()
    eng = build_sglang_engine(url_cfg(a.url, b.url, request_timeout_s=5.0), pad_token_id=PAD)
    ref, _ = eng.generate(PROMPTS, 2, SAMPLING)
    b.stop()  # a given server dies: marked down, never restarted by us
    out, _ = eng.generate(PROMPTS, 2, SAMPLING)
    assert [x.response_ids for x in out] == [x.response_ids for x in ref]
    assert not eng.servers[1].healthy
    eng.shutdown()


def test_server_dying_during_weight_push_is_recovered(fake):
    a, b = fake(), fake()
    new = tiny_qwen3(1)
    eng = build_sglang_engine(
        url_cfg(a.url, b.url, request_timeout_s=5.0),
        pad_token_id=PAD
    )
    b.stop()  # still marked healthy: the push to it fails, it is marked down, the live one is (re)synced
    eng.update_weights(new.state_dict().items())
    assert not eng.servers[1].healthy and eng.servers[0].healthy
    assert probe_gap(eng, new) < 1e-4
    eng.shutdown()


def launch_cfg(model_dir, tmp_path, port: int, extra=(), **kw) -> SGLangConfig:
    return SGLangConfig(
        model_path=model_dir,
        launch_module="support.fake_sglang",
        base_port=port,
        num_engines=kw.pop("num_engines", 1),
        extra_args=tuple(extra),
        request_timeout_s=20.0,
        health_timeout_s=120.0,  # a fake's start (torch + transformers imports) takes ~25 s on a loaded 2-core box
        weight_sync="disk",
        disk_dir=str(tmp_path / "weights"),
        **kw,
    )


def reference_and_crashing_cfg(fake, model_dir, tmp_path, new, **kw) -> tuple[list, SGLangConfig]:
    """The samples of ``new``'s weights on an in-process fake without faults, and the config of a launched
    fake that dies (once) at its 3rd generate request while others are in flight."""
    ref_server = fake()
    ref = build_sglang_engine(url_cfg(ref_server.url), pad_token_id=PAD)
    ref.update_weights(new.state_dict().items())
    expected, _ = ref.generate(PROMPTS, 2, SAMPLING)
    ref.shutdown()
    extra = ["--slow-s", "0.3", "--crash-after-requests", "3", "--crash-once-file", str(tmp_path / "crashed")]
    cfg = dataclasses.replace(launch_cfg(model_dir, tmp_path, free_port(), extra, max_retries=2), **kw)
    return expected, cfg


@pytest.mark.slow
def test_launched_server_crash_restart_resubmits_and_resyncs(fake, model_dir, tmp_path):
    new = tiny_qwen3(1)
    expected, cfg = reference_and_crashing_cfg(fake, model_dir, tmp_path, new)
    marker = tmp_path / "crashed"
    eng = build_sglang_engine(cfg, pad_token_id=PAD)
    first_pid = eng.pids[0]
    eng.update_weights(new.state_dict().items())
    # 1 request was the probe; the 3rd generate request kills the process while others are in flight
    samples, m = eng.generate(PROMPTS, 2, SAMPLING)
    assert marker.exists()
    assert len(eng.pids) == 2 and eng.servers[0].restarts == 1
    assert eng.servers[0].proc.pid != first_pid
    # exactly one sample per (prompt, j), prompt-major, the restarted server runs the synced weights
    assert [(x.prompt_index, x.response_ids) for x in samples] == [
        (x.prompt_index, x.response_ids) for x in expected
    ]
    assert m["rollout/retried_requests"] >= 1
    assert probe_gap(eng, new) < 1e-4
    eng.shutdown()


def test_tensor_sync_buckets_reach_the_server(fake, tensor_sync):
    server = fake()
    new = tiny_qwen3(1)
    eng = build_sglang_engine(url_cfg(server.url, weight_sync="tensor", bucket_bytes=4096), pad_token_id=PAD)
    eng.update_weights(new.state_dict().items())
    assert probe_gap(eng, new) < 1e-4
    for name, t in new.state_dict().items():
        torch.testing.assert_close(server.state.model.state_dict()[name], t, msg=name)
    counts = server.state.counts
    assert counts["/update_weights_from_tensor"] > 1  # bucketed, inside one begin/end session
    assert counts["/begin_weight_update"] == counts["/end_weight_update"] == 1
    eng.shutdown()


def test_an_older_server_without_sessions_or_server_info(fake, tensor_sync):
    """SGLang < 0.5.23 answers 404 to /begin_weight_update, /end_weight_update and /server_info: the push
    runs without a session (begin is asked once, never again), and the context length is read from
    /get_server_info."""
    old_routes = ("/begin_weight_update", "/end_weight_update", "/server_info")
    server = fake(missing_routes=old_routes, context_length=64)
    new = tiny_qwen3(1)
    eng = build_sglang_engine(url_cfg(server.url, weight_sync="tensor", bucket_bytes=4096), pad_token_id=PAD)
    assert eng.context_tokens == 63  # from /get_server_info
    eng.update_weights(new.state_dict().items())
    eng.update_weights(new.state_dict().items())
    assert probe_gap(eng, new) < 1e-4
    counts = server.state.counts
    assert counts["/begin_weight_update"] == 1 and "/end_weight_update" not in counts
    assert counts["/get_server_info"] == 1 and counts["/update_weights_from_tensor"] > 2
    eng.shutdown()


def test_server_handles_answer_one_interface():
    """The in-process handle maps SGLang's routes to ``sglang.Engine`` methods of the same name (a
    missing one is ``_NoSuchRoute``, as an HTTP 404 is), checks their success, and builds the tensor
    update from the tensors themselves."""
    from tempo_mega.rollout.sglang.handles import _InProcessServer
    from tempo_mega.rollout.sglang.transport import _NoSuchRoute

    calls = []

    class Engine:
        def flush_cache(self):
            calls.append("flush_cache")
            return {"success": True}

        def update_weights_from_disk(self, model_path):
            return {"success": False, "message": f"no weights at {model_path}"}

        def shutdown(self):
            calls.append("shutdown")

    h = _InProcessServer(url="engine", engine=Engine())
    assert not h.routed and h.healthy
    h.call("/flush_cache", {}, 1.0)
    with pytest.raises(SGLangServerError, match="no weights at /x"):
        h.call("/update_weights_from_disk", {"model_path": "/x"}, 1.0)
    with pytest.raises(_NoSuchRoute, match="begin_weight_update"):
        h.call("/begin_weight_update", {}, 1.0)
    bucket = [("w", torch.zeros(2))]
    assert h.tensor_update_body(bucket, tp_size=2) == {"named_tensors": bucket, "flush_cache": False}
    assert h.server_info(1.0) is None  # the engine reports no server info
    h.stop()
    h.stop()  # once
    assert calls == ["flush_cache", "shutdown"]


@pytest.mark.slow
def test_restart_without_a_weight_copy_asks_for_the_weights(fake, model_dir, tmp_path, tensor_sync):
    """tensor sync keeps no copy of the weights: the restarted server is not used,
    generate raises RolloutNeedsWeights, resync_stale pushes to it alone, and the retried call gives what a
    run without the crash gives."""
    new = tiny_qwen3(1)
    expected, cfg = reference_and_crashing_cfg(fake, model_dir, tmp_path, new, weight_sync="tensor")
    marker = tmp_path / "crashed"
    eng = build_sglang_engine(cfg, pad_token_id=PAD)
    eng.update_weights(new.state_dict().items())
    with pytest.raises(RolloutNeedsWeights, match="resync_stale"):
        eng.generate(PROMPTS, 2, SAMPLING)
    assert marker.exists() and eng.servers[0].restarts == 1 and eng.servers[0].weights_stale
    assert eng.resync_stale(new.state_dict().items()) == [eng.servers[0].url]
    assert eng.resync_stale(iter(())) == []  # nothing waits any more
    samples, _ = eng.generate(PROMPTS, 2, SAMPLING)
    assert [(x.prompt_index, x.response_ids) for x in samples] == [(x.prompt_index, x.response_ids) for x in expected]
    assert probe_gap(eng, new) < 1e-4
    eng.shutdown()


@pytest.mark.slow
def test_weight_sync_resyncs_a_restarted_server_and_generates_again(fake, model_dir, tmp_path, tensor_sync, caplog):
    """The controller's side of the same fault (``WeightSync.generate``): the engine asks for the weights,
    the trainer's are streamed to the restarted server, probed, and the whole call generated again; the
    samples are those of a run without the crash, and the re-sync is counted."""
    new = tiny_qwen3(1)
    expected, cfg = reference_and_crashing_cfg(fake, model_dir, tmp_path, new, weight_sync="tensor")
    eng = build_sglang_engine(cfg, pad_token_id=PAD)
    sync = WeightSync(build_actor(new), eng, PAD)
    assert sync.push()["rollout/probe_logprob_diff_max"] < 1e-4  # the first generate request: the probe
    with caplog.at_level("WARNING", logger="tempo_mega.weight_sync"):
        samples, metrics = sync.generate(PROMPTS, 2, SAMPLING)
    assert (tmp_path / "crashed").exists() and eng.servers[0].restarts == 1
    assert [(x.prompt_index, x.response_ids) for x in samples] == [(x.prompt_index, x.response_ids) for x in expected]
    assert metrics["rollout/weight_resyncs"] == 1.0 and metrics["rollout/probe_logprob_diff_max"] < 1e-4
    assert metrics["timing/weight_resync_s"] > 0 and "re-sending the weights" in caplog.text
    eng.shutdown()


@pytest.mark.slow
def test_shutdown_stops_only_our_pids(model_dir, tmp_path, caplog, monkeypatch):
    """Also: launched servers want the key made for this process (the fake checks it as SGLang does), the
    client sends it, the logged command does not show it, and the logs stay in the run's dir."""
    monkeypatch.delenv("TEMPO_SGLANG_API_KEY", raising=False)
    caplog.set_level("INFO", logger="tempo_mega.rollout.sglang")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg = launch_cfg(model_dir, tmp_path, free_port(consecutive=2), num_engines=2)
        eng = build_sglang_engine(cfg, pad_token_id=PAD, log_dir=tmp_path / "run" / "sglang_logs")
        assert len(eng.pids) == 2 and bystander.pid not in eng.pids
        assert len(eng.generate(PROMPTS, 1, SAMPLING)[0]) == len(PROMPTS)
        key = eng._transport.api_key
        assert key and "--api-key=***" in caplog.text and key not in caplog.text
        with pytest.raises(SGLangServerError, match="HTTP 401"):  # without the key: refused
            _http(eng.servers[0].url, "/flush_cache", {}, 5.0)
        pids_reported = {stats(s.url)["pid"] for s in eng.servers}
        assert pids_reported == set(eng.pids)
        eng.shutdown()
        eng.shutdown()  # idempotent
        assert sorted(p.name for p in (tmp_path / "run" / "sglang_logs").iterdir()) == ["server0_0.log",
                                                                                        "server1_0.log"]
        assert all(s.proc.poll() is not None for s in eng.servers)
        assert bystander.poll() is None
        with pytest.raises(RuntimeError, match="shut down"):
            eng.generate(PROMPTS, 1, SAMPLING)
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def test_launch_failure_is_reported_with_its_log_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    """A server that dies while starting: the error carries the last lines of its log and the log's path.
    Without a run dir the engine's logs (and disk copies) live in temp dirs that shutdown removes; a failed
    start shuts down too. Checked in a temp root of this test's own (other suites share /tmp)."""
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    cfg = SGLangConfig(
        model_path=str(tmp_path / "missing"),
        launch_module="support.fake_sglang",
        base_port=free_port(),
        health_timeout_s=120.0,
    )
    with pytest.raises(RuntimeError, match=r"exited with code \d+ while starting; the last lines of its log "
                                           r"\S+server0_0\.log:\n(.|\n)*missing") as err:
        build_sglang_engine(cfg, pad_token_id=PAD)
    assert "Traceback" in str(err.value)
    assert list(tmp_root.iterdir()) == [], "a failed start left its temp dirs"


def test_sglang_not_installed_is_one_line():
    assert importlib.util.find_spec("sglang") is None  # the CPU environment (docs/CPU_TESTING.md)
    cfg = SGLangConfig(model_path="/m", base_port=free_port())
    with pytest.raises(RuntimeError) as err:
        build_sglang_engine(cfg, pad_token_id=PAD)
    msg = str(err.value)
    assert "\n" not in msg and "sglang is not installed" in msg and "pip install -e '.[sglang]'" in msg


def test_engine_leaves_no_temp_dir(fake, tmp_path, monkeypatch):
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    s = fake()
    eng = build_sglang_engine(url_cfg(s.url), pad_token_id=PAD)  # URL mode: no log dir is made at all
    assert list(tmp_root.iterdir()) == []
    eng.update_weights(tiny_qwen3(1).state_dict().items())  # disk sync: a temp copy of the weights
    assert [p.name[:21] for p in tmp_root.iterdir()] == ["tempo_sglang_weights_"]
    eng.shutdown()
    assert list(tmp_root.iterdir()) == []


# ------------------------------------------------------------------------------ faults seen on SGLang 0.5.23


def test_failed_tensor_update_closes_the_session_and_the_next_push_succeeds(fake, tensor_sync):
    """SGLang 0.5.23 refuses a begin while a session is open (the fake does too): a push that fails inside its
    session must still end it, or every later push fails; a session whose end was lost is ended first."""
    server = fake(fail_updates=1)
    new = tiny_qwen3(1)
    eng = build_sglang_engine(url_cfg(server.url, weight_sync="tensor", bucket_bytes=4096), pad_token_id=PAD)
    with pytest.raises(SGLangServerError, match=r"fake fault.*session was closed"):
        eng.update_weights(new.state_dict().items())
    assert not stats(server.url)["session_open"] and not eng.servers[0].session_open
    assert eng.servers[0].weights_stale  # part of a push landed: no request before the weights are whole again
    eng.update_weights(new.state_dict().items())  # the next step's push
    assert probe_gap(eng, new) < 1e-4
    # an end that never reached the server (a dropped connection): the next push ends that session first
    assert _http(server.url, "/begin_weight_update", {}, 5.0)["success"]
    eng.servers[0].session_open = True
    eng.update_weights(new.state_dict().items())
    counts = stats(server.url)["counts"]
    assert counts["/begin_weight_update"] == 4 and counts["/end_weight_update"] == 4
    assert not stats(server.url)["session_open"]
    assert len(eng.generate(PROMPTS[:1], 2, SAMPLING)[0]) == 2
    eng.shutdown()


def test_failed_distributed_update_closes_the_session_and_the_next_push_succeeds(fake, monkeypatch):
    """The NCCL side needs GPUs: the group and the broadcast are stood in for; the HTTP side (group init,
    session, one update per bucket) runs against the fake, which refuses updates outside a session."""
    import tempo_mega.rollout.sglang.weight_push as weight_push

    monkeypatch.setattr(weight_push, "_init_weight_group", lambda *a: None)
    broadcast: list[str] = []
    monkeypatch.setattr(weight_push.NcclPush, "broadcast_bucket",
                        lambda self, bucket: broadcast.extend(n for n, _ in bucket))
    server = fake(fail_updates=1)
    eng = build_sglang_engine(url_cfg(server.url, weight_sync="distributed", bucket_bytes=4096, probe=False),
                              pad_token_id=PAD)
    weights = tiny_qwen3(1).state_dict()
    with pytest.raises(SGLangServerError, match=r"fake fault.*session was closed"):
        eng.update_weights(weights.items())
    assert not stats(server.url)["session_open"]
    broadcast.clear()
    eng.update_weights(weights.items())
    assert broadcast == list(weights)  # every tensor went out, inside the session
    counts = stats(server.url)["counts"]
    assert counts["/init_weights_update_group"] == 1
    assert counts["/begin_weight_update"] == counts["/end_weight_update"] == 2
    eng.shutdown()


def test_a_server_back_as_a_new_process_rejoins_the_nccl_weight_group(fake, monkeypatch):
    """distributed sync: an NCCL group takes no new member, so a server that came back as a new process
    makes the engine form the group again (the survivor leaves the old one, every healthy server and this
    process join the next, at group_master_port + 1) and push to all of them; then the call goes on."""
    import tempo_mega.rollout.sglang.weight_push as weight_push

    groups: list[tuple[int, int]] = []
    monkeypatch.setattr(weight_push, "_init_weight_group", lambda addr, port, world: groups.append((port, world)) or port)
    monkeypatch.setattr(weight_push, "_destroy_weight_group", lambda pg: groups.append(("destroyed", pg)))
    sent: list[int] = []
    monkeypatch.setattr(weight_push.NcclPush, "broadcast_bucket", lambda self, bucket: sent.append(len(bucket)))
    a, b = fake(), fake()
    cfg = url_cfg(a.url, b.url, weight_sync="distributed", probe=False, restart_wait_s=30.0, group_master_port=29700)
    eng = build_sglang_engine(cfg, pad_token_id=PAD)
    weights = tiny_qwen3(1).state_dict()
    eng.update_weights(weights.items())
    assert groups == [(29700, 3)] and stats(a.url)["weight_groups"] == stats(b.url)["weight_groups"] == {
        weight_push.GROUP_NAME: 29700}
    b.restart(down_s=0.5).join(timeout=30)  # a preempted node: back as a fresh process, in no group
    eng.servers[1].fail(eng.servers[1].epoch, "gone")  # as a refused request marks it
    with pytest.raises(RolloutNeedsWeights):  # no copy of the weights here: the caller streams them again
        eng.generate(PROMPTS, 2, SAMPLING)
    sent.clear()
    assert eng.resync_stale(weights.items()) == [b.url]
    assert groups[1:] == [("destroyed", 29700), (29701, 3)] and sum(sent) == len(weights)
    assert stats(a.url)["weight_groups"] == stats(b.url)["weight_groups"] == {weight_push.GROUP_NAME: 29701}
    assert stats(a.url)["counts"]["/destroy_weights_update_group"] == 1
    a_updates, b_updates = (stats(x.url)["counts"]["/update_weights_from_distributed"] for x in (a, b))
    assert a_updates == 2 * b_updates  # both took the re-sync's broadcast (a had the first push too)
    out, m = eng.generate(PROMPTS, 2, SAMPLING)
    assert len(out) == len(PROMPTS) * 2 and m["rollout/servers_up"] == 2
    eng.update_weights(weights.items())  # the next push: the same group, nothing made again
    assert len(groups) == 3
    eng.shutdown()


def test_server_aborts_are_retried_and_never_returned(fake):
    """SGLang answers a request it aborted itself with HTTP 200 and finish_reason abort: those truncated
    samples are resubmitted (with a backoff), never returned; an abort that persists fails the call."""
    ref, _ = build_sglang_engine(url_cfg(fake().url), pad_token_id=PAD).generate(PROMPTS, 2, SAMPLING)
    s = fake(abort_requests=2)
    eng = build_sglang_engine(url_cfg(s.url, retry_backoff_s=0.05), pad_token_id=PAD)
    out, m = eng.generate(PROMPTS, 2, SAMPLING)
    assert [(x.prompt_index, x.response_ids) for x in out] == [(x.prompt_index, x.response_ids) for x in ref]
    assert all(x.finish_reason != "abort" for x in out)
    assert m["rollout/server_aborts"] == 2
    assert eng.servers[0].healthy  # an abort is no fault of the server
    _http(s.url, "/fake/config", {"abort_requests": 10**6}, 5.0)
    with pytest.raises(RuntimeError, match=r"failed 3 times \(rollout.sglang.max_retries=2\); SGLang aborted them "
                                           r"itself each time.*finish_reason abort"):
        eng.generate(PROMPTS[:1], 2, SAMPLING)
    eng.shutdown()


def test_context_length_is_read_checked_and_long_prompts_clamped(fake):
    s = fake(context_length=16)  # SGLang refuses prompt + max_new_tokens >= 16 (the fake too)
    with pytest.raises(ValueError, match=r"rollout.max_response_tokens=20 does not fit.*at most 15 tokens"):
        build_sglang_engine(url_cfg(s.url), pad_token_id=PAD, max_response_tokens=20)
    eng = build_sglang_engine(url_cfg(s.url), pad_token_id=PAD, max_response_tokens=10)
    assert eng.context_tokens == 15
    long_prompt = [5, 17, 9, 3, 44, 61, 12, 8, 20]  # 9 tokens: room for 6 of the 10
    sampling = SamplingParams(max_response_tokens=10)
    out, m = eng.generate([PROMPTS[0], long_prompt], 2, sampling)
    assert m["rollout/clamped_requests"] == 1
    assert all(len(x.response_ids) == 6 for x in out if x.prompt_index == 1)
    assert all(len(x.response_ids) == 10 for x in out if x.prompt_index == 0)
    # the clamped request is what a request for 6 tokens gives
    six, _ = eng.generate([long_prompt], 2, SamplingParams(max_response_tokens=6))
    assert [x.response_ids for x in out if x.prompt_index == 1] == [x.response_ids for x in six]
    with pytest.raises(ValueError, match=r"prompt 0 has 15 tokens.*data.max_prompt_tokens"):
        eng.generate([[1] * 15], 1, sampling)
    with pytest.raises(ValueError, match="rollout.max_response_tokens=15"):
        eng.generate(PROMPTS, 1, SamplingParams(max_response_tokens=15))
    eng.shutdown()
    # without --context-length, SGLang reports the scheduler's max_req_input_len (the fake: 128 - 6)
    eng = build_sglang_engine(url_cfg(fake().url), pad_token_id=PAD)
    assert eng.context_tokens == 122
    eng.shutdown()


def test_url_server_that_restarts_is_waited_for_and_resynced(fake):
    new = tiny_qwen3(1)
    ref = build_sglang_engine(url_cfg(fake().url), pad_token_id=PAD)
    ref.update_weights(new.state_dict().items())
    expected, _ = ref.generate(PROMPTS, 2, SAMPLING)
    s = fake()
    eng = build_sglang_engine(url_cfg(s.url, restart_wait_s=60.0), pad_token_id=PAD)
    eng.update_weights(new.state_dict().items())
    back = s.restart(down_s=1.5)  # a preempted node, an OOM restart: refused, then a fresh server
    out, _ = eng.generate(PROMPTS, 2, SAMPLING)
    back.join(timeout=30)
    # the new process started from the original weights; it was given the last ones before any prompt
    assert [(x.prompt_index, x.response_ids) for x in out] == [(x.prompt_index, x.response_ids) for x in expected]
    assert stats(s.url)["counts"]["/update_weights_from_disk"] == 1
    assert probe_gap(eng, new) < 1e-4
    s.stop()  # and one that never comes back: a named error after restart_wait_s
    eng2 = dataclasses.replace(eng.cfg, restart_wait_s=1.0)
    eng.cfg = eng2
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no SGLang server is healthy.*waited rollout.sglang.restart_wait_s=1.0"):
        eng.generate(PROMPTS, 2, SAMPLING)
    assert time.monotonic() - t0 < 10.0
    eng.shutdown()


HUNG_CHILD = """
import sys, time
from tempo_mega.rollout.base import SamplingParams
from tempo_mega.rollout.sglang import SGLangConfig, build_sglang_engine
cfg = SGLangConfig(urls=(sys.argv[1],), weight_sync="disk", request_timeout_s=3600.0, watchdog_interval_s=0.2,
                   watchdog_timeout_s=2.0, watchdog_failures=2, restart_wait_s=0.5)
eng = build_sglang_engine(cfg, pad_token_id=0)
try:
    eng.generate([[5, 17, 9], [3, 44]], 2, SamplingParams(max_response_tokens=4))
except RuntimeError as e:
    print("ERROR", repr(str(e)[:200]), flush=True)
    raise  # as a trainer would: no shutdown() called by hand
"""


@pytest.mark.slow
def test_hung_server_does_not_keep_the_process_alive(fake):
    """A request to a hung server may wait up to request_timeout_s (an hour); once the watchdog has failed the
    run, the process must exit at once, not when that request ends (the fake answers after 60 s)."""
    s = fake(hang=True)
    proc = subprocess.Popen([sys.executable, "-c", HUNG_CHILD, s.url], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # until the error is printed
            lines.append(line)
            if line.startswith("ERROR"):
                break
        t_error = time.monotonic()
        assert lines and lines[-1].startswith("ERROR") and "no SGLang server is healthy" in lines[-1], lines
        proc.wait(timeout=20)
        assert time.monotonic() - t_error < 20 and proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_api_key_is_sent_from_the_environment(fake, monkeypatch):
    s = fake(api_key="job-key-123")
    monkeypatch.delenv("TEMPO_SGLANG_API_KEY", raising=False)
    with pytest.raises(SGLangServerError, match=r"HTTP 401.*rollout.sglang.api_key_env"):
        build_sglang_engine(url_cfg(s.url), pad_token_id=PAD)
    monkeypatch.setenv("TEMPO_SGLANG_API_KEY", "job-key-123")
    eng = build_sglang_engine(url_cfg(s.url), pad_token_id=PAD)
    assert len(eng.generate(PROMPTS[:2], 2, SAMPLING)[0]) == 4
    assert stats(s.url)["counts"]["unauthorized"] == 1  # the first engine's, none since
    assert "job-key-123" not in repr(eng.cfg)  # never a config value (config.json)
    eng.shutdown()


def test_abort_returns_what_finished(fake):
    fast, hung = fake(slow_s=0.3), fake(hang=True)
    eng = build_sglang_engine(url_cfg(fast.url, hung.url), pad_token_id=PAD)
    out: list = []
    th = threading.Thread(target=lambda: out.append(eng.generate(PROMPTS, 2, SAMPLING)[0]))
    th.start()
    deadline = time.monotonic() + 10
    while len(eng.abort_snapshot()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # least-outstanding routing: prompts 0, 2 on the fast server (0.3 s each), 1, 3 on the hung one
    finished = eng.abort()
    th.join(timeout=20)
    assert not th.is_alive()
    done = sorted(finished)
    assert done == [0, 2] and stats(fast.url)["generate_requests"] == 2
    assert [x.prompt_index for x in out[0]] == [i for i in done for _ in range(2)]
    assert [x.response_ids for x in out[0]] == [x.response_ids for i in done for x in finished[i]]
    assert stats(hung.url)["counts"]["/abort_request"] == 1
    eng.shutdown()


class _LoopEngine:
    """Stands in for ``sglang.Engine`` (0.5.23) with only what engine-mode abort touches: ``loop`` (the
    asyncio loop its blocking ``generate`` runs on) and ``tokenizer_manager.abort_request(rid, abort_all)``.
    Prompt 0's samples finish at once, the others wait until aborted and come back with finish_reason
    abort, prompt-major, as SGLang returns a batch with n > 1."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.aborted = False
        self.abort_thread = None
        self.tokenizer_manager = types.SimpleNamespace(abort_request=self._abort_request)

    def _abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        assert abort_all and rid == ""
        self.abort_thread = threading.current_thread()
        self.aborted = True

    def generate(self, input_ids, sampling_params, return_logprob, logprob_start_len):
        self.generate_thread = threading.current_thread()
        n = sampling_params["n"]

        def out(i: int, j: int) -> dict:
            kind = "stop" if i == 0 else "abort"
            ids = [10 + i, 20 + j] if i == 0 else [30 + i]
            return {"text": "", "output_ids": ids, "meta_info": {
                "output_token_logprobs": [[-0.5, t, None] for t in ids], "finish_reason": {"type": kind}}}

        async def run():
            while not self.aborted:
                await asyncio.sleep(0.01)
            return [out(i, j) for i in range(len(input_ids)) for j in range(n)]

        return self.loop.run_until_complete(run())

    def shutdown(self):
        self.loop.close()


def test_engine_mode_abort_runs_on_the_engine_loop_and_returns_what_finished(monkeypatch):
    fake_engine = _LoopEngine()
    monkeypatch.setattr(SGLangRolloutEngine, "_make_inprocess_engine", lambda self: fake_engine)
    eng = build_sglang_engine(SGLangConfig(mode="engine", model_path="/unused"), pad_token_id=PAD)
    out: list = []
    th = threading.Thread(target=lambda: out.append(eng.generate(PROMPTS, 2, SAMPLING)[0]))
    th.start()
    time.sleep(0.2)  # generate is blocked inside the engine's loop
    assert th.is_alive() and eng.abort() == {}
    th.join(timeout=10)
    assert not th.is_alive()
    # the abort ran on the thread driving the loop (SGLang's ZMQ sockets are not thread-safe)
    assert fake_engine.abort_thread is fake_engine.generate_thread
    assert [(x.prompt_index, x.response_ids, x.finish_reason) for x in out[0]] == [
        (0, [10, 20], "stop"), (0, [10, 21], "stop")]
    eng.shutdown()


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_inprocess_engine_and_tensor_sync(tmp_path):  # pragma: no cover - needs sglang + CUDA
    pytest.importorskip("sglang")
    model = tiny_qwen3(0)
    model.save_pretrained(tmp_path)
    new = tiny_qwen3(1)
    cfg = SGLangConfig(mode="engine", model_path=str(tmp_path), weight_sync="tensor", probe_tolerance=5e-2)
    eng = build_sglang_engine(cfg, pad_token_id=PAD)
    eng.update_weights((n, t.cuda()) for n, t in new.state_dict().items())
    samples, _ = eng.generate(PROMPTS, 2, SAMPLING)
    assert [x.prompt_index for x in samples] == [i for i in range(len(PROMPTS)) for _ in range(2)]
    eng.shutdown()


@pytest.mark.gpu
def test_server_distributed_sync(tmp_path):  # pragma: no cover - needs sglang + CUDA (2 GPUs)
    pytest.importorskip("sglang")
    model = tiny_qwen3(0)
    model.save_pretrained(tmp_path)
    new = tiny_qwen3(1)
    cfg = SGLangConfig(
        model_path=str(tmp_path), weight_sync="distributed", base_port=free_port(), probe_tolerance=5e-2
    )
    eng = build_sglang_engine(cfg, pad_token_id=PAD)
    eng.update_weights(new.state_dict().items())
    eng.shutdown()


@pytest.mark.gpu
def test_server_tensor_sync_after_release_and_resume(tmp_path):  # pragma: no cover - needs sglang + CUDA
    """The colocated production path: a launched server, CUDA-IPC tensor sync in buckets, the memory
    released after a rollout and taken back by the weight push and by generate."""
    pytest.importorskip("sglang")
    tiny_qwen3(0).save_pretrained(tmp_path)
    new = tiny_qwen3(1)
    cfg = SGLangConfig(model_path=str(tmp_path), weight_sync="tensor", base_port=free_port(), probe_tolerance=5e-2,
                       mem_fraction_static=0.3, bucket_bytes=2**16)
    eng = build_sglang_engine(cfg, pad_token_id=PAD)
    try:
        eng.update_weights((n, t.cuda()) for n, t in new.state_dict().items())
        assert probe_gap(eng, new) < 5e-2
        eng.release_memory()  # as the controller does after each rollout
        eng.update_weights((n, t.cuda()) for n, t in new.state_dict().items())  # weights back, push, the rest
        assert probe_gap(eng, new) < 5e-2
        eng.release_memory()
        samples, _ = eng.generate(PROMPTS, 2, SAMPLING)  # takes its memory back itself
        assert [x.prompt_index for x in samples] == [i for i in range(len(PROMPTS)) for _ in range(2)]
        assert all(len(x.logprobs) == len(x.response_ids) for x in samples)
    finally:
        eng.shutdown()


def test_routed_experts_of_a_mixture_of_experts(tmp_path):
    """A Qwen3-MoE served with --enable-return-routed-experts: asked for them (return_routed_experts, SGLang's
    request field), every sample carries the experts of each token the server ran ([prompt + response - 1,
    layers, top-k], SGLang's base64 int32 read into uint8), which are the model's own top k; a request
    for them is refused by name where the engine or the server was not set up for them."""
    import torch
    from support.fake_sglang import FakeSGLangServer
    from support.models import hf_moe_model, tiny_qwen3_moe_config

    from tempo_mega.rollout.sglang import build_sglang_engine

    cfg = tiny_qwen3_moe_config()
    model = hf_moe_model(cfg)
    model.save_pretrained(tmp_path / "moe")
    sampling = dataclasses.replace(SAMPLING, return_routed_experts=True)
    server = FakeSGLangServer(str(tmp_path / "moe"), return_routed_experts=True)
    plain = FakeSGLangServer(str(tmp_path / "moe"))
    server.start(), plain.start()
    shape = (cfg.num_hidden_layers, cfg.num_experts_per_tok, cfg.num_experts)
    try:
        eng = build_sglang_engine(url_cfg(server.url, return_routed_experts=True), pad_token_id=PAD, moe_shape=shape)
        samples, _ = eng.generate(PROMPTS[:2], 2, sampling)
        for s in samples:
            seq = PROMPTS[s.prompt_index] + s.response_ids
            with torch.no_grad():
                logits = model.model(input_ids=torch.tensor([seq[:-1]]), output_router_logits=True).router_logits
            own = torch.stack([x.topk(2, dim=-1).indices for x in logits], dim=1)
            assert s.routed_experts.dtype == torch.uint8 and s.routed_experts.shape == (len(seq) - 1, 2, 2)
            assert torch.equal(s.routed_experts.long(), own)
        assert all(s.routed_experts is None for s in eng.generate(PROMPTS[:1], 1, SAMPLING)[0])
        eng.shutdown()
        unset = build_sglang_engine(url_cfg(server.url), pad_token_id=PAD, moe_shape=shape)
        with pytest.raises(ValueError, match="rollout.sglang.return_routed_experts=true"):
            unset.generate(PROMPTS[:1], 1, sampling)
        unset.shutdown()
        other = build_sglang_engine(url_cfg(plain.url, return_routed_experts=True, max_retries=0), pad_token_id=PAD,
                                    moe_shape=shape)
        with pytest.raises(RuntimeError, match="--enable-return-routed-experts"):
            other.generate(PROMPTS[:1], 1, sampling)
        other.shutdown()
    finally:
        server.stop(), plain.stop()


def test_prompts_are_split_over_node_groups_by_their_servers():
    from tempo_mega.rollout.rank_zero import split_prompts

    assert split_prompts(6, [1, 1]) == [[0, 2, 4], [1, 3, 5]]  # equal nodes take turns
    assert split_prompts(6, [2, 1]) == [[0, 2, 3, 5], [1, 4]]  # in proportion to the servers
    assert split_prompts(3, [1, 0, 1]) == [[0, 2], [], [1]]  # a node without servers takes none
    assert split_prompts(0, [1, 1]) == [[], []]
    with pytest.raises(ValueError, match="no group has a server"):
        split_prompts(2, [0, 0])


def test_node_group_metrics_sum_the_counters_and_keep_each_node():
    from tempo_mega.rollout.base import Sample
    from tempo_mega.rollout.rank_zero import NodeGroupRollout

    per_node = [{"rollout/tokens_per_s": 10.0, "rollout/servers_up": 2.0, "rollout/servers": 2.0,
                 "rollout/retried_requests": 1.0, "timing/x": 3.0},
                {"rollout/tokens_per_s": 30.0, "rollout/servers_up": 1.0, "rollout/servers": 2.0,
                 "rollout/retried_requests": 0.0, "timing/x": 5.0}]
    samples = [Sample(0, [1, 2, 3], [-1.0] * 3, "stop"), Sample(1, [4], [-1.0], "length")]
    m = NodeGroupRollout._merged_metrics(per_node, samples, 2.0)
    assert m["rollout/tokens_per_s"] == 2.0 and m["rollout/response_len_mean"] == 2.0  # 4 tokens in 2 s
    assert m["rollout/servers_up"] == 3.0 and m["rollout/servers"] == 4.0 and m["rollout/retried_requests"] == 1.0
    assert m["rollout/node0/tokens_per_s"] == 10.0 and m["rollout/node1/tokens_per_s"] == 30.0
    assert m["rollout/node1/servers_up"] == 1.0 and m["timing/x"] == 5.0
