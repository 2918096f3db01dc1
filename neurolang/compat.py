"""`--compat released-code`: the neuron scores and selection of the authors' released code (SPEC §7).

Not the method of the paper and never the default: it exists so that users can compare with the
neuron files the authors published. What it reproduces:
- FFN score Σ_t |(W_up x_t)_k| (no gate, no activation, no ‖W_down‖);
- Q/K score Σ_{i,j} (ΔA)² with channel c of the post-RoPE (and post q-norm) queries zeroed; the
  same list serves Q and K;
- V/O score Σ_t |y_t,c| on the attention output before `o_proj`, for V and O;
- swapped top-k sizes: attention groups keep ρ · intermediate_size neurons, FFN ρ · (heads · head_dim).
What it does not: the released code maps K/V indices from query-head space with a formula SPEC §7
does not give, so models with grouped-query attention are refused; and it keeps the causal mask
(the released code probably drops it for Llama/Qwen; SPEC §7 says "likely", so we do not guess).
"""
import torch

from kernels import AttentionSpec, qk_impact_torch
from kernels.qk_impact import _heads, _normalise, _rotate_half
from kernels.select_count import top_k_size
from neurolang.adapters import Captured, Layer, ModelAdapter
from neurolang.errors import NeurolangError

RELEASED_CODE = "released-code"
COMPAT_MODES = (RELEASED_CODE,)


def check_compatible(adapter: ModelAdapter) -> None:
    spec = adapter.layers[0].spec
    if spec.n_kv_heads != spec.n_heads:
        raise NeurolangError(
            f"--compat {RELEASED_CODE} needs a model without grouped-query attention ({adapter.family} has "
            f"{spec.n_heads} query and {spec.n_kv_heads} key/value heads): the released code's K/V index mapping "
            "under GQA is not specified in SPEC §7")


def top_k_sizes(widths: dict[str, int], ratio: float) -> dict[str, int]:
    """The released code's swapped sizes: attention gets ρ · intermediate, FFN ρ · attention width."""
    attention_k = top_k_size(ratio, widths["ffn"])
    return {"ffn": min(widths["ffn"], top_k_size(ratio, widths["q"])),
            **{g: min(widths[g], attention_k) for g in ("q", "k", "v", "o")}}


def _masked_abs_sum(x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t |x_t| over real tokens, in float32 (float64 stays): [B, width]."""
    x = x if x.dtype == torch.float64 else x.float()
    return (x.abs() * token_mask[..., None]).sum(1)


def attention_scores(layer: Layer, cap: Captured, token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Q, K, V, O scores of one layer as the released code computes them: {group: [B, n_heads·D]}."""
    spec = layer.spec
    acc = torch.float32 if cap.q.dtype != torch.float64 else torch.float64
    b, t = cap.q.shape[:2]
    cos, sin = cap.cos.to(acc)[:, None], cap.sin.to(acc)[:, None]
    rotated = []
    for x, n, norm in ((cap.q, spec.n_heads, spec.q_norm), (cap.k, spec.n_kv_heads, spec.k_norm)):
        h = _normalise(_heads(x, n, spec.head_dim, acc), norm)[0]
        rotated.append((h * cos + _rotate_half(h) * sin).transpose(1, 2).reshape(b, t, -1))
    plain = AttentionSpec(n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                          scaling=spec.scaling, softcap=spec.softcap, sliding_window=spec.sliding_window)
    identity_cos = torch.ones_like(cap.cos, dtype=acc)
    q_scores, _ = qk_impact_torch(rotated[0], rotated[1], cap.v, identity_cos, torch.zeros_like(identity_cos),
                                  token_mask, plain, metric="probs")
    vo = _masked_abs_sum(cap.attn_out, token_mask)
    return {"q": q_scores, "k": q_scores, "v": vo, "o": vo}


def ffn_scores(cap: Captured, token_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t |(W_up x_t)_k| over real tokens: [B, intermediate]."""
    return _masked_abs_sum(cap.ffn_up, token_mask)

