"""Functional importance of the neuron sets (SPEC §4, Eq. 5–6, Fig. 4, Appendix B).

PPL_ℓ = exp(total NLL / total predicted tokens) on ℓ's held-out evaluation split;
ΔPPL = PPL with a set deactivated − base PPL;
Imp_ℓ = (ΔPPL_ℓ(shared) / |shared|) / (ΔPPL_ℓ(exclusive_ℓ) / |exclusive_ℓ|);
LAS = log(1 + mean_ℓ Imp_ℓ) (Imp = 1 ⇔ LAS = log 2).
How far Imp and LAS rest on the few held-out sentences is shown by a bootstrap over them.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from neurolang.ablate import deactivated, random_control, set_size
from neurolang.adapters import ModelAdapter
from neurolang.classify import classify
from neurolang.corpus import encode, load_corpus, pad_batch
from neurolang.detect import SCORES_FILE, STATS_FILE, NeuronSets, atomic_write_text, check_corpus_unchanged, model_fingerprint
from neurolang.errors import NeurolangError

LOW_BOUNDARY = math.log(2)  # below: shared neurons matter less per neuron than exclusive ones
HIGH_BOUNDARY = math.log(11)  # from here: shared neurons matter ten times as much per neuron
STRATEGIES = {"low": "all", "medium": "shared", "high": "exclusive"}


def sentence_nll(model, seqs, pad_id: int, batch_size: int = 8):
    """Per token sequence, the summed NLL of its predicted tokens (float64) and their number:
    two numpy arrays in the order of `seqs`. A float32 log-softmax, in length-sorted padded
    batches (padding changes nothing)."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    nll, count = np.zeros(len(seqs)), np.zeros(len(seqs), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in rows], pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits[:, :-1]
            token_nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            valid = mask[:, 1:]
            nll[rows] = (token_nll.double() * valid).sum(1).cpu().numpy()
            count[rows] = valid.sum(1).cpu().numpy()
    return nll, count


def ppl_of(nll, count) -> float:
    """exp(Σ NLL / Σ predicted tokens) of `sentence_nll`'s arrays."""
    if count.sum() == 0:
        raise NeurolangError("the evaluation split has no predicted tokens (every sentence is one token long)")
    return math.exp(nll.sum() / count.sum())


