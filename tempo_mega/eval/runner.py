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
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tempo_mega.eval.benchmarks import (
    BenchmarkItem,
    benchmark_spec,
    extracted_answer,
    grade_response,
    load_benchmark,
)
from tempo_mega.eval.metrics import avg_at_k, distinct_answer_ratio, distinct_answers, pass_at_k_batch
from tempo_mega.models import fresh_qwen3_config, stop_token_ids

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
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODES = ("strict", "lenient")
MODE_NOTES = {
    "strict": "strict = exact symbolic/numeric equivalence (math-verify)",
    "lenient": "lenient = strict, or numbers within 2e-3 relative (the published grader; inflates scores)",
}


# ---------------------------------------------------------------------------------------------- metrics


def pass_at_k_values(n: int) -> list[int]:
    """The k of the pass@k a run of n samples per prompt reports: powers of two up to n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def _check_table(name: str, table: Sequence[Sequence[Any]], num_items: int, n: int) -> None:
    if len(table) != num_items:
        raise ValueError(f"evaluate_generations: {name} has {len(table)} rows for {num_items} items")
    for p, row in enumerate(table):
        if isinstance(row, str) or len(row) != n:
            raise ValueError(f"evaluate_generations: {name}[{p}] must hold {n} entries (one per generation)")


def evaluate_generations(
    items: Sequence[BenchmarkItem],
    generations: Sequence[Sequence[str]],
    *,
    lenient: bool = False,
    token_counts: Sequence[Sequence[int]] | None = None,
    finish_reasons: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Grade recorded responses. ``generations``: [P, n] response texts, row p answering ``items[p]``;
    every row has the same n >= 1. ``token_counts``: [P, n] response lengths in tokens (else lengths
    are counted in characters); ``finish_reasons``: [P, n] ``"stop"`` | ``"length"``.

    Returns ``{"grading": "strict"|"lenient", "n", "num_prompts", "response_len_unit": "tokens"|"chars",
    "metrics": {...}, "per_prompt": [...]}``. ``metrics``:

    - ``avg@n``: mean over prompts of the fraction of correct responses;
    - ``pass@k`` for k in ``pass_at_k_values(n)``: mean over prompts of 1 - C(n-c, k) / C(n, k);
    - ``diversity/distinct_answers``: mean over prompts of the number of distinct extracted answers
      (normalized strings for math, letters for choice; a response without an answer is not counted);
      ``diversity/distinct_ratio``: the same divided by n;
    - ``answer_missing_rate``: share of responses with no extractable answer;
    - ``response_len_mean``: mean response length (``response_len_unit``);
    - ``truncation_rate``: share of responses that hit the length limit (only with ``finish_reasons``).

    ``per_prompt``: ``{"id", "gold", "num_correct", "correct": [n bools], "answers": [n str|None]}``.
    """
    if not items:
        raise ValueError("evaluate_generations: no items")
    n = len(generations[0]) if len(generations) else 0
    if n < 1:
        raise ValueError("evaluate_generations: need at least one generation per item")
    _check_table("generations", generations, len(items), n)
    if token_counts is not None:
        _check_table("token_counts", token_counts, len(items), n)
    if finish_reasons is not None:
        _check_table("finish_reasons", finish_reasons, len(items), n)

    correct = [[grade_response(item, text, lenient=lenient) for text in row] for item, row in zip(items, generations)]
    answers = [[extracted_answer(item, text) for text in row] for item, row in zip(items, generations)]
    metrics: dict[str, float] = {f"avg@{n}": avg_at_k(correct)}
    for k in pass_at_k_values(n):
        metrics[f"pass@{k}"] = pass_at_k_batch(correct, k)
    metrics["diversity/distinct_answers"] = distinct_answers(answers)
    metrics["diversity/distinct_ratio"] = distinct_answer_ratio(answers)
    metrics["answer_missing_rate"] = sum(a is None for row in answers for a in row) / (len(items) * n)
    if token_counts is not None:
        lengths, unit = [int(c) for row in token_counts for c in row], "tokens"
    else:
        lengths, unit = [len(text) for row in generations for text in row], "chars"
    metrics["response_len_mean"] = sum(lengths) / len(lengths)
    if finish_reasons is not None:
        metrics["truncation_rate"] = sum(r == "length" for row in finish_reasons for r in row) / (len(items) * n)
    per_prompt = [
        {"id": item.id, "gold": item.gold, "num_correct": sum(row), "correct": row, "answers": ans}
        for item, row, ans in zip(items, correct, answers)
    ]
    return {
        "grading": "lenient" if lenient else "strict",
        "n": n,
        "num_prompts": len(items),
        "response_len_unit": unit,
        "metrics": metrics,
        "per_prompt": per_prompt,
    }


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSource:
    """What ``resolve_model`` found. ``weights``: an HF directory (``kind="hf"``) or a checkpoint's
    ``actor`` directory (``kind="checkpoint"``: ``model.safetensors`` without a ``config.json``).
    For a checkpoint, the architecture comes from ``config_dir`` (the run's ``hf/actor``) when there is
    one, else from the run's ``config.json`` (``run_config``). ``tokenizer``: a tokenizer directory, or
    None for the built-in synthetic tokenizer (a run trained with it)."""

    weights: Path
    kind: str
    tokenizer: Path | None
    config_dir: Path | None = None
    run_config: Path | None = None

    def describe(self) -> str:
        tok = str(self.tokenizer) if self.tokenizer is not None else "built-in synthetic tokenizer"
        return f"{self.weights} ({self.kind}; tokenizer: {tok})"


