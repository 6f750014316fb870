"""``tempo-mega eval``: sample n responses per benchmark problem from a checkpoint and grade them.

Two layers:

- ``evaluate_generations(items, generations)``: metrics from recorded responses (n per item), no model:
  ``avg@n``, unbiased ``pass@k`` for k = 1, 2, 4, ... up to n (and n itself), answer diversity,
  mean response length, truncation rate, per-prompt correctness.
- ``evaluate_checkpoint(model, {name: file}, n, ...)``: loads a model (an HF directory, or a run
  directory: its ``hf/actor`` export or one of its ``checkpoints/step_*/actor``), formats each prompt with
  the paper's template (``format_prompt``: the chat template when the tokenizer has one), samples with
  the rollout engine, and grades strict by default, lenient on request, or both. Metric keys name the
  benchmark and the grading mode: ``eval/aime24/strict/avg@16``, ``eval/gpqa/lenient/pass@1``.

Lenient grading (the published grader's tolerant numeric path, 2015 passes for 2016) inflates
accuracy; it exists to reproduce published numbers, and every key and table row says which mode made it.

This module is the run (``evaluate_checkpoint``: sample with the rollout engine, then grade) and the
command line (``main``, ``format_table``). The first layer lives in ``eval.grading``, finding and loading
the model in ``eval.model_source``; their names stay importable from here.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tempo_mega.eval.benchmarks import benchmark_spec, load_benchmark
from tempo_mega.eval.grading import MODE_NOTES, MODES, evaluate_generations, pass_at_k_values
from tempo_mega.eval.model_source import DTYPES, ModelSource, load_model_and_tokenizer, resolve_model
from tempo_mega.models import stop_token_ids

__all__ = [
    "ENGINES",
    "ModelSource",
    "evaluate_checkpoint",
    "evaluate_generations",
    "format_table",
    "load_model_and_tokenizer",
    "main",
    "pass_at_k_values",
    "resolve_model",
    "stop_token_ids",
]

log = logging.getLogger(__name__)

ENGINES = ("hf",)  # "sglang" joins when the SGLang engine lands


# ---------------------------------------------------------------------------------------------- the run


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return dev


def evaluate_checkpoint(
    model_dir_or_run_dir: str | Path,
    benchmark_files: Mapping[str, str | Path],
    n: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_response_tokens: int,
    lenient: bool = False,
    both: bool = False,
    seed: int = 0,
    engine: str = "hf",
    device: str = "cpu",
    max_prompts: int | None = None,
    checkpoint: str = "auto",
    tokenizer: str | Path | None = None,
    dtype: str = "auto",
    max_batch_size: int = 64,
    save_generations: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` responses per problem of each benchmark and grade them.

    ``benchmark_files``: ``{name: export file}``; the name picks the loader (``benchmark_spec``) and names
    the metric keys. Grading: strict, ``lenient=True`` lenient, ``both=True`` both. ``max_prompts``: the
    first problems of each benchmark only. ``checkpoint``/``tokenizer``: see ``resolve_model``. ``seed``
    fixes the samples (and GPQA's option order). Everything is checked (files, rows, options) before the
    model is loaded.

    Returns ``{"model", "sampling", "grading": [modes], "metrics": {"eval/<name>/<mode>/<metric>": float},
    "benchmarks": {name: {"benchmark", "kind", "file", "num_prompts", "generate_s",
    "response_len_unit", "grading": {mode: {"metrics", "per_prompt"}}, ["generations"]}}}``;
    ``generations`` ([P, n] ``{"text", "tokens", "finish_reason"}``) only with ``save_generations``.
    """
    from tempo_mega.data import format_prompt
    from tempo_mega.rollout.base import SamplingParams

    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not available in this build: only {', '.join(ENGINES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per problem) must be an integer >= 1, got {n!r}")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    if not benchmark_files:
        raise ValueError("no benchmarks given (--bench NAME=FILE)")
    SamplingParams(temperature=temperature, top_p=top_p, max_response_tokens=max_response_tokens)  # checks them
    modes = list(MODES) if both else ["lenient" if lenient else "strict"]
    dev = _resolve_device(device)
    benches = {name: load_benchmark(name, path, seed=seed, limit=max_prompts)
               for name, path in benchmark_files.items()}
    source = resolve_model(model_dir_or_run_dir, checkpoint=checkpoint, tokenizer=tokenizer)

    from tempo_mega.rollout.hf import HFRolloutEngine

    model, tok = load_model_and_tokenizer(source, dtype)
    prompt_ids = {name: [format_prompt(item.prompt, tok) for item in items] for name, items in benches.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_response_tokens=max_response_tokens,
                              stop_token_ids=stop_token_ids(tok, model), seed=seed)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(ids) for ids_list in prompt_ids.values() for ids in ids_list)
    if max_positions is not None and longest + max_response_tokens > max_positions:
        log.warning("the longest prompt (%d tokens) + max_response_tokens (%d) exceeds the model's "
                    "max_position_embeddings (%d)", longest, max_response_tokens, max_positions)
    rollout = HFRolloutEngine(model, pad_token_id=pad, device=dev, max_batch_size=max_batch_size)

    result: dict[str, Any] = {
        "model": source.describe(),
        "model_path": str(source.weights),
        "engine": engine,
        "device": str(dev),
        "sampling": {"n": n, "temperature": temperature, "top_p": top_p,
                     "max_response_tokens": max_response_tokens, "seed": seed, "max_prompts": max_prompts},
        "grading": modes,
        "metrics": {},
        "benchmarks": {},
    }
    try:
        for name, items in benches.items():
            start = time.perf_counter()
            samples, _ = rollout.generate(prompt_ids[name], n, sampling)
            generate_s = time.perf_counter() - start
            texts = [[tok.decode(samples[p * n + j].response_ids, skip_special_tokens=True) for j in range(n)]
                     for p in range(len(items))]
            tokens = [[len(samples[p * n + j].response_ids) for j in range(n)] for p in range(len(items))]
            finish = [[samples[p * n + j].finish_reason for j in range(n)] for p in range(len(items))]
            bench: dict[str, Any] = {
                "benchmark": benchmark_spec(name).title,
                "kind": items[0].kind,
                "file": str(benchmark_files[name]),
                "num_prompts": len(items),
                "generate_s": generate_s,
                "response_len_unit": "tokens",
                "grading": {},
            }
            for mode in modes:
                graded = evaluate_generations(items, texts, lenient=mode == "lenient", token_counts=tokens,
                                              finish_reasons=finish)
                bench["grading"][mode] = {"metrics": graded["metrics"], "per_prompt": graded["per_prompt"]}
                for key, value in graded["metrics"].items():
                    result["metrics"][f"eval/{name}/{mode}/{key}"] = value
            if save_generations:
                bench["generations"] = [
                    [{"text": t, "tokens": c, "finish_reason": f} for t, c, f in zip(*row)]
                    for row in zip(texts, tokens, finish)
                ]
            result["benchmarks"][name] = bench
            log.info("%s: %d prompts x %d samples in %.1f s", name, len(items), n, generate_s)
    finally:
        rollout.shutdown()
    return result


