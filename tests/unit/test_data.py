"""tempo_mega.data: tokenizer, prompt template, dataset loading, sampler, synthetic task."""

from __future__ import annotations

import json
import random
import re
import socket
import string
from collections import Counter

import pytest

from tempo_mega.data import (
    FAMILIES,
    FIELD_MAPS,
    PLAIN_SUFFIX,
    TRAP_FAMILIES,
    FieldMap,
    PromptRecord,
    PromptSampler,
    build_synthetic_tokenizer,
    format_prompt,
    load_prompts,
    make_synthetic_task,
    render_prompt,
    solution_text,
    write_jsonl,
)
from tempo_mega.data.datasets import DAPO_PREFIX, DAPO_SUFFIX

PROBLEM = re.compile(r"What is (\d+) ([+\-*]) (\d+)\?")


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_size(tok):
    assert len(tok) == 276
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token is None
    assert sorted(tok.all_special_ids) == [0, 1, 2]
    # specials are matched whole inside text, and never produced from plain characters
    assert tok("<|im_start|>a<|im_end|>", add_special_tokens=False)["input_ids"] == [
        1,
        tok.convert_tokens_to_ids("a"),
        2,
    ]


def test_tokenizer_round_trip_ascii_and_beyond(tok):
    rng = random.Random(0)
    texts = [
        string.printable,
        "".join(chr(i) for i in range(128)),
        "What is 47 + 38? " + PLAIN_SUFFIX,
        "47 + 38 = 85. \\boxed{85}\n\n  \\frac{1}{2}  ,  . ?",
        "  leading and trailing spaces  ",
        "héllo 日本 — ∑",  # not ASCII: byte-level, so still lossless
    ]
    texts += ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert all(i > 2 for i in ids)  # no special token out of plain text


def test_tokenizer_digits_single_and_template_words_whole(tok):
    assert tok.tokenize("0123456789") == list("0123456789")
    assert tok.tokenize(" " + PLAIN_SUFFIX) == [
        "ĠPlease", "Ġreason", "Ġstep", "Ġby", "Ġstep", ",", "Ġand", "Ġput", "Ġyour", "Ġfinal",
        "Ġanswer", "Ġwithin", "Ġ", "\\boxed", "{", "}", ".",
    ]  # fmt: skip
    assert tok.tokenize("\\boxed{85}") == ["\\boxed", "{", "8", "5", "}"]


def test_tokenizer_deterministic(tok):
    other = build_synthetic_tokenizer()
    assert other.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert other.get_vocab() == tok.get_vocab()


def test_tokenizer_save_and_load_offline(tmp_path, monkeypatch, tok):
    from transformers import AutoTokenizer

    build_synthetic_tokenizer(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}

    def no_network(*args, **kwargs):
        raise AssertionError("tokenizer loading tried to open a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 2)
    assert loaded.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    body = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == body
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        body + "<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------------------------------------- templates


def test_format_prompt_chat(tok):
    ids = format_prompt("What is 47 + 38?", tok)
    expected = f"<|im_start|>user\nWhat is 47 + 38? {PLAIN_SUFFIX}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids) == expected
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1  # one <|im_start|> first, one <|im_end|>
    assert len(ids) == 36


def test_format_prompt_plain(tok):
    ids = format_prompt("What is 47 + 38?  \n", tok, use_chat_template=False)
    assert tok.decode(ids) == f"What is 47 + 38? {PLAIN_SUFFIX}"  # question.rstrip() + " " + suffix
    assert len(ids) == 28


def test_format_prompt_keeps_an_existing_suffix(tok):
    q = f"What is 1 + 1?\n{PLAIN_SUFFIX}"
    assert render_prompt(q, tok, use_chat_template=False) == q
    messages = [{"role": "user", "content": q}]
    assert render_prompt(messages, tok).count(PLAIN_SUFFIX) == 1


def test_format_prompt_messages(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "What is 3 * 4?"},
    ]
    chat = render_prompt(messages, tok)
    assert chat == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFirst?<|im_end|>\n"
        "<|im_start|>assistant\nOk.<|im_end|>\n"
        f"<|im_start|>user\nWhat is 3 * 4? {PLAIN_SUFFIX}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert messages[3]["content"] == "What is 3 * 4?"  # the caller's messages are not modified
    plain = render_prompt(messages, tok, use_chat_template=False)
    assert plain == f"Be brief.\n\nFirst?\n\nOk.\n\nWhat is 3 * 4? {PLAIN_SUFFIX}"
    assert tok.decode(format_prompt(messages, tok, use_chat_template=False)) == plain


