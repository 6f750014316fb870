"""``tempo-mega report RUN_DIR``: a Markdown summary and PNG plots of a run's ``metrics.jsonl``.

Writes ``RUN_DIR/report/report.md`` with a summary table (steps, step time and the share of each
phase, throughput, GPU, eval before/after, grading mode) and, next to it, ``scores.png``,
``eval.png``, ``phases.png``, ``throughput.png`` and ``gpu.png``. Keys a run did not log are skipped;
a plot with nothing to show is left out and the report says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PHASES", "load_metrics", "main", "write_report"]

logger = logging.getLogger(__name__)

# the controller's phases inside timing/step_s, in the order they run
PHASES = ("rollout", "logprob", "e_step", "m_step", "weight_sync")
PASS_AT = re.compile(r"^eval/pass@(\d+)$")
Record = dict[str, Any]


def load_metrics(path: Path) -> list[Record]:
    """The records of a ``metrics.jsonl``, in file order. A line that is not a JSON object with a
    ``step`` (a line torn by a crash) is skipped with a warning; a missing file raises
    ``FileNotFoundError``, one without any record ``ValueError``, both naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    records, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            bad.append(number)
            continue
        records.append(record)
    if bad:
        logger.warning("%s: skipped %d unparseable line(s): %s", path, len(bad), bad[:10])
    if not records:
        raise ValueError(f"{path} holds no metrics (empty, or no line with a 'step')")
    return records


