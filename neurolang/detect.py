"""Detection of language-related neurons (SPEC §3, Eq. 2, Appendix B).

For each language, sentences are run in length-sorted batches; every layer's impacts are turned
into activation counts on the device as soon as they exist (top ρ per sentence, layer and group,
or impact > σ), and N_ℓ is the set of neurons activated in at least τ of the language's sentences.
"""
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kernels import select_count_torch, top_k_size
from neurolang.adapters import GROUPS, ModelAdapter
from neurolang.corpus import encode, load_corpus, pad_batch, split_indices
from neurolang.errors import NeurolangError
from neurolang.impact import compute_impacts

NEURONS_FILE = "neurons.safetensors"
DETECT_FILE = "detect.json"


@dataclass
class NeuronSets:
    """Per-language activation counts and memberships: counts[lang][group] is int32
    [n_layers, width], members[lang][group] bool of the same shape."""

    langs: list[str]
    counts: dict[str, dict[str, torch.Tensor]]
    members: dict[str, dict[str, torch.Tensor]]
    info: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for lang in self.langs:
            for group in GROUPS:
                out[f"counts.{lang}.{group}"] = self.counts[lang][group].cpu().contiguous()
                out[f"lang.{lang}.{group}"] = self.members[lang][group].cpu().contiguous()
        return out

    def save(self, out_dir) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(self.tensors(), out_dir / NEURONS_FILE)
        atomic_write_text(json.dumps(self.info, indent=2, ensure_ascii=False) + "\n", out_dir / DETECT_FILE)

    @classmethod
    def load(cls, out_dir) -> "NeuronSets":
        out_dir = Path(out_dir)
        for name in (NEURONS_FILE, DETECT_FILE):
            if not (out_dir / name).is_file():
                raise NeurolangError(f"{out_dir} has no {name}: run `neurolang detect --out {out_dir}` first")
        info = json.loads((out_dir / DETECT_FILE).read_text())
        tensors = load_file(out_dir / NEURONS_FILE)
        langs = info["langs"]
        counts = {lang: {g: tensors[f"counts.{lang}.{g}"] for g in GROUPS} for lang in langs}
        members = {lang: {g: tensors[f"lang.{lang}.{g}"] for g in GROUPS} for lang in langs}
        return cls(langs, counts, members, info)


def atomic_save_tensors(tensors: dict, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial)
    os.replace(partial, path)


def atomic_write_text(text: str, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def model_fingerprint(model) -> str:
    """A short hash of the weights' names, shapes and a sample of values: tells two models apart."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def membership(counts: torch.Tensor, n_sentences: int, tau: float) -> torch.Tensor:
    """N_ℓ: neurons activated in at least τ of the n sentences (τ = 1: in every one)."""
    return counts >= max(1, math.ceil(tau * n_sentences - 1e-9))


def count_activations(adapter: ModelAdapter, seqs, pad_id: int, *, ratio=0.01, sigma=None, batch_size=8,
                      metric="output", backend="torch", device=None, progress=None):
    """Activation counts {group: int32 [n_layers, width]} over token sequences, in length-sorted
    batches; also returns the time spent in impact computation and selection."""
    widths = adapter.widths()
    device = device or next(adapter.model.parameters()).device
    counts = {g: torch.zeros(adapter.n_layers, w, dtype=torch.int32, device=device) for g, w in widths.items()}
    ks = {g: None if sigma is not None else top_k_size(ratio, w) for g, w in widths.items()}
    timings = {"impacts_s": 0.0}
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))

    def on_layer(layer, impacts):
        for group, values in impacts.items():
            counts[group][layer] += select_count_torch(values, ks[group], sigma)

    for start in range(0, len(order), batch_size):
        batch = [seqs[i] for i in order[start:start + batch_size]]
        ids, mask = pad_batch(batch, pad_id, device)
        compute_impacts(adapter, ids, mask, metric=metric, backend=backend, on_layer=on_layer, timings=timings)
        if progress is not None:
            progress(sum(len(s) for s in batch))
    return counts, timings["impacts_s"]


class _Progress:
    """A one-line progress display with tokens/s on stderr (quiet when not a terminal)."""

    def __init__(self, lang: str, total_tokens: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_tokens, desc=f"detect {lang}", unit="tok", unit_scale=True,
                        disable=not enabled, file=sys.stderr)

    def __call__(self, tokens: int) -> None:
        self.bar.update(tokens)

    def close(self):
        self.bar.close()


def detect(model, tokenizer, corpus="builtin", langs=("en", "zh", "th", "fr", "de", "sw"), *, ratio=0.01,
           sigma=None, tau=1.0, max_sentences=200, eval_sentences=40, max_length=128, batch_size=8, seed=0,
           metric="output", backend="torch", text_field="text", model_name=None, progress=True) -> NeuronSets:
    """Detect N_ℓ for each language of a corpus (see `neurolang detect --help` for the options)."""
    if sigma is None and not 0 < ratio <= 1:
        raise NeurolangError(f"--ratio must be in (0, 1], got {ratio}")
    if not 0 < tau <= 1:
        raise NeurolangError(f"--tau must be in (0, 1], got {tau}")
    if batch_size < 1 or max_length < 1 or max_sentences < 1:
        raise NeurolangError("--batch-size, --max-length and --max-sentences must be positive")
    adapter = ModelAdapter(model)
    texts = load_corpus(corpus, list(langs), text_field)
    counts, members, per_lang = {}, {}, {}
    start = time.perf_counter()
    for lang in langs:
        split = split_indices(len(texts[lang]), max_sentences, eval_sentences, seed)
        seqs, truncated = encode(tokenizer, [texts[lang][i] for i in split.detection], max_length)
        bar = _Progress(lang, sum(map(len, seqs)), progress)
        lang_start = time.perf_counter()
        counts[lang], impact_s = count_activations(adapter, seqs, tokenizer.pad_token_id, ratio=ratio, sigma=sigma,
                                                   batch_size=batch_size, metric=metric, backend=backend,
                                                   progress=bar)
        bar.close()
        elapsed = time.perf_counter() - lang_start
        n = len(seqs)
        members[lang] = {g: membership(c, n, tau) for g, c in counts[lang].items()}
        tokens = sum(map(len, seqs))
        per_lang[lang] = {
            "detection_lines": split.detection, "evaluation_lines": split.evaluation, "sentences": n,
            "tokens": tokens, "truncated": truncated, "seconds": round(elapsed, 3),
            "impact_seconds": round(impact_s, 3), "tokens_per_second": round(tokens / elapsed, 1),
        }
    from neurolang import __version__

    info = {
        "model": model_name, "model_type": adapter.family, "fingerprint": model_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "n_layers": adapter.n_layers,
        "widths": adapter.widths(), "neuron_count": adapter.neuron_count(), "langs": list(langs),
        "options": {"corpus": str(corpus), "ratio": ratio, "sigma": sigma, "tau": tau,
                    "max_sentences": max_sentences, "eval_sentences": eval_sentences, "max_length": max_length,
                    "batch_size": batch_size, "seed": seed, "qk_metric": metric, "backend": backend,
                    "text_field": text_field},
        "per_language": per_lang, "version": __version__,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return NeuronSets(list(langs), counts, members, info)
