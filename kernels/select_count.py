"""Selection of activated neurons and per-language counting (SPEC §3), on the impacts' device.

Per sentence, the top k = floor(ρ·width) neurons (at least 1) of a (layer, group) are activated,
or, in threshold mode, those whose impact exceeds σ. The count of a neuron is the number of
sentences in which it was activated; only these counts ever leave the device.
"""
import torch


def top_k_size(ratio: float, width: int) -> int:
    """k = floor(ρ · width), at least 1."""
    return max(1, int(ratio * width))


def top_k_order(impacts: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of each row's k largest impacts, largest first; ties go to the lower index
    (a stable sort, unlike `torch.topk`), so selections are reproducible and a smaller k is a prefix."""
    return torch.sort(impacts, dim=1, descending=True, stable=True).indices[:, :k]


def count_selected(order: torch.Tensor, width: int) -> torch.Tensor:
    """How often each of `width` neurons appears in the rows of `order` [B, k]: int32 [width]."""
    counts = torch.zeros(width, dtype=torch.int32, device=order.device)
    ones = torch.ones(order.numel(), dtype=torch.int32, device=order.device)
    return counts.index_add_(0, order.reshape(-1), ones)


def select_count_torch(impacts: torch.Tensor, k: int | None = None, sigma: float | None = None) -> torch.Tensor:
    """Activation counts [W] (int32) of one (layer, group) over a batch of impacts [B, W].

    Exactly one of `k` (top-k per sentence; ties broken towards the lower index, so the
    selection is reproducible) and `sigma` (impact > σ) is given.
    """
    if (k is None) == (sigma is None):
        raise ValueError("give exactly one of k and sigma")
    if sigma is not None:
        return (impacts > sigma).sum(0, dtype=torch.int32)
    return count_selected(top_k_order(impacts, k), impacts.shape[1])
