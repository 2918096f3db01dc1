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


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch twin stays available
    triton = None

if triton is not None:

    @triton.jit
    def _select_count_kernel(IMPACTS, COUNTS, ORDER, W, stride_row, k, sigma,
                             USE_SIGMA: tl.constexpr, BLOCK: tl.constexpr):
        """One program per sentence: select its activated neurons and add them to the counts.

        Top-k: impacts are ≥ 0, so their float bits order like the values; each is packed with
        (BLOCK − 1 − index) into an int64 key whose descending sort lists the largest impacts first
        and, among equal ones, the lower index first (the stable order of `top_k_order`).
        """
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < W
        values = tl.load(IMPACTS + row * stride_row + offs, mask=valid, other=-1.0).to(tl.float32)
        if USE_SIGMA:
            tl.atomic_add(COUNTS + offs, (values > sigma).to(tl.int32), mask=valid)
        else:
            bits = values.to(tl.int32, bitcast=True).to(tl.int64)  # padding (−1.0) is negative: last
            keys = tl.sort((bits << 32) | (BLOCK - 1 - offs).to(tl.int64), descending=True)
            index = (BLOCK - 1 - (keys & 0xFFFFFFFF)).to(tl.int32)
            top = offs < k
            tl.atomic_add(COUNTS + index, tl.full([BLOCK], 1, tl.int32), mask=top)
            tl.store(ORDER + row * k + offs, index, mask=top)


MAX_SORT_WIDTH = 16384  # a row's int64 keys must fit one program's shared memory (Hopper: 227 KiB)


def select_count_triton(impacts: torch.Tensor, counts: torch.Tensor, k: int | None = None,
                        sigma: float | None = None) -> torch.Tensor | None:
    """One launch for a batch [B, W] of one (layer, group): adds each neuron's activations to
    `counts` (int32 [W], in place) and returns the top-k order [B, k] (int32; None with σ).

    Same selection as `select_count_torch` / `top_k_order`: impacts must be non-negative floats.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if (k is None) == (sigma is None):
        raise ValueError("give exactly one of k and sigma")
    b, w = impacts.shape
    if w > MAX_SORT_WIDTH:
        raise ValueError(f"width {w} is over the {MAX_SORT_WIDTH} keys one program can sort")
    impacts = impacts if impacts.stride(-1) == 1 else impacts.contiguous()
    order = None if k is None else torch.empty(b, k, dtype=torch.int32, device=impacts.device)
    _select_count_kernel[(b,)](impacts, counts, order if order is not None else counts, w, impacts.stride(0),
                               k or 0, float(sigma or 0.0), USE_SIGMA=sigma is not None,
                               BLOCK=triton.next_power_of_2(w), num_warps=8 if w > 4096 else 4)
    return order
