"""The ablation study at toy scale: from ONE Stage-1 checkpoint on the ``shift`` synthetic task (labeled
and unlabeled splits from different mixes, a precedence trap; see data/synthetic_shift.py), run TEMPO,
TEMPO with a frozen critic, TTRL, EMPO and supervised continuation for the same number of steps and
seeds, then write Markdown tables (mean and 95% t-interval over seeds), a per-claim summary and PNG
curves.

    python scripts/study.py --out runs/study --jobs 2     # the documented study (docs/results.md)
    python scripts/study.py --out /tmp/s --tiny           # a smoke run (CI)

Every run is an ordinary ``tempo-mega train`` run under ``<out>/<method>/seed<k>/`` (metrics.jsonl,
checkpoints). A run whose HF export exists is complete and is not run again, so an interrupted study
continues where it stopped and ``--jobs`` workers never repeat each other's work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

from tempo_mega.config import load_config
from tempo_mega.demo import eval_rows
from tempo_mega.trainer import run_training

# method -> overrides on top of experiment=demo (labeled/unlabeled mix as each method is meant)
METHODS: dict[str, list[str]] = {
    "tempo": ["algo=tempo"],
    "tempo_frozen_critic": ["algo=tempo", "algo.e_step_every=0"],
    "ttrl": ["algo=ttrl", "algo.labeled_prompts_per_step=0"],
    "empo": ["algo=empo", "algo.labeled_prompts_per_step=0"],
    "supervised_continuation": ["algo=supervised_continuation", "algo.unlabeled_prompts_per_step=0"],
}
KEYS = ("eval/avg@k", "eval/pass@k", "eval/distinct_answers", "eval/reward_auroc", "eval/trap_family_avg@k",
        "eval/trap_answer_frac", "eval/trap_majority_frac")
PLOT_KEYS = ("eval/avg@k", "eval/pass@k", "eval/distinct_answers", "eval/reward_auroc", "eval/trap_family_avg@k",
             "eval/trap_answer_frac")
# the documented study's batch (docs/results.md): 6 labeled + 6 unlabeled prompts x 8 samples a step (Stage 1
# too), an evaluation every 25 steps; 5 methods x 5 seeds x 150 steps take about 50 min with --jobs 2 on 2 cores
STUDY = ["algo.labeled_prompts_per_step=6", "algo.unlabeled_prompts_per_step=6", "algo.mini_batch_prompts=6",
         "trainer.eval_every=25"]
TINY = ["algo.num_samples_per_prompt=2", "algo.labeled_prompts_per_step=2", "algo.unlabeled_prompts_per_step=2",
        "algo.mini_batch_prompts=2", "algo.filter_groups=false", "rollout.max_response_tokens=6",
        "data.synthetic_num_train=60", "data.synthetic_num_test=10", "trainer.eval_max_prompts=4",
        "trainer.eval_num_samples=2", "trainer.eval_every=1", "trainer.loggers=[jsonl]"]
# two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); beyond 30, the normal's 1.96
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def _clean(xs) -> list[float]:
    return [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]


def t_quantile(df: int) -> float:
    if df in T975:
        return T975[df]
    return next((T975[d] for d in sorted(T975) if d >= df), 1.96)


def ci95(xs) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval over the values); the half-width is nan for one value."""
    xs = _clean(xs)
    if not xs:
        return float("nan"), float("nan")
    if len(xs) == 1:
        return xs[0], float("nan")
    return statistics.fmean(xs), t_quantile(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def _at(rows: list[dict], step: int, key: str):
    """The value at the evaluation closest to ``step`` (evaluations are every trainer.eval_every steps)."""
    if not rows:
        return None
    return min(rows, key=lambda r: abs(r["step"] - step)).get(key)


def summarize(out: Path, methods: list[str], seeds: list[int], steps: int) -> dict:
    """{method: {key: {"initial", "final", "gain", "late_gain": (mean, ci)}, "curves": {key: [(step, mean, ci)]}}}.

    ``gain`` is final - initial per seed; ``late_gain`` is final - the value at 2/3 of the run per seed:
    a method that has plateaued has a late gain near 0, one that keeps improving a positive one."""
    summary = {}
    for method in methods:
        runs = [eval_rows(out / method / f"seed{s}" / "metrics.jsonl") for s in seeds]
        runs = [r for r in runs if r]
        entry: dict = {"curves": {}, "seeds": len(runs)}
        for key in KEYS:
            init = [r[0].get(key) for r in runs]
            final = [r[-1].get(key) for r in runs]
            mid = [_at(r, round(steps * 2 / 3), key) for r in runs]
            entry[key] = {
                "initial": ci95(init),
                "final": ci95(final),
                "gain": ci95([f - i for f, i in zip(final, init) if f is not None and i is not None]),
                "late_gain": ci95([f - m for f, m in zip(final, mid) if f is not None and m is not None]),
                "per_seed_final": final,
            }
            all_steps = sorted({row["step"] for r in runs for row in r})
            entry["curves"][key] = [(st, *ci95([row.get(key) for r in runs for row in r if row["step"] == st]))
                                    for st in all_steps]
        summary[method] = entry
    return summary


def paired(summary: dict, a: str, b: str, key: str) -> tuple[float, float]:
    """Final a - final b, paired by seed (same seed, same Stage-1 start), mean and 95% t-interval."""
    xs, ys = summary[a][key]["per_seed_final"], summary[b][key]["per_seed_final"]
    return ci95([x - y for x, y in zip(xs, ys) if x is not None and y is not None])


def fmt(ms: tuple[float, float]) -> str:
    m, h = ms
    if math.isnan(m):
        return "nan"
    return f"{m:.3f}" if math.isnan(h) else f"{m:.3f} +- {h:.3f}"


def write_markdown(out: Path, summary: dict, seeds: list[int], steps: int, k: int, minutes: float,
                   command: str) -> str:
    head = ["method"] + [key.removeprefix("eval/") for key in KEYS]
    sep = "|" + "---|" * len(head)
    first = next(iter(summary.values()))
    final = ["| " + " | ".join(head) + " |", sep,
             "| Stage 1 (start) | " + " | ".join(fmt(first[key]["initial"]) for key in KEYS) + " |"]
    gains = ["| " + " | ".join(head) + " |", sep]
    late = ["| " + " | ".join(head) + " |", sep]
    for method, entry in summary.items():
        final.append(f"| {method} | " + " | ".join(fmt(entry[key]["final"]) for key in KEYS) + " |")
        gains.append(f"| {method} | " + " | ".join(fmt(entry[key]["gain"]) for key in KEYS) + " |")
        late.append(f"| {method} | " + " | ".join(fmt(entry[key]["late_gain"]) for key in KEYS) + " |")
    vs = []
    if "tempo" in summary:
        vs = ["| method - tempo | " + " | ".join(key.removeprefix("eval/") for key in KEYS) + " |", sep]
        for method in summary:
            if method != "tempo":
                vs.append(f"| {method} | " + " | ".join(fmt(paired(summary, method, "tempo", key)) for key in KEYS)
                          + " |")
    text = (f"Unlabeled split (D_u), strict grading, k = {k} samples per prompt, {steps} test-time steps; "
            f"mean +- half-width of the 95% t-interval over seeds {seeds} (n = {len(seeds)}); "
            f"{minutes:.1f} min wall for `{command}`.\n\n"
            "Final values:\n\n" + "\n".join(final) + "\n\n"
            "Gain over the run (final - start, per seed):\n\n" + "\n".join(gains) + "\n\n"
            f"Late gain (final - value at step ~{round(steps * 2 / 3)}, per seed; ~0 = plateau):\n\n"
            + "\n".join(late) + "\n")
    if vs:
        text += "\nFinal difference to TEMPO, paired by seed:\n\n" + "\n".join(vs) + "\n"
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    return text


def plot(out: Path, summary: dict) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'tempo-mega[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(PLOT_KEYS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    for method, entry in summary.items():
        for ax, key in zip(axes, PLOT_KEYS):
            pts = [(st, m, 0.0 if math.isnan(h) else h) for st, m, h in entry["curves"][key] if not math.isnan(m)]
            if not pts:
                continue
            xs, ms, hs = zip(*pts)
            ax.plot(xs, ms, marker="o", ms=3, label=method)
            ax.fill_between(xs, [m - h for m, h in zip(ms, hs)], [m + h for m, h in zip(ms, hs)], alpha=0.15)
    for ax, key in zip(axes, PLOT_KEYS):
        ax.set_title(key.removeprefix("eval/") + " (95% t-interval)")
        ax.set_xlabel("test-time step")
        ax.grid(alpha=0.3)
    for ax in axes[len(PLOT_KEYS):]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study_curves.png", dpi=110)
    plt.close(fig)


def _one_run(overrides: list[str]) -> None:
    """One (method, seed) run; module-level so that a worker process can run it."""
    import torch

    torch.set_num_threads(int(os.environ.get("TEMPO_STUDY_THREADS", "1")))
    run_training(load_config(overrides))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=150, help="test-time steps per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (worker processes, 1 torch thread each)")
    p.add_argument("--tiny", action="store_true", help="a few steps on a tiny batch, for CI")
    args, overrides = p.parse_known_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # every run it starts starts over (a reused Stage 1 is not rerun)
    base = ["experiment=demo", "data.synthetic_task=shift", "trainer.overwrite=true", *STUDY,
            *(TINY if args.tiny else []), *overrides]
    start = time.time()

    stage1 = out / "stage1"
    s1 = ["algo=rlvr", *base, f"trainer.output_dir={stage1}", "algo.unlabeled_prompts_per_step=0"]
    if args.tiny:
        s1 += ["trainer.warm_start_steps=2", "trainer.total_steps=1"]
    cfg1 = load_config(s1)
    if (stage1 / "hf" / "critic").exists():
        print(f"[study] reusing the Stage-1 checkpoint in {stage1}")
    else:
        print(f"[study] Stage 1: warm start {cfg1.trainer.warm_start_steps} steps + RLVR {cfg1.trainer.total_steps} steps")
        run_training(cfg1)
    todo = []  # seed by seed: a study stopped early has every method at the seeds it finished
    for seed in seeds:
        for method in methods:
            d = out / method / f"seed{seed}"
            if (d / "hf" / "critic").exists():
                print(f"[study] {method} seed {seed}: complete, not run again")
                continue
            todo.append((method, seed, [METHODS[method][0], *base, *METHODS[method][1:], f"trainer.output_dir={d}",
                                        f"model.path={stage1 / 'hf' / 'actor'}",
                                        f"model.critic_path={stage1 / 'hf' / 'critic'}",
                                        "trainer.warm_start_steps=0", f"trainer.total_steps={args.steps}",
                                        f"trainer.seed={seed}", "trainer.save_every=0", "trainer.loggers=[jsonl]"]))
    for _, _, ov in todo:
        load_config(ov)  # a config error surfaces before any run starts
    if args.jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_one_run, ov): (m, s) for m, s, ov in todo}
            for fut, (m, s) in futures.items():
                fut.result()
                print(f"[study] {m} seed {s}: done ({(time.time() - start) / 60:.1f} min)")
    else:
        for m, s, ov in todo:
            print(f"[study] {m} seed {s}: {args.steps} steps")
            run_training(load_config(ov))
    summary = summarize(out, methods, seeds, args.steps)
    command = "python scripts/study.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    text = write_markdown(out, summary, seeds, args.steps, cfg1.trainer.eval_num_samples,
                          (time.time() - start) / 60, command.strip())
    plot(out, summary)
    print(text)
    print(f"[study] {out / 'study.md'}, {out / 'study_curves.png'}")
    return 0