def test_format_prompt_errors():
    no_template = build_synthetic_tokenizer()
    no_template.chat_template = None
    assert (
        no_template.decode(format_prompt("What is 1 + 2?", no_template)) == f"What is 1 + 2? {PLAIN_SUFFIX}"
    )
    with pytest.raises(ValueError, match="no chat template"):
        format_prompt("What is 1 + 2?", no_template, use_chat_template=True)
    with pytest.raises(ValueError, match="empty"):
        format_prompt("   ", no_template)
    with pytest.raises(ValueError, match="no 'user' message"):
        format_prompt([{"role": "system", "content": "x"}], no_template)


# ---------------------------------------------------------------------------------------------- loading


def _write_lines(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_load_jsonl_default_fields(tmp_path):
    path = _write_lines(
        tmp_path / "data.jsonl",
        [
            {"prompt": "What is 1 + 1?", "answer": "2", "extra": [1, 2]},
            "",
            {"prompt": "q2", "answer": 34},
            {"prompt": "q3", "answer": 2.0},
            {"prompt": "q4", "answer": 2.5},
            {"prompt": "q5", "answer": "  \\frac{1}{2} "},
        ],
    )
    records = load_prompts(path)
    assert [r.prompt for r in records] == ["What is 1 + 1?", "q2", "q3", "q4", "q5"]
    assert [r.answer for r in records] == ["2", "34", "2", "2.5", "\\frac{1}{2}"]
    assert [r.source for r in records] == [f"{path}:{i}" for i in (1, 3, 4, 5, 6)]
    assert [r.uid for r in records] == [r.source for r in records]
    assert all(r.is_labeled and r.hidden_answer is None for r in records)
    assert len(load_prompts(path, limit=2)) == 2


def test_load_jsonl_dapo_nested_fields(tmp_path):
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"Problem {i}"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(10 + i), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"uuid-{i}"},
        }
        for i in range(3)
    ]
    path = _write_lines(tmp_path / "dapo.jsonl", rows)
    records = load_prompts(path, FIELD_MAPS["dapo_math"], labeled=True)
    assert [r.prompt for r in records] == [[{"role": "user", "content": f"Problem {i}"}] for i in range(3)]
    assert [r.answer for r in records] == ["10", "11", "12"]
    assert [r.uid for r in records] == ["uuid-0", "uuid-1", "uuid-2"]
    # a numeric path part indexes a list
    flat = load_prompts(path, FieldMap(prompt="prompt.0.content", answer="reward_model.ground_truth"))
    assert flat[2].prompt == "Problem 2"


def test_dapo_answer_format_instructions_give_way_to_the_boxed_one(tmp_path):
    # DAPO-Math-17K's own wording, verbatim: the verifier grades \\boxed{}, so "Answer:" must not be asked for
    content = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "In triangle $ABC$, $AB = 5$. Find $BC$.\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    rows = [
        {"prompt": [{"role": "user", "content": content}], "reward_model": {"ground_truth": "7"},
         "extra_info": {"index": "a"}},
        {"prompt": [{"role": "user", "content": "A plain question?"}], "reward_model": {"ground_truth": "1"},
         "extra_info": {"index": "b"}},
        {"prompt": [{"role": "user", "content": DAPO_PREFIX + DAPO_SUFFIX}], "reward_model": {"ground_truth": "1"},
         "extra_info": {"index": "c"}},
    ]
    path = _write_lines(tmp_path / "dapo.jsonl", rows[:2])
    records = load_prompts(path, FIELD_MAPS["dapo_math"], labeled=True)
    assert records[0].prompt == [{"role": "user", "content": "In triangle $ABC$, $AB = 5$. Find $BC$."}]
    assert records[1].prompt == [{"role": "user", "content": "A plain question?"}]  # nothing to strip
    text = render_prompt(records[0].prompt, build_synthetic_tokenizer(), use_chat_template=False)
    assert text == "In triangle $ABC$, $AB = 5$. Find $BC$. " + PLAIN_SUFFIX and "Answer:" not in text
    # the default field map keeps a prompt as it is
    assert load_prompts(path, FieldMap(answer="reward_model.ground_truth"))[0].prompt[0]["content"] == content
    bad = _write_lines(tmp_path / "only_instructions.jsonl", rows[2:])
    with pytest.raises(ValueError, match=re.escape(f"{bad}:1: field 'prompt' holds only the instructions")):
        load_prompts(bad, FIELD_MAPS["dapo_math"], labeled=True)


