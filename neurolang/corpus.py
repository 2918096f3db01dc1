"""Text inputs: a few built-in sentences in the paper's six languages, and batching."""
import torch

from neurolang.errors import NeurolangError

# Written for this project (public domain): one everyday sentence per language, parallel.
SAMPLE_SENTENCES = {
    "en": "The baker opens her small shop at six every morning, before the street wakes up.",
    "zh": "面包师每天早上六点打开她的小店，那时街道还没有醒来。",
    "th": "คนทำขนมปังเปิดร้านเล็ก ๆ ของเธอตอนหกโมงเช้าทุกวัน ก่อนที่ถนนจะตื่น",
    "fr": "La boulangère ouvre sa petite boutique à six heures chaque matin, avant que la rue ne s'éveille.",
    "de": "Die Bäckerin öffnet ihren kleinen Laden jeden Morgen um sechs, bevor die Straße erwacht.",
    "sw": "Mwokaji hufungua duka lake dogo saa kumi na mbili kila asubuhi, kabla mtaa haujaamka.",
}


def tokenize(tokenizer, sentences, max_length: int, device=None):
    """Right-padded (input_ids, attention_mask) for a list of sentences.

    Empty sentences are an error; a sentence longer than `max_length` tokens is an error too,
    so that no caller silently measures a truncated sentence.
    """
    if not sentences:
        raise NeurolangError("no text given: the list of sentences is empty")
    for i, sentence in enumerate(sentences):
        if not sentence.strip():
            raise NeurolangError(f"sentence {i + 1} is empty")
    tokenizer.padding_side = "right"
    enc = tokenizer(list(sentences), padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    if int(lengths.max()) > max_length:
        i = int(lengths.argmax())
        raise NeurolangError(
            f"sentence {i + 1} has {int(lengths[i])} tokens, more than --max-length {max_length}"
        )
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def read_lines(path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, with a one-line error when it is missing or empty."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise NeurolangError(f"no such text file: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise NeurolangError(f"{path} holds no text")
    return lines


def first_tokens(ids: torch.Tensor, mask: torch.Tensor, i: int) -> torch.Tensor:
    """Sentence i of a right-padded batch, without its padding, as a [1, T] batch."""
    return ids[i : i + 1, : int(mask[i].sum())]
