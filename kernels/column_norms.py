"""Masked column norms: the one reduction behind the FFN, O and V impacts (SPEC §2).

Zeroing one input channel c of a linear map W changes its output by the outer product
X[:, c] W[:, c]ᵀ, whose Frobenius norm is ‖X[:, c]‖₂ · ‖W[:, c]‖₂. So the FFN impact (X = input
of `down_proj`), the O impact (X = input of `o_proj`) and, summed over a KV group's query heads,
the V impact all reduce to per-sentence column sums of squares over the real tokens.
"""
import torch


def masked_column_sumsq_torch(x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t x[b, t, c]² over the real tokens (token_mask[b, t] true), in float32 (float64 stays).

    x: [B, T, C] in any float dtype; token_mask: [B, T] bool. Returns [B, C].
    Extra memory: one float32 copy of x per call; callers pass one layer's activations.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    return torch.einsum("btc,btc,bt->bc", xf, xf, token_mask.to(acc))


def weight_column_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W[:, c]‖₂ for a `nn.Linear` weight of shape [out, in], in float32 (float64 stays)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(weight.to(acc), dim=0)
