"""Deactivation, perplexity, random controls, Imp / LAS and threshold validation."""
import json
import math

import numpy as np
import pytest
import torch

import neurolang.score
from neurolang.ablate import deactivated, empty_masks, random_control, set_size, union
from neurolang.adapters import GROUPS, ModelAdapter
from neurolang.cli import main
from neurolang.corpus import BUILTIN_DIR, encode
from neurolang.detect import NeuronSets, detect
from neurolang.models import load_model
from neurolang.score import importance, language_agnostic_score, perplexity, stage_of
from neurolang.tiny import byte_tokenizer, tiny_model

SENTENCES = ["The cat sleeps.", "Le chat dort sur le toit chaud.", "Paka amelala."]


def some_masks(adapter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.rand(adapter.n_layers, w, generator=gen) < 0.2 for g, w in adapter.widths().items()}


def zero_in_place(adapter, masks):
    """Literally zero every parameter the masked neurons own (SPEC §1), biases included."""
    with torch.no_grad():
        for layer in adapter.layers:
            i = layer.index
            for g, lins in (("ffn", (layer.gate_proj, layer.up_proj)), ("q", (layer.q_proj,)),
                            ("k", (layer.k_proj,)), ("v", (layer.v_proj,))):
                rows = masks[g][i]
                for lin in lins:
                    lin.weight[rows] = 0
                    if lin.bias is not None:
                        lin.bias[rows] = 0
            layer.o_proj.weight[:, masks["o"][i]] = 0


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "llama"])
def test_masking_equals_zeroing_parameters(family):
    tokenizer = byte_tokenizer()
    ids = tokenizer(SENTENCES[:1], return_tensors="pt").input_ids
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    masks = some_masks(adapter)
    with torch.no_grad():
        base = model(ids).logits
        with deactivated(adapter, masks):
            masked = model(ids).logits
        assert torch.equal(model(ids).logits, base)  # undone on exit
        zeroed_model = tiny_model(family)
        zero_in_place(ModelAdapter(zeroed_model), masks)
        zeroed = zeroed_model(ids).logits
    assert not torch.allclose(masked, base)
    torch.testing.assert_close(masked, zeroed, rtol=1e-5, atol=1e-5)


def test_deactivation_composes():
    tokenizer = byte_tokenizer()
    ids = tokenizer(SENTENCES[:1], return_tensors="pt").input_ids
    model = tiny_model("mistral")
    adapter = ModelAdapter(model)
    a, b = some_masks(adapter, 1), some_masks(adapter, 2)
    with torch.no_grad(), deactivated(adapter, a), deactivated(adapter, b):
        nested = model(ids).logits
    with torch.no_grad(), deactivated(adapter, union(a, b)):
        together = model(ids).logits
    torch.testing.assert_close(nested, together, rtol=1e-6, atol=1e-6)


def test_perplexity_by_hand_and_batch_invariant():
    tokenizer = byte_tokenizer()
    model = tiny_model("gemma2")
    seqs, _ = encode(tokenizer, SENTENCES, 64)
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in seqs:
            logits = model(torch.tensor([seq])).logits[0].double()
            for t in range(len(seq) - 1):
                nll -= float(torch.log_softmax(logits[t], -1)[seq[t + 1]])
                count += 1
    expected = math.exp(nll / count)
    for batch_size in (1, 2, 3):
        assert perplexity(model, seqs, tokenizer.pad_token_id, batch_size) == pytest.approx(expected, rel=1e-5)


def test_random_controls():
    adapter = ModelAdapter(tiny_model("llama"))
    masks = some_masks(adapter, 3)
    for kind in ("matched", "uniform"):
        control = random_control(masks, kind, seed=7)
        assert set_size(control) == set_size(masks)
        again = random_control(masks, kind, seed=7)
        assert all(torch.equal(control[g], again[g]) for g in GROUPS)
        other = random_control(masks, kind, seed=8)
        assert not all(torch.equal(control[g], other[g]) for g in GROUPS)
    matched = random_control(masks, "matched", seed=7)
    for g in GROUPS:
        assert torch.equal(matched[g].sum(1), masks[g].sum(1))
    assert set_size(random_control(empty_masks(adapter), "uniform", 0)) == 0