def perplexity(model, seqs, pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted perplexity of token sequences: exp(Σ NLL / Σ predicted tokens)."""
    return ppl_of(*sentence_nll(model, seqs, pad_id, batch_size))


def importance(d_shared: float, n_shared: int, d_exclusive: float, n_exclusive: int):
    """(Imp_ℓ, None) or (None, reason) when Eq. 5 is undefined."""
    if n_shared == 0:
        return None, "no shared neurons"
    if n_exclusive == 0:
        return None, "no exclusive neurons for this language"
    if d_exclusive <= 0:
        return None, f"deactivating the exclusive neurons did not raise PPL (ΔPPL = {d_exclusive:.4g})"
    return (d_shared / n_shared) / (d_exclusive / n_exclusive), None


def language_agnostic_score(imps: dict):
    """(LAS, None) over the defined Imp_ℓ, or (None, reason)."""
    defined = [v for v in imps.values() if v is not None]
    if not defined:
        return None, "Imp is undefined for every language"
    mean = sum(defined) / len(defined)
    if mean <= -1:
        return None, f"mean Imp = {mean:.4g} ≤ −1"
    return math.log1p(mean), None


def bootstrap_intervals(base: dict, shared: dict, exclusive: dict, n_shared: int, n_exclusive: dict, las_langs,
                        resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals of Imp_ℓ and LAS over resamples of each language's evaluation sentences.

    `base`, `shared` and `exclusive` map a language to its `sentence_nll` arrays with nothing, the
    shared neurons and exclusive_ℓ deactivated; one resample of a language's sentences serves all
    three (the differences are paired). LAS takes `las_langs` (those whose Imp is defined on all
    the sentences); a resample where one of them is undefined (ΔPPL_excl ≤ 0) gives no LAS, and
    the share of resamples that gave one is reported beside the interval."""
    rng = np.random.default_rng(seed)
    tails = [50 * (1 - level), 100 - 50 * (1 - level)]
    imp_draws, imps, defined = {}, {}, {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for lang in base:
            n = len(base[lang][0])
            picks = rng.integers(0, n, size=(resamples, n))

            def ppl(pair):
                return np.exp(pair[0][picks].sum(1) / pair[1][picks].sum(1))

            if not n_shared or not n_exclusive[lang]:
                imps[lang] = None
                continue
            base_ppl = ppl(base[lang])
            d_shared, d_exclusive = ppl(shared[lang]) - base_ppl, ppl(exclusive[lang]) - base_ppl
            draws = np.where(d_exclusive > 0, (d_shared / n_shared) / (d_exclusive / n_exclusive[lang]), np.nan)
            imp_draws[lang] = draws
            defined[lang] = float(np.isfinite(draws).mean())
            imps[lang] = np.percentile(draws[np.isfinite(draws)], tails).tolist() if defined[lang] else None
        las = None
        if las_langs:
            mean = np.mean([imp_draws[lang] for lang in las_langs], 0)
            draws = np.where(mean > -1, np.log1p(mean), np.nan)
            defined["las"] = float(np.isfinite(draws).mean())
            las = np.percentile(draws[np.isfinite(draws)], tails).tolist() if defined["las"] else None
    return {"level": level, "resamples": resamples, "seed": seed, "imp": imps, "las": las, "defined": defined}


def stage_of(las, low: float = LOW_BOUNDARY, high: float = HIGH_BOUNDARY):
    if las is None:
        return None
    return "low" if las < low else "medium" if las < high else "high"


def evaluation_texts(info: dict, tokenizer):
    """Token ids of each language's held-out evaluation lines of a detection run: {lang: [ids]}."""
    options = info["options"]
    texts = load_corpus(options["corpus"], info["langs"], options["text_field"])
    check_corpus_unchanged(info, texts)
    seqs = {}
    for lang in info["langs"]:
        lines = info["per_language"][lang]["evaluation_lines"]
        if not lines:
            raise NeurolangError(f"{lang} has no evaluation sentences: re-run detect with --eval-sentences > 0")
        seqs[lang], _ = encode(tokenizer, [texts[lang][i] for i in lines], options["max_length"])
    return seqs


def validate_threshold(sets: NeuronSets, ppl_with, base: dict, tolerance: float, shrink: float, seed: int,
                       max_steps: int = 10):
    """Appendix B: while deactivating a random control of the size of some N_ℓ raises ℓ's PPL by
    more than `tolerance`, multiply ρ by `shrink` and re-select from the recorded ranks."""
    steps = []
    for _ in range(max_steps):
        ratio = sets.info["options"]["ratio"]
        rises = {}
        for i, lang in enumerate(sets.langs):
            control = random_control(sets.members[lang], "uniform", seed + i)
            rises[lang] = ppl_with(control, [lang])[lang] / base[lang] - 1 if set_size(control) else 0.0
        worst = max(rises, key=rises.get)
        steps.append({"ratio": ratio, "sizes": {l: set_size(sets.members[l]) for l in sets.langs},
                      "random_ppl_rise": rises, "passed": rises[worst] <= tolerance})
        if rises[worst] <= tolerance:
            return sets, steps
        smaller = sets.reselect(ratio * shrink)
        if all(smaller.counts[l][g].sum() == sets.counts[l][g].sum() for l in sets.langs for g in smaller.counts[l]):
            steps[-1]["note"] = "ρ cannot go lower (k = 1 in every group)"
            return sets, steps
        sets = smaller
    steps[-1]["note"] = f"stopped after {max_steps} steps"
    return sets, steps


def _layer_stages_of(run_dir: Path):
    """The layer stages of the run's earlier classification (`classify --layer-stages`), kept when
    scoring classifies again; None (thirds) without one."""
    stats_file = run_dir / STATS_FILE
    if not stats_file.is_file():
        return None
    ranges = list(json.loads(stats_file.read_text())["layers"]["stage_bounds"].values())
    return ranges if all(ranges) else None


def check_options(*, batch_size, low, high, tolerance, shrink, bootstrap) -> None:
    """Refuse scoring options that have no meaning, with the flag's name, before any work."""
    if batch_size < 1:
        raise NeurolangError(f"--batch-size must be positive, got {batch_size}")
    if not low < high:
        raise NeurolangError(f"--low must be below --high, got {low} and {high}")
    if not tolerance >= 0:
        raise NeurolangError(f"--tolerance must be at least 0, got {tolerance}")
    if not 0 < shrink < 1:
        raise NeurolangError(f"--shrink must be in (0, 1), got {shrink}")
    if bootstrap < 0:
        raise NeurolangError(f"--bootstrap must be at least 0, got {bootstrap}")


def score(model, tokenizer, run_dir, *, batch_size: int = 8, seed: int = 0, low: float = LOW_BOUNDARY,
          high: float = HIGH_BOUNDARY, validate: bool = False, tolerance: float = 0.05, shrink: float = 0.5,
          bootstrap: int = 1000, progress: bool = False) -> dict:
    """Base PPL, ΔPPL for shared / exclusive_ℓ / random controls, Imp_ℓ, LAS and stage, with 95 %
    intervals of Imp_ℓ and LAS from `bootstrap` resamples of the evaluation sentences (0: none);
    saved to RUN/scores.json. With `validate`, the threshold is validated first (and the run's
    neuron files are rewritten at the validated ρ). `progress` shows the perplexity passes on stderr."""
    from tqdm.auto import tqdm

    check_options(batch_size=batch_size, low=low, high=high, tolerance=tolerance, shrink=shrink, bootstrap=bootstrap)
    run_dir = Path(run_dir)
    start = time.perf_counter()
    sets = NeuronSets.load(run_dir)
    if sets.info.get("fingerprint") and model_fingerprint(model) != sets.info["fingerprint"]:
        raise NeurolangError(f"this model is not the one {run_dir} was detected with ({sets.info.get('model')})")
    adapter = ModelAdapter(model)
    seqs = evaluation_texts(sets.info, tokenizer)
    langs = sets.langs
    pad = tokenizer.pad_token_id

    # One pass per (model state, language): base, shared and its two controls on every language,
    # exclusive_ℓ and its two controls on ℓ; threshold validation's passes, of unknown number, come
    # between base and the rest.
    bar = tqdm(total=None if validate else 7 * len(langs), desc="score", unit="pass", disable=not progress,
               leave=False)

    def nll_on(on_langs):
        out = {}
        for lang in on_langs:
            out[lang] = sentence_nll(model, seqs[lang], pad, batch_size)
            bar.update()
        return out

    def nll_with(masks, on_langs):
        with deactivated(adapter, masks):
            return nll_on(on_langs)

    def ppl_with(masks, on_langs):
        return {lang: ppl_of(*pair) for lang, pair in nll_with(masks, on_langs).items()}

    results, per_sentence = {}, {}

    def measure(name, masks, on_langs):
        """results[name]: PPL with `masks` off (the base PPL where the set is empty: nothing to
        deactivate); the per-sentence values stay in per_sentence[name] for the bootstrap."""
        size = set_size(masks)
        if size:
            per_sentence[name] = nll_with(masks, on_langs)
        else:
            bar.update(len(on_langs))
            per_sentence[name] = {lang: base_nll[lang] for lang in on_langs}
        results[name] = {"size": size,
                         "ppl": {lang: ppl_of(*pair) for lang, pair in per_sentence[name].items()}}

    base_nll = nll_on(langs)
    base = {lang: ppl_of(*pair) for lang, pair in base_nll.items()}
    steps = None
    if validate:
        sets, steps = validate_threshold(sets, ppl_with, base, tolerance, shrink, seed)
        sets.info["threshold_validation"] = steps
        sets.save(run_dir)
        bar.total = bar.n + 6 * len(langs)
        bar.refresh()
    classes = classify(sets, layer_stages=_layer_stages_of(run_dir))
    classes.save(run_dir)
    n_shared = set_size(classes.shared)
    measure("shared", classes.shared, langs)
    for kind in ("uniform", "matched"):
        measure(f"random_{kind}.shared", random_control(classes.shared, kind, seed), langs)
    for i, lang in enumerate(langs):
        measure(f"exclusive.{lang}", classes.exclusive[lang], [lang])
        for kind in ("uniform", "matched"):
            control = random_control(classes.exclusive[lang], kind, seed + 1 + i)
            measure(f"random_{kind}.exclusive.{lang}", control, [lang])
    bar.close()
    for entry in results.values():
        entry["delta_ppl"] = {lang: entry["ppl"][lang] - base[lang] for lang in entry["ppl"]}
    imps, reasons = {}, {}
    for lang in langs:
        imps[lang], reason = importance(results["shared"]["delta_ppl"][lang], n_shared,
                                        results[f"exclusive.{lang}"]["delta_ppl"][lang], results[f"exclusive.{lang}"]["size"])
        if reason:
            reasons[lang] = reason
    las, las_reason = language_agnostic_score(imps)
    intervals = None if not bootstrap else bootstrap_intervals(
        base_nll, per_sentence["shared"], {lang: per_sentence[f"exclusive.{lang}"][lang] for lang in langs}, n_shared,
        {lang: results[f"exclusive.{lang}"]["size"] for lang in langs}, [l for l in langs if imps[l] is not None],
        resamples=bootstrap, seed=seed)
    stage = stage_of(las, low, high)
    scores = {
        "model": sets.info.get("model"), "langs": langs, "base_ppl": base, "sets": results,
        "imp": imps, "imp_undefined": reasons, "las": las, "las_undefined": las_reason, "intervals": intervals,
        "stage": stage, "strategy": STRATEGIES.get(stage), "stage_boundaries": {"low": low, "high": high},
        "ratio": sets.info["options"]["ratio"], "threshold_validation": steps,
        "evaluation_sentences": {lang: len(seqs[lang]) for lang in langs},
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", run_dir / SCORES_FILE)
    return scores


def _num(x, digits=3):
    return "undef" if x is None else f"{x:.{digits}g}"


def format_scores(scores: dict) -> str:
    """A table shaped like Figure 4 (ΔPPL by language for random / shared / exclusive), Imp and LAS."""
    sets = scores["sets"]
    intervals = scores.get("intervals")

    def interval(bounds):
        return "" if not bounds else f"{bounds[0]:.3g}–{bounds[1]:.3g}"

    lines = [f"{'lang':<6}{'base PPL':>10}{'Δ rand-u':>10}{'Δ rand-m':>10}{'Δ shared':>10}{'Δ excl':>10}"
             f"{'Δ rand-ex':>10}{'Imp':>9}" + (f"  {intervals['level']:.0%} interval" if intervals else "")]
    for lang in scores["langs"]:
        lines.append(
            f"{lang:<6}{_num(scores['base_ppl'][lang], 4):>10}"
            f"{_num(sets['random_uniform.shared']['delta_ppl'][lang]):>10}"
            f"{_num(sets['random_matched.shared']['delta_ppl'][lang]):>10}"
            f"{_num(sets['shared']['delta_ppl'][lang]):>10}"
            f"{_num(sets[f'exclusive.{lang}']['delta_ppl'][lang]):>10}"
            f"{_num(sets[f'random_uniform.exclusive.{lang}']['delta_ppl'][lang]):>10}"
            f"{_num(scores['imp'][lang]):>9}" + (f"  {interval(intervals['imp'][lang])}" if intervals else ""))
    lines.append(f"|shared| = {sets['shared']['size']}; random controls have the same sizes "
                 "(rand-u: uniform over all neurons, rand-m: matched per layer and group)")
    for lang, reason in scores["imp_undefined"].items():
        lines.append(f"Imp_{lang} undefined: {reason}")
    las = "undefined (" + scores["las_undefined"] + ")" if scores["las"] is None else f"{scores['las']:.4f}"
    lines.append(f"Language Agnostic Score = {las} (log 2 = {math.log(2):.4f}); stage: {scores['stage']}"
                 + (f" -> train {scores['strategy']} neurons" if scores["strategy"] else ""))
    if intervals and intervals["las"]:
        lines.append(f"{intervals['level']:.0%} interval of LAS: {interval(intervals['las'])} (over "
                     f"{intervals['resamples']} resamples of the evaluation sentences, "
                     f"{intervals['defined']['las']:.0%} of them with every Imp defined)")
        boundaries = scores["stage_boundaries"]
        reach = [stage_of(x, boundaries["low"], boundaries["high"]) for x in intervals["las"]]
        if reach[0] != reach[1]:
            lines.append(f"the interval reaches from stage {reach[0]} to {reach[1]}: more evaluation sentences "
                         "(detect --eval-sentences) would settle the stage")
    return "\n".join(lines)
