"""MGSM / MMMLU evaluation: answer extraction, prompts, scripted stand-in models, padding, the command."""
import csv
import json
import os
from pathlib import Path

import pytest
import torch

from neurolang.cli import main
from neurolang.eval import (
    LETTERS,
    PROGRESS_DIR,
    ModelRunner,
    build_prompt,
    evaluate,
    exemplar_indices,
    extract_answer,
    normalize_number,
    read_mgsm,
    read_task,
)
from neurolang.models import load_model

MGSM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mgsm"
SUBJECTS = ("astronomy", "high_school_biology", "virology")


@pytest.fixture
def mgsm_dir(tmp_path):
    """Six problems per language in MGSM's published TSV form (answers with separators included)."""
    rows = [("Tom has {} apples and buys 2 more. How many?", "{}"), ("A farm sells {} eggs. Count?", "{}")]
    for lang in ("zh", "fr"):
        lines = [f"{rows[n % 2][0].format(lang + str(n))}\t{(1000 + n) if n % 3 else f'1,{n:03d}'}" for n in range(6)]
        (tmp_path / f"mgsm_{lang}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


@pytest.fixture
def mmmlu_dir(tmp_path):
    """Twelve questions in OpenAI's published MMMLU CSV form (leading unnamed index column)."""
    with open(tmp_path / "mmlu_ZH_CN.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "Question", "A", "B", "C", "D", "Answer", "Subject"])
        for n in range(12):
            writer.writerow([n, f"问题 {n}, with a comma?", "甲", "乙", "丙", "丁", LETTERS[n % 4], SUBJECTS[n % 3]])
    return tmp_path


@pytest.mark.parametrize("output, expected", [
    (" The answer is 1,234.", "1234"),
    (" $18.00 in total", "18"),
    (" 3.50", "3.5"),
    ("答案是１８。", "18"),  # full-width digits
    (" ๑๘ บาท", "18"),  # Thai digits
    (" 70,000.0", "70000"),
    (" She lost -5 points", "-5"),
    (" 3 apples, then 4 pears, so 7", "7"),
    (" 12 345 is spaced", "345"),  # a plain space separates numbers, it does not group digits
    (" 1\u202f000 francs", "1000"),  # narrow no-break space groups thousands (French)
    (" 0", "0"),
    (" 007", "7"),
    (" no number here", None),
    ("", None),
])
def test_extract_answer_on_tricky_outputs(output, expected):
    assert extract_answer(output) == expected


def test_normalize_number():
    assert normalize_number("114,200") == "114200"
    assert normalize_number("2.50") == "2.5"
    assert normalize_number("1e5") is None
    assert normalize_number("twelve") is None


class ScriptedRunner:
    """A stand-in model that reads the evaluated question from the prompt and answers it right or wrong."""

    def __init__(self, items, right: bool):
        self.answers = {item.question: item.answer for item in items}
        self.right = right
        self.prompts = []

    def count_tokens(self, text):
        return len(text)

    def _question(self, prompt, mgsm):
        last = prompt.rsplit("Question: ", 1)[1] if mgsm else prompt.rsplit("\n\n", 1)[1]
        return last.split("\n")[0]

    def generate(self, prompts, max_new_tokens, on_batch=None):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            answer = int(self.answers[self._question(prompt, True)]) + (0 if self.right else 1)
            # The real answer first, then text after a stop that must be cut away.
            out.append(f" Let me think: 2 + 2 = 4, so {answer:,}.\n\nQuestion: What is 99?\nAnswer: 99")
        return out

    def letter_logprobs(self, prompts, on_batch=None):
        self.prompts += prompts
        scores = []
        for prompt in prompts:
            answer = self.answers[self._question(prompt, False)]
            best = LETTERS.index(answer) if self.right else (LETTERS.index(answer) + 1) % 4
            scores.append([0.0 if k == best else -5.0 for k in range(4)])
        return scores


def _all_items(task, data, langs):
    return [item for lang in langs for item in read_task(data, task, lang)]


@pytest.mark.parametrize("right, accuracy", [(True, 100.0), (False, 0.0)])
def test_scripted_model_scores_all_or_nothing_on_mgsm(mgsm_dir, right, accuracy):
    runner = ScriptedRunner(_all_items("mgsm", mgsm_dir, ["zh", "fr"]), right)
    results = evaluate(runner, "mgsm", ["zh", "fr"], mgsm_dir, shots=2)
    assert results["average"] == accuracy
    assert all(r["correct"] is right for r in results["items"]) and len(results["items"]) == 12
    assert all("Question" not in r["output"] for r in results["items"])  # cut at the new question


@pytest.mark.parametrize("right, accuracy", [(True, 100.0), (False, 0.0)])
def test_scripted_model_scores_all_or_nothing_on_mmmlu(mmmlu_dir, right, accuracy):
    runner = ScriptedRunner(_all_items("mmmlu", mmmlu_dir, ["zh"]), right)
    results = evaluate(runner, "mmmlu", ["zh"], mmmlu_dir, shots=5)
    assert results["per_language"]["zh"]["accuracy"] == accuracy
    assert set(results["per_language"]["zh"]["per_subject"]) == set(SUBJECTS)
    assert all(r["shots"] == 3 for r in results["items"])  # only 3 other items per subject exist


@pytest.mark.skipif(not MGSM_DIR.is_dir(), reason="needs ../shared/data/mgsm")
@pytest.mark.parametrize("lang", ["zh", "th", "sw"])
def test_mgsm_prompts_never_contain_the_item(lang):
    items = read_mgsm(MGSM_DIR / f"mgsm_{lang}.tsv")
    assert len(items) == 250
    for i in range(0, 250, 7):
        prompt = build_prompt("mgsm", items, i, 8)
        assert i not in exemplar_indices(items, i, 8)
        assert prompt.count(items[i].question) == 1 and prompt.endswith(items[i].question + "\nAnswer:")
        assert prompt.count("Question: ") == 9


def test_mmmlu_exemplars_share_the_subject_and_exclude_the_item(mmmlu_dir):
    items = read_task(mmmlu_dir, "mmmlu", "zh")
    for i, item in enumerate(items):
        chosen = exemplar_indices(items, i, 5)
        assert i not in chosen and all(items[j].subject == item.subject for j in chosen)
        prompt = build_prompt("mmmlu", items, i, 5)
        assert prompt.count(item.question) == 1 and prompt.endswith("D. 丁\nAnswer:")
        assert item.subject.replace("_", " ") in prompt.split("\n")[0]


def test_long_prompts_lose_exemplars(mgsm_dir):
    runner = ScriptedRunner(_all_items("mgsm", mgsm_dir, ["zh"]), True)
    one_item = len(build_prompt("mgsm", read_task(mgsm_dir, "mgsm", "zh"), 0, 1))
    results = evaluate(runner, "mgsm", ["zh"], mgsm_dir, shots=4, max_new_tokens=1, max_length=one_item + 1)
    assert {r["shots"] for r in results["items"]} <= {0, 1} and results["average"] == 100.0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_padding_does_not_change_greedy_outputs(family):
    model, tokenizer = load_model(f"tiny:{family}", "float32", "cpu")
    prompts = ["Question: 2+2?\nAnswer:", "Q: a much longer prompt than the first one, padded on the left\nA:",
               "x", "Question: ¿Cuántos?\nAnswer:"]
    alone = [ModelRunner(model, tokenizer, batch_size=1).generate([p], max_new_tokens=12)[0] for p in prompts]
    batched = ModelRunner(model, tokenizer, batch_size=4).generate(prompts, max_new_tokens=12)
    assert batched == alone
    assert tokenizer.padding_side == "right"  # restored


def test_letter_scores_do_not_depend_on_batching():
    model, tokenizer = load_model("tiny:qwen2", "float32", "cpu")
    prompts = ["Which? A. x B. y C. z D. w\nAnswer:", "Short\nAnswer:", "A third, longer question?\nAnswer:"]
    alone = [ModelRunner(model, tokenizer, batch_size=1).letter_logprobs([p])[0] for p in prompts]
    batched = ModelRunner(model, tokenizer, batch_size=3).letter_logprobs(prompts)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=0, atol=1e-5)
    # The scores are next-token log-probabilities of ' A'..' D' (the byte tokenizer spells ' A' as ' ' + 'A').
    ids = tokenizer(prompts[1] + " ")["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    letter_ids = [tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in LETTERS]
    torch.testing.assert_close(torch.tensor(alone[1]), logp[letter_ids], rtol=0, atol=1e-5)


def test_eval_command_and_compare(mgsm_dir, tmp_path, capsys):
    for name in ("before", "after"):
        assert main(["eval", "--model", "tiny:llama", "--task", "mgsm", "--data", str(mgsm_dir), "--langs", "zh,fr",
                     "--limit", "3", "--shots", "1", "--max-new-tokens", "4", "--out", str(tmp_path / name)]) == 0
    results = json.loads((tmp_path / "before" / "results.json").read_text())
    assert results["model"] == "tiny:llama" and len(results["items"]) == 6
    assert {"output", "prediction", "answer", "correct", "shots"} <= set(results["items"][0])
    # Doctor the second run so that the Δ row has something to show.
    after = json.loads((tmp_path / "after" / "results.json").read_text())
    after["per_language"]["zh"]["accuracy"] = 50.0
    (tmp_path / "after" / "results.json").write_text(json.dumps(after))
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "before"), str(tmp_path / "after")]) == 0
    table = capsys.readouterr().out
    zh_before = results["per_language"]["zh"]["accuracy"]
    assert "MGSM" in table and f"{50.0 - zh_before:+8.1f}" in table


