"""Text inputs: per-language corpora (text, JSON Lines, local `datasets`), the built-in corpus,
seeded detection / evaluation splits, and tokenised batches."""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from neurolang.errors import NeurolangError

BUILTIN_DIR = Path(__file__).parent / "data" / "corpus"
PAPER_LANGS = ("en", "zh", "th", "fr", "de", "sw")

# Written for this project (public domain): one everyday sentence per language, parallel.
SAMPLE_SENTENCES = {
    "en": "The baker opens her small shop at six every morning, before the street wakes up.",
    "zh": "面包师每天早上六点打开她的小店，那时街道还没有醒来。",
    "th": "คนทำขนมปังเปิดร้านเล็ก ๆ ของเธอตอนหกโมงเช้าทุกวัน ก่อนที่ถนนจะตื่น",
    "fr": "La boulangère ouvre sa petite boutique à six heures chaque matin, avant que la rue ne s'éveille.",
    "de": "Die Bäckerin öffnet ihren kleinen Laden jeden Morgen um sechs, bevor die Straße erwacht.",
    "sw": "Mwokaji hufungua duka lake dogo saa kumi na mbili kila asubuhi, kabla mtaa haujaamka.",
}


def read_lines(path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, with a one-line error when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise NeurolangError(f"no such text file: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise NeurolangError(f"{path} holds no text")
    return lines


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise NeurolangError(f"{path}:{number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise NeurolangError(f"{path}:{number} has no field {field!r} (choose it with --text-field)")
        if str(record[field]).strip():
            texts.append(str(record[field]).strip())
    if not texts:
        raise NeurolangError(f"{path} holds no text")
    return texts


def _read_dataset(path: Path, field: str) -> list[str]:
    from datasets import load_from_disk

    data = load_from_disk(str(path))
    if hasattr(data, "keys"):  # a DatasetDict: take the train split, else the only one
        split = "train" if "train" in data else next(iter(data.keys()))
        data = data[split]
    if field not in data.column_names:
        raise NeurolangError(f"dataset {path} has no column {field!r} (columns: {', '.join(data.column_names)})")
    texts = [str(t).strip() for t in data[field] if str(t).strip()]
    if not texts:
        raise NeurolangError(f"dataset {path} holds no text")
    return texts


def load_corpus(corpus: str, langs, text_field: str = "text") -> dict[str, list[str]]:
    """{lang: texts} from `builtin` or a directory of `<lang>.txt`, `<lang>.jsonl` or `<lang>/`
    (a `datasets` dataset saved with `save_to_disk`)."""
    root = BUILTIN_DIR if corpus == "builtin" else Path(corpus)
    if not root.is_dir():
        raise NeurolangError(f"no such corpus directory: {corpus} (use 'builtin' or a directory of <lang>.txt files)")
    if not langs:
        raise NeurolangError("no languages given (--langs en,zh,...)")
    texts = {}
    for lang in langs:
        if (root / f"{lang}.txt").is_file():
            texts[lang] = read_lines(root / f"{lang}.txt")
        elif (root / f"{lang}.jsonl").is_file():
            texts[lang] = _read_jsonl(root / f"{lang}.jsonl", text_field)
        elif (root / lang).is_dir():
            texts[lang] = _read_dataset(root / lang, text_field)
        else:
            raise NeurolangError(f"corpus {corpus} has no {lang}.txt, {lang}.jsonl or {lang}/ dataset")
    return texts


@dataclass(frozen=True)
class Split:
    detection: list[int]  # indices of corpus lines used to detect neurons
    evaluation: list[int]  # disjoint indices kept for perplexity


def split_indices(n_lines: int, max_sentences: int, eval_sentences: int, seed: int) -> Split:
    """Seeded, disjoint detection and evaluation splits; evaluation is served first so that it
    never shrinks, and detection takes up to `max_sentences` of the rest."""
    if n_lines <= eval_sentences:
        raise NeurolangError(f"only {n_lines} lines: fewer than --eval-sentences {eval_sentences} plus one to detect with")
    order = list(range(n_lines))
    random.Random(seed).shuffle(order)
    evaluation = sorted(order[:eval_sentences])
    detection = sorted(order[eval_sentences:eval_sentences + max_sentences])
    return Split(detection, evaluation)


def tokenize(tokenizer, sentences, max_length: int, device=None):
    """Right-padded (input_ids, attention_mask) for a list of sentences.

    Empty sentences are an error, and so is a sentence longer than `max_length` tokens: no
    caller silently measures a truncated sentence (detection truncates on purpose, see `encode`).
    """
    seqs, _ = encode(tokenizer, sentences, max_length, truncate=False)
    return pad_batch(seqs, tokenizer.pad_token_id, device)


def encode(tokenizer, sentences, max_length: int, truncate: bool = True):
    """Token ids of each sentence (no padding) and how many were cut to `max_length`."""
    if not sentences:
        raise NeurolangError("no text given: the list of sentences is empty")
    for i, sentence in enumerate(sentences):
        if not sentence.strip():
            raise NeurolangError(f"sentence {i + 1} is empty")
    seqs = tokenizer(list(sentences))["input_ids"]
    long = [i for i, ids in enumerate(seqs) if len(ids) > max_length]
    if long and not truncate:
        i = long[0]
        raise NeurolangError(f"sentence {i + 1} has {len(seqs[i])} tokens, more than --max-length {max_length}")
    return [ids[:max_length] for ids in seqs], len(long)


def pad_batch(seqs, pad_id: int, device=None):
    """Right-padded (input_ids [B, T], attention_mask [B, T] bool) from lists of token ids."""
    width = max(len(ids) for ids in seqs)
    input_ids = torch.full((len(seqs), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, ids in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = True
    return input_ids.to(device), mask.to(device)


def first_tokens(ids: torch.Tensor, mask: torch.Tensor, i: int) -> torch.Tensor:
    """Sentence i of a right-padded batch, without its padding, as a [1, T] batch."""
    return ids[i : i + 1, : int(mask[i].sum())]
