"""Detection and classification against brute-force recomputation on tiny random models."""
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from kernels import select_count_torch, top_k_order, top_k_size
from neurolang.adapters import GROUPS, ModelAdapter
from neurolang.classify import Classification, classify, compare, format_comparison, format_table, parse_layer_stages
from neurolang.cli import main
from neurolang.corpus import BUILTIN_DIR, PAPER_LANGS, encode, load_corpus, pad_batch, split_indices
from neurolang.detect import PROGRESS_DIR, NeuronSets, detect
from neurolang.errors import NeurolangError
from neurolang.impact import compute_impacts
from neurolang.tiny import byte_tokenizer, tiny_model

LANGS = ["en", "fr", "sw"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for lang in LANGS:
        lines = (BUILTIN_DIR / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:14]
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("gemma2"), byte_tokenizer()


def run_detect(model_and_tokenizer, corpus_dir, **kwargs):
    model, tokenizer = model_and_tokenizer
    options = dict(langs=LANGS, ratio=0.05, max_sentences=8, eval_sentences=4, max_length=40, batch_size=3,
                   progress=False)
    options.update(kwargs)
    return detect(model, tokenizer, str(corpus_dir), **options)


def test_select_count_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    impacts = torch.randn(5, 23, generator=gen)
    impacts[2, [3, 7, 9]] = 10.0  # a three-way tie at the top
    k = 2
    expected = torch.zeros(23, dtype=torch.int32)
    for row in impacts.tolist():
        for j in sorted(range(23), key=lambda j: (-row[j], j))[:k]:  # ties: lower index first
            expected[j] += 1
    assert torch.equal(select_count_torch(impacts, k=k), expected)
    assert torch.equal(select_count_torch(impacts, sigma=0.5), (impacts > 0.5).sum(0, dtype=torch.int32))
    assert top_k_size(0.01, 50) == 1 and top_k_size(0.01, 14336) == 143


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_order_is_a_stable_sort(dtype):
    gen = torch.Generator().manual_seed(1)
    impacts = torch.randn(6, 300, generator=gen).to(dtype)
    impacts[0, 10:20] = 2.0  # ties inside the top k and across its edge
    impacts[1, :50] = 0.0
    impacts[1, 25:50] = -0.0  # equal to 0.0 for a sort
    impacts[2, [5, 77]] = float("nan")  # first, as a descending sort has them
    impacts[2, 90] = -float("nan")
    impacts[3, [1, 2, 3]] = float("inf")
    impacts[4] = impacts[4].abs()
    for k in (1, 15, 60, 300):
        expected = torch.sort(impacts, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_k_order(impacts, k), expected), k


def test_sets_equal_brute_force(model_and_tokenizer, corpus_dir):
    model, tokenizer = model_and_tokenizer
    sets = run_detect(model_and_tokenizer, corpus_dir, tau=0.5)
    adapter = ModelAdapter(model)
    texts = load_corpus(str(corpus_dir), LANGS)
    for lang in LANGS:
        lines = sets.info["per_language"][lang]["detection_lines"]
        seqs, _ = encode(tokenizer, [texts[lang][i] for i in lines], 40)
        activated = []  # per sentence: {(layer, group, neuron)}
        for seq in seqs:
            ids, mask = pad_batch([seq], tokenizer.pad_token_id)
            impacts = compute_impacts(adapter, ids, mask)
            chosen = set()
            for layer, groups in impacts.items():
                for group, values in groups.items():
                    row = values[0].tolist()
                    k = top_k_size(0.05, len(row))
                    chosen |= {(layer, group, j) for j in sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]}
            activated.append(chosen)
        for group in GROUPS:
            counts = sets.counts[lang][group]
            for layer in range(counts.shape[0]):
                for j in range(counts.shape[1]):
                    n = sum((layer, group, j) in a for a in activated)
                    assert int(counts[layer, j]) == n
                    assert bool(sets.members[lang][group][layer, j]) == (n >= 4)  # τ = 0.5 of 8 sentences


def test_tau_one_is_the_intersection(model_and_tokenizer, corpus_dir):
    sets = run_detect(model_and_tokenizer, corpus_dir, tau=1.0)
    for lang in LANGS:
        for group in GROUPS:
            assert torch.equal(sets.members[lang][group], sets.counts[lang][group] == 8)


