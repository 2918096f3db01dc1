"""Multilingual evaluation from the benchmarks' own files (the paper's Table 1).

MGSM: `mgsm_<lang>.tsv` (question TAB numeric answer, no header). Prompt, K exemplars first:

    Question: <question>
    Answer: <number>
    <blank line>
    ...
    Question: <evaluated question>
    Answer:

The exemplars are the first K other problems of the same file (MGSM ships no training split; the
evaluated item is never among them). Greedy generation stops at a blank line or a new
"Question:"; the prediction is the last number of the output, normalised (Unicode digits to ASCII,
thousands separators and trailing zeros of decimals dropped) and compared exactly with the answer.

MMMLU: `mmlu_<LOCALE>.csv` (columns Question, A, B, C, D, Answer, Subject; e.g. mmlu_ZH_CN.csv),
in the classic MMLU prompt: a header naming the subject, K exemplars of the same subject (the first K
other items of the file in that subject), then the item ending in "Answer:". The prediction is the
option letter with the highest log-likelihood as the next token.

Prompts that would exceed `max_length` tokens lose exemplars from the end until they fit; each
item's record says how many shots it got.
"""
import csv
import hashlib
import json
import math
import re
import shutil
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from neurolang.errors import NeurolangError

TASKS = ("mgsm", "mmmlu")
DEFAULT_SHOTS = {"mgsm": 4, "mmmlu": 5}
RESULTS_FILE = "results.json"
PROGRESS_DIR = "eval-progress"
LETTERS = ("A", "B", "C", "D")
STOPS = ("\n\n", "\nQuestion:")
# OpenAI's MMMLU file locales (no Thai was published).
MMMLU_LOCALES = {"ar": "AR_XY", "bn": "BN_BD", "de": "DE_DE", "es": "ES_LA", "fr": "FR_FR", "hi": "HI_IN",
                 "id": "ID_ID", "it": "IT_IT", "ja": "JA_JP", "ko": "KO_KR", "pt": "PT_BR", "sw": "SW_KE",
                 "yo": "YO_NG", "zh": "ZH_CN"}


@dataclass
class Item:
    question: str
    answer: str
    subject: str = ""
    options: tuple = field(default_factory=tuple)


# ---------------------------------------------------------------- reading the published files

def _data_file(data, task: str, lang: str) -> Path:
    data = Path(data)
    if not data.is_dir():
        raise NeurolangError(f"--data {data} is not a directory")
    if task == "mgsm":
        name = f"mgsm_{lang}.tsv"
    elif lang in MMMLU_LOCALES:
        name = f"mmlu_{MMMLU_LOCALES[lang]}.csv"
    else:
        raise NeurolangError(f"MMMLU has no {lang!r} file (published locales: {', '.join(sorted(MMMLU_LOCALES))})")
    for candidate in (data / name, data / "test" / name):
        if candidate.is_file():
            return candidate
    raise NeurolangError(f"no {task.upper()} file for {lang} in {data} (expected {name})")


def read_mgsm(path) -> list[Item]:
    """MGSM's TSV: `question<TAB>answer` per line, no header."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        question, sep, answer = line.rpartition("\t")
        if not sep or normalize_number(answer) is None:
            raise NeurolangError(f"{path}:{number}: expected 'question<TAB>numeric answer'")
        items.append(Item(question.strip(), normalize_number(answer)))
    if not items:
        raise NeurolangError(f"{path} holds no problems")
    return items


def read_mmmlu(path) -> list[Item]:
    """MMMLU's CSV: columns Question, A, B, C, D, Answer (a letter), Subject (an unnamed index column is ignored)."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"Question", *LETTERS, "Answer", "Subject"} - set(reader.fieldnames or ())
        if missing:
            raise NeurolangError(f"{path} lacks the column(s) {', '.join(sorted(missing))}")
        items = []
        for number, row in enumerate(reader, 2):
            answer = row["Answer"].strip().upper()
            if answer not in LETTERS:
                raise NeurolangError(f"{path}:{number}: answer {row['Answer']!r} is not one of A, B, C, D")
            items.append(Item(row["Question"].strip(), answer, row["Subject"].strip(),
                              tuple(row[letter].strip() for letter in LETTERS)))
    if not items:
        raise NeurolangError(f"{path} holds no questions")
    return items


