"""Rollout throughput and weight-sync time, SGLang vs the HF reference engine, on one model.

    python scripts/bench_rollout.py --model-path Qwen/Qwen3-0.6B --prompts 32 --n 8 --max-response-tokens 2048

Prints one CSV row per engine: engine, tokens_per_s, response_len_mean, truncation_rate, weight_sync_s, and
for SGLang release_s (memory released as after a colocated rollout) and sync_after_release_s (the push
that takes it back: weights resumed, pushed, KV cache and CUDA graphs resumed, probe off).
Needs CUDA and sglang for the SGLang row; without them it says so in one line and exits 0.

    python scripts/bench_rollout.py --nodes 1,2,4

A CPU simulation of rollout over several nodes (``NodeGroupRollout``, what ``rollout.sglang.launch_on=
every_node`` builds): for each node count N, a gloo world of N processes, each one a "node" whose engine
drives its own fake SGLang servers (tests/support/fake_sglang with its latency model: a request holds one
of ``--max-running`` slots for ``--tokens`` x ``--token-latency-s``, no model forward). Every run samples
the same ``--prompts`` x ``--n``. Prints one CSV row per N: nodes, wall_s (median of ``--reps`` calls),
speedup over 1 node, efficiency (speedup / N; the goal is >= 0.9), tokens_per_s, and the slowest node's
tokens/s (``rollout/node<k>/tokens_per_s``). With ``--train-s T``, also the trainer's wait for its
samples per step, for a train phase of T seconds: ``rollout.async_steps=0`` waits the whole rollout, ``1``
(the next step's rollout in the background, ``start_generate`` / ``finish_generate``) only what the
rollout takes beyond the train phase (the goal: max(0, rollout - T)).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _tiny_model_dir() -> str:
    """A one-layer Qwen3 the fake servers load (their latency model never runs it; it sets the vocabulary)."""
    import tempfile

    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tempfile.mkdtemp(prefix="bench_rollout_model_")
    cfg = Qwen3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


def _nodes_worker(args) -> None:
    """One rank of the simulation: a "node" with ``--servers-per-node`` fake servers of its own."""
    import statistics

    import torch.distributed as dist
    from support.fake_sglang import FakeSGLangServer

    from tempo_mega.rollout.base import SamplingParams
    from tempo_mega.rollout.rank_zero import NodeGroupRollout
    from tempo_mega.rollout.sglang import SGLangConfig, build_sglang_engine

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    servers = [FakeSGLangServer(args.model_dir, token_latency_s=args.token_latency_s, max_running=args.max_running)
               for _ in range(args.servers_per_node)]
    urls = tuple(s.start() for s in servers)
    cfg = SGLangConfig(urls=urls, weight_sync="disk", probe=False, request_timeout_s=600.0,
                       max_concurrent_requests=4096)
    rollout = NodeGroupRollout(lambda _k: build_sglang_engine(cfg, pad_token_id=0),
                               groups=[[r] for r in range(world)])
    prompts = [[1 + (i % 200), 2 + (i % 50), 3] for i in range(args.prompts)]
    sampling = SamplingParams(max_response_tokens=args.tokens)
    rollout.generate(prompts[:world], 1, SamplingParams(max_response_tokens=1))  # warm-up: connections
    walls, metrics = [], {}
    for _ in range(args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        samples, metrics = rollout.generate(prompts, args.n, sampling)
        walls.append(time.perf_counter() - t0)
    waits = {}
    if args.train_s > 0:  # the trainer's wait for its samples, one step at a time: synchronous vs one-step-off
        for mode in ("sync", "async"):
            got = []
            for _ in range(args.reps):
                dist.barrier()
                if mode == "sync":  # the step waits for its own rollout, then trains
                    t0 = time.perf_counter()
                    rollout.generate(prompts, args.n, sampling)
                    got.append(time.perf_counter() - t0)
                    time.sleep(args.train_s)
                else:  # the next step's rollout runs while this one trains (rollout.async_steps=1)
                    handle = rollout.start_generate([(prompts, args.n, sampling)])
                    time.sleep(args.train_s)
                    t0 = time.perf_counter()
                    rollout.finish_generate(handle)
                    got.append(time.perf_counter() - t0)
            waits[mode] = statistics.median(got)
    if rank == 0:
        assert len(samples) == args.prompts * args.n
        slowest = min(v for k, v in metrics.items() if k.startswith("rollout/node") and k.endswith("tokens_per_s")) \
            if world > 1 else metrics["rollout/tokens_per_s"]
        print(f"RESULT {world} {statistics.median(walls):.4f} {metrics['rollout/tokens_per_s']:.1f} {slowest:.1f}",
              flush=True)
        if waits:
            print(f"WAIT {world} {waits['sync']:.4f} {waits['async']:.4f}", flush=True)
    rollout.shutdown()
    for s in servers:
        s.stop()
    dist.destroy_process_group()


def nodes_main(args) -> int:
    """Each node count in its own gloo world (torchrun), the same work; a CSV row per count."""
    import os
    import subprocess
    from pathlib import Path

    counts = [int(x) for x in args.nodes.split(",")]
    model_dir = _tiny_model_dir()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    print(f"# {args.prompts} prompts x n={args.n}, {args.tokens} tokens, {args.token_latency_s * 1e3:g} ms/token, "
          f"{args.servers_per_node} server(s) per node of {args.max_running} running requests")
    print("nodes,wall_s,speedup,efficiency,tokens_per_s,slowest_node_tokens_per_s")
    base, waits = None, []
    for n in counts:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # the worker's settings through the environment: torchrun reads options anywhere on its command line
        work = {k: getattr(args, k) for k in ("prompts", "n", "tokens", "token_latency_s", "max_running",
                                              "servers_per_node", "reps", "train_s")}
        env["TEMPO_BENCH_NODES"] = json.dumps({**work, "model_dir": model_dir})
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", f"--master-port={port}",
               str(Path(__file__).resolve()), "--nodes-worker"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(out.stdout[-2000:] + out.stderr[-4000:], file=sys.stderr)
            return 1
        _, world, wall, tps, slowest = line.split()
        wall = float(wall)
        base = base or wall * n  # the 1-node wall (the first count, scaled to 1 node)
        speedup = base / wall
        print(f"{world},{wall:.3f},{speedup:.2f},{speedup / n:.2f},{float(tps):.0f},{float(slowest):.0f}")
        wait = next((x for x in out.stdout.splitlines() if x.startswith("WAIT ")), None)
        if wait is not None:
            _, _, sync_s, async_s = wait.split()
            waits.append((n, wall, float(sync_s), float(async_s)))
    if waits:
        print(f"# the trainer's wait per step with a {args.train_s:g} s train phase: async_steps 0 vs 1 "
              "(goal: max(0, rollout - train))")
        print("nodes,rollout_s,wait_async0_s,wait_async1_s,goal_s")
        for n, wall, sync_s, async_s in waits:
            print(f"{n},{wall:.3f},{sync_s:.3f},{async_s:.3f},{max(0.0, wall - args.train_s):.3f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default=None, help="CPU simulation over node counts, e.g. 1,2,4")
    p.add_argument("--nodes-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=64, help="--nodes: tokens per response")
    p.add_argument("--token-latency-s", type=float, default=0.004, help="--nodes: a fake server's time per token")
    p.add_argument("--max-running", type=int, default=8, help="--nodes: requests a fake server runs at once")
    p.add_argument("--servers-per-node", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train-s", type=float, default=0.0,
                   help="--nodes: also the trainer's wait per step with a train phase this long, async_steps 0 vs 1")
    p.add_argument("--model-path", default=None)
    p.add_argument("--prompts", type=int, default=None, help="32 (GPU), 128 (--nodes)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-response-tokens", type=int, default=2048)
    p.add_argument("--weight-sync", default="tensor", choices=["tensor", "distributed", "disk"])
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--skip-hf", action="store_true", help="HF decoding of long rollouts is slow")
    args = p.parse_args()
    if args.prompts is None:
        args.prompts = 128 if args.nodes else 32
    if args.nodes_worker:
        import os

        _nodes_worker(argparse.Namespace(**json.loads(os.environ["TEMPO_BENCH_NODES"])))
        return 0
    if args.nodes:
        return nodes_main(args)
    if args.model_path is None:
        p.error("--model-path is required (or --nodes for the CPU simulation)")

    import torch

    try:
        import sglang  # noqa: F401
    except ImportError:
        sglang_missing = True
    else:
        sglang_missing = False
    if not torch.cuda.is_available() or sglang_missing:
        what = "CUDA" if not torch.cuda.is_available() else "sglang"
        print(f"bench_rollout: no {what} on this machine; nothing to benchmark")
        return 0

    from transformers import AutoModelForCausalLM

    from tempo_mega.rollout.base import SamplingParams
    from tempo_mega.rollout.hf import HFRolloutEngine
    from tempo_mega.rollout.sglang import SGLangConfig, build_sglang_engine

    trainer = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.bfloat16).cuda().eval()
    vocab = trainer.get_input_embeddings().num_embeddings
    eos = trainer.generation_config.eos_token_id
    stop = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, min(vocab, 30000), (args.prompts, args.prompt_len), generator=g).tolist()
    sampling = SamplingParams(
        temperature=1.0, max_response_tokens=args.max_response_tokens, stop_token_ids=stop
    )
    weights = lambda: ((n, t.detach()) for n, t in trainer.state_dict().items())  # noqa: E731

    print("engine,tokens_per_s,response_len_mean,truncation_rate,weight_sync_s,release_s,sync_after_release_s")
    cfg = SGLangConfig(
        model_path=args.model_path, tp_size=args.tp_size, weight_sync=args.weight_sync, probe=False
    )
    eng = build_sglang_engine(cfg, pad_token_id=0)
    try:
        eng.generate(prompts[:2], 1, SamplingParams(max_response_tokens=16))  # warm-up
        _, gen = eng.generate(prompts, args.n, sampling)
        t0 = time.perf_counter()
        eng.update_weights(weights())
        sync_s = time.perf_counter() - t0
        # a colocated step: memory released for training, then the push takes it back (weights first)
        t0 = time.perf_counter()
        eng.release_memory()
        release_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.update_weights(weights())
        resync_s = time.perf_counter() - t0
    finally:
        eng.shutdown()
    print(
        f"sglang,{gen['rollout/tokens_per_s']:.1f},{gen['rollout/response_len_mean']:.1f},"
        f"{gen['rollout/truncation_rate']:.3f},{sync_s:.3f},{release_s:.3f},{resync_s:.3f}"
    )

    if not args.skip_hf:
        ref = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.bfloat16)
        hf = HFRolloutEngine(ref, pad_token_id=0, device="cuda")
        t0 = time.perf_counter()
        samples, _ = hf.generate(prompts, args.n, sampling)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(s.response_ids) for s in samples)
        t0 = time.perf_counter()
        hf.update_weights(weights())
        torch.cuda.synchronize()
        sync_s = time.perf_counter() - t0
        trunc = sum(s.finish_reason == "length" for s in samples) / len(samples)
        print(f"hf,{tokens / elapsed:.1f},{tokens / len(samples):.1f},{trunc:.3f},{sync_s:.3f},,")
    return 0


if __name__ == "__main__":
    sys.exit(main())