def test_an_interrupted_evaluation_resumes_from_its_finished_languages(mgsm_dir, tmp_path, monkeypatch, capsys):
    """Killed during its second language, an evaluation keeps the first; the same command again
    generates for the second alone and gives the uninterrupted results; other options start over."""
    model, tokenizer = load_model("tiny:llama", "float32", "cpu")
    options = dict(limit=3, shots=1, max_new_tokens=4)
    straight = evaluate(ModelRunner(model, tokenizer, 4), "mgsm", ["zh", "fr"], mgsm_dir, **options)
    calls, generate = [], ModelRunner.generate

    def interrupted_at(n):
        def counted(self, prompts, *args, **kwargs):
            calls.append(prompts)
            if len(calls) == n:
                raise KeyboardInterrupt
            return generate(self, prompts, *args, **kwargs)
        return counted

    out = tmp_path / "out"
    monkeypatch.setattr(ModelRunner, "generate", interrupted_at(2))
    with pytest.raises(KeyboardInterrupt):
        evaluate(ModelRunner(model, tokenizer, 4), "mgsm", ["zh", "fr"], mgsm_dir, resume_dir=out,
                 model_name="tiny:llama", **options)
    assert [p.name for p in (out / PROGRESS_DIR).iterdir()] == ["zh.safetensors"]
    calls.clear()
    monkeypatch.setattr(ModelRunner, "generate", interrupted_at(0))  # never interrupts
    assert main(["eval", "--model", "tiny:llama", "--task", "mgsm", "--data", str(mgsm_dir), "--langs", "zh,fr",
                 "--limit", "3", "--shots", "1", "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out)]) == 0
    assert "zh: kept from the interrupted run" in capsys.readouterr().out
    assert len(calls) == 1 and all("fr" in p for p in calls[0])  # only French was generated
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["items"] == straight["items"] and resumed["average"] == straight["average"]
    assert not (out / PROGRESS_DIR).exists()  # saved results need no progress
    for other in (dict(options, limit=2), dict(options, shots=0)):  # another option: every language again
        calls.clear()
        monkeypatch.setattr(ModelRunner, "generate", interrupted_at(2))
        with pytest.raises(KeyboardInterrupt):  # zh kept, with the first options
            evaluate(ModelRunner(model, tokenizer, 4), "mgsm", ["zh", "fr"], mgsm_dir, resume_dir=out,
                     model_name="tiny:llama", **options)
        calls.clear()
        monkeypatch.setattr(ModelRunner, "generate", interrupted_at(0))
        evaluate(ModelRunner(model, tokenizer, 4), "mgsm", ["zh", "fr"], mgsm_dir, resume_dir=out,
                 model_name="tiny:llama", **other)
        assert len(calls) == 2


def test_an_evaluation_of_a_checkpoint_saved_again_at_its_path_starts_over(mgsm_dir, tmp_path, monkeypatch):
    from neurolang.tiny import byte_tokenizer, tiny_model

    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    model, tokenizer = load_model(str(path), "float32", "cpu")
    calls, generate = [], ModelRunner.generate

    def killed_after_one(self, prompts, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(prompts)
        return generate(self, prompts, *args, **kwargs)

    options = dict(limit=2, shots=1, max_new_tokens=2, resume_dir=tmp_path / "out", model_name=str(path))
    monkeypatch.setattr(ModelRunner, "generate", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        evaluate(ModelRunner(model, tokenizer), "mgsm", ["zh", "fr"], mgsm_dir, **options)
    monkeypatch.setattr(ModelRunner, "generate", generate)
    weights = path / "model.safetensors"
    later = weights.stat().st_mtime_ns + 10**10  # saved again (say, trained again) ten seconds later
    os.utime(weights, ns=(later, later))
    results = evaluate(ModelRunner(model, tokenizer), "mgsm", ["zh", "fr"], mgsm_dir, **options)
    assert not any(info.get("resumed") for info in results["per_language"].values())


@pytest.mark.parametrize("argv, message", [
    (["--task", "mgsm", "--out", "x"], "needs --data"),
    (["--task", "mgsm", "--data", "/nonexistent", "--out", "x"], "is not a directory"),
    (["--task", "mmmlu", "--langs", "th", "--data", ".", "--out", "x"], "MMMLU has no 'th' file"),
    (["--task", "mgsm", "--langs", "xx", "--data", ".", "--out", "x"], "expected mgsm_xx.tsv"),
    (["--compare", "/nonexistent"], "no results.json"),
    (["--task", "mgsm", "--data", ".", "--out", "x", "--limit", "0"], "--limit must be positive"),
    (["--task", "mgsm", "--data", ".", "--out", "x", "--shots", "-1"], "--shots must be at least 0"),
    (["--task", "mgsm", "--data", ".", "--out", "x", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--task", "mgsm", "--data", ".", "--out", "x", "--max-length", "48"], "leaves no room for a prompt"),
])
def test_eval_errors_are_one_line(argv, message, capsys):
    assert main(["eval", "--model", "tiny:llama", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