def test_load_aime_fields_and_unlabeled(tmp_path):
    rows = [
        {"id": 60 + i, "problem": f"AIME problem {i}", "solution": "...", "answer": 100 + i} for i in range(4)
    ]
    path = _write_lines(tmp_path / "aime24.jsonl", rows)
    labeled = load_prompts(path, FIELD_MAPS["aime"])
    assert [(r.prompt, r.answer, r.hidden_answer) for r in labeled] == [
        (f"AIME problem {i}", str(100 + i), None) for i in range(4)
    ]
    hidden = load_prompts(path, FIELD_MAPS["aime"], labeled=False)
    assert all(r.answer is None and not r.is_labeled for r in hidden)
    assert [r.hidden_answer for r in hidden] == ["100", "101", "102", "103"]
    assert [r.eval_answer for r in hidden] == [r.answer for r in labeled]
    with_ids = load_prompts(path, FieldMap(prompt="problem", id="id"))
    assert [r.uid for r in with_ids] == ["60", "61", "62", "63"]


def test_load_unlabeled_without_answers(tmp_path):
    path = _write_lines(tmp_path / "u.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    for labeled in (None, False):
        records = load_prompts(path, labeled=labeled)
        assert [(r.answer, r.hidden_answer) for r in records] == [(None, None), (None, None)]
    assert load_prompts(path, FieldMap(answer=None))[0].answer is None
    with pytest.raises(ValueError, match=r"u\.jsonl:1: field 'answer' is missing \(labeled=True"):
        load_prompts(path, labeled=True)
    with pytest.raises(ValueError, match="labeled=True needs an answer field"):
        load_prompts(path, FieldMap(answer=None), labeled=True)


def test_load_json_array(tmp_path):
    path = tmp_path / "aime.json"
    path.write_text(json.dumps([{"prompt": "p0", "answer": "1"}, {"prompt": "", "answer": "2"}]))
    with pytest.raises(ValueError, match=r"aime\.json\[1\]: field 'prompt' is empty"):
        load_prompts(path)
    assert load_prompts(path, limit=1)[0].source == f"{path}[0]"
    lines = _write_lines(tmp_path / "lines.json", [{"prompt": "p0"}, {"prompt": "p1"}])
    assert [r.source for r in load_prompts(lines)] == [f"{lines}:1", f"{lines}:2"]


GOOD = {"prompt": "What is 1 + 1?", "answer": "2"}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "q", "answer": ', "invalid JSON"),
        ({"answer": "1"}, "field 'prompt' is missing (the row has: answer)"),
        ({"prompt": None, "answer": "1"}, "field 'prompt' is null"),
        ({"prompt": 5, "answer": "1"}, "field 'prompt' must be a string or a list of {'role', 'content'} messages, got int"),
        ({"prompt": {"text": "q"}}, "field 'prompt' must be a string or a list of {'role', 'content'} messages, got dict"),
        ({"prompt": " \n ", "answer": "1"}, "field 'prompt' is empty"),
        ({"prompt": [], "answer": "1"}, "field 'prompt' is an empty list of messages"),
        ({"prompt": [{"role": "user"}], "answer": "1"}, "field 'prompt' message 0 must be an object with string 'role' and 'content'"),
        ({"prompt": [{"role": "user", "content": " "}], "answer": "1"}, "field 'prompt' is empty"),
        ({"prompt": [{"role": "system", "content": "x"}], "answer": "1"}, "field 'prompt' has no message with role 'user'"),
        ({"prompt": "q", "answer": {"value": 1}}, "field 'answer' must be a string or a number, got dict"),
        ({"prompt": "q", "answer": [1]}, "field 'answer' must be a string or a number, got list"),
        ({"prompt": "q", "answer": True}, "field 'answer' must be a string or a number, got bool"),
        ({"prompt": "q", "answer": "  "}, "field 'answer' is empty"),
        ({"prompt": "q"}, "field 'answer' is missing, but "),
        ('[1, 2]', "expected an object (a mapping of fields), got list"),
    ],
)  # fmt: skip
def test_load_jsonl_bad_row_names_file_line_and_field(tmp_path, bad_line, message):
    path = _write_lines(tmp_path / "data.jsonl", [GOOD] * 4 + [""] + [GOOD, bad_line, GOOD])
    with pytest.raises(ValueError, match=re.escape(f"{path}:7: {message}")):
        load_prompts(path)


