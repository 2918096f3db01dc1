"""`--compat released-code`: the released code's scores (SPEC §7) against literal loops, swapped top-k sizes."""
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kernels import top_k_size
from neurolang.adapters import ModelAdapter
from neurolang.cli import main
from neurolang.corpus import pad_batch
from neurolang.detect import detect
from neurolang.impact import compute_impacts
from neurolang.tiny import CONFIGS, byte_tokenizer, tiny_model


def mha_gemma3():
    """Gemma3 text (q/k norms, soft-cap free, sliding window) with as many KV heads as query heads."""
    config = CONFIGS["gemma3_text"]()
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape) / (1 if "embed" in name else p.shape[1] ** 0.5))
            else:
                p.copy_(0.2 * torch.randn(p.shape))
    return model.eval()


def literal_scores(model, ids, layer_index):
    """The released code's scores for one unpadded sentence, by hooks and loops over channels."""
    adapter = ModelAdapter(model)
    layer = adapter.layers[layer_index]
    seen = {}
    hooks = [layer.up_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("up", o)),
             layer.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             layer.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o)),
             layer.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0])),
             layer.attn.register_forward_pre_hook(
                 lambda m, a, kw: seen.__setitem__("pe", kw["position_embeddings"]), with_kwargs=True)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    spec, attn = layer.spec, layer.attn
    t, d = ids.shape[1], spec.head_dim
    q = seen["q"].view(1, t, spec.n_heads, d).transpose(1, 2)
    k = seen["k"].view(1, t, spec.n_kv_heads, d).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q, k, *seen["pe"])
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & ((i - j < spec.sliding_window) if spec.sliding_window else True)

    def probs(qh, kh):
        logits = (qh @ kh.T) * spec.scaling
        if spec.softcap:
            logits = spec.softcap * torch.tanh(logits / spec.softcap)
        return logits.masked_fill(~allowed, float("-inf")).softmax(-1)

    qk = torch.zeros(spec.n_heads * d, dtype=torch.float64)
    for h in range(spec.n_heads):
        base = probs(q[0, h], k[0, h])
        for c in range(d):
            changed = q[0, h].clone()
            changed[:, c] = 0
            qk[h * d + c] = (probs(changed, k[0, h]) - base).square().sum()
    vo = seen["y"][0].abs().sum(0)
    return {"ffn": seen["up"][0].abs().sum(0), "q": qk, "k": qk, "v": vo, "o": vo}


# float64 models; Gemma's RMSNorm runs in float32 inside transformers whatever the dtype, so its
# q/k-normed scores agree to float32 precision only (measured 3e-7).
@pytest.mark.parametrize("make, rtol", [(lambda: tiny_model("qwen2").double(), 1e-9),
                                        (lambda: mha_gemma3().double(), 1e-6)], ids=["qwen2", "gemma3_text-mha"])
def test_released_code_scores_equal_literal_loops(make, rtol):
    model = make()
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 260, (n,), generator=gen).tolist() for n in (9, 5, 7)]  # window 4 < T
    ids, mask = pad_batch(seqs, 0)
    fast = compute_impacts(ModelAdapter(model), ids, mask, compat="released-code")
    for s, seq in enumerate(seqs):
        for layer in (0, 2):
            expected = literal_scores(model, torch.tensor([seq]), layer)
            for group, values in expected.items():
                torch.testing.assert_close(fast[layer][group][s], values.to(fast[layer][group]), rtol=rtol,
                                           atol=1e-12, msg=f"{group} layer {layer} sentence {s}")


def test_swapped_top_k_sizes_and_the_recorded_option():
    model = tiny_model("qwen2")
    sets = detect(model, byte_tokenizer(), "builtin", ["en"], max_sentences=6, eval_sentences=2, ratio=0.2,
                  tau=0.5, progress=False, compat="released-code")
    widths = ModelAdapter(model).widths()
    assert sets.ranks["en"]["q"].shape[2] == top_k_size(0.2, widths["ffn"])  # attention: ρ · intermediate
    assert sets.ranks["en"]["ffn"].shape[2] == top_k_size(0.2, widths["q"])  # ffn: ρ · attention width
    assert sets.info["options"]["compat"] == "released-code"
    assert torch.equal(sets.counts["en"]["q"], sets.counts["en"]["k"])  # one list for Q and K
    smaller = sets.reselect(0.1)
    assert int(smaller.counts["en"]["q"].sum()) == 6 * 3 * top_k_size(0.1, widths["ffn"])


def test_grouped_query_models_are_refused_in_one_line(tmp_path, capsys):
    assert main(["detect", "--model", "tiny:llama", "--langs", "en", "--max-sentences", "4", "--compat",
                 "released-code", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "grouped-query attention" in err and len(err.splitlines()) == 1
