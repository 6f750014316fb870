"""Host memory and time to build backend=megatron's actor and critic from an HF checkpoint directory.

Two ways, each in a fresh process (so that its peak resident memory is its own):

- ``lazy`` (the product path, ``build.build_megatron_models``): each rank reads its stage's tensors
  from the safetensors files on demand (``backends/megatron/hf_weights.py``);
- ``loaded`` (the path before it): the whole HF actor and a critic copied from it are loaded into
  memory first, and each rank takes its slices from those.

Prints, per way: peak resident memory of the process (``ru_maxrss``), the part of it above the
process's memory after imports, and the seconds to build both roles; then the ratios lazy / loaded
measured in the same run. The shape is a Qwen3-like model (``--hidden``, ``--layers``, ``--vocab``),
saved once to a temporary directory in ``--dtype``.

    python scripts/bench_model_load.py                       # CUDA when present, else CPU
    python scripts/bench_model_load.py --hidden 4096 --layers 8 --vocab 151936 --dtype bfloat16

On CPU, megatron-core's hard-coded CUDA calls are redirected by the test suite's shim
(``tests/support/megatron_cpu.py``, on ``PYTHONPATH=tests``), as the CPU tests do; the numbers are host memory either way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(way: str, directory: str, dtype: str) -> None:
    import contextlib

    import torch

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend

    cpu = not torch.cuda.is_available()
    if cpu:
        try:  # megatron-core on the CPU is test support (tests/support), on PYTHONPATH where tests run this
            from support.megatron_cpu import megatron_on_cpu
            from support.net import free_port
        except ImportError as e:
            raise SystemExit("bench_model_load.py: megatron-core runs on the CPU only through the test support: "
                             "PYTHONPATH=tests python scripts/bench_model_load.py ... (or run it on a GPU)") from e

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    ctx = megatron_on_cpu() if cpu else contextlib.nullcontext()
    dt = getattr(torch, dtype)
    mc = MegatronConfig(params_dtype=dtype)
    with ctx:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(directory)
        base = rss_mb()
        t0 = time.perf_counter()
        if way == "lazy":
            from tempo_mega.backends.megatron.hf_weights import SafetensorsWeights, critic_weights

            actor_sd = SafetensorsWeights(directory, dtype=dt)
            critic_sd = critic_weights(actor_sd, None, hidden_size=hf_config.hidden_size, seed=0, dtype=dt)
            actor = MegatronBackend("actor", hf_config, mc, hf_state_dict=actor_sd)
            critic = MegatronBackend("critic", hf_config, mc, hf_state_dict=critic_sd)
        else:
            from transformers import AutoModelForCausalLM

            from tempo_mega.models.critic import ValueHeadModel

            hf_actor = AutoModelForCausalLM.from_pretrained(directory, dtype=dt)
            hf_critic = ValueHeadModel.from_actor(hf_actor, seed=0)
            actor = MegatronBackend("actor", hf_config, mc, hf_state_dict=hf_actor.state_dict())
            critic = MegatronBackend("critic", hf_config, mc, hf_state_dict=hf_critic.state_dict())
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for b in (actor, critic) for c in b.chunks for p in c.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"way": way, "peak_mb": peak, "above_imports_mb": peak - base, "seconds": seconds,
                      "params": params}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--child", nargs=3, metavar=("WAY", "DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(args.hidden // 128, 1)
    cfg = Qwen3Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=max(heads // 4, 1), head_dim=128, intermediate_size=3 * args.hidden,
                      vocab_size=args.vocab, tie_word_embeddings=False, max_position_embeddings=4096)
    with tempfile.TemporaryDirectory(prefix="tempo_bench_load_") as d:
        Qwen3ForCausalLM(cfg).to(getattr(torch, args.dtype)).save_pretrained(d)
        size_mb = sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 2**20
        print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}: "
              f"{size_mb:.0f} MB of safetensors; building actor + critic (TP=PP=1) on "
              f"{'CUDA' if torch.cuda.is_available() else 'CPU'}")
        rows = {}
        for way in ("lazy", "loaded"):
            out = subprocess.run([sys.executable, __file__, "--child", way, d, args.dtype], capture_output=True,
                                 text=True, cwd=ROOT, check=False)
            if out.returncode != 0:
                sys.exit(f"{way}: failed\n{out.stderr[-3000:]}")
            rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| way | peak RSS (MB) | above imports (MB) | build s |")
    print("|---|---|---|---|")
    for way, r in rows.items():
        print(f"| {way} | {r['peak_mb']:.0f} | {r['above_imports_mb']:.0f} | {r['seconds']:.2f} |")
    lazy, loaded = rows["lazy"], rows["loaded"]
    print(f"lazy / loaded: memory above imports {lazy['above_imports_mb'] / loaded['above_imports_mb']:.2f}x, "
          f"time {lazy['seconds'] / loaded['seconds']:.2f}x")


if __name__ == "__main__":
    main()