def read_task(data, task: str, lang: str) -> list[Item]:
    path = _data_file(data, task, lang)
    return read_mgsm(path) if task == "mgsm" else read_mmmlu(path)


# ---------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?\d+(?:[,\u00a0\u202f\u2009]\d{3})*(?:\.\d+)?")


def _ascii_digits(text: str) -> str:
    return "".join(str(unicodedata.decimal(ch)) if ch.isdecimal() and not ch.isascii() else ch for ch in text)


def normalize_number(text: str):
    """Canonical form of a number written with separators or decimals ('1,000.0' → '1000'), or None."""
    text = _ascii_digits(text.strip())
    if not _NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(re.sub(r"[,\u00a0\u202f\u2009]", "", text)).normalize()
    except InvalidOperation:
        return None
    return "0" if value == 0 else format(value, "f")


def extract_answer(output: str):
    """The last number in a model's output, normalised; None when it has none."""
    numbers = _NUMBER.findall(_ascii_digits(output))
    return normalize_number(numbers[-1]) if numbers else None


def cut_at_stop(text: str, stops=STOPS) -> str:
    """The generation up to the first stop string (exclusive)."""
    ends = [text.find(stop) for stop in stops if stop in text]
    return text[: min(ends)] if ends else text


# ---------------------------------------------------------------- prompts

def exemplar_indices(items, i: int, shots: int) -> list[int]:
    """The first `shots` items other than i (MMMLU: of i's subject)."""
    subject = items[i].subject
    return [j for j in range(len(items)) if j != i and items[j].subject == subject][:shots]


def _mgsm_block(item: Item, answer: bool) -> str:
    return f"Question: {item.question}\nAnswer:" + (f" {item.answer}\n\n" if answer else "")


def _mmmlu_block(item: Item, answer: bool) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, item.options))
    return f"{item.question}{options}\nAnswer:" + (f" {item.answer}\n\n" if answer else "")


def build_prompt(task: str, items, i: int, shots: int) -> str:
    block = _mgsm_block if task == "mgsm" else _mmmlu_block
    head = ""
    if task == "mmmlu":
        head = f"The following are multiple choice questions (with answers) about {items[i].subject.replace('_', ' ')}.\n\n"
    return head + "".join(block(items[j], True) for j in exemplar_indices(items, i, shots)) + block(items[i], False)


# ---------------------------------------------------------------- running a model

class _StopOnText:
    """A per-row stopping criterion: a row is done once its new text holds a stop string."""

    def __init__(self, tokenizer, prompt_width: int, stops=STOPS):
        self.tokenizer, self.prompt_width, self.stops = tokenizer, prompt_width, stops

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