def _json(path: Path) -> Any:
    from tempo_mega.checkpoint import load_json

    return load_json(path)


def _is_hf_dir(d: Path) -> bool:
    cfg = d / "config.json"
    return cfg.is_file() and isinstance(data := _json(cfg), dict) and "model_type" in data


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _checkpoint_source(actor: Path, run_dir: Path, tokenizer: Path | None) -> ModelSource:
    state_file = actor / "backend_state.json"
    if state_file.is_file() and _json(state_file).get("role", "actor") != "actor":
        raise ValueError(f"{actor}: a {_json(state_file)['role']} checkpoint, not the actor")
    if not (actor / "model.safetensors").is_file():
        raise FileNotFoundError(f"{actor}: no model.safetensors (an incomplete checkpoint?)")
    export = run_dir / "hf" / "actor"
    config_dir = export if _is_hf_dir(export) else None
    run_config = next((p for p in (actor.parent / "config.json", run_dir / "config.json") if p.is_file()), None)
    if config_dir is None and run_config is None:
        raise FileNotFoundError(
            f"{actor}: a checkpoint, but neither {export}/config.json nor the run's config.json says "
            "which model it holds"
        )
    if tokenizer is None:
        if config_dir is not None and _has_tokenizer(config_dir):
            tokenizer = config_dir
        else:  # as the trainer chose it: model.tokenizer_path, model.path, or the synthetic tokenizer
            model_cfg = _json(run_config).get("model", {}) if run_config is not None else {}
            chosen = model_cfg.get("tokenizer_path") or model_cfg.get("path")
            if chosen is not None and not Path(chosen).is_dir():
                raise FileNotFoundError(
                    f"{run_config}: the run's tokenizer {chosen} is not a directory here; pass --tokenizer"
                )
            tokenizer = Path(chosen) if chosen is not None else None
    return ModelSource(actor, "checkpoint", tokenizer, config_dir, run_config)


def _pick_run_checkpoint(run_dir: Path, checkpoint: str) -> tuple[str, Path]:
    from tempo_mega.checkpoint import COMPLETE_MARKER, list_checkpoints

    export = run_dir / "hf" / "actor"
    has_export = _is_hf_dir(export)
    steps = list_checkpoints(run_dir / "checkpoints")
    if checkpoint == "hf":
        if not has_export:
            raise FileNotFoundError(f"{run_dir}: no HF export at {export} (the run has not finished?)")
        return "hf", export
    if checkpoint == "latest":
        if not steps:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        return "checkpoint", steps[-1][1] / "actor"
    if checkpoint != "auto":
        digits = checkpoint.removeprefix("step_")
        if not digits.isdigit():
            raise ValueError(f"checkpoint must be auto, hf, latest or a step number, got {checkpoint!r}")
        found = [p for s, p in steps if s == int(digits)]
        if not found:
            raise FileNotFoundError(
                f"{run_dir}: no complete checkpoint of step {int(digits)} (have: {[s for s, _ in steps]})"
            )
        return "checkpoint", found[0] / "actor"
    # auto: the export of a finished run, unless a checkpoint was written after it (a resumed run)
    if has_export and (
        not steps
        or (export / "config.json").stat().st_mtime >= (steps[-1][1] / COMPLETE_MARKER).stat().st_mtime
    ):
        return "hf", export
    if steps:
        return "checkpoint", steps[-1][1] / "actor"
    raise FileNotFoundError(f"{run_dir}: a run directory without hf/actor or a complete checkpoint")


