"""Benchmark loaders, grading and the eval runner: metrics on recorded responses against hand-computed
values, each sample export loaded and checked, GPQA's seeded option shuffle, and ``tempo-mega eval``
end to end on a tiny Qwen3 with the synthetic tokenizer."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from tempo_mega.checkpoint import COMPLETE_MARKER, atomic_checkpoint
from tempo_mega.data import FieldMap
from tempo_mega.data.tokenizer import build_synthetic_tokenizer
from tempo_mega.eval.benchmarks import (
    BenchmarkItem,
    ChoiceFieldMap,
    benchmark_spec,
    extract_choice,
    grade_response,
    load_benchmark,
    shuffle_options,
)
from tempo_mega.eval.runner import (
    evaluate_generations,
    load_model_and_tokenizer,
    main,
    pass_at_k_values,
    resolve_model,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "benchmarks"


def math_item(gold: str, uid: str) -> BenchmarkItem:
    return BenchmarkItem(id=uid, prompt="q", gold=gold, kind="math", source=f"mem:{uid}")


def boxed(answer: str | None) -> str:
    return "I think so." if answer is None else f"So the answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------------------------------------- metrics

# 3 prompts x 4 responses. Strict correct counts c = [2, 0, 1]; lenient c = [2, 0, 4] (2015 and 2017
# pass for 2016 within the published grader's 2e-3 tolerance, 11 and 13 do not pass for 12).
ITEMS = [math_item("7", "p0"), math_item("12", "p1"), math_item("2016", "p2")]
ANSWERS = [["7", "8", "7", None], ["11", "13", "11", "11"], ["2016", "2015", "2015", "2017"]]
GENERATIONS = [[boxed(a) for a in row] for row in ANSWERS]


def test_metrics_strict_by_hand():
    out = evaluate_generations(ITEMS, GENERATIONS)
    m = out["metrics"]
    assert out["grading"] == "strict" and out["n"] == 4 and out["num_prompts"] == 3
    assert [p["correct"] for p in out["per_prompt"]] == [
        [True, False, True, False],
        [False, False, False, False],
        [True, False, False, False],
    ]
    assert [p["num_correct"] for p in out["per_prompt"]] == [2, 0, 1]
    # avg@4 = (2/4 + 0/4 + 1/4) / 3; pass@1 equals it
    assert m["avg@4"] == pytest.approx(0.25, abs=1e-12)
    assert m["pass@1"] == pytest.approx(0.25, abs=1e-12)
    # pass@2 = 1 - C(n-c, 2)/C(4, 2): 1 - 1/6, 0, 1 - 3/6 -> mean 4/9
    assert m["pass@2"] == pytest.approx(float(Fraction(4, 9)), abs=1e-12)
    # pass@4: any correct -> 1, 0, 1
    assert m["pass@4"] == pytest.approx(2 / 3, abs=1e-12)
    assert set(m) >= {"avg@4", "pass@1", "pass@2", "pass@4"} and "pass@3" not in m
    # distinct answers: {7, 8} (None not counted), {11, 13}, {2016, 2015, 2017}
    assert m["diversity/distinct_answers"] == pytest.approx(7 / 3, abs=1e-12)
    assert m["diversity/distinct_ratio"] == pytest.approx((2 / 4 + 2 / 4 + 3 / 4) / 3, abs=1e-12)
    assert m["answer_missing_rate"] == pytest.approx(1 / 12, abs=1e-12)
    assert out["per_prompt"][0]["answers"] == ["7", "8", "7", None]
    assert "truncation_rate" not in m


def test_metrics_lenient_differs_on_2015_vs_2016():
    strict = evaluate_generations(ITEMS, GENERATIONS)["metrics"]
    out = evaluate_generations(ITEMS, GENERATIONS, lenient=True)
    m = out["metrics"]
    assert out["grading"] == "lenient"
    assert [p["num_correct"] for p in out["per_prompt"]] == [2, 0, 4]
    assert m["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3, abs=1e-12)
    assert m["pass@2"] == pytest.approx(float(Fraction(5, 6) + 0 + 1) / 3, abs=1e-12)
    assert m["avg@4"] > strict["avg@4"]
    assert m["diversity/distinct_answers"] == strict["diversity/distinct_answers"]  # grading-independent


def test_metrics_lengths_and_truncation():
    tokens = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    finish = [["stop", "length", "stop", "stop"], ["stop"] * 4, ["length", "length", "stop", "stop"]]
    out = evaluate_generations(ITEMS, GENERATIONS, token_counts=tokens, finish_reasons=finish)
    assert out["response_len_unit"] == "tokens"
    assert out["metrics"]["response_len_mean"] == pytest.approx(6.5)
    assert out["metrics"]["truncation_rate"] == pytest.approx(3 / 12)
    chars = evaluate_generations([math_item("1", "a")], [["ab", "abcd"]])
    assert chars["response_len_unit"] == "chars"
    assert chars["metrics"]["response_len_mean"] == pytest.approx(3.0)


def test_pass_at_k_values():
    assert pass_at_k_values(1) == [1]
    assert pass_at_k_values(4) == [1, 2, 4]
    assert pass_at_k_values(12) == [1, 2, 4, 8, 12]
    assert pass_at_k_values(16) == [1, 2, 4, 8, 16]


def test_metrics_reject_ragged_or_mismatched_tables():
    with pytest.raises(ValueError, match="generations has 2 rows for 3 items"):
        evaluate_generations(ITEMS, GENERATIONS[:2])
    with pytest.raises(ValueError, match=r"generations\[1\] must hold 4"):
        evaluate_generations(ITEMS, [GENERATIONS[0], GENERATIONS[1][:3], GENERATIONS[2]])
    with pytest.raises(ValueError, match="token_counts"):
        evaluate_generations(ITEMS, GENERATIONS, token_counts=[[1] * 4] * 2)


# ---------------------------------------------------------------------------------------------- loaders

SAMPLE_CASES = [
    # name, file, rows, first id, first gold, first prompt starts with
    ("aime24", "aime24", 3, "60", "1", "Find the remainder when $7^{2024}$"),
    ("aime25", "aime25", 2, "0", "400", "What is the sum of the first $20$"),  # question/answer layout
    ("aime26", "aime26", 2, "0", "120", "Compute $\\binom{10}{3}$"),
    ("beyond_aime", "beyond_aime", 3, "0", "130", "Find the number of integers $n$"),
    ("olymmath", "olymmath", 3, "olym-sample-1", "\\frac{1}{4}", "Find the probability"),
]


@pytest.mark.parametrize("name,file,rows,first_id,gold,prompt", SAMPLE_CASES)
def test_math_loaders_on_samples(name, file, rows, first_id, gold, prompt):
    path = SAMPLES / f"{file}.jsonl"
    items = load_benchmark(name, path)
    assert len(items) == rows
    first = items[0]
    assert (first.id, first.gold, first.kind, first.choices) == (first_id, gold, "math", ())
    assert first.prompt.startswith(prompt)
    assert first.source == f"{path}:1"
    assert len({it.id for it in items}) == rows
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [it.gold for it in items] == [str(r["answer"]) for r in raw]
    assert load_benchmark(name, path, limit=1) == items[:1]


def test_gpqa_loader_on_sample():
    path = SAMPLES / "gpqa_diamond.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    items = load_benchmark("gpqa", path)
    assert load_benchmark("gpqa_diamond", path) == items
    assert len(items) == 4 and [it.id for it in items] == [r["Record ID"] for r in raw]
    for it, row in zip(items, raw):
        assert it.kind == "choice" and it.gold in "ABCD"
        assert it.choices["ABCD".index(it.gold)] == row["Correct Answer"]
        assert sorted(it.choices) == sorted(
            [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
        )
        assert it.prompt.startswith(row["Question"] + "\n\nA) " + it.choices[0] + "\nB) " + it.choices[1])
        assert f"D) {it.choices[3]}\n" in it.prompt


def test_gpqa_shuffle_deterministic_per_seed_and_position_free(tmp_path):
    path = SAMPLES / "gpqa_diamond.jsonl"
    a, b = load_benchmark("gpqa", path, seed=0), load_benchmark("gpqa", path, seed=0)
    assert a == b
    orders = {tuple(it.choices for it in load_benchmark("gpqa", path, seed=s)) for s in range(6)}
    assert len(orders) > 1  # the seed changes the order
    # the same question gets the same letters wherever its row sits
    reversed_file = tmp_path / "reversed.jsonl"
    reversed_file.write_text("\n".join(reversed(path.read_text().splitlines())) + "\n")
    by_id = {it.id: (it.gold, it.choices) for it in load_benchmark("gpqa", reversed_file, seed=0)}
    assert by_id == {it.id: (it.gold, it.choices) for it in a}


def test_shuffle_options_gold_letter_points_at_correct_answer():
    letters = set()
    for seed in range(40):
        options, letter = shuffle_options("Q?", "right", ["w1", "w2", "w3"], seed)
        assert options["ABCD".index(letter)] == "right"
        assert sorted(options) == ["right", "w1", "w2", "w3"]
        assert shuffle_options("Q?", "right", ["w1", "w2", "w3"], seed) == (options, letter)
        letters.add(letter)
    assert letters == set("ABCD")  # the correct answer is not stuck in one place


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_bad_row_names_file_line_and_field(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": "2"},
                                               {"problem": "p3"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: field 'answer' is missing"):
        load_benchmark("aime24", bad)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"question": "p1", "answer": "1"}, {"question": " ", "answer": "2"}])
    with pytest.raises(ValueError, match=r"empty\.jsonl:2: field 'question' is empty"):
        load_benchmark("aime25", empty)
    nothing = write_jsonl(tmp_path / "nothing.jsonl", [{"text": "p1", "answer": "1"}])
    with pytest.raises(ValueError, match=r"nothing\.jsonl:1: field 'problem' is missing.*the row has: text"):
        load_benchmark("olymmath", nothing)
    with pytest.raises(FileNotFoundError):
        load_benchmark("aime24", tmp_path / "absent.jsonl")


def test_explicit_field_map(tmp_path):
    f = write_jsonl(tmp_path / "custom.jsonl", [{"q": "What?", "a": 5, "n": "x1"}])
    (item,) = load_benchmark("aime25", f, field_map=FieldMap(prompt="q", answer="a", id="n"))
    assert (item.id, item.prompt, item.gold) == ("x1", "What?", "5")
    g = write_jsonl(tmp_path / "custom_gpqa.jsonl", [{"q": "Which?", "c": "yes", "w": ["n1", "n2", "n3"]}])
    (choice,) = load_benchmark("gpqa", g, field_map=ChoiceFieldMap("q", "c", ("w.0", "w.1", "w.2")))
    assert choice.choices["ABCD".index(choice.gold)] == "yes"
    with pytest.raises(ValueError, match="ChoiceFieldMap"):
        load_benchmark("gpqa", g, field_map=FieldMap())


def test_gpqa_bad_rows(tmp_path):
    good = {"Question": "Q1", "Correct Answer": "a", "Incorrect Answer 1": "b", "Incorrect Answer 2": "c",
            "Incorrect Answer 3": "d"}
    missing = {k: v for k, v in good.items() if k != "Incorrect Answer 2"} | {"Question": "Q2"}
    f = write_jsonl(tmp_path / "gpqa_bad.jsonl", [good, missing])
    with pytest.raises(ValueError, match=r"gpqa_bad\.jsonl:2: field 'Incorrect Answer 2' is missing"):
        load_benchmark("gpqa", f)
    dup = write_jsonl(tmp_path / "gpqa_dup.jsonl", [good, good | {"Question": "Q2", "Incorrect Answer 3": "a"}])
    with pytest.raises(ValueError, match=r"gpqa_dup\.jsonl:2: the four options .* not all different"):
        load_benchmark("gpqa", dup)


def test_benchmark_names():
    assert benchmark_spec("AIME-2024").name == "aime24"
    assert benchmark_spec("olymmath_en_hard").name == "olymmath"
    assert benchmark_spec("BeyondAIME").name == "beyond_aime"
    assert benchmark_spec("gpqa").kind == "choice"
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        benchmark_spec("mmlu")


# ---------------------------------------------------------------------------------------------- choice grading


@pytest.mark.parametrize(
    "response,letter",
    [
        ("so \\boxed{B}", "B"),
        ("\\boxed{(c)}", "C"),
        ("$\\boxed{\\text{D}}$", "D"),
        ("\\boxed{A) 3 m/s}", "A"),
        ("B", "B"),
        (" (C). ", "C"),
        ("A lot of reasoning", None),
        ("\\boxed{All of them}", None),
        ("\\boxed{E}", None),
        ("\\boxed{B", None),  # unclosed: truncated
        ("the answer is B", None),
    ],
)
def test_extract_choice(response, letter):
    assert extract_choice(response) == letter


def test_choice_grading_compares_letters():
    item = BenchmarkItem(id="0", prompt="p", gold="C", kind="choice", source="mem", choices=("w", "x", "y", "z"))
    gens = [["\\boxed{C}", "\\boxed{(c)}", "\\boxed{y}", "C", "\\boxed{D}"]]
    out = evaluate_generations([item], gens)
    assert out["per_prompt"][0]["correct"] == [True, True, False, True, False]
    assert out["per_prompt"][0]["answers"] == ["C", "C", None, "C", "D"]
    assert evaluate_generations([item], gens, lenient=True)["per_prompt"][0]["correct"] == out["per_prompt"][0]["correct"]
    assert grade_response(math_item("\\frac{1}{4}", "m"), "\\boxed{0.25}")


# ---------------------------------------------------------------------------------------------- end to end


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(tok, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_qwen3")
    tok = build_synthetic_tokenizer()
    tiny_model(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_eval_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = main(["--model", str(model_dir), "--bench", f"aime24={SAMPLES / 'aime24.jsonl'}",
               "--bench", f"gpqa={SAMPLES / 'gpqa_diamond.jsonl'}", "-n", "2", "--max-response-tokens", "8",
               "--both", "--device", "cpu", "--out", str(out), "--save-generations"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "grading: strict" in printed and "lenient" in printed
    result = json.loads(out.read_text())
    assert result["grading"] == ["strict", "lenient"]
    assert result["sampling"]["n"] == 2 and result["sampling"]["max_response_tokens"] == 8
    m = result["metrics"]
    for bench in ("aime24", "gpqa"):
        for mode in ("strict", "lenient"):
            for key in ("avg@2", "pass@1", "pass@2", "diversity/distinct_answers", "diversity/distinct_ratio",
                        "response_len_mean", "truncation_rate"):
                assert f"eval/{bench}/{mode}/{key}" in m
            assert 0 <= m[f"eval/{bench}/{mode}/avg@2"] <= 1
            assert 1 <= m[f"eval/{bench}/{mode}/response_len_mean"] <= 8
    aime = result["benchmarks"]["aime24"]
    assert aime["kind"] == "math" and aime["num_prompts"] == 3 and aime["response_len_unit"] == "tokens"
    per_prompt = aime["grading"]["strict"]["per_prompt"]
    assert [p["id"] for p in per_prompt] == ["60", "61", "62"]
    assert [p["gold"] for p in per_prompt] == ["1", "36", "2016"]
    assert all(len(p["correct"]) == 2 and len(p["answers"]) == 2 for p in per_prompt)
    gens = aime["generations"]
    assert len(gens) == 3 and all(len(row) == 2 for row in gens)
    assert all(1 <= g["tokens"] <= 8 and g["finish_reason"] in ("stop", "length") for row in gens for g in row)
    assert result["benchmarks"]["gpqa"]["kind"] == "choice"


def test_eval_cli_strict_default_is_seeded(model_dir, tmp_path, capsys):
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        assert main(["--model", str(model_dir), "--bench", f"aime24={SAMPLES / 'aime24.jsonl'}", "-n", "2",
                     "--max-response-tokens", "4", "--max-prompts", "2", "--device", "cpu", "--seed", "3",
                     "--out", str(out), "--save-generations"]) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["grading"] == ["strict"]
    assert all("/strict/" in k for k in outs[0]["metrics"])
    assert outs[0]["benchmarks"]["aime24"]["num_prompts"] == 2
    assert outs[0]["benchmarks"]["aime24"]["generations"] == outs[1]["benchmarks"]["aime24"]["generations"]
    assert "strict" in capsys.readouterr().out


def test_eval_cli_user_errors(model_dir, capsys):
    bench = f"aime24={SAMPLES / 'aime24.jsonl'}"
    assert main(["--model", str(model_dir), "--bench", bench, "--engine", "sglang", "--max-response-tokens", "4"]) == 2
    assert "engine 'sglang' is not available" in capsys.readouterr().err
    assert main(["--model", str(model_dir), "--bench", "mmlu=x.jsonl"]) == 2
    assert "unknown benchmark 'mmlu'" in capsys.readouterr().err
    assert main(["--model", str(model_dir), "--bench", bench, "--bench", bench]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["--model", str(model_dir.parent / "absent"), "--bench", bench]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--bench", bench, "--lenient", "--both"])


def test_resolve_run_dir_export_and_checkpoints(tmp_path):
    """A run directory as the trainer leaves it: hf/actor (model + tokenizer) and checkpoints/step_*/actor
    (weights only). Each choice must load exactly the weights written there."""
    tok = build_synthetic_tokenizer()
    exported, trained = tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    run = tmp_path / "run"
    exported.save_pretrained(run / "hf" / "actor")
    tok.save_pretrained(run / "hf" / "actor")
    with atomic_checkpoint(run / "checkpoints", 3) as d:
        (d / "actor").mkdir()
        save_model(trained, str(d / "actor" / "model.safetensors"))
        (d / "actor" / "backend_state.json").write_text('{"role": "actor", "num_train_steps": 3}')
    step = run / "checkpoints" / "step_00000003"

    def weights_of(path, **kw):
        model, _ = load_model_and_tokenizer(resolve_model(path, **kw))
        return model.state_dict()

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert same(weights_of(run, checkpoint="hf"), exported.state_dict())
    assert same(weights_of(run, checkpoint="latest"), trained.state_dict())
    assert same(weights_of(run, checkpoint="3"), trained.state_dict())
    assert same(weights_of(step / "actor"), trained.state_dict())
    assert resolve_model(step).weights == step / "actor"
    assert resolve_model(run, checkpoint="latest").tokenizer == run / "hf" / "actor"
    # auto: the export of a finished run, the checkpoint when it is newer (a resumed run)
    marker = step / COMPLETE_MARKER
    export_cfg = run / "hf" / "actor" / "config.json"
    os.utime(marker, (1_000, 1_000))
    os.utime(export_cfg, (2_000, 2_000))
    assert resolve_model(run).kind == "hf"
    os.utime(marker, (3_000, 3_000))
    assert resolve_model(run).kind == "checkpoint"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of step 7"):
        resolve_model(run, checkpoint="7")
    with pytest.raises(ValueError, match="auto, hf, latest or a step number"):
        resolve_model(run, checkpoint="newest")


def test_checkpoint_without_export_uses_run_config(tmp_path):
    """A run still training (no hf/ yet) that used the synthetic tokenizer: the architecture comes from
    the run's config.json, the tokenizer is the built-in one."""
    tok = build_synthetic_tokenizer()
    model = tiny_model(tok, seed=2)
    c = model.config
    run = tmp_path / "run"
    run.mkdir()
    shape = {"path": None, "tokenizer_path": None, "hidden_size": c.hidden_size,
             "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
             "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
             "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings, "rope_theta": 10000.0,
             "tie_word_embeddings": c.tie_word_embeddings, "dtype": "float32"}
    (run / "config.json").write_text(json.dumps({"model": shape}))
    with atomic_checkpoint(run / "checkpoints", 1) as d:
        (d / "actor").mkdir()
        save_model(model, str(d / "actor" / "model.safetensors"))
    source = resolve_model(run)
    assert source.kind == "checkpoint" and source.tokenizer is None and source.config_dir is None
    loaded, loaded_tok = load_model_and_tokenizer(source)
    assert len(loaded_tok) == len(tok)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
