"""Shared, exclusive and unique neurons and their statistics (SPEC §4, Eq. 3–4, Appendix C).

shared = ∩_ℓ N_ℓ;  exclusive_ℓ = N_ℓ \\ shared (the paper's definition: may overlap between
languages);  unique_ℓ = N_ℓ \\ ∪_{ℓ'≠ℓ} N_ℓ' (strictly one language).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from neurolang.adapters import GROUPS
from neurolang.detect import CLASSES_FILE, STATS_FILE, NeuronSets, atomic_save_tensors, atomic_write_text
from neurolang.errors import NeurolangError

COMPONENTS = {"QK": ("q", "k"), "VO": ("v", "o"), "FFN": ("ffn",)}
STAGES = ("early", "middle", "late")


@dataclass
class Classification:
    """Masks {group: bool [n_layers, width]} of every set, and the statistics of `stats.json`."""

    langs: list[str]
    shared: dict[str, torch.Tensor]
    exclusive: dict[str, dict[str, torch.Tensor]]
    unique: dict[str, dict[str, torch.Tensor]]
    stats: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"shared.{g}": self.shared[g] for g in GROUPS}
        for lang in self.langs:
            for g in GROUPS:
                out[f"exclusive.{lang}.{g}"] = self.exclusive[lang][g]
                out[f"unique.{lang}.{g}"] = self.unique[lang][g]
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def save(self, out_dir) -> None:
        out_dir = Path(out_dir)
        atomic_save_tensors(self.tensors(), out_dir / CLASSES_FILE)
        atomic_write_text(json.dumps(self.stats, indent=2) + "\n", out_dir / STATS_FILE)

    @classmethod
    def load(cls, out_dir) -> "Classification":
        out_dir = Path(out_dir)
        tensors = load_file(out_dir / CLASSES_FILE)
        stats = json.loads((out_dir / STATS_FILE).read_text())
        langs = stats["langs"]
        return cls(langs, {g: tensors[f"shared.{g}"] for g in GROUPS},
                   {lang: {g: tensors[f"exclusive.{lang}.{g}"] for g in GROUPS} for lang in langs},
                   {lang: {g: tensors[f"unique.{lang}.{g}"] for g in GROUPS} for lang in langs}, stats)


def _size(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    sizes = {g: int(masks[g].sum()) for g in GROUPS}
    sizes["total"] = sum(sizes.values())
    return sizes


def _per_layer_fraction(masks: dict[str, torch.Tensor]) -> np.ndarray:
    """Fraction of each layer's neurons that are in the set."""
    in_set = sum(masks[g].sum(1).double() for g in GROUPS)
    width = sum(masks[g].shape[1] for g in GROUPS)
    return (in_set / width).numpy()


def _component_shares(masks: dict[str, torch.Tensor]) -> dict[str, float] | None:
    total = sum(int(masks[g].sum()) for g in GROUPS)
    if total == 0:
        return None
    return {c: sum(int(masks[g].sum()) for g in groups) / total for c, groups in COMPONENTS.items()}


def _mean_dicts(dicts) -> dict | None:
    dicts = [d for d in dicts if d is not None]
    if not dicts:
        return None
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}


def parse_layer_stages(text: str) -> list[tuple[int, int]]:
    """"0-7,8-23,24-31" (as the paper's tables print them) as [(0, 7), (8, 23), (24, 31)]."""
    try:
        ranges = [tuple(int(x) for x in part.split("-")) for part in text.split(",")]
    except ValueError:
        ranges = []
    if len(ranges) != 3 or any(len(r) != 2 for r in ranges):
        raise NeurolangError(f"layer stages are three ranges FIRST-LAST, as in 0-7,8-23,24-31; got {text!r}")
    return ranges


def stage_bounds(n_layers: int, layer_stages=None) -> dict[str, list[int]]:
    """Early / middle / late layer ranges: the given (first, last) pairs, which must cover every
    layer in order, or else thirds of the layers (as even as integer division allows)."""
    if layer_stages is None:
        parts = np.array_split(np.arange(n_layers), 3)
        return {stage: [int(p[0]), int(p[-1])] if len(p) else [] for stage, p in zip(STAGES, parts)}
    ranges = [[int(first), int(last)] for first, last in layer_stages]
    starts = [0] + [last + 1 for _, last in ranges[:-1]]
    if len(ranges) != 3 or [first for first, _ in ranges] != starts or ranges[-1][1] != n_layers - 1 \
            or any(last < first for first, last in ranges):
        shown = ",".join(f"{first}-{last}" for first, last in ranges)
        raise NeurolangError(f"layer stages {shown} must be three consecutive, non-empty ranges covering this "
                             f"model's layers 0-{n_layers - 1}")
    return dict(zip(STAGES, ranges))


