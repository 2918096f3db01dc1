"""Detection of language-related neurons (SPEC §3, Eq. 2, Appendix B).

For each language, sentences are run in length-sorted batches; every layer's impacts are turned
into activation counts on the device as soon as they exist (top ρ per sentence, layer and group,
or impact > σ), and N_ℓ is the set of neurons activated in at least τ of the language's sentences.
"""
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kernels import count_selected, resolve_backend, select_count_torch, select_count_triton, top_k_order, top_k_size
from kernels.select_count import MAX_TOP_K
from neurolang.adapters import GROUPS, ModelAdapter
from neurolang.corpus import encode, load_corpus, pad_batch, split_indices
from neurolang.errors import NeurolangError
from neurolang.impact import compute_impacts
from neurolang.models import weights_stamp

NEURONS_FILE = "neurons.safetensors"
RANKS_FILE = "ranks.safetensors"
DETECT_FILE = "detect.json"
# What classify and score compute from the sets: stale, and removed, whenever the sets are saved anew.
CLASSES_FILE = "classes.safetensors"
STATS_FILE = "stats.json"
SCORES_FILE = "scores.json"
# The languages an interrupted detection finished, one file each; removed once the sets are saved.
PROGRESS_DIR = "detect-progress"


@dataclass
class NeuronSets:
    """Per-language activation counts and memberships: counts[lang][group] is int32
    [n_layers, width], members[lang][group] bool of the same shape."""

    langs: list[str]
    counts: dict[str, dict[str, torch.Tensor]]
    members: dict[str, dict[str, torch.Tensor]]
    info: dict = field(default_factory=dict)
    # In top-k mode, ranks[lang][group] is int32 [n_sentences, n_layers, k]: each sentence's
    # activated neurons, most impactful first. A smaller ρ selects a prefix (threshold validation).
    ranks: dict[str, dict[str, torch.Tensor]] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for lang in self.langs:
            for group in GROUPS:
                out[f"counts.{lang}.{group}"] = self.counts[lang][group].cpu().contiguous()
                out[f"lang.{lang}.{group}"] = self.members[lang][group].cpu().contiguous()
        return out

    def save(self, out_dir) -> None:
        """Write the sets, replacing an earlier detection's in `out_dir` whole: its classes, scores and
        (in threshold mode) ranks are removed, and detect.json, written last, is absent in between.
        Files of those names in a directory that holds no detection are left alone."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / NEURONS_FILE).is_file():
            stale = (DETECT_FILE, CLASSES_FILE, STATS_FILE, SCORES_FILE) + ((RANKS_FILE,) if self.ranks is None else ())
            for name in stale:
                (out_dir / name).unlink(missing_ok=True)
        atomic_save_tensors(self.tensors(), out_dir / NEURONS_FILE)
        if self.ranks is not None:
            ranks = {f"ranks.{lang}.{g}": self.ranks[lang][g].cpu().contiguous() for lang in self.langs for g in GROUPS}
            atomic_save_tensors(ranks, out_dir / RANKS_FILE)
        atomic_write_text(json.dumps(self.info, indent=2, ensure_ascii=False) + "\n", out_dir / DETECT_FILE)
        shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)

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
        ranks = None
        if (out_dir / RANKS_FILE).is_file():
            saved = load_file(out_dir / RANKS_FILE)
            ranks = {lang: {g: saved[f"ranks.{lang}.{g}"] for g in GROUPS} for lang in langs}
        return cls(langs, counts, members, info, ranks)

    def reselect(self, ratio: float) -> "NeuronSets":
        """The sets a smaller top fraction ρ would have given, from the recorded ranks."""
        if self.ranks is None:
            raise NeurolangError("no ranks recorded (threshold mode --sigma, or an older run): re-run detect")
        tau = self.info["options"]["tau"]
        widths = self.info["widths"]
        ks = top_k_sizes(widths, ratio, self.info["options"].get("compat"))
        counts, members = {}, {}
        for lang in self.langs:
            counts[lang], members[lang] = {}, {}
            for g in GROUPS:
                ranks = self.ranks[lang][g]
                k = min(ks[g], ranks.shape[2])
                n_sentences, n_layers = ranks.shape[0], ranks.shape[1]
                c = torch.stack([count_selected(ranks[:, layer, :k].long(), widths[g]) for layer in range(n_layers)])
                counts[lang][g] = c
                members[lang][g] = membership(c, n_sentences, tau)
        info = json.loads(json.dumps(self.info))
        info["options"]["ratio"] = ratio
        return NeuronSets(self.langs, counts, members, info, self.ranks)


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


def atomic_write_text(text: str, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def model_fingerprint(model) -> str:
    """A short hash of the weights' names, shapes and a sample of values (rounded to bfloat16, so
    that a float32 and a bfloat16 load of one checkpoint agree): tells two models apart."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to(torch.bfloat16).float().cpu()
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model, name) -> dict:
    """What tells this model's resumed work from another's: its name, dtype, fingerprint and the
    stamp of its weight files (`models.weights_stamp`)."""
    return {"model": name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "fingerprint": model_fingerprint(model), "weights": weights_stamp(model)}