def test_load_bad_nested_and_ids(tmp_path):
    row = {
        "prompt": [{"role": "user", "content": "q"}],
        "reward_model": {"style": "x"},
        "extra_info": {"index": "a"},
    }
    path = _write_lines(tmp_path / "dapo.jsonl", [row])
    with pytest.raises(
        ValueError, match=re.escape(f"{path}:1: field 'reward_model.ground_truth' is missing")
    ):
        load_prompts(path, FIELD_MAPS["dapo_math"], labeled=True)
    path = _write_lines(
        tmp_path / "ids.jsonl",
        [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "y"}, {"prompt": "c", "id": "x"}],
    )
    with pytest.raises(
        ValueError, match=re.escape(f"{path}:3: field 'id' value 'x' repeats the id of {path}:1")
    ):
        load_prompts(path, FieldMap(id="id"))
    path = _write_lines(tmp_path / "noid.jsonl", [{"prompt": "a", "id": "x"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: field 'id' is missing")):
        load_prompts(path, FieldMap(id="id"))
    path = _write_lines(tmp_path / "mixed.jsonl", [{"prompt": "a"}, {"prompt": "b", "answer": "1"}])
    with pytest.raises(
        ValueError, match=re.escape(f"{path}:2: field 'answer' is present, but {path}:1 has none")
    ):
        load_prompts(path)


def test_load_missing_unsupported_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported data file type '\.csv'"):
        load_prompts(tmp_path / "data.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with datasets' save_to_disk"):
        load_prompts(tmp_path / "folder")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no rows"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_prompts(tmp_path / "latin1.jsonl")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake\.parquet: not a readable parquet file"):
        load_prompts(tmp_path / "fake.parquet")


def _dapo_rows(n):
    return [
        {
            "prompt": [{"role": "user", "content": f"Problem {i}"}],
            "reward_model": {"ground_truth": str(i), "style": "rule"},
            "extra_info": {"index": f"id-{i}"},
        }
        for i in range(n)
    ]


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(_dapo_rows(5)), path)
    records = load_prompts(path, FIELD_MAPS["dapo_math"], labeled=True)
    assert [r.answer for r in records] == ["0", "1", "2", "3", "4"]
    assert records[3].prompt == [{"role": "user", "content": "Problem 3"}]
    assert [r.source for r in records] == [f"{path}[{i}]" for i in range(5)]
    assert [r.uid for r in records] == [f"id-{i}" for i in range(5)]

    aime = tmp_path / "aime.parquet"
    pq.write_table(pa.table({"problem": ["p0", "p1", None, "p3"], "answer": [1, 2, 3, 4]}), aime)
    with pytest.raises(ValueError, match=re.escape(f"{aime}[2]: field 'problem' is null")):
        load_prompts(aime, FIELD_MAPS["aime"])
    assert [r.answer for r in load_prompts(aime, FIELD_MAPS["aime"], limit=2)] == ["1", "2"]

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"prompt": [7, 8]}), wrong)
    with pytest.raises(ValueError, match=re.escape(f"{wrong}[0]: field 'prompt' must be a string or a list")):
        load_prompts(wrong)
    with pytest.raises(ValueError, match=re.escape(f"{wrong}[0]: field 'problem' is missing")):
        load_prompts(wrong, FIELD_MAPS["aime"])