def classify(sets: NeuronSets, layer_stages=None) -> Classification:
    """Shared / exclusive / unique masks and every statistic of SPEC §4 that needs no perplexity.
    `layer_stages`, three (first, last) layer ranges, sets the early / middle / late stages of the
    layer table (default: thirds; the paper's Tables 3 and 5 use other ranges per model)."""
    langs = sets.langs
    members = sets.members
    shared = {g: torch.stack([members[lang][g] for lang in langs]).all(0) for g in GROUPS}
    exclusive = {lang: {g: members[lang][g] & ~shared[g] for g in GROUPS} for lang in langs}
    unique = {}
    for lang in langs:
        others = [other for other in langs if other != lang]
        unique[lang] = {}
        for g in GROUPS:
            elsewhere = torch.stack([members[o][g] for o in others]).any(0) if others else torch.zeros_like(members[lang][g])
            unique[lang][g] = members[lang][g] & ~elsewhere

    n_llm = sets.info.get("neuron_count") or sum(int(t.numel()) for t in members[langs[0]].values())
    n_layers = members[langs[0]]["ffn"].shape[0]
    sizes = {"shared": _size(shared),
             "language": {lang: _size(members[lang]) for lang in langs},
             "exclusive": {lang: _size(exclusive[lang]) for lang in langs},
             "unique": {lang: _size(unique[lang]) for lang in langs}}
    mean_exclusive = float(np.mean([sizes["exclusive"][lang]["total"] for lang in langs]))
    if mean_exclusive > 0:
        ratio, ratio_reason = sizes["shared"]["total"] / mean_exclusive, None
    else:
        ratio, ratio_reason = None, "no language has exclusive neurons (mean |exclusive| = 0)"
    fractions = {lang: {"language": sizes["language"][lang]["total"] / n_llm,
                        "shared": sizes["shared"]["total"] / n_llm,
                        "exclusive": sizes["exclusive"][lang]["total"] / n_llm,
                        "unique": sizes["unique"][lang]["total"] / n_llm} for lang in langs}
    per_layer = {"shared": _per_layer_fraction(shared),
                 "exclusive": np.mean([_per_layer_fraction(exclusive[lang]) for lang in langs], 0),
                 "unique": np.mean([_per_layer_fraction(unique[lang]) for lang in langs], 0)}
    bounds = stage_bounds(n_layers, layer_stages)
    stages = {}
    for stage, rng in bounds.items():
        stages[stage] = {name: float(values[rng[0]:rng[1] + 1].mean()) if rng else None
                         for name, values in per_layer.items()}
    components = {"shared": _component_shares(shared),
                  "exclusive": _mean_dicts(_component_shares(exclusive[lang]) for lang in langs),
                  "unique": _mean_dicts(_component_shares(unique[lang]) for lang in langs)}
    stats = {
        "langs": langs, "neuron_count": n_llm, "n_layers": n_layers, "sizes": sizes,
        "shared_ratio": ratio, "shared_ratio_undefined": ratio_reason,
        "fractions": fractions,
        "layers": {"stage_bounds": bounds, "stages": stages,
                   "per_layer": {k: [float(x) for x in v] for k, v in per_layer.items()}},
        "components": components,
    }
    return Classification(langs, shared, exclusive, unique, stats)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def format_table(stats: dict) -> str:
    """The statistics as readable tables (sizes, Fig. 2 fractions, Tables 2–5)."""
    langs = stats["langs"]
    lines = [f"|LLM| = {stats['neuron_count']:,} neurons in {stats['n_layers']} layers; "
             f"|shared| = {stats['sizes']['shared']['total']:,}; shared neuron ratio (Eq. 4) = "
             + (f"{stats['shared_ratio']:.3f}" if stats["shared_ratio"] is not None
                else f"undefined ({stats['shared_ratio_undefined']})"), ""]
    if len(langs) == 1:
        lines[-1:-1] = [f"one language: 'shared' is N_{langs[0]} itself; shared and exclusive neurons need two or more"]
    lines.append(f"{'lang':<6}{'|N_l|':>9}{'|excl|':>9}{'|uniq|':>9}{'N_l %':>9}{'shared %':>10}{'excl %':>9}{'uniq %':>9}")
    for lang in langs:
        f = stats["fractions"][lang]
        s = stats["sizes"]
        lines.append(f"{lang:<6}{s['language'][lang]['total']:>9}{s['exclusive'][lang]['total']:>9}"
                     f"{s['unique'][lang]['total']:>9}{_pct(f['language']):>9}{_pct(f['shared']):>10}"
                     f"{_pct(f['exclusive']):>9}{_pct(f['unique']):>9}")
    lines += ["", "components (share of each set, %):", f"{'':<6}{'shared':>9}{'excl':>9}{'uniq':>9}"]
    for comp in COMPONENTS:
        row = [(stats["components"][name] or {}).get(comp) for name in ("shared", "exclusive", "unique")]
        lines.append(f"{comp:<6}" + "".join(f"{_pct(x):>9}" for x in row))
    lines += ["", "layer stages (mean % of a layer's neurons):", f"{'':<16}{'shared':>9}{'excl':>9}{'uniq':>9}"]
    for stage, rng in stats["layers"]["stage_bounds"].items():
        row = stats["layers"]["stages"][stage]
        label = f"{stage} ({rng[0]}-{rng[1]})" if rng else stage
        lines.append(f"{label:<16}" + "".join(f"{_pct(row[n]):>9}" for n in ("shared", "exclusive", "unique")))
    return "\n".join(lines)


