"""SGLang servers on every node of a multi-node trainer (``NodeGroupSGLang``): a 2-node torchrun world
(two torchrun launches on this machine, 2 ranks each; node = torchrun's ``GROUP_RANK``) whose megatron
actor is TP=2 inside each node. Each node's first rank launches and owns its node's fake SGLang server
(its own pid, port and log), both servers get prompts, the samples are those of one server for the same
weights, and a server killed on node 1 is restarted and re-synced by node 1 while node 0's share is
kept, not generated again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from support.megatron_cpu import megatron_on_cpu  # noqa: E402
from support.models import tiny_qwen3_config  # noqa: E402
from support.net import free_port  # noqa: E402

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16]]


def _tiny():
    return tiny_qwen3_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.mark.slow
def test_every_node_owns_its_servers_and_recovers_alone(tmp_path):
    from support.fake_sglang import FakeSGLangServer
    from transformers import Qwen3ForCausalLM

    from tempo_mega.rollout.base import SamplingParams
    from tempo_mega.rollout.sglang import SGLangConfig, build_sglang_engine

    served = tmp_path / "served"
    Qwen3ForCausalLM(_tiny()).save_pretrained(served)  # not the actor's weights: the push replaces them
    master, base = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={master}", str(Path(__file__).resolve()), str(served),
         str(tmp_path), str(base)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for node in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-5000:] for o in outs)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    r0 = res[0]

    # each node's first rank owns a server of its own (its pid, a port of its node's range)
    assert r0["groups"] == [[0, 1], [2, 3]] and r0["servers_per_group"] == [1, 1]
    lead0, lead1 = r0["server"], res[2]["server"]
    assert lead0["url"].endswith(f":{base}") and lead1["url"].endswith(f":{base + 1}")
    assert lead0["pid"] != lead1["pid"] and res[1]["server"] is None and res[3]["server"] is None
    assert (tmp_path / "logs" / "node0" / "server0_0.log").exists()
    assert (tmp_path / "logs" / "node1" / "server0_0.log").exists()

    # both servers got prompts: the six go three to each node, in turns (one request per prompt, after
    # the probe request of the first push)
    share = r0["counts_first"]
    assert share[0]["generate_requests"] == share[1]["generate_requests"] == 1 + 3

    # every rank has the same samples, those of one server running the actor's weights
    sampling = SamplingParams(temperature=0.7, max_response_tokens=4)
    ref_server = FakeSGLangServer(str(served))
    url = ref_server.start()
    try:
        ref = build_sglang_engine(SGLangConfig(urls=(url,), weight_sync="disk", disk_dir=str(tmp_path / "ref")),
                                  pad_token_id=0)
        ref.update_weights(r0["weights"].items())
        expected, _ = ref.generate(PROMPTS, 2, sampling)
        ref.shutdown()
    finally:
        ref_server.stop()
    want = [(s.prompt_index, s.response_ids) for s in expected]
    assert [(p, ids) for p, ids, _ in r0["first"]] == want
    for r in res[1:]:
        assert r["first"] == r0["first"] and r["again"] == r0["again"]
    assert [(p, ids) for p, ids, _ in r0["again"]] == want
    assert r0["first_metrics"]["rollout/servers"] == 2 and r0["first_metrics"]["rollout/servers_up"] == 2
    assert r0["first_metrics"]["rollout/node0/tokens_per_s"] > 0 and r0["first_metrics"]["rollout/node1/tokens_per_s"] > 0

    # node 1's server was killed: node 1 restarted it (a new pid) and re-synced it; node 0 kept its
    # server and its share: its three prompts went out once in the second call (not again in the retried
    # call after the re-sync), plus the probe request after the re-sync
    assert res[2]["after"]["restarts"] == 1 and res[2]["after"]["pid"] != lead1["pid"]
    assert r0["after"]["restarts"] == 0 and r0["after"]["pid"] == lead0["pid"]
    again = r0["counts_again"]
    assert again[0]["generate_requests"] == share[0]["generate_requests"] + 3 + 1 and again[0]["pid"] == lead0["pid"]
    assert again[1]["generate_requests"] == 1 + 3 and again[1]["pid"] != lead1["pid"]  # probe, node 1's share
    assert r0["again_metrics"]["rollout/weight_resyncs"] == 1.0
    # sampled in the background: the same samples on every rank, each call's own
    for r in res:
        assert r["background"] == r0["again"] and r["background_small"] == [0, 1]
    assert r0["background_metrics"]["rollout/servers_up"] == 2
    assert r0["again_metrics"]["rollout/probe_logprob_diff_max"] < 1e-4


@pytest.mark.slow
def test_bench_rollout_nodes_simulation_runs():
    """``scripts/bench_rollout.py --nodes``: one CSV row per node count, every node's samples counted
    (the figures themselves are for docs/benchmarks.md, not asserted)."""
    script = Path(__file__).parents[2] / "scripts" / "bench_rollout.py"
    out = subprocess.run([sys.executable, str(script), "--nodes", "1,2", "--prompts", "8", "--n", "2", "--tokens", "4",
                          "--token-latency-s", "0.002", "--reps", "1", "--train-s", "0.01"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    rows = [line.split(",") for line in out.stdout.splitlines() if line[:2] in ("1,", "2,")]
    scaling, waits = rows[:2], rows[2:]
    assert [r[0] for r in scaling] == ["1", "2"] and all(len(r) == 6 and float(r[1]) > 0 for r in scaling)
    assert [r[0] for r in waits] == ["1", "2"] and all(len(r) == 5 for r in waits)


def _stats(engine) -> dict:
    from support.sglang import stats

    s = stats(engine.servers[0].url)
    return {"generate_requests": s["generate_requests"], "pid": s["pid"]}


def _worker(served: str, out_dir: str, base_port: str) -> None:
    import torch.distributed as dist
    from support.fake_sglang import install_fake_serializer
    from transformers import Qwen3ForCausalLM

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.rollout.base import SamplingParams
    from tempo_mega.rollout.rank_zero import NodeGroupSGLang
    from tempo_mega.rollout.sglang import SGLangConfig
    from tempo_mega.weight_sync import WeightSync

    install_fake_serializer()  # the client's tensor payloads, as the fake server reads them
    with megatron_on_cpu():
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        torch.manual_seed(1)
        hf = Qwen3ForCausalLM(_tiny())
        actor = MegatronBackend("actor", hf.config, MegatronConfig(tensor_parallel_size=2, params_dtype="float32"),
                                hf_state_dict=hf.state_dict(), temperature=0.7)
        sg = SGLangConfig(model_path=served, launch_module="support.fake_sglang", base_port=int(base_port),
                          weight_sync="tensor", request_timeout_s=30.0, health_timeout_s=180.0)
        rollout = NodeGroupSGLang(sg, pad_token_id=0, weights_dtype=torch.float32, log_dir=Path(out_dir) / "logs")
        sync = WeightSync(actor, rollout, pad_token_id=0)
        sync.push()
        sampling = SamplingParams(temperature=0.7, max_response_tokens=4)
        own = rollout.engine.servers[0] if rollout.is_leader else None
        res = {"groups": rollout.groups, "servers_per_group": rollout.servers_per_group,
               "server": {"url": own.url, "pid": own.proc.pid} if own else None}
        got, res["first_metrics"] = sync.generate(PROMPTS, 2, sampling)
        res["first"] = [(s.prompt_index, s.response_ids, s.logprobs) for s in got]
        counts: list = [None] * 4
        dist.all_gather_object(counts, _stats(rollout.engine) if rollout.is_leader else None)
        res["counts_first"] = [counts[0], counts[2]]
        if rollout.is_leader and rollout.group == 1:  # node 1 loses its server
            own.proc.send_signal(signal.SIGKILL)
            own.proc.wait(timeout=30)
        dist.barrier()
        got, res["again_metrics"] = sync.generate(PROMPTS, 2, sampling)
        res["again"] = [(s.prompt_index, s.response_ids, s.logprobs) for s in got]
        dist.all_gather_object(counts, _stats(rollout.engine) if rollout.is_leader else None)
        res["counts_again"] = [counts[0], counts[2]]
        if own is not None:
            res["after"] = {"restarts": own.restarts, "pid": own.proc.pid}
        # in the background (rollout.async_steps): the leaders sample on a thread while this rank goes on
        handle = rollout.start_generate([(PROMPTS, 2, sampling), (PROMPTS[:2], 1, sampling)])
        (bg, bg_metrics), (small, _) = rollout.finish_generate(handle)
        res["background"] = [(s.prompt_index, s.response_ids, s.logprobs) for s in bg]
        res["background_small"] = [s.prompt_index for s in small]
        res["background_metrics"] = bg_metrics
        weights = dict(actor.export_weights())
        if rank == 0:
            res["weights"] = weights
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        rollout.shutdown()
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