def resolve_model(path: str | Path, *, checkpoint: str = "auto", tokenizer: str | Path | None = None) -> ModelSource:
    """Find the weights, architecture and tokenizer to evaluate at ``path``:

    - an HF directory (a ``config.json`` with a ``model_type``): itself, tokenizer included;
    - a checkpoint's ``step_*/actor`` directory or its ``step_*`` directory;
    - a run directory (``hf/actor`` and/or ``checkpoints/``), by ``checkpoint``: ``"auto"`` (the ``hf/actor``
      export, unless the newest complete checkpoint is newer than it), ``"hf"``, ``"latest"``, or a step
      number (``"120"`` / ``"step_00000120"``).

    A checkpoint takes its architecture from the run's ``hf/actor`` (else the run's ``config.json``), and
    its tokenizer from ``hf/actor`` (else the tokenizer the run's config names, else the synthetic one).
    ``tokenizer`` overrides the tokenizer directory in every case.
    """
    p = Path(path)
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not _has_tokenizer(tok):
        raise FileNotFoundError(f"--tokenizer {tok}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist")
    if _is_hf_dir(p):
        if tok is None and not _has_tokenizer(p):
            raise FileNotFoundError(f"{p}: an HF model directory without a tokenizer; pass --tokenizer DIR")
        return ModelSource(p, "hf", tok or p)
    if (p / "backend_state.json").is_file() or (p / "model.safetensors").is_file():  # step_*/actor
        return _checkpoint_source(p, p.parent.parent.parent, tok)
    if (p / "actor" / "model.safetensors").is_file():  # step_*
        return _checkpoint_source(p / "actor", p.parent.parent, tok)
    if (p / "hf" / "actor").is_dir() or (p / "checkpoints").is_dir():
        kind, weights = _pick_run_checkpoint(p, checkpoint)
        if kind == "hf":
            return resolve_model(weights, tokenizer=tok)
        return _checkpoint_source(weights, p, tok)
    raise FileNotFoundError(
        f"{p}: not an HF model directory (config.json with model_type), a checkpoint (step_*/actor) "
        "or a run directory (hf/actor, checkpoints/)"
    )


def _torch_dtype(name: str, source: ModelSource):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        if source.kind == "hf":
            return "auto"  # what the directory's config.json says
        if source.config_dir is not None:
            name = _json(source.config_dir / "config.json").get("dtype") or "float32"
        else:
            name = _json(source.run_config).get("model", {}).get("dtype", "float32")
    return getattr(torch, name)


def load_model_and_tokenizer(source: ModelSource, dtype: str = "auto"):
    """(causal LM in eval mode, tokenizer) for a ``ModelSource``."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tempo_mega.data.tokenizer import build_synthetic_tokenizer

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(source.tokenizer) if source.tokenizer else build_synthetic_tokenizer()
    torch_dtype = _torch_dtype(dtype, source)
    if source.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(source.weights, dtype=torch_dtype, attn_implementation="sdpa")
        return model.eval(), tok
    if source.config_dir is not None:
        config = AutoConfig.from_pretrained(source.config_dir)
    else:
        m = _json(source.run_config).get("model", {})
        if m.get("path"):
            config = AutoConfig.from_pretrained(m["path"])
        else:  # the fresh Qwen3 the trainer builds when model.path is None (build.build_models)
            config = fresh_qwen3_config(m, tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
    weights = source.weights / "model.safetensors"
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not fit the model described by "
                         f"{source.config_dir or source.run_config}: {str(e).splitlines()[0]}") from None
    return model.eval(), tok


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
            samples = rollout.generate(prompt_ids[name], n, sampling)
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
