"""The ablation study at toy scale: from ONE Stage-1 checkpoint on the synthetic task, run TEMPO, TEMPO
with a frozen critic, TTRL, EMPO and supervised continuation for the same number of steps and seeds,
then write a Markdown table (mean +- std over seeds) and PNG curves.

    python scripts/study.py --out runs/study            # 5 methods x 3 seeds, about 15 minutes on 2 cores
    python scripts/study.py --out /tmp/s --tiny          # a smoke run (CI)

Every run is an ordinary ``tempo-mega train`` run under ``<out>/<method>/seed<k>/`` (metrics.jsonl,
checkpoints), so any of them can be inspected or resumed on its own.
"""

from __future__ import annotations

import argparse
import json
import math
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
KEYS = ("eval/avg@k", "eval/pass@k", "eval/distinct_answers", "eval/reward_auroc", "eval/trap_answer_frac",
        "eval/trap_family_avg@k")
TINY = ["algo.num_samples_per_prompt=2", "algo.labeled_prompts_per_step=2", "algo.unlabeled_prompts_per_step=2",
        "algo.mini_batch_prompts=2", "algo.filter_groups=false", "rollout.max_response_tokens=6",
        "data.synthetic_num_train=60", "data.synthetic_num_test=10", "trainer.eval_max_prompts=4",
        "trainer.eval_num_samples=2", "trainer.eval_every=1", "trainer.loggers=[jsonl]"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(out: Path, methods: list[str], seeds: list[int]) -> dict:
    """{method: {key: {"initial": (mean, std), "final": (mean, std)}, "curves": {key: [(step, mean, std)]}}}"""
    summary = {}
    for method in methods:
        runs = [eval_rows(out / method / f"seed{s}" / "metrics.jsonl") for s in seeds]
        entry = {"curves": {}}
        for key in KEYS:
            entry[key] = {"initial": mean_std([r[0].get(key) for r in runs if r]),
                          "final": mean_std([r[-1].get(key) for r in runs if r])}
            steps = sorted({row["step"] for r in runs for row in r})
            entry["curves"][key] = [(st, *mean_std([row.get(key) for r in runs for row in r if row["step"] == st]))
                                    for st in steps]
        summary[method] = entry
    return summary


def fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return "nan" if math.isnan(m) else f"{m:.3f} +- {s:.3f}"


def write_markdown(out: Path, summary: dict, seeds: list[int], steps: int, k: int, minutes: float) -> str:
    head = ["method"] + [key.removeprefix("eval/") for key in KEYS]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    first = next(iter(summary.values()))
    lines.append("| Stage 1 (start) | " + " | ".join(fmt(first[key]["initial"]) for key in KEYS) + " |")
    for method, entry in summary.items():
        lines.append(f"| {method} | " + " | ".join(fmt(entry[key]["final"]) for key in KEYS) + " |")
    text = (f"Unlabeled split, strict grading, k = {k} samples per prompt, after {steps} test-time steps; "
            f"mean +- std over seeds {seeds}; {minutes:.1f} min wall.\n\n" + "\n".join(lines) + "\n")
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

    keys = ("eval/avg@k", "eval/pass@k", "eval/distinct_answers", "eval/reward_auroc", "eval/trap_answer_frac")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for method, entry in summary.items():
        for ax, key in zip(axes, keys):
            pts = [(st, m, s) for st, m, s in entry["curves"][key] if not math.isnan(m)]
            if not pts:
                continue
            xs, ms, ss = zip(*pts)
            ax.plot(xs, ms, marker="o", ms=3, label=method)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], alpha=0.15)
    for ax, key in zip(axes, keys):
        ax.set_title(key.removeprefix("eval/"))
        ax.set_xlabel("test-time step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study_curves.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40, help="test-time steps per run")
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
    base = ["experiment=demo", "trainer.overwrite=true", *(TINY if args.tiny else []), *overrides]
    start = time.time()

    stage1 = out / "stage1"
    if (stage1 / "hf" / "critic").exists():
        print(f"[study] reusing the Stage-1 checkpoint in {stage1}")
        cfg1 = load_config(["algo=rlvr", *base, f"trainer.output_dir={stage1}", "algo.unlabeled_prompts_per_step=0"])
    else:
        s1 = ["algo=rlvr", *base, f"trainer.output_dir={stage1}", "algo.unlabeled_prompts_per_step=0"]
        if args.tiny:
            s1 += ["trainer.warm_start_steps=2", "trainer.total_steps=1"]
        cfg1 = load_config(s1)
        print(f"[study] Stage 1: warm start {cfg1.trainer.warm_start_steps} steps + RLVR {cfg1.trainer.total_steps} steps")
        run_training(cfg1)
    for method in methods:
        for seed in seeds:
            d = out / method / f"seed{seed}"
            cfg = load_config([METHODS[method][0], *base, *METHODS[method][1:], f"trainer.output_dir={d}",
                               f"model.path={stage1 / 'hf' / 'actor'}", f"model.critic_path={stage1 / 'hf' / 'critic'}",
                               "trainer.warm_start_steps=0", f"trainer.total_steps={args.steps}",
                               f"trainer.seed={seed}", "trainer.save_every=0", "trainer.loggers=[jsonl]"])
            print(f"[study] {method} seed {seed}: {args.steps} steps")
            run_training(cfg)
    summary = summarize(out, methods, seeds)
    text = write_markdown(out, summary, seeds, args.steps, cfg1.trainer.eval_num_samples, (time.time() - start) / 60)
    plot(out, summary)
    print(text)
    print(f"[study] {out / 'study.md'}, {out / 'study_curves.png'}")
    return 0