def membership(counts: torch.Tensor, n_sentences: int, tau: float) -> torch.Tensor:
    """N_ℓ: neurons activated in at least τ of the n sentences (τ = 1: in every one)."""
    return counts >= max(1, math.ceil(tau * n_sentences - 1e-9))


def top_k_sizes(widths: dict[str, int], ratio: float, compat=None) -> dict[str, int]:
    """k = floor(ρ · width), at least 1, per group; the released code's swapped sizes under `compat`."""
    if compat is not None:
        from neurolang.compat import top_k_sizes as released_sizes

        return released_sizes(widths, ratio)
    return {g: top_k_size(ratio, w) for g, w in widths.items()}


def _spans(sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Where each group's block starts and ends when the blocks lie side by side in `sizes`' order."""
    ends = dict(zip(sizes, itertools.accumulate(sizes.values())))
    return {g: (ends[g] - n, ends[g]) for g, n in sizes.items()}


def count_activations(adapter: ModelAdapter, seqs, pad_id: int, *, ratio=0.01, sigma=None, batch_size=8,
                      metric="output", backend="auto", device=None, progress=None, compat=None):
    """Activation counts {group: int32 [n_layers, width]} over token sequences, in length-sorted
    batches; also the ranks (top-k mode, else None) and the seconds spent on impacts and selection."""
    widths = adapter.widths()
    device = device or next(adapter.model.parameters()).device
    ks = {g: None for g in widths} if sigma is not None else top_k_sizes(widths, ratio, compat)
    # Every group's counts and ranks side by side in one tensor (each group's a view of it), so that
    # one launch selects a layer's groups and writes the ranks in place.
    all_counts = torch.zeros(adapter.n_layers, sum(widths.values()), dtype=torch.int32, device=device)
    counts = dict(zip(widths, all_counts.split(list(widths.values()), dim=1)))
    ranks = None
    if sigma is None:
        all_ranks = torch.zeros(len(seqs), adapter.n_layers, sum(ks.values()), dtype=torch.int32, device=device)
        ranks = dict(zip(ks, all_ranks.split(list(ks.values()), dim=2)))
    timings = {"impacts_s": 0.0}
    weight_norms = {}  # o_proj's and down_proj's column norms, read once per detection
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    rows = None
    try:
        on_triton = resolve_backend(backend, torch.device(device)) == "triton"
    except ValueError as err:
        raise NeurolangError(str(err)) from None
    # On the Triton backend one launch selects, counts and ranks a layer's groups for the whole batch;
    # a k over what one program sorts (ρ·width > 16384: far above the paper's 1 %) takes the twin,
    # also on the device, and the other groups then a launch each. A launch's groups lie side by
    # side in `all_counts` and `all_ranks`.
    kernel_groups = [g for g in widths if on_triton and (ks[g] or 0) <= MAX_TOP_K]
    runs = [kernel_groups] if kernel_groups == list(widths) else [[g] for g in kernel_groups]
    columns = _spans(widths)
    slots = None if sigma is not None else _spans(ks)

    def on_layer(layer, impacts):
        for run in runs:
            values = torch.cat([impacts[g].float() for g in run], dim=1) if len(run) > 1 else impacts[run[0]].float()
            counted = all_counts[layer, columns[run[0]][0]:columns[run[-1]][1]]
            if sigma is not None:
                select_count_triton(values, counted, sigma=sigma, widths=[widths[g] for g in run])
            else:
                select_count_triton(values, counted, k=[ks[g] for g in run], widths=[widths[g] for g in run],
                                    order=all_ranks[:, layer, slots[run[0]][0]:slots[run[-1]][1]], rows=rows)
        for group, values in impacts.items():
            if group in kernel_groups:
                continue
            if sigma is not None:
                counts[group][layer] += select_count_torch(values, sigma=sigma)
            else:
                chosen = top_k_order(values, ks[group])
                counts[group][layer] += count_selected(chosen, values.shape[1])
                ranks[group][rows, layer] = chosen.int()

    for start in range(0, len(order), batch_size):
        rows = torch.tensor(order[start:start + batch_size], device=device)
        batch = [seqs[i] for i in order[start:start + batch_size]]
        ids, mask = pad_batch(batch, pad_id, device)
        compute_impacts(adapter, ids, mask, metric=metric, backend=backend, on_layer=on_layer, timings=timings,
                        compat=compat, weight_norms=weight_norms)
        if progress is not None:
            progress(sum(len(s) for s in batch))
    return counts, ranks, timings["impacts_s"]


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


class LanguageProgress:
    """Each finished language of a long run (detection, evaluation) in OUT/<name>/<lang>.safetensors,
    its tensors and a JSON record, so that a run interrupted after some languages (killed, out of
    memory) computes only the others when re-run. A file is used only when the run's `identity`
    (the model and every option that changes the result) and the language's input (`source`, a
    digest of its text) are those of the run asking."""

    def __init__(self, out_dir, name: str, identity: dict):
        self.dir = Path(out_dir) / name
        self.identity = json.dumps(identity, sort_keys=True)

    def _key(self, lang: str, source: str) -> str:
        return hashlib.sha256(f"{self.identity}|{lang}|{source}".encode()).hexdigest()

    def load(self, lang: str, source: str):
        """(tensors, record) of a finished language, or None."""
        path = self.dir / f"{lang}.safetensors"
        if not path.is_file():
            return None
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != self._key(lang, source):
                return None
            return {name: f.get_tensor(name) for name in f.keys()}, json.loads(meta["record"])

    def save(self, lang: str, source: str, tensors: dict, record) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({k: t.contiguous() for k, t in tensors.items()}, self.dir / f"{lang}.safetensors",
                            {"key": self._key(lang, source), "record": json.dumps(record, ensure_ascii=False)})


def corpus_digest(lines: list[str]) -> str:
    """A short digest of one language's corpus lines, recorded with the line numbers a run took."""
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def check_corpus_unchanged(info: dict, texts: dict[str, list[str]]) -> None:
    """Refuse corpus text that changed since the detection `info` took its line numbers from it:
    they would name other sentences (held-out ones among them) without a word."""
    for lang, lines in texts.items():
        recorded = info["per_language"].get(lang, {}).get("corpus_digest")  # absent in older runs
        if recorded is not None and recorded != corpus_digest(lines):
            raise NeurolangError(f"the {lang} text of corpus {info['options']['corpus']} changed after detection, "
                                 "so the run's line numbers name other sentences: re-run detect")


