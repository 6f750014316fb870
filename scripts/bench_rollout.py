"""Rollout throughput and weight-sync time, SGLang vs the HF reference engine, on one model.

    python scripts/bench_rollout.py --model-path Qwen/Qwen3-0.6B --prompts 32 --n 8 --max-response-tokens 2048

Prints one CSV row per engine: engine, tokens_per_s, response_len_mean, truncation_rate, weight_sync_s, and
for SGLang release_s (memory released as after a colocated rollout) and sync_after_release_s (the push
that takes it back: weights resumed, pushed, KV cache and CUDA graphs resumed, probe off).
Needs CUDA and sglang for the SGLang row; without them it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-response-tokens", type=int, default=2048)
    p.add_argument("--weight-sync", default="tensor", choices=["tensor", "distributed", "disk"])
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--skip-hf", action="store_true", help="HF decoding of long rollouts is slow")
    args = p.parse_args()

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