def test_imp_las_and_stage_by_hand():
    imp, reason = importance(d_shared=30.0, n_shared=10, d_exclusive=12.0, n_exclusive=40)
    assert reason is None and imp == pytest.approx((30 / 10) / (12 / 40))  # 10
    las, _ = language_agnostic_score({"en": 10.0, "fr": 2.0, "sw": None})
    assert las == pytest.approx(math.log(1 + 6.0))
    assert language_agnostic_score({"en": 1.0})[0] == pytest.approx(math.log(2))
    assert stage_of(math.log(2) - 1e-9) == "low" and stage_of(math.log(2)) == "medium"
    assert stage_of(math.log(11)) == "high" and stage_of(None) is None


def test_bootstrap_intervals_match_a_loop():
    """The vectorised bootstrap against a plain loop over the same resamples, using `importance`
    and `language_agnostic_score` themselves; and resamples of identical sentences change nothing."""
    gen = np.random.default_rng(5)

    def sentences(n, scale):
        return gen.uniform(1, 3, n) * scale, gen.integers(1, 6, n)

    langs = {"en": 7, "fr": 5}
    base = {l: sentences(n, 1.0) for l, n in langs.items()}
    shared = {l: (base[l][0] * gen.uniform(1.2, 2.0, n), base[l][1]) for l, n in langs.items()}
    exclusive = {l: (base[l][0] * gen.uniform(0.9, 1.3, n), base[l][1]) for l, n in langs.items()}
    n_exclusive = {"en": 40, "fr": 30}
    got = neurolang.score.bootstrap_intervals(base, shared, exclusive, 10, n_exclusive, ["en", "fr"],
                                              resamples=60, seed=3)
    rng, draws = np.random.default_rng(3), {}
    for lang, n in langs.items():
        picks = rng.integers(0, n, size=(60, n))
        draws[lang] = []
        for row in picks:
            ppl = {name: math.exp(sets[lang][0][row].sum() / sets[lang][1][row].sum())
                   for name, sets in (("base", base), ("shared", shared), ("exclusive", exclusive))}
            draws[lang].append(importance(ppl["shared"] - ppl["base"], 10, ppl["exclusive"] - ppl["base"],
                                          n_exclusive[lang])[0])
    for lang in langs:
        defined = [d for d in draws[lang] if d is not None]
        assert got["defined"][lang] == len(defined) / 60 and 0 < len(defined) < 60  # some resamples undefined
        assert got["imp"][lang] == pytest.approx(np.percentile(defined, [2.5, 97.5]).tolist(), rel=1e-12)
    las = [language_agnostic_score({"en": en, "fr": fr})[0] for en, fr in zip(draws["en"], draws["fr"])
           if en is not None and fr is not None]
    assert got["defined"]["las"] == len(las) / 60
    assert got["las"] == pytest.approx(np.percentile(las, [2.5, 97.5]).tolist(), rel=1e-12)

    same = {"en": (np.full(4, 2.0), np.ones(4, dtype=np.int64))}  # identical sentences: every resample equal
    flat = neurolang.score.bootstrap_intervals(same, {"en": (same["en"][0] + 1, same["en"][1])},
                                               {"en": (same["en"][0] + 0.5, same["en"][1])}, 10, {"en": 40}, ["en"])
    imp = ((math.exp(3) - math.exp(2)) / 10) / ((math.exp(2.5) - math.exp(2)) / 40)
    assert flat["imp"]["en"] == pytest.approx([imp, imp]) and flat["las"] == pytest.approx([math.log1p(imp)] * 2)


def test_imp_degenerate_cases():
    assert importance(1.0, 0, 1.0, 5) == (None, "no shared neurons")
    assert importance(1.0, 5, 1.0, 0) == (None, "no exclusive neurons for this language")
    value, reason = importance(1.0, 5, -0.5, 5)
    assert value is None and "did not raise PPL" in reason
    las, reason = language_agnostic_score({"en": None, "fr": None})
    assert las is None and reason == "Imp is undefined for every language"
    assert language_agnostic_score({"en": -3.0})[0] is None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for lang in ("en", "fr"):
        lines = (BUILTIN_DIR / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:16]
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_reselect_equals_detecting_with_the_smaller_ratio(corpus):
    model, tokenizer = tiny_model("qwen3"), byte_tokenizer()
    options = dict(langs=["en", "fr"], max_sentences=10, eval_sentences=4, max_length=40, tau=0.5, progress=False)
    wide = detect(model, tokenizer, str(corpus), ratio=0.2, **options)
    narrow = detect(model, tokenizer, str(corpus), ratio=0.05, **options)
    reselected = wide.reselect(0.05)
    for key, value in narrow.tensors().items():
        assert torch.equal(value, reselected.tensors()[key]), key