# Options of a detection that change its sets; how two runs differ in them is printed with a comparison.
_SET_OPTIONS = ("corpus", "ratio", "sigma", "tau", "max_sentences", "max_length", "seed", "qk_metric", "compat")


def _overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Sizes, intersection and Jaccard index of two sets of neurons, in all and per group."""
    def counts(groups):
        n_a = sum(int(a[g].sum()) for g in groups)
        n_b = sum(int(b[g].sum()) for g in groups)
        both = sum(int((a[g] & b[g]).sum()) for g in groups)
        union = n_a + n_b - both
        return n_a, n_b, both, (both / union if union else None)

    n_a, n_b, both, jaccard = counts(GROUPS)
    return {"a": n_a, "b": n_b, "both": both, "jaccard": jaccard,
            "a_in_b": both / n_a if n_a else None, "b_in_a": both / n_b if n_b else None,
            "jaccard_by_group": {g: counts((g,))[3] for g in GROUPS}}


def compare(a: NeuronSets, b: NeuronSets) -> dict:
    """How the sets of two detections of one model shape overlap: N_ℓ, exclusive_ℓ and unique_ℓ of
    the languages both have, and shared (over each run's own languages). For the stability of the
    sets across corpora, seeds, ρ or τ, the two Q/K metrics, `--compat released-code`, or a model
    before and after training."""
    if a.info.get("widths") != b.info.get("widths") or a.info.get("n_layers") != b.info.get("n_layers"):
        raise NeurolangError("the two runs have different neuron universes (another model shape): nothing to compare")
    langs = [lang for lang in a.langs if lang in b.langs]
    if not langs:
        raise NeurolangError(f"the two runs have no language in common ({', '.join(a.langs)} and {', '.join(b.langs)})")
    ca, cb = classify(a), classify(b)
    sets = {f"N.{lang}": _overlap(a.members[lang], b.members[lang]) for lang in langs}
    sets["shared"] = _overlap(ca.shared, cb.shared)
    sets.update({f"exclusive.{lang}": _overlap(ca.exclusive[lang], cb.exclusive[lang]) for lang in langs})
    sets.update({f"unique.{lang}": _overlap(ca.unique[lang], cb.unique[lang]) for lang in langs})
    options_a, options_b = a.info.get("options", {}), b.info.get("options", {})
    differences = {k: [options_a.get(k), options_b.get(k)] for k in _SET_OPTIONS if options_a.get(k) != options_b.get(k)}
    if a.langs != b.langs:
        differences["langs"] = [a.langs, b.langs]
    return {"models": [a.info.get("model"), b.info.get("model")],
            "same_fingerprint": a.info.get("fingerprint") == b.info.get("fingerprint"),
            "langs": langs, "option_differences": differences, "sets": sets}


def format_comparison(result: dict, names=("A", "B")) -> str:
    """The overlap table of `compare`, one row per set."""
    def num(x, digits=3):
        return "—" if x is None else f"{x:.{digits}f}"

    a, b = names
    lines = [f"A: {a} ({result['models'][0]})", f"B: {b} ({result['models'][1]})"]
    if not result["same_fingerprint"]:
        lines.append("the two runs were detected on different models (their fingerprints differ)")
    for option, (x, y) in result["option_differences"].items():
        lines.append(f"options differ: {option} {x} (A) vs {y} (B)")
    lines += ["", f"{'set':<14}{'|A|':>8}{'|B|':>8}{'|A∩B|':>8}{'Jaccard':>9}{'A in B':>8}{'B in A':>8}  "
              + "".join(f"{g:>6}" for g in GROUPS)]
    for name, o in result["sets"].items():
        lines.append(f"{name:<14}{o['a']:>8}{o['b']:>8}{o['both']:>8}{num(o['jaccard']):>9}{num(o['a_in_b'], 2):>8}"
                     f"{num(o['b_in_a'], 2):>8}  " + "".join(f"{num(o['jaccard_by_group'][g], 2):>6}" for g in GROUPS))
    lines.append("Jaccard = |A∩B| / |A∪B| (in all, then per group); A in B = |A∩B| / |A|; — where a set is empty")
    return "\n".join(lines)
