"""Every neuron of every group of two layers of a tiny model of each family against the oracle."""
import pytest
import torch

import neurolang.impact
from neurolang.adapters import GROUPS, ModelAdapter
from neurolang.corpus import SAMPLE_SENTENCES, first_tokens, tokenize
from neurolang.impact import compute_impacts
from neurolang.oracle import oracle_impacts, verify
from neurolang.tiny import FAMILIES, byte_tokenizer, tiny_model

# Odd lengths, a one-token sentence, sentences longer than every sliding window: a padded batch.
SENTENCES = [SAMPLE_SENTENCES["en"][:23], SAMPLE_SENTENCES["de"][:9], "a", SAMPLE_SENTENCES["fr"][:17]]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("metric", ["output", "probs"])
def test_every_neuron_matches_oracle_float32(family, metric, tokenizer):
    adapter = ModelAdapter(tiny_model(family))
    report = verify(adapter, tokenizer, SENTENCES, layers=[0, 1], neurons_per_group=None, metric=metric,
                    tolerance=1e-4)
    widths = adapter.widths()
    for group in GROUPS:  # all neurons, 2 layers, 4 sentences
        assert report.groups[group].checked == widths[group] * 2 * len(SENTENCES)
    assert report.passed, report.table()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_every_neuron_matches_oracle_float64(family, tokenizer):
    """float64 models: the bound is the float32 softmax inside `transformers`' eager attention."""
    adapter = ModelAdapter(tiny_model(family, dtype=torch.float64))
    report = verify(adapter, tokenizer, SENTENCES, layers=[1, 2], neurons_per_group=None, tolerance=1e-5)
    assert report.passed, report.table()


def test_shapes_exercise_the_hard_cases():
    groups, head_dims, windows, softcaps, norms, biases = set(), set(), set(), set(), set(), set()
    for family in FAMILIES:
        adapter = ModelAdapter(tiny_model(family))
        for layer in adapter.layers:
            spec = layer.spec
            groups.add(spec.group_size)
            head_dims.add(spec.head_dim)
            windows.add(spec.sliding_window)
            softcaps.add(spec.softcap)
            norms.add(spec.q_norm is not None)
            biases.add(layer.q_proj.bias is not None)
    assert {1, 3, 4} <= groups
    assert any(d & (d - 1) for d in head_dims)  # a head_dim that is not a power of two
    assert any(w is not None and w < len(SENTENCES[0]) for w in windows)
    assert len(softcaps) > 1 and norms == {True, False} and biases == {True, False}


def test_batch_equals_one_sentence_at_a_time(tokenizer):
    adapter = ModelAdapter(tiny_model("gemma3_text"))
    adapter.model.set_attn_implementation("eager")
    ids, mask = tokenize(tokenizer, SENTENCES, 64)
    batch = compute_impacts(adapter, ids, mask)
    for s in range(len(SENTENCES)):
        one = first_tokens(ids, mask, s)
        alone = compute_impacts(adapter, one, torch.ones_like(one, dtype=torch.bool))
        for layer in batch:
            for group in GROUPS:
                torch.testing.assert_close(batch[layer][group][s], alone[layer][group][0], rtol=2e-5, atol=1e-6)


def test_impacts_are_float32_for_half_models(tokenizer):
    adapter = ModelAdapter(tiny_model("qwen2", dtype=torch.bfloat16))
    ids, mask = tokenize(tokenizer, SENTENCES[:2], 64)
    impacts = compute_impacts(adapter, ids, mask, layers=[1])
    assert set(impacts) == {1}
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in impacts[1].values())


def test_oracle_can_fail(tokenizer, monkeypatch):
    """A planted error of 0.1 % in one Q channel must be caught."""
    real = neurolang.impact.qk_impact_torch

    def planted(*args, **kwargs):
        q, k = real(*args, **kwargs)
        q = q.clone()
        q[:, 5] *= 1.001
        return q, k

    monkeypatch.setattr(neurolang.impact, "qk_impact_torch", planted)
    adapter = ModelAdapter(tiny_model("llama"))
    report = verify(adapter, tokenizer, SENTENCES[:2], layers=[0], neurons_per_group=None)
    assert not report.passed
    assert report.groups["q"].worst_error > 5e-4 and report.groups["q"].worst_at[2] == 5
    assert all(report.groups[g].worst_error < 1e-4 for g in ("ffn", "k", "v", "o"))


def test_oracle_zeroes_what_it_says(tokenizer):
    """Oracle impact of an FFN neuron equals ‖H[:, k]‖·‖W_down[:, k]‖ computed by hand."""
    adapter = ModelAdapter(tiny_model("llama", dtype=torch.float64))
    adapter.model.set_attn_implementation("eager")  # as the oracle runs it
    ids = tokenizer(["hello"], return_tensors="pt").input_ids
    seen = {}
    handle = adapter.layers[0].down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0]))
    with torch.no_grad():
        adapter.model(ids)
    handle.remove()
    oracle = oracle_impacts(adapter, ids, [0], {"ffn": [3]})[0]["ffn"][0]
    by_hand = float(seen["h"][0, :, 3].norm() * adapter.layers[0].down_proj.weight[:, 3].detach().norm())
    assert abs(float(oracle) - by_hand) < 1e-12 * by_hand