def test_score_command(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["detect", "--model", "tiny:gemma", "--corpus", str(corpus), "--langs", "en,fr", "--ratio", "0.2",
                 "--tau", "0.5", "--max-sentences", "10", "--eval-sentences", "5", "--out", str(out)]) == 0
    assert main(["score", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Language Agnostic Score" in printed
    scores = json.loads((out / "scores.json").read_text())
    intervals = scores["intervals"]  # 95 % bootstrap intervals over the evaluation sentences
    assert intervals["resamples"] == 1000 and intervals["level"] == 0.95
    if scores["las"] is not None:
        assert intervals["las"][0] <= intervals["las"][1] and "interval" in printed
    intervals.update(las=[math.log(2) - 0.1, math.log(2) + 0.1], defined={"las": 1.0})  # across the low boundary
    assert "the interval reaches from stage low to medium" in neurolang.score.format_scores(scores)
    assert scores["evaluation_sentences"] == {"en": 5, "fr": 5}
    for name, entry in scores["sets"].items():
        for lang, delta in entry["delta_ppl"].items():
            assert delta == pytest.approx(entry["ppl"][lang] - scores["base_ppl"][lang])
    n_shared = scores["sets"]["shared"]["size"]
    assert scores["sets"]["random_uniform.shared"]["size"] == n_shared
    assert set(scores["sets"]["shared"]["ppl"]) == {"en", "fr"}  # shared sets on every language,
    assert set(scores["sets"]["exclusive.fr"]["ppl"]) == {"fr"}  # exclusive_ℓ on ℓ alone (Eq. 5)
    for lang in ("en", "fr"):
        imp = scores["imp"][lang]
        if imp is not None:
            d_s = scores["sets"]["shared"]["delta_ppl"][lang]
            excl = scores["sets"][f"exclusive.{lang}"]
            assert imp == pytest.approx((d_s / n_shared) / (excl["delta_ppl"][lang] / excl["size"]))
        else:
            assert lang in scores["imp_undefined"]


def counted_nll(passes: list):
    """A stand-in for sentence_nll that records its passes: pass i gives PPL 1 + i (one token of
    NLL log(1 + i) a sentence)."""
    def fake(model, seqs, *args):
        passes.append(seqs)
        return np.full(len(seqs), math.log(1.0 + len(passes))), np.ones(len(seqs), dtype=np.int64)
    return fake


def test_score_keeps_the_layer_stages_of_the_classification(corpus, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from neurolang.classify import Classification, classify
    from neurolang.tiny import CONFIGS, random_weights_

    config = CONFIGS["llama"]()
    config.num_hidden_layers = 4  # four layers: stages other than thirds exist
    model = random_weights_(AutoModelForCausalLM.from_config(config).eval())
    tokenizer = byte_tokenizer()
    sets = detect(model, tokenizer, corpus, ["en", "fr"], ratio=0.2, tau=0.5, max_sentences=4, eval_sentences=2)
    sets.save(tmp_path)
    classify(sets, layer_stages=[(0, 0), (1, 2), (3, 3)]).save(tmp_path)
    monkeypatch.setattr(neurolang.score, "sentence_nll", counted_nll([]))
    neurolang.score.score(model, tokenizer, tmp_path)
    assert Classification.load(tmp_path).stats["layers"]["stage_bounds"] == {"early": [0, 0], "middle": [1, 2],
                                                                              "late": [3, 3]}


def test_one_perplexity_pass_per_model_state_and_language(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["detect", "--model", "tiny:gemma", "--corpus", str(corpus), "--langs", "en,fr", "--ratio", "0.2",
                 "--tau", "0.5", "--max-sentences", "10", "--eval-sentences", "5", "--out", str(out)]) == 0
    passes = []
    monkeypatch.setattr(neurolang.score, "sentence_nll", counted_nll(passes))
    model, tokenizer = load_model("tiny:gemma")
    scores = neurolang.score.score(model, tokenizer, out, progress=True)
    sizes = {name: entry["size"] for name, entry in scores["sets"].items()}
    # base on both languages; shared and its two controls on both; exclusive_ℓ and its two controls on ℓ
    expected = 2 + 3 * 2 * (sizes["shared"] > 0) + sum(3 * (sizes[f"exclusive.{l}"] > 0) for l in ("en", "fr"))
    assert len(passes) == expected and expected > 2
    err = capsys.readouterr().err
    assert "score:   0%" in err and "0/14" in err  # a bar of 7 passes a language (empty sets' count too)


def test_a_new_detection_replaces_the_old_one_whole(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["detect", "--model", "tiny:llama", "--corpus", str(corpus), "--langs", "en,fr", "--tau", "0.5",
              "--max-sentences", "10", "--eval-sentences", "5", "--out", str(out)]
    assert main([*common, "--ratio", "0.2"]) == 0 and main(["score", str(out)]) == 0
    derived = ("classes.safetensors", "stats.json", "scores.json", "ranks.safetensors")
    assert all((out / name).is_file() for name in derived)
    assert main([*common, "--sigma", "0.5"]) == 0  # threshold mode: no ranks
    assert not any((out / name).exists() for name in derived)
    capsys.readouterr()
    assert main(["score", str(out), "--validate-threshold"]) == 2  # not the first run's ranks, silently
    assert "no ranks recorded" in capsys.readouterr().err
    elsewhere = tmp_path / "project"  # a directory that holds no detection keeps its files of those names
    elsewhere.mkdir()
    (elsewhere / "stats.json").write_text("{}")
    assert main([*common[:-1], str(elsewhere), "--ratio", "0.2"]) == 0
    assert (elsewhere / "stats.json").read_text() == "{}"


def test_a_corpus_changed_after_detection_is_refused(corpus, tmp_path, capsys):
    own = tmp_path / "corpus"
    own.mkdir()
    for lang in ("en", "fr"):
        (own / f"{lang}.txt").write_text((corpus / f"{lang}.txt").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["detect", "--model", "tiny:llama", "--corpus", str(own), "--langs", "en,fr", "--ratio", "0.2",
                 "--tau", "0.5", "--max-sentences", "10", "--eval-sentences", "5", "--out", str(out)]) == 0
    assert main(["score", str(out)]) == 0
    lines = (own / "fr.txt").read_text(encoding="utf-8").splitlines()
    (own / "fr.txt").write_text("\n".join(["Une phrase de plus.", *lines]) + "\n", encoding="utf-8")  # indices shift
    capsys.readouterr()
    assert main(["score", str(out)]) == 2
    assert main(["train", "--neurons", str(out), "--data", str(own), "--strategy", "all", "--langs", "fr",
                 "--out", str(tmp_path / "trained"), "--max-steps", "1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("the fr text of corpus" in e and "re-run detect" in e for e in errors)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--low", "2", "--high", "1"], "--low must be below --high"),
    (["--validate-threshold", "--tolerance", "-0.1"], "--tolerance must be at least 0"),
    (["--shrink", "1"], "--shrink must be in (0, 1)"),
    (["--bootstrap", "-1"], "--bootstrap must be at least 0"),
])
def test_meaningless_score_options_fail_first(tmp_path, capsys, flags, message):
    assert main(["score", str(tmp_path / "no-run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1  # not the missing run's error: checked first


def test_threshold_validation_lowers_the_ratio(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["detect", "--model", "tiny:llama", "--corpus", str(corpus), "--langs", "en,fr", "--ratio", "0.4",
                 "--tau", "0.3", "--max-sentences", "10", "--eval-sentences", "5", "--out", str(out)]) == 0
    # No rise allowed: on this random model a control always raises some language's PPL, so ρ halves
    # until k = 1 everywhere.
    assert main(["score", str(out), "--validate-threshold", "--tolerance", "0"]) == 0
    steps = json.loads((out / "scores.json").read_text())["threshold_validation"]
    ratios = [step["ratio"] for step in steps]
    assert ratios[0] == 0.4 and all(b == pytest.approx(a / 2) for a, b in zip(ratios, ratios[1:]))
    assert len(steps) > 2 and "cannot go lower" in steps[-1]["note"]
    info = NeuronSets.load(out).info
    assert info["options"]["ratio"] == ratios[-1] and info["threshold_validation"] == steps
    assert "too high" in capsys.readouterr().out