def _num(value: Any) -> float | None:
    """A finite float, or None for null/NaN/strings/bools."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Sequence[Record], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for r in records:
        v = _num(r.get(key))
        if v is not None:
            steps.append(float(r["step"]))
            values.append(v)
    return steps, values


def _eval_series(records: Sequence[Record], key: str) -> tuple[list[float], list[float]]:
    """``eval/...`` over steps, with step 0 from ``eval_initial/...`` (logged on the first line)."""
    steps, values = _series(records, key)
    initial_key = key.replace("eval/", "eval_initial/", 1)
    for r in records:
        v = _num(r.get(initial_key))
        if v is not None:
            return [0.0, *steps], [v, *values]
    return steps, values


def _keys(records: Sequence[Record]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _pass_keys(keys: Sequence[str]) -> list[str]:
    found = [k for k in keys if PASS_AT.match(k)]
    return sorted(found, key=lambda k: int(PASS_AT.match(k).group(1)))


# ---------------------------------------------------------------------- plots
def _new_figure(rows: int, height_per_row: float = 3.0):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(8, height_per_row * rows), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def _line_panel(ax, records, keys, title, ylabel, series=_series) -> None:
    for key in keys:
        steps, values = series(records, key)
        ax.plot(steps, values, marker="o", markersize=3, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _present(records, keys, series=_series) -> list[str]:
    return [k for k in keys if series(records, k)[0]]


def _plot_lines(path: Path, records, panels, series=_series) -> bool:
    """``panels``: (keys, title, ylabel); panels without data are dropped. False if none is left."""
    panels = [(present, title, ylabel) for keys, title, ylabel in panels
              if (present := _present(records, keys, series))]
    if not panels:
        return False
    fig, axes = _new_figure(len(panels))
    for ax, (keys, title, ylabel) in zip(axes, panels):
        _line_panel(ax, records, keys, title, ylabel, series)
    fig.savefig(path, dpi=100)
    return True


def _plot_phases(path: Path, records) -> bool:
    rows = [r for r in records if any(_num(r.get(f"timing/{p}_s")) is not None for p in PHASES)]
    if not rows:
        return False
    steps = [float(r["step"]) for r in rows]
    fig, (ax,) = _new_figure(1, 3.5)
    bottom = [0.0] * len(rows)
    parts = [(p, [(_num(r.get(f"timing/{p}_s")) or 0.0) for r in rows]) for p in PHASES]
    other = [max((_num(r.get("timing/step_s")) or 0.0) - sum(v[i] for _, v in parts), 0.0)
             for i, r in enumerate(rows)]
    if any(o > 1e-3 * max(_num(r.get("timing/step_s")) or 1.0, 1e-9) for o, r in zip(other, rows)):
        parts.append(("other", other))  # advantages, filters, bookkeeping between the timed phases
    for name, values in parts:
        if not any(values):
            continue
        ax.bar(steps, values, bottom=bottom, label=name, width=0.8)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title("time per step by phase")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)
    return True


# ---------------------------------------------------------------------- the report
def _summary_rows(records: Sequence[Record], keys: Sequence[str]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    steps = [int(r["step"]) for r in records]
    rows.append(("steps", f"{len(records)} (step {min(steps)} to {max(steps)})"))
    step_times = _series(records, "timing/step_s")[1]
    if step_times:
        rows.append(("mean step time", f"{_fmt(_mean(step_times))} s (total {_fmt(sum(step_times))} s)"))
        # shares over the steps that report both the phase and the step time
        for phase in PHASES:
            spent = total = 0.0
            for r in records:
                p, s = _num(r.get(f"timing/{phase}_s")), _num(r.get("timing/step_s"))
                if p is not None and s is not None:
                    spent, total = spent + p, total + s
            if total > 0:
                rows.append((f"{phase} share", f"{100 * spent / total:.1f}%"))
    for key, label in (("perf/tokens_per_s", "mean tokens/s"), ("perf/tokens_per_s_per_gpu", "mean tokens/s per GPU"),
                       ("perf/mfu", "mean MFU"), ("perf/mfu_m_step", "mean MFU (M-step)"),
                       ("perf/mfu_e_step", "mean MFU (E-step)"), ("perf/mfu_logprob", "mean MFU (log-prob)"),
                       ("perf/mfu_rollout", "mean MFU (rollout)"), ("gpu/util_mean", "mean GPU utilization (%)"),
                       ("gpu/power_w_mean", "mean GPU power (W)"), ("gpu/mem_used_gib_max", "max GPU memory (GiB)"),
                       ("gpu/temp_c_max", "max GPU temperature (C)"), ("gpu/throttle_frac", "mean throttled share")):
        values = _series(records, key)[1]
        if values:
            value = max(values) if key.endswith("_max") else _mean(values)
            rows.append((label, _fmt(value)))
    energy = _series(records, "gpu/energy_j")
    if energy[1]:
        rows.append(("GPU energy", f"{_fmt(sum(energy[1]) / 3.6e6)} kWh"))
        energy_steps = set(energy[0])
        tokens = sum(v for s, v in zip(*_series(records, "perf/num_tokens")) if s in energy_steps)
        if tokens > 0 and sum(energy[1]) > 0:
            rows.append(("tokens per joule", _fmt(tokens / sum(energy[1]))))
    scores = _series(records, "rollout/score_mean")[1]
    if scores:
        rows.append(("rollout/score_mean first -> last", f"{_fmt(scores[0])} -> {_fmt(scores[-1])}"))
    lenient = _series(records, "eval/grading_lenient")[1] or _series(records, "eval_initial/grading_lenient")[1]
    if lenient:
        rows.append(("grading", "lenient" if lenient[-1] > 0 else "strict"))
    return rows


def _eval_rows(records: Sequence[Record], keys: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(metric, initial, final, change) for the eval metrics of the last evaluated step."""
    eval_keys = [k for k in keys if k.startswith("eval/") and k not in ("eval/k", "eval/grading_lenient")]
    rows = []
    for key in eval_keys:
        final = _series(records, key)
        initial = _series(records, key.replace("eval/", "eval_initial/", 1))[1]
        if not final[1]:
            continue
        first = initial[0] if initial else None
        last = final[1][-1]
        change = f"{last - first:+.4g}" if first is not None else "-"
        rows.append((f"{key} (step {int(final[0][-1])})", _fmt(first), _fmt(last), change))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report/report.md`` and its plots from ``run_dir/metrics.jsonl``; returns the
    Markdown file's path. Raises ``FileNotFoundError``/``ValueError`` naming the metrics file when it
    is missing or empty."""
    run_dir = Path(run_dir)
    records = load_metrics(run_dir / "metrics.jsonl")
    records.sort(key=lambda r: r["step"])
    keys = _keys(records)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    pass_keys = _pass_keys(keys)
    plots: list[tuple[str, str, str]] = []  # (file, title, why it is missing)
    try:
        import matplotlib  # noqa: F401

        have_matplotlib = True
    except ImportError:
        have_matplotlib = False
        logger.warning("report: matplotlib is not installed, so no plots (pip install 'tempo-mega[plot]')")
    specs = [
        ("scores.png", "rollout scores", "no rollout/score_mean or rollout/unlabeled_reward_mean",
         lambda p: _plot_lines(p, records, [(["rollout/score_mean", "rollout/unlabeled_reward_mean"],
                                             "rollout scores", "score")])),
        ("eval.png", "evaluation (step 0: before training)", "no eval/* metrics",
         lambda p: _plot_lines(p, records, [
             (["eval/avg@k", *pass_keys], "accuracy on the unlabeled split", "fraction correct"),
             (["eval/distinct_answers"], "distinct answers per prompt", "answers"),
             (["eval/reward_auroc"], "reward AUROC vs hidden answers", "AUROC"),
         ], series=_eval_series)),
        ("phases.png", "time per step by phase", "no timing/* metrics",
         lambda p: _plot_phases(p, records)),
        ("throughput.png", "throughput", "no perf/* metrics",
         lambda p: _plot_lines(p, records, [
             (["perf/tokens_per_s"], "throughput", "tokens/s"),
             (["perf/tokens_per_s_per_gpu"], "throughput per GPU", "tokens/s/GPU"),
             ([k for k in keys if k == "perf/mfu" or k.startswith("perf/mfu_")], "model FLOPs utilization", "MFU"),
         ])),
        ("gpu.png", "GPU utilization and power", "no gpu/* metrics (NVML telemetry off or not wired in)",
         lambda p: _plot_lines(p, records, [
             (["gpu/util_mean", "gpu/util_max"], "GPU utilization", "%"),
             (["gpu/power_w_mean", "gpu/power_w_max"], "GPU power", "W"),
             (["gpu/mem_used_gib_mean", "gpu/mem_used_gib_max"], "GPU memory used", "GiB"),
             (["gpu/temp_c_max"], "GPU temperature", "C"),
             (["gpu/throttle_frac"], "share of samples with clocks throttled", "fraction"),
         ])),
    ]
    for name, title, why, plot in specs:
        path = out / name
        path.unlink(missing_ok=True)  # never leave a stale plot from an earlier report
        if not have_matplotlib:
            plots.append((name, title, "matplotlib is not installed"))
        elif plot(path):
            plots.append((name, title, ""))
        else:
            plots.append((name, title, why))

    lines = [f"# Run report: {run_dir.resolve().name}", "",
             f"From `{run_dir / 'metrics.jsonl'}`.", "", "## Summary", ""]
    lines += _table(("metric", "value"), _summary_rows(records, keys))
    eval_rows = _eval_rows(records, keys)
    if eval_rows:
        lines += ["", "## Evaluation", "", "Initial: before the first step (`eval_initial/*`).", ""]
        lines += _table(("metric", "initial", "final", "change"), eval_rows)
    lines += ["", "## Plots", ""]
    for name, title, why in plots:
        lines += [f"![{title}]({name})" if not why else f"*{title}: not plotted, {why}.*", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tempo-mega report",
                                     description="Markdown summary and plots of RUN_DIR/metrics.jsonl")
    parser.add_argument("run_dir", type=Path, help="a run's output directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"tempo-mega report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