def check_options(*, ratio, sigma, tau, max_sentences, eval_sentences, max_length, batch_size) -> None:
    """Refuse detection options that have no meaning, with the flag's name, before any work."""
    if sigma is None and not 0 < ratio <= 1:
        raise NeurolangError(f"--ratio must be in (0, 1], got {ratio}")
    if sigma is not None and not sigma >= 0:  # impacts are norms: a negative σ would select every neuron
        raise NeurolangError(f"--sigma must be at least 0, got {sigma}")
    if not 0 < tau <= 1:
        raise NeurolangError(f"--tau must be in (0, 1], got {tau}")
    if batch_size < 1 or max_length < 1 or max_sentences < 1:
        raise NeurolangError("--batch-size, --max-length and --max-sentences must be positive")
    if eval_sentences < 0:
        raise NeurolangError(f"--eval-sentences must be at least 0, got {eval_sentences}")


def detect(model, tokenizer, corpus="builtin", langs=("en", "zh", "th", "fr", "de", "sw"), *, ratio=0.01,
           sigma=None, tau=1.0, max_sentences=200, eval_sentences=40, max_length=128, batch_size=8, seed=0,
           metric="output", backend="auto", text_field="text", model_name=None, progress=True,
           compat=None, resume_dir=None) -> NeuronSets:
    """Detect N_ℓ for each language of a corpus (see `neurolang detect --help` for the options);
    `compat="released-code"` scores and selects as the authors' released code (neurolang.compat).
    With `resume_dir` (the directory the sets will be saved to), each finished language is kept
    there until `NeuronSets.save`, and a re-run after an interruption reuses those it finds."""
    check_options(ratio=ratio, sigma=sigma, tau=tau, max_sentences=max_sentences, eval_sentences=eval_sentences,
                  max_length=max_length, batch_size=batch_size)
    adapter = ModelAdapter(model)
    if compat is not None:
        from neurolang.compat import COMPAT_MODES, check_compatible

        if compat not in COMPAT_MODES:
            raise NeurolangError(f"unknown --compat {compat!r}; choose {', '.join(COMPAT_MODES)}")
        check_compatible(adapter)
    texts = load_corpus(corpus, list(langs), text_field)
    identity = model_identity(model, model_name)
    options = {"corpus": str(corpus), "ratio": ratio, "sigma": sigma, "tau": tau,
               "max_sentences": max_sentences, "eval_sentences": eval_sentences, "max_length": max_length,
               "batch_size": batch_size, "seed": seed, "qk_metric": metric, "backend": backend,
               "text_field": text_field, "compat": compat}
    # Batch size, backend and device are not in the key: the counts do not depend on them.
    counted_by = ("corpus", "ratio", "sigma", "max_sentences", "eval_sentences", "max_length", "seed", "qk_metric",
                  "text_field", "compat")
    kept = None if resume_dir is None else LanguageProgress(resume_dir, PROGRESS_DIR, {
        **identity, **{k: options[k] for k in counted_by}})
    counts, members, ranks, per_lang = {}, {}, {}, {}
    start = time.perf_counter()
    for lang in langs:
        digest = corpus_digest(texts[lang])
        finished = kept.load(lang, digest) if kept is not None else None
        if finished is not None:
            tensors, per_lang[lang] = finished
            counts[lang] = {g: tensors[f"counts.{g}"] for g in GROUPS}
            ranks[lang] = {g: tensors[f"ranks.{g}"] for g in GROUPS} if sigma is None else None
            per_lang[lang]["resumed"] = True
            members[lang] = {g: membership(c, per_lang[lang]["sentences"], tau) for g, c in counts[lang].items()}
            continue
        split = split_indices(len(texts[lang]), max_sentences, eval_sentences, seed)
        seqs, truncated = encode(tokenizer, [texts[lang][i] for i in split.detection], max_length)
        bar = _Progress(lang, sum(map(len, seqs)), progress)
        lang_start = time.perf_counter()
        on_device, lang_ranks, impact_s = count_activations(adapter, seqs, tokenizer.pad_token_id, ratio=ratio,
                                                            sigma=sigma, batch_size=batch_size, metric=metric,
                                                            backend=backend, progress=bar, compat=compat)
        counts[lang] = {g: c.cpu() for g, c in on_device.items()}  # only the counts leave the device
        ranks[lang] = None if lang_ranks is None else {g: r.cpu() for g, r in lang_ranks.items()}
        bar.close()
        elapsed = time.perf_counter() - lang_start
        n = len(seqs)
        members[lang] = {g: membership(c, n, tau) for g, c in counts[lang].items()}
        tokens = sum(map(len, seqs))
        per_lang[lang] = {
            "detection_lines": split.detection, "evaluation_lines": split.evaluation,
            "corpus_digest": digest, "sentences": n,
            "tokens": tokens, "truncated": truncated, "seconds": round(elapsed, 3),
            "impact_seconds": round(impact_s, 3), "tokens_per_second": round(tokens / elapsed, 1),
        }
        if kept is not None:
            tensors = {f"counts.{g}": c for g, c in counts[lang].items()}
            tensors.update({f"ranks.{g}": r for g, r in (ranks[lang] or {}).items()})
            kept.save(lang, digest, tensors, per_lang[lang])
    from neurolang import __version__

    info = {
        "model": model_name, "model_type": adapter.family, "fingerprint": identity["fingerprint"],
        "dtype": identity["dtype"], "n_layers": adapter.n_layers,
        "widths": adapter.widths(), "neuron_count": adapter.neuron_count(), "langs": list(langs),
        "options": options, "per_language": per_lang, "version": __version__,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return NeuronSets(list(langs), counts, members, info, None if sigma is not None else ranks)
