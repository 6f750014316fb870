"""tempo-mega report: Markdown table and PNG plots from a recorded metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from tempo_mega.report import load_metrics, main, write_report

pytest.importorskip("matplotlib")


def recorded_run(num_steps=4, gpu=True, eval_every=2):
    """metrics.jsonl lines as the trainer writes them: eval_initial/* on the first line, eval/* every
    ``eval_every`` steps, timing/perf on every step, gpu/* when NVML telemetry is on."""
    lines = []
    for step in range(1, num_steps + 1):
        m = {
            "step": step,
            "actor/loss": 0.1 / step, "critic/loss": 0.2 / step,
            "rollout/score_mean": -0.5 + 0.2 * step, "rollout/unlabeled_reward_mean": 0.1 * step,
            "timing/rollout_s": 6.0, "timing/logprob_s": 1.0, "timing/e_step_s": 1.0,
            "timing/m_step_s": 1.5, "timing/weight_sync_s": 0.5, "timing/step_s": 10.0,
            "perf/tokens_per_s": 1000.0 + step, "perf/num_tokens": 10000.0,
            "perf/tokens_per_s_per_gpu": 125.0, "perf/mfu": 0.3,
        }
        if gpu:
            m.update({"gpu/util_mean": 80.0, "gpu/util_max": 100.0, "gpu/power_w_mean": 500.0,
                      "gpu/power_w_max": 690.0, "gpu/mem_used_gib_max": 70.0, "gpu/energy_j": 5000.0,
                      "gpu/temp_c_max": 71.0, "gpu/throttle_frac": 0.1})
        if step == 1:
            m.update({"eval_initial/avg@k": 0.25, "eval_initial/pass@1": 0.25, "eval_initial/pass@8": 0.5,
                      "eval_initial/distinct_answers": 4.0, "eval_initial/reward_auroc": 0.6,
                      "eval_initial/grading_lenient": 0.0})
        if step % eval_every == 0:
            m.update({"eval/avg@k": 0.25 + 0.05 * step, "eval/pass@1": 0.25 + 0.05 * step,
                      "eval/pass@8": 0.5 + 0.05 * step, "eval/k": 8.0, "eval/distinct_answers": 4.0 - 0.5 * step,
                      "eval/reward_auroc": 0.6 + 0.05 * step, "eval/reward_ece": None,
                      "eval/grading_lenient": 0.0})
        lines.append(json.dumps(m))
    return "\n".join(lines) + "\n"


def test_report_table_and_plots(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(recorded_run())
    report = write_report(tmp_path)
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    assert "| steps | 4 (step 1 to 4) |" in text
    assert "| mean step time | 10 s (total 40 s) |" in text
    assert "| rollout share | 60.0% |" in text and "| weight_sync share | 5.0% |" in text
    assert "| grading | strict |" in text
    assert "| mean GPU utilization (%) | 80 |" in text
    # 4 steps x 10000 tokens over 4 x 5000 J
    assert "| tokens per joule | 2 |" in text
    # eval: initial from eval_initial/*, final from the last eval line (step 4)
    assert "| eval/avg@k (step 4) | 0.25 | 0.45 | +0.2 |" in text
    assert "| eval/pass@8 (step 4) | 0.5 | 0.7 | +0.2 |" in text
    assert "eval/reward_ece" not in text  # logged as null: skipped
    for name in ("scores", "eval", "phases", "throughput", "gpu"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000, name  # a drawn figure, not an empty canvas
        assert f"]({name}.png)" in text


def test_missing_gpu_metrics_leave_a_note(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(recorded_run(num_steps=3, gpu=False, eval_every=10))
    text = write_report(tmp_path).read_text()
    assert not (tmp_path / "report" / "gpu.png").exists()
    assert "GPU utilization and power: not plotted, no gpu/* metrics" in text
    # no eval/* line, but the initial evaluation still gives the eval plot its step 0
    assert (tmp_path / "report" / "eval.png").exists()
    assert "GPU energy" not in text


def test_minimal_records_and_a_torn_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "actor/loss": 1.0}\n{"step": 2, "actor/lo')
    assert load_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "actor/loss": 1.0}]
    text = write_report(tmp_path).read_text()
    assert "| steps | 1 (step 1 to 1) |" in text
    assert "not plotted" in text
    assert list((tmp_path / "report").glob("*.png")) == []


def test_missing_or_empty_metrics_name_the_file(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(FileNotFoundError, match=str(path)):
        write_report(tmp_path)
    path.write_text("\n")
    with pytest.raises(ValueError, match=str(path)):
        write_report(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_main_writes_the_report(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(recorded_run(num_steps=2))
    assert main([str(tmp_path)]) == 0
    assert "report.md" in capsys.readouterr().out
    assert (tmp_path / "report" / "report.md").exists()