# ---------------------------------------------------------------------------------------------- CLI


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of ``evaluate_checkpoint``'s result: one row per benchmark and grading mode."""
    s = result["sampling"]
    n = s["n"]
    ks = pass_at_k_values(n)
    head = ["benchmark", "grading", "prompts", f"avg@{n}", *(f"pass@{k}" for k in ks),
            "distinct", "len(tok)", "truncated"]
    rows = []
    for name, bench in result["benchmarks"].items():
        for mode, graded in bench["grading"].items():
            m = graded["metrics"]
            rows.append([name, mode, str(bench["num_prompts"]), _fmt(m[f"avg@{n}"]),
                         *(_fmt(m[f"pass@{k}"]) for k in ks), _fmt(m["diversity/distinct_answers"]),
                         f"{m['response_len_mean']:.1f}", _fmt(m.get("truncation_rate"))])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [
        f"model: {result['model']}",
        f"sampling: n={n}, temperature={s['temperature']}, top_p={s['top_p']}, "
        f"max_response_tokens={s['max_response_tokens']}, seed={s['seed']}",
        "grading: " + "; ".join(MODE_NOTES[m] for m in result["grading"]),
        "",
        line(head),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
    ]
    return "\n".join(out)


def _bench_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FILE (e.g. aime24=data/aime24.jsonl), got {text!r}")
    return name.strip(), path.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tempo-mega eval",
        description="Sample n responses per benchmark problem from a model or run directory and grade them "
        "(strict by default). Benchmark files: docs/eval.md.",
    )
    p.add_argument("--model", required=True, help="HF model dir, a run dir (hf/actor or checkpoints/), or step_*/actor")
    p.add_argument("--bench", action="append", type=_bench_arg, required=True, metavar="NAME=FILE",
                   help="benchmark name (aime24, aime25, aime26, beyond_aime, olymmath, gpqa_diamond/gpqa, "
                   "or one of them with a suffix) and its export file; repeatable")
    p.add_argument("-n", "--num-samples", type=int, default=16, help="samples per problem (default 16)")
    grading = p.add_mutually_exclusive_group()
    grading.add_argument("--lenient", action="store_true", help="lenient grading (inflates scores)")
    grading.add_argument("--both", action="store_true", help="report strict and lenient grading")
    p.add_argument("--max-response-tokens", type=int, default=16384, help="default 16384")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompts", type=int, default=None, help="first problems of each benchmark only")
    p.add_argument("--engine", default="hf", help="rollout engine (only 'hf' in this build)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--checkpoint", default="auto", help="in a run dir: auto | hf | latest | STEP")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: from the model or run)")
    p.add_argument("--out", type=Path, default=None, help="write the metrics and per-prompt results as JSON")
    p.add_argument("--save-generations", action="store_true", help="also put every response in --out")
    return p


def main(argv: list[str]) -> int:
    """``tempo-mega eval ...``: prints the table, writes ``--out``; 2 on a user mistake."""
    args = build_parser().parse_args(argv)
    names = [name for name, _ in args.bench]
    if len(set(names)) != len(names):
        print(f"tempo-mega eval: error: a benchmark name is given twice: {names}", file=sys.stderr)
        return 2
    try:
        result = evaluate_checkpoint(
            args.model, dict(args.bench), args.num_samples, temperature=args.temperature, top_p=args.top_p,
            max_response_tokens=args.max_response_tokens, lenient=args.lenient, both=args.both, seed=args.seed,
            engine=args.engine, device=args.device, max_prompts=args.max_prompts, checkpoint=args.checkpoint,
            tokenizer=args.tokenizer, dtype=args.dtype, max_batch_size=args.max_batch_size,
            save_generations=args.save_generations,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"tempo-mega eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out is not None:
        from tempo_mega.checkpoint import save_json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