def test_batch_size_and_rerun_invariance(model_and_tokenizer, corpus_dir):
    a = run_detect(model_and_tokenizer, corpus_dir, batch_size=1, tau=0.5)
    b = run_detect(model_and_tokenizer, corpus_dir, batch_size=5, tau=0.5)
    c = run_detect(model_and_tokenizer, corpus_dir, batch_size=5, tau=0.5)
    for key, value in a.tensors().items():
        assert torch.equal(value, b.tensors()[key]), key
        assert torch.equal(value, c.tensors()[key]), key


def test_an_interrupted_detection_resumes_from_its_finished_languages(model_and_tokenizer, corpus_dir,
                                                                      tmp_path, monkeypatch):
    detect_module = sys.modules["neurolang.detect"]  # `neurolang.detect` is the function
    real, calls = detect_module.count_activations, []

    def counted(*args, **kwargs):
        if len(calls) == stop_after:
            raise RuntimeError("killed")
        calls.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(detect_module, "count_activations", counted)
    stop_after = None
    whole = run_detect(model_and_tokenizer, corpus_dir)
    out = tmp_path / "run"
    calls.clear(); stop_after = 1
    with pytest.raises(RuntimeError, match="killed"):
        run_detect(model_and_tokenizer, corpus_dir, resume_dir=out)
    assert sorted(p.name for p in (out / PROGRESS_DIR).iterdir()) == ["en.safetensors"]

    # Options that change the counts, or another model name, do not take the kept language.
    for i, changed in enumerate(({"ratio": 0.1}, {"max_length": 30}, {"model_name": "another"})):
        other = tmp_path / f"other{i}"
        shutil.copytree(out / PROGRESS_DIR, other / PROGRESS_DIR)
        calls.clear(); stop_after = None
        sets = run_detect(model_and_tokenizer, corpus_dir, resume_dir=other, **changed)
        assert len(calls) == 3 and not any(r.get("resumed") for r in sets.info["per_language"].values())

    # Another batch size (say, after running out of memory) resumes: en is kept, fr and sw are computed.
    calls.clear(); stop_after = None
    resumed = run_detect(model_and_tokenizer, corpus_dir, resume_dir=out, batch_size=5)
    assert calls == [5, 5]
    assert [resumed.info["per_language"][lang].get("resumed") for lang in LANGS] == [True, None, None]
    for lang in LANGS:
        assert resumed.info["per_language"][lang]["detection_lines"] == whole.info["per_language"][lang]["detection_lines"]
        for g in GROUPS:
            assert torch.equal(resumed.counts[lang][g], whole.counts[lang][g]), (lang, g)
            assert torch.equal(resumed.members[lang][g], whole.members[lang][g]), (lang, g)
            assert torch.equal(resumed.ranks[lang][g], whole.ranks[lang][g]), (lang, g)
    resumed.save(out)
    assert not (out / PROGRESS_DIR).exists()
    assert NeuronSets.load(out).info["per_language"]["en"]["resumed"] is True