class ModelRunner:
    """Greedy generation and next-token letter scores of a `transformers` causal LM, batched."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def _batches(self, prompts):
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def generate(self, prompts, max_new_tokens: int, on_batch=None) -> list[str]:
        """Greedy continuations (left-padded batches), ending soon after a stop string."""
        from transformers import GenerationConfig, StoppingCriteriaList

        tok, outputs = self.tokenizer, [None] * len(prompts)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            for rows in self._batches(prompts):
                enc = tok([prompts[i] for i in rows], return_tensors="pt", padding=True).to(self.device)
                width = enc["input_ids"].shape[1]
                with torch.inference_mode():
                    out = self.model.generate(**enc, generation_config=config,
                                              stopping_criteria=StoppingCriteriaList([_StopOnText(tok, width)]))
                for i, text in zip(rows, tok.batch_decode(out[:, width:], skip_special_tokens=True)):
                    outputs[i] = text
                if on_batch:
                    on_batch(len(rows))
        finally:
            tok.padding_side = side
        return outputs

    def letter_logprobs(self, prompts, on_batch=None) -> list[list[float]]:
        """log P(" X" | prompt) for X in A..D, from one forward pass per prompt. Batches are
        left-padded with explicit positions, so only the last position's logits are computed
        (long few-shot prompts times a large vocabulary would not fit otherwise)."""
        common, last_ids = self._letter_tokens()
        scores = [None] * len(prompts)
        for rows in self._batches(prompts):
            seqs = [self.tokenizer(prompts[i])["input_ids"] + common for i in rows]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, seq in enumerate(seqs):
                ids[r, width - len(seq):], mask[r, width - len(seq):] = torch.tensor(seq), 1
            positions = (mask.cumsum(1) - 1).clamp_min(0)
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=positions.to(self.device), use_cache=False, logits_to_keep=1).logits
            last = logits[:, -1].float().log_softmax(-1)
            for r, i in enumerate(rows):
                scores[i] = last[r, last_ids].tolist()
            if on_batch:
                on_batch(len(rows))
        return scores

    def _letter_tokens(self):
        """(shared leading tokens of ' A'..' D', the distinct last token of each)."""
        encoded = [self.tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in LETTERS]
        common = encoded[0][:-1]
        if any(ids[:-1] != common for ids in encoded) or len({ids[-1] for ids in encoded}) != len(LETTERS):
            raise NeurolangError("this tokenizer does not spell ' A' … ' D' as shared tokens plus one letter token")
        return common, [ids[-1] for ids in encoded]


# ---------------------------------------------------------------- the evaluation

def _fit(task, items, i, shots, runner, budget):
    """The prompt with as many of the `shots` exemplars as fit in `budget` tokens, and that number."""
    for k in range(len(exemplar_indices(items, i, shots)), -1, -1):
        prompt = build_prompt(task, items, i, k)
        if runner.count_tokens(prompt) <= budget:
            return prompt, k
    raise NeurolangError(f"item {i + 1} needs {runner.count_tokens(build_prompt(task, items, i, 0))} prompt tokens "
                         f"without exemplars; at most {budget} fit (--max-length, the model's context, generation)")


def evaluate(runner, task: str, langs, data, *, limit=None, shots=None, max_new_tokens=48, max_length=2048,
             progress=False, resume_dir=None, model_name=None) -> dict:
    """Accuracy per language (and per subject for MMMLU) with every item's prediction. With
    `resume_dir` (the directory the results will be saved to), each finished language is kept
    there until `save_results`, and a re-run after an interruption reuses those it finds."""
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise NeurolangError(f"unknown task {task!r}; choose {' or '.join(TASKS)}")
    shots = DEFAULT_SHOTS[task] if shots is None else shots
    if shots < 0:
        raise NeurolangError(f"--shots must be at least 0, got {shots}")
    if limit is not None and limit < 1:
        raise NeurolangError(f"--limit must be positive, got {limit}")
    if max_new_tokens < 1:
        raise NeurolangError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    max_length = min(max_length, getattr(runner, "max_positions", None) or max_length)
    budget = max_length - (max_new_tokens if task == "mgsm" else 2)
    if budget < 1:
        raise NeurolangError(f"a length of {max_length} tokens (--max-length, or the model's context) leaves no room "
                             f"for a prompt beside the {max_length - budget} answer tokens")
    kept = None
    if resume_dir is not None:
        from neurolang.detect import LanguageProgress, model_identity

        # The batch size is not in the key: a run out of memory may go on with a smaller one.
        kept = LanguageProgress(resume_dir, PROGRESS_DIR, {
            **model_identity(runner.model, model_name), "task": task, "limit": limit, "shots": shots,
            "max_new_tokens": max_new_tokens, "max_length": max_length})
    per_language, records, start = {}, [], time.perf_counter()
    for lang in langs:
        data_digest = hashlib.sha256(_data_file(data, task, lang).read_bytes()).hexdigest()
        finished = None if kept is None else kept.load(lang, data_digest)
        if finished is not None:
            per_language[lang] = {**finished[1]["summary"], "resumed": True}
            records += finished[1]["records"]
            continue
        items = read_task(data, task, lang)
        chosen = range(min(limit or len(items), len(items)))
        fitted = [_fit(task, items, i, shots, runner, budget) for i in chosen]
        prompts = [p for p, _ in fitted]
        lang_start = time.perf_counter()
        with tqdm(total=len(prompts), desc=f"{task} {lang}", unit="item", disable=not progress,
                  file=sys.stderr) as bar:
            if task == "mgsm":
                outputs = [cut_at_stop(text) for text in runner.generate(prompts, max_new_tokens, on_batch=bar.update)]
                predictions = [extract_answer(text) for text in outputs]
            else:
                outputs = runner.letter_logprobs(prompts, on_batch=bar.update)
                predictions = [LETTERS[max(range(4), key=row.__getitem__)] for row in outputs]
        subjects = {}
        for i, (_, k), output, prediction in zip(chosen, fitted, outputs, predictions):
            correct = prediction == items[i].answer
            records.append({"lang": lang, "index": i, "subject": items[i].subject or None, "shots": k,
                            "output": output, "prediction": prediction, "answer": items[i].answer,
                            "correct": correct})
            tally = subjects.setdefault(items[i].subject, [0, 0])
            tally[0], tally[1] = tally[0] + correct, tally[1] + 1
        n, right = len(prompts), sum(r["correct"] for r in records if r["lang"] == lang)
        per_language[lang] = {"items": n, "correct": right, "accuracy": 100.0 * right / n,
                              "seconds": time.perf_counter() - lang_start}
        if task == "mmmlu":
            per_language[lang]["per_subject"] = {s: 100.0 * c / t for s, (c, t) in sorted(subjects.items())}
        if kept is not None:
            kept.save(lang, data_digest, {},
                      {"summary": per_language[lang], "records": [r for r in records if r["lang"] == lang]})
    return {"task": task, "langs": list(langs), "per_language": per_language,
            "average": sum(v["accuracy"] for v in per_language.values()) / len(per_language),
            "options": {"data": str(data), "limit": limit, "shots": shots, "max_new_tokens": max_new_tokens,
                        "max_length": max_length, "prompt_format": "mgsm-direct" if task == "mgsm" else "mmlu"},
            "seconds": time.perf_counter() - start, "items": records}


def save_results(results: dict, out) -> Path:
    from neurolang.detect import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(results, indent=1, ensure_ascii=False), out / RESULTS_FILE)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # the finished languages are in the results now
    return out / RESULTS_FILE


def load_results(run) -> dict:
    path = Path(run) / RESULTS_FILE if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise NeurolangError(f"no {RESULTS_FILE} in {run}: not a directory written by `neurolang eval`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise NeurolangError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None


def format_results(results: dict) -> str:
    langs = results["langs"]
    lines = [f"{results['task'].upper()} ({results['options']['shots']}-shot, {results.get('model', '')})",
             "         " + "".join(f"{lang:>8}" for lang in langs) + "     avg",
             "accuracy " + "".join(f"{results['per_language'][l]['accuracy']:8.1f}" for l in langs)
             + f"{results['average']:8.1f}",
             "items    " + "".join(f"{results['per_language'][l]['items']:8d}" for l in langs)]
    intervals = [accuracy_interval(results["per_language"][l]["correct"], results["per_language"][l]["items"])
                 for l in langs]
    lines.append("95% CI   " + "".join(f"{f'{lo:.0f}-{hi:.0f}':>8}" for lo, hi in intervals))
    return "\n".join(lines)


def format_comparison(runs: dict) -> str:
    """Table 1's shape: per task, each run's accuracy per language, and its Δ against the first run."""
    by_task = {}
    for name, results in runs.items():
        by_task.setdefault(results["task"], []).append((name, results))
    blocks = []
    for task, entries in by_task.items():
        langs = [l for l in entries[0][1]["langs"] if all(l in r["per_language"] for _, r in entries)]
        if not langs:
            raise NeurolangError(f"the {task} runs share no language")
        width = max(12, *(len(name) for name, _ in entries)) + 2
        lines = [f"{task.upper()}", f"{'run':<{width}}" + "".join(f"{l:>8}" for l in langs) + "   avg Δ"]
        base = entries[0][1]["per_language"]
        for position, (name, results) in enumerate(entries):
            accs = [results["per_language"][l]["accuracy"] for l in langs]
            lines.append(f"{name:<{width}}" + "".join(f"{a:8.1f}" for a in accs))
            if position:
                deltas = [a - base[l]["accuracy"] for a, l in zip(accs, langs)]
                lines.append(f"{'  Δ':<{width}}" + "".join(f"{d:+8.1f}" for d in deltas)
                             + f"{sum(deltas) / len(deltas):+8.1f}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def accuracy_interval(correct: int, n: int) -> tuple:
    """A 95 % Wilson interval for an accuracy, in percent (small samples make wide ones)."""
    if n == 0:
        return (math.nan, math.nan)
    p, z = correct / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100 * (centre - half), 100 * (centre + half))