def test_load_saved_dataset(tmp_path):
    hf = pytest.importorskip("datasets")
    hf.disable_progress_bars()
    ds = hf.Dataset.from_list(_dapo_rows(4))
    ds.save_to_disk(str(tmp_path / "single"))
    records = load_prompts(tmp_path / "single", FIELD_MAPS["dapo_math"])
    assert [(r.answer, r.uid, r.source) for r in records] == [
        (str(i), f"id-{i}", f"{tmp_path / 'single'}[{i}]") for i in range(4)
    ]

    test = hf.Dataset.from_list([{"problem": "p0", "answer": "1"}, {"problem": "", "answer": "2"}])
    hf.DatasetDict({"train": ds, "test": test}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_prompts(tmp_path / "dict", FIELD_MAPS["dapo_math"])) == 4  # the "train" split
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / 'dict' / 'test'}[1]: field 'problem' is empty")
    ):
        load_prompts(tmp_path / "dict" / "test", FIELD_MAPS["aime"])

    hf.DatasetDict({"validation": test, "test": test}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(ValueError, match=r"splits \['test', 'validation'\] and no 'train' split"):
        load_prompts(tmp_path / "notrain", FIELD_MAPS["aime"])


def test_write_jsonl_round_trip(tmp_path):
    train, test = make_synthetic_task(6, 4, seed=3)
    write_jsonl(train, tmp_path / "out" / "train.jsonl")
    write_jsonl(test, tmp_path / "out" / "test.jsonl")
    first = json.loads((tmp_path / "out" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "prompt", "answer", "meta"}
    back = load_prompts(tmp_path / "out" / "train.jsonl", FIELD_MAPS["synthetic"], labeled=True)
    assert [(r.uid, r.prompt, r.answer) for r in back] == [(r.uid, r.prompt, r.answer) for r in train]
    back = load_prompts(tmp_path / "out" / "test.jsonl", FIELD_MAPS["synthetic"], labeled=False)
    assert [(r.uid, r.prompt, r.answer, r.hidden_answer) for r in back] == [
        (r.uid, r.prompt, None, r.hidden_answer) for r in test
    ]


# ---------------------------------------------------------------------------------------------- sampler


def _records(n):
    return [PromptRecord(f"q{i}", str(i), f"mem:{i}", f"u{i}") for i in range(n)]


def test_sampler_epochs_are_permutations():
    records = _records(10)
    sampler = PromptSampler(records, seed=1)
    first = [r.uid for r in sampler.next_batch(10)]
    second = [r.uid for r in sampler.next_batch(10)]
    assert sorted(first) == sorted(second) == sorted(r.uid for r in records)
    assert first != second  # a new order each epoch
    assert sampler.epoch == 1 and sampler.position == 10
    in_order = PromptSampler(records, shuffle=False).next_batch(12)
    assert [r.uid for r in in_order] == [f"u{i}" for i in range(10)] + ["u0", "u1"]


def test_sampler_deterministic_and_seeded():
    records = _records(7)
    draw = lambda seed: [r.uid for r in PromptSampler(records, seed=seed).next_batch(30)]  # noqa: E731
    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    uids = draw(5)
    for e in range(4):  # every full epoch inside a long batch covers each record once
        assert sorted(uids[7 * e : 7 * e + 7]) == sorted(r.uid for r in records)


def test_sampler_exact_resume():
    records = _records(11)
    sizes = [3, 5, 7, 2, 11, 4, 9, 1, 6, 13, 8]
    reference = PromptSampler(records, seed=42)
    expected = [[r.uid for r in reference.next_batch(n)] for n in sizes]
    for cut in range(len(sizes) + 1):
        first = PromptSampler(records, seed=42)
        got = [[r.uid for r in first.next_batch(n)] for n in sizes[:cut]]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
        resumed = PromptSampler(records, seed=0)  # the seed comes from the state
        resumed.load_state_dict(state)
        got += [[r.uid for r in resumed.next_batch(n)] for n in sizes[cut:]]
        assert got == expected, f"resume after {cut} batches diverged"


def test_sampler_rejects_other_dataset_and_bad_input():
    sampler = PromptSampler(_records(5))
    sampler.next_batch(3)
    with pytest.raises(ValueError, match="saved for another dataset"):
        PromptSampler(_records(6)).load_state_dict(sampler.state_dict())
    renamed = [PromptRecord(r.prompt, r.answer, r.source, r.uid + "x") for r in _records(5)]
    with pytest.raises(ValueError, match="saved for another dataset"):
        PromptSampler(renamed).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="no records"):
        PromptSampler([])
    with pytest.raises(ValueError, match="n must be >= 0"):
        sampler.next_batch(-1)


# ---------------------------------------------------------------------------------------------- synthetic


def _key(record):
    a, op, b = PROBLEM.fullmatch(record.prompt).groups()
    a, b = int(a), int(b)
    return (op, min(a, b), max(a, b)) if op in "+*" else (op, a, b)


def _inner_carry(a, b):
    """A carry into a column that is not the new leading one: some lower part of a and b overflows."""
    n = max(len(str(a)), len(str(b)))
    return any(a % 10**k + b % 10**k >= 10**k for k in range(1, n))


def _borrow(a, b):
    n = max(len(str(a)), len(str(b)))
    return any(a % 10**k < b % 10**k for k in range(1, n + 1))


def _columnwise(a, b, op):
    """Digit strings aligned right, each column mod 10 except the leading one (written whole)."""
    n = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(n), str(b).zfill(n)
    f = (lambda x, y: x + y) if op == "+" else (lambda x, y: x - y)
    return int(
        str(f(int(xs[0]), int(ys[0]))) + "".join(str(f(int(x), int(y)) % 10) for x, y in zip(xs[1:], ys[1:]))
    )


def test_synthetic_deterministic_and_seeded():
    a = make_synthetic_task(50, 30, seed=7)
    b = make_synthetic_task(50, 30, seed=7)
    c = make_synthetic_task(50, 30, seed=8)
    assert a == b
    assert [r.prompt for r in a[0]] != [r.prompt for r in c[0]]


def test_synthetic_splits_disjoint_labels_and_answers():
    train, test = make_synthetic_task(400, 200, seed=0)
    assert len(train) == 400 and len(test) == 200
    train_keys, test_keys = {_key(r) for r in train}, {_key(r) for r in test}
    assert len(train_keys) == 400 and len(test_keys) == 200 and not train_keys & test_keys
    assert all(r.answer is not None and r.hidden_answer is None and r.is_labeled for r in train)
    assert all(r.answer is None and r.hidden_answer is not None and not r.is_labeled for r in test)
    assert len({r.uid for r in train + test}) == 600
    for r in train + test:
        a, op, b = PROBLEM.fullmatch(r.prompt).groups()
        assert r.eval_answer == str(eval(f"{a}{op}{b}"))  # the prompt is [0-9]+ [+-*] [0-9]+, safe to eval
        assert int(a) <= 99 and int(b) <= 99 and int(r.eval_answer) >= 0


def test_synthetic_families_and_traps():
    train, test = make_synthetic_task(500, 500, seed=1)
    for split in (train, test):
        counts = Counter(r.meta["family"] for r in split)
        assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
    for r in train + test:
        family, (a, b) = r.meta["family"], r.meta["operands"]
        if family.startswith("add"):
            assert _inner_carry(a, b) == (family == "add_carry")
        if family.startswith("sub"):
            assert a > b and _borrow(a, b) == (family == "sub_borrow")
        if family == "mul":
            assert 2 <= b <= 9
        if family in TRAP_FAMILIES:
            assert r.meta["trap_answer"] == str(_columnwise(a, b, r.meta["op"])) != r.eval_answer
        else:
            assert r.meta["trap_answer"] is None
    assert {r.meta["trap_answer"] for r in train if r.prompt == "What is 47 + 38?"} <= {"75"}


def test_synthetic_known_traps():
    from tempo_mega.data.synthetic import _borrows_ignored, _carries_dropped

    assert (
        _carries_dropped(47, 38) == 75 and _carries_dropped(95, 17) == 102 and _carries_dropped(62, 46) == 108
    )
    assert _borrows_ignored(83, 47) == 46 and _borrows_ignored(91, 9) == 92


def test_synthetic_difficulty_and_families_option():
    _, hard = make_synthetic_task(0, 300, seed=2, difficulty="hard")
    operands = [x for r in hard for x in r.meta["operands"][: 1 if r.meta["family"] == "mul" else 2]]
    assert min(operands) >= 10 and max(operands) <= 999 and max(operands) >= 100
    medium, _ = make_synthetic_task(100, 0, seed=2, difficulty="medium", families=("add_carry",))
    assert {r.meta["family"] for r in medium} == {"add_carry"}
    assert all(10 <= x <= 99 for r in medium for x in r.meta["operands"])
    with pytest.raises(ValueError, match="ran out of distinct 'mul' problems"):
        make_synthetic_task(1000, 1000, families=("mul",))
    with pytest.raises(ValueError, match="families must be a non-empty subset"):
        make_synthetic_task(1, 1, families=("div",))
    with pytest.raises(ValueError, match="difficulty must be one of"):
        make_synthetic_task(1, 1, difficulty="extreme")


def test_solution_text_and_token_budget(tok):
    train, test = make_synthetic_task(100, 20, seed=4)
    for r in train + test:
        text = solution_text(r)
        m = re.fullmatch(r"(\d+) ([+\-*]) (\d+) = (\d+)\. \\boxed\{(\d+)\}", text)
        assert m and m.group(4) == m.group(5) == r.eval_answer
        assert r.prompt == f"What is {m.group(1)} {m.group(2)} {m.group(3)}?"
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 21  # 99 + 99 = 198. \\boxed{198}
        assert len(format_prompt(r.prompt, tok)) <= 36
    handmade = PromptRecord("What is 47 + 38?", "85", "x", "x", meta={"op": "+", "operands": [47, 38]})
    assert solution_text(handmade) == "47 + 38 = 85. \\boxed{85}"
    with pytest.raises(ValueError, match="not a synthetic record"):
        solution_text(PromptRecord("q", "1", "data.jsonl:1", "u"))