def test_a_checkpoint_saved_again_at_its_path_is_not_resumed(tmp_path, corpus_dir, monkeypatch):
    """Training changes a few rows by little, which the sampled fingerprint may not see; a checkpoint
    saved later at the same path (its weight files' times differ) computes every language again."""
    from neurolang.models import load_model

    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    model, tokenizer = load_model(str(path), device="cpu")
    detect_module = sys.modules["neurolang.detect"]
    real, calls = detect_module.count_activations, []

    def killed_after_one(*args, **kwargs):
        if calls:
            raise RuntimeError("killed")
        calls.append(1)
        return real(*args, **kwargs)

    options = dict(langs=LANGS, max_sentences=6, eval_sentences=2, ratio=0.1, tau=0.5, model_name=str(path),
                   resume_dir=tmp_path / "run")
    monkeypatch.setattr(detect_module, "count_activations", killed_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        detect(model, tokenizer, corpus_dir, **options)
    monkeypatch.setattr(detect_module, "count_activations", real)
    weights = path / "model.safetensors"
    later = weights.stat().st_mtime_ns + 10**10  # saved again ten seconds later
    os.utime(weights, ns=(later, later))
    sets = detect(model, tokenizer, corpus_dir, **options)
    assert not any(r.get("resumed") for r in sets.info["per_language"].values())


def test_weight_norms_are_read_once_a_detection(monkeypatch, model_and_tokenizer):
    import neurolang.impact
    from neurolang.detect import count_activations

    model, _ = model_and_tokenizer
    adapter = ModelAdapter(model)
    reads = []
    real = neurolang.impact.weight_column_norms
    monkeypatch.setattr(neurolang.impact, "weight_column_norms", lambda w: reads.append(w) or real(w))
    seqs = [[5 + i] * (3 + i) for i in range(5)]
    count_activations(adapter, seqs, 0, batch_size=2)  # three batches
    assert len(reads) == 2 * adapter.n_layers  # o_proj and down_proj of each layer


def test_classify_counts_add_up(model_and_tokenizer, corpus_dir):
    sets = run_detect(model_and_tokenizer, corpus_dir, tau=0.5)
    result = classify(sets)
    stats = result.stats
    for lang in LANGS:
        for g in GROUPS:
            member, shared = sets.members[lang][g], result.shared[g]
            excl, uniq = result.exclusive[lang][g], result.unique[lang][g]
            assert torch.equal(member, shared | excl) and not (shared & excl).any()  # a partition of N_l
            assert not (uniq & ~excl).any()  # unique ⊆ exclusive
            others = torch.stack([sets.members[o][g] for o in LANGS if o != lang]).any(0)
            assert torch.equal(uniq, member & ~others)
        sizes = stats["sizes"]
        assert sizes["language"][lang]["total"] == sizes["shared"]["total"] + sizes["exclusive"][lang]["total"]
        assert stats["fractions"][lang]["unique"] == sizes["unique"][lang]["total"] / stats["neuron_count"]
    mean_excl = sum(stats["sizes"]["exclusive"][lang]["total"] for lang in LANGS) / len(LANGS)
    assert stats["shared_ratio"] == pytest.approx(stats["sizes"]["shared"]["total"] / mean_excl)
    shares = stats["components"]["exclusive"]
    assert shares is None or sum(shares.values()) == pytest.approx(1.0)
    assert stats["neuron_count"] == ModelAdapter(model_and_tokenizer[0]).neuron_count()


def test_one_language_is_classified_and_said_to_be_one(model_and_tokenizer, corpus_dir):
    sets = run_detect(model_and_tokenizer, corpus_dir, langs=["en"], tau=0.5)
    result = classify(sets)
    for g in GROUPS:  # ∩ over one set is the set; nothing is exclusive; all of it is unique
        assert torch.equal(result.shared[g], sets.members["en"][g]) and not result.exclusive["en"][g].any()
        assert torch.equal(result.unique["en"][g], sets.members["en"][g])
    assert "one language: 'shared' is N_en itself" in format_table(result.stats)
    assert "one language" not in format_table(classify(run_detect(model_and_tokenizer, corpus_dir)).stats)


def test_classify_by_hand():
    """Two languages, one layer, known masks: every number of stats.json by hand."""
    def masks(ffn, q):
        m = {g: torch.zeros(1, 2, dtype=torch.bool) for g in GROUPS}
        m["ffn"] = torch.tensor([ffn]); m["q"] = torch.tensor([q])
        return m

    members = {"en": masks([True, True], [True, False]), "fr": masks([True, False], [False, True])}
    counts = {lang: {g: m.int() for g, m in ms.items()} for lang, ms in members.items()}
    sets = NeuronSets(["en", "fr"], counts, members, {"neuron_count": 10})
    stats = classify(sets).stats
    assert stats["sizes"]["shared"]["total"] == 1  # ffn 0
    assert stats["sizes"]["exclusive"]["en"]["total"] == 2 and stats["sizes"]["exclusive"]["fr"]["total"] == 1
    assert stats["shared_ratio"] == pytest.approx(1 / 1.5)
    assert stats["fractions"]["en"]["language"] == pytest.approx(0.3)
    assert stats["components"]["shared"] == {"QK": 0.0, "VO": 0.0, "FFN": 1.0}
    assert stats["components"]["exclusive"]["QK"] == pytest.approx((0.5 + 1.0) / 2)
    assert stats["layers"]["per_layer"]["shared"] == [pytest.approx(1 / 10)]


def test_layer_stages_by_hand():
    """Four layers whose shared fractions are known: the stage means for given ranges and for thirds."""
    shared = {g: torch.zeros(4, 5, dtype=torch.bool) for g in GROUPS}
    for layer, n in enumerate([1, 2, 3, 4]):  # layer i has n of its 25 neurons shared (ffn)
        shared["ffn"][layer, :n] = True
    members = {lang: {g: m.clone() for g, m in shared.items()} for lang in ("en", "fr")}
    counts = {lang: {g: m.int() for g, m in ms.items()} for lang, ms in members.items()}
    sets = NeuronSets(["en", "fr"], counts, members, {"neuron_count": 100})
    layers = classify(sets).stats["layers"]  # thirds of 4 layers: 0-1, 2, 3
    assert layers["stage_bounds"] == {"early": [0, 1], "middle": [2, 2], "late": [3, 3]}
    assert layers["stages"]["early"]["shared"] == pytest.approx(1.5 / 25)
    layers = classify(sets, layer_stages=[(0, 0), (1, 2), (3, 3)]).stats["layers"]
    assert layers["stage_bounds"] == {"early": [0, 0], "middle": [1, 2], "late": [3, 3]}
    assert [layers["stages"][s]["shared"] for s in ("early", "middle", "late")] == pytest.approx([1 / 25, 2.5 / 25, 4 / 25])
    assert "middle (1-2)" in format_table(classify(sets, layer_stages=[(0, 0), (1, 2), (3, 3)]).stats)
    for bad in ([(0, 0), (2, 2), (3, 3)], [(0, 1), (1, 2), (3, 3)], [(0, 0), (1, 2), (3, 4)], [(0, 0), (1, 3)],
                [(0, 1), (2, 1), (2, 3)]):  # a gap, an overlap, past the last layer, two ranges, an empty one
        with pytest.raises(NeurolangError, match="covering this model's layers 0-3"):
            classify(sets, layer_stages=bad)


@pytest.mark.parametrize("text", ["0-7,8-23", "0-7,8-23,24-31,32-40", "0-7,8-x,24-31", "0,1,2", ""])
def test_layer_stages_that_do_not_parse(text):
    with pytest.raises(NeurolangError, match="three ranges FIRST-LAST"):
        parse_layer_stages(text)


def _hand_sets(langs, ffn, q, info=None):
    """Sets of one layer, two neurons a group: ffn[lang] and q[lang] are the members, others empty."""
    members = {}
    for lang in langs:
        members[lang] = {g: torch.zeros(1, 2, dtype=torch.bool) for g in GROUPS}
        members[lang]["ffn"] = torch.tensor([ffn[lang]])
        members[lang]["q"] = torch.tensor([q[lang]])
    counts = {lang: {g: m.int() for g, m in ms.items()} for lang, ms in members.items()}
    info = {"neuron_count": 10, "n_layers": 1, "widths": {g: 2 for g in GROUPS}, "fingerprint": "f",
            "options": {"ratio": 0.01, "qk_metric": "output"}, **(info or {})}
    return NeuronSets(list(langs), counts, members, info)


def test_compare_by_hand():
    """Known masks: every overlap of `compare` by hand; a run against itself is identical."""
    a = _hand_sets(["en", "fr"], ffn={"en": [True, True], "fr": [True, False]},
                   q={"en": [True, False], "fr": [False, True]})
    b = _hand_sets(["en", "fr", "de"], ffn={"en": [True, False], "fr": [True, False], "de": [False, False]},
                   q={"en": [True, True], "fr": [False, False], "de": [True, True]},
                   info={"options": {"ratio": 0.01, "qk_metric": "probs"}})
    result = compare(a, b)
    assert result["langs"] == ["en", "fr"] and result["same_fingerprint"]
    assert result["option_differences"] == {"qk_metric": ["output", "probs"], "langs": [["en", "fr"], ["en", "fr", "de"]]}
    n_en = result["sets"]["N.en"]  # A: ffn 0, 1, q 0; B: ffn 0, q 0, 1
    assert (n_en["a"], n_en["b"], n_en["both"]) == (3, 3, 2) and n_en["jaccard"] == pytest.approx(0.5)
    assert n_en["a_in_b"] == pytest.approx(2 / 3) and n_en["jaccard_by_group"]["ffn"] == pytest.approx(0.5)
    assert n_en["jaccard_by_group"]["q"] == pytest.approx(0.5) and n_en["jaccard_by_group"]["v"] is None
    shared = result["sets"]["shared"]  # A: ffn 0 (en, fr); B: nothing in all of en, fr, de
    assert (shared["a"], shared["b"], shared["both"], shared["jaccard"]) == (1, 0, 0, 0.0) and shared["b_in_a"] is None
    excl_fr = result["sets"]["exclusive.fr"]  # A: q 1; B: ffn 0
    assert (excl_fr["a"], excl_fr["b"], excl_fr["both"], excl_fr["jaccard"]) == (1, 1, 0, 0.0)
    same = compare(a, a)
    assert same["option_differences"] == {} and all(o["jaccard"] in (1.0, None) for o in same["sets"].values())
    assert all(o["a"] == o["b"] == o["both"] for o in same["sets"].values())
    table = format_comparison(result, ("runs/a", "runs/b"))
    assert "options differ: qk_metric output (A) vs probs (B)" in table
    assert "N.en" in table and "N.de" not in table and "unique.fr" in table and "fingerprints" not in table
    retrained = _hand_sets(["en", "fr"], ffn={"en": [True, True], "fr": [True, False]},
                           q={"en": [True, False], "fr": [False, True]}, info={"fingerprint": "g"})
    assert "different models (their fingerprints differ)" in format_comparison(compare(a, retrained))


def test_compare_refuses_what_cannot_be_compared():
    a = _hand_sets(["en"], ffn={"en": [True, True]}, q={"en": [True, False]})
    wider = _hand_sets(["en"], ffn={"en": [True, True]}, q={"en": [True, False]},
                       info={"widths": {**{g: 2 for g in GROUPS}, "ffn": 3}})
    with pytest.raises(NeurolangError, match="different neuron universes"):
        compare(a, wider)
    with pytest.raises(NeurolangError, match="no language in common"):
        compare(a, _hand_sets(["fr"], ffn={"fr": [True, True]}, q={"fr": [True, False]}))


def test_classify_compare_command(tmp_path, capsys):
    """Two detections that differ only in the Q/K metric: FFN, V and O sets are the same; nothing written."""
    runs = []
    for metric in ("output", "probs"):
        out = tmp_path / metric
        assert main(["detect", "--model", "tiny:llama", "--langs", "en,fr", "--max-sentences", "6",
                     "--eval-sentences", "4", "--max-length", "48", "--ratio", "0.1", "--qk-metric", metric,
                     "--out", str(out)]) == 0
        runs.append(out)
    capsys.readouterr()
    result = compare(NeuronSets.load(runs[0]), NeuronSets.load(runs[1]))
    assert result["option_differences"] == {"qk_metric": ["output", "probs"]}
    for o in result["sets"].values():
        assert all(o["jaccard_by_group"][g] in (1.0, None) for g in ("ffn", "v", "o"))
    assert main(["classify", str(runs[0]), "--compare", str(runs[1])]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"A: {runs[0]} (tiny:llama)") and "options differ: qk_metric" in printed
    assert not (runs[0] / "classes.safetensors").exists()
    assert main(["classify", str(runs[0]), "--compare", str(tmp_path / "none")]) == 2
    assert "has no neurons.safetensors" in capsys.readouterr().err


def test_empty_exclusive_is_reported_not_divided():
    m = {g: torch.ones(1, 2, dtype=torch.bool) for g in GROUPS}
    sets = NeuronSets(["en", "fr"], {l: {g: t.int() for g, t in m.items()} for l in "en fr".split()},
                      {"en": m, "fr": m}, {"neuron_count": 10})
    stats = classify(sets).stats
    assert stats["shared_ratio"] is None and "no language has exclusive neurons" in stats["shared_ratio_undefined"]


def test_splits_are_seeded_and_disjoint():
    a = split_indices(240, 200, 40, seed=3)
    assert a == split_indices(240, 200, 40, seed=3) and a != split_indices(240, 200, 40, seed=4)
    assert len(a.detection) == 200 and len(a.evaluation) == 40
    assert not set(a.detection) & set(a.evaluation)
    with pytest.raises(NeurolangError, match="fewer than --eval-sentences"):
        split_indices(10, 5, 10, seed=0)


def test_corpus_formats(tmp_path):
    (tmp_path / "en.jsonl").write_text('{"body": "One line."}\n{"body": "Two lines."}\n', encoding="utf-8")
    assert load_corpus(str(tmp_path), ["en"], text_field="body") == {"en": ["One line.", "Two lines."]}
    with pytest.raises(NeurolangError, match="has no field 'text'"):
        load_corpus(str(tmp_path), ["en"])
    from datasets import Dataset

    Dataset.from_dict({"text": ["Habari.", "Asante sana."]}).save_to_disk(str(tmp_path / "sw"))
    assert load_corpus(str(tmp_path), ["sw"]) == {"sw": ["Habari.", "Asante sana."]}
    with pytest.raises(NeurolangError, match="has no de.txt"):
        load_corpus(str(tmp_path), ["de"])


def test_truncation_is_counted(model_and_tokenizer, corpus_dir):
    sets = run_detect(model_and_tokenizer, corpus_dir, max_length=12)
    assert all(info["truncated"] > 0 for info in sets.info["per_language"].values())
    assert max(t.shape[0] for t in sets.counts["en"].values()) == 3


def test_builtin_corpus_is_parallel_and_large_enough():
    lengths = {}
    for lang in PAPER_LANGS:
        lines = (BUILTIN_DIR / f"{lang}.txt").read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and all(line.strip() for line in lines[:-1]), lang
        lengths[lang] = len(lines) - 1
    assert min(lengths.values()) >= 200 and len(set(lengths.values())) == 1
    assert (BUILTIN_DIR / "LICENSE.md").is_file()


def test_detect_and_classify_commands(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["detect", "--model", "tiny:qwen2", "--langs", "en,zh,th", "--max-sentences", "6",
            "--eval-sentences", "4", "--max-length", "64", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "shared neuron ratio" in printed
    tensors = load_file(out / "neurons.safetensors")
    assert tensors["counts.th.ffn"].dtype == torch.int32 and tensors["lang.th.ffn"].dtype == torch.bool
    assert tensors["counts.en.k"].shape == (3, 40)  # KV-head space: 4 heads × 10
    info = json.loads((out / "detect.json").read_text())
    assert info["options"]["ratio"] == 0.01 and len(info["per_language"]["zh"]["detection_lines"]) == 6
    assert main(["classify", str(out)]) == 0
    result = Classification.load(out)
    assert set(result.stats["fractions"]) == {"en", "zh", "th"}
    assert "exclusive.th.q" in load_file(out / "classes.safetensors")
    capsys.readouterr()
    assert main(["classify", str(out), "--layer-stages", "0-0,1-1,2-2"]) == 0
    assert "late (2-2)" in capsys.readouterr().out
    assert Classification.load(out).stats["layers"]["stage_bounds"]["middle"] == [1, 1]
    assert main(["classify", str(out), "--layer-stages", "0-0,1-2,3-3"]) == 2
    assert "covering this model's layers 0-2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["classify", str(out), "--layer-stages", "0-7"])
    assert "argument --layer-stages: layer stages are three ranges" in capsys.readouterr().err


def test_detect_command_resumes_an_interrupted_run(tmp_path, capsys, monkeypatch):
    """`detect` killed after its first language: the same command again computes only the others."""
    from neurolang.models import load_model

    detect_module = sys.modules["neurolang.detect"]
    out = tmp_path / "run"
    args = ["detect", "--model", "tiny:qwen2", "--langs", "en,zh", "--max-sentences", "6", "--eval-sentences", "4",
            "--max-length", "64", "--out", str(out)]
    model, tokenizer = load_model("tiny:qwen2", "float32", "cpu")
    real, calls = detect_module.count_activations, []

    def killed_after_one(*a, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(detect_module, "count_activations", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        detect(model, tokenizer, "builtin", ["en", "zh"], max_sentences=6, eval_sentences=4, max_length=64,
               model_name="tiny:qwen2", progress=False, resume_dir=out)
    monkeypatch.setattr(detect_module, "count_activations", real)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "en: 6 sentences" in printed and "kept from the interrupted run" in printed.split("zh:")[0]
    assert "kept" not in printed.split("zh:")[1] and not (out / PROGRESS_DIR).exists()


def test_detect_errors(tmp_path, capsys):
    assert main(["classify", str(tmp_path)]) == 2
    assert "has no neurons.safetensors" in capsys.readouterr().err
    assert main(["detect", "--corpus", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "has no en.txt" in capsys.readouterr().err
    assert main(["detect", "--ratio", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--ratio must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--sigma", "-1"], "--sigma must be at least 0"),
    (["--sigma", "nan"], "--sigma must be at least 0"),
    (["--tau", "0"], "--tau must be in (0, 1]"),
    (["--eval-sentences", "-1"], "--eval-sentences must be at least 0"),
    (["--batch-size", "0"], "must be positive"),
])
def test_meaningless_detection_options_fail_before_the_model_loads(tmp_path, capsys, flags, message):
    assert main(["detect", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1  # not the missing model's error: checked first


def test_ratio_and_sigma_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", "--ratio", "0.1", "--sigma", "0.5", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "argument --sigma: not allowed with argument --ratio" in capsys.readouterr().err
