"""Selection of activated neurons and per-language counting (SPEC §3), on the impacts' device.

Per sentence, the top k = floor(ρ·width) neurons (at least 1) of a (layer, group) are activated,
or, in threshold mode, those whose impact exceeds σ. The count of a neuron is the number of
sentences in which it was activated; only these counts ever leave the device.
"""
import functools

import torch

from kernels.dispatch import on_input_device


def top_k_size(ratio: float, width: int) -> int:
    """k = floor(ρ · width), at least 1."""
    return max(1, int(ratio * width))


def top_k_order(impacts: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of each row's k largest impacts, largest first; ties go to the lower index
    (a stable sort's order, unlike `torch.topk`'s), so selections are reproducible and a smaller k
    is a prefix. Float32 impacts take `torch.topk` of unique int64 keys, the value's bits in the
    floats' order and then the index reversed (the Triton kernel's keys): on the 2-core CPU 51 µs
    against the sort's 511 for 8 × 1536, k = 15, and 1.0 against 3.2 ms for 8 × 14336, k = 143.
    Other dtypes take the stable sort itself."""
    if impacts.dtype != torch.float32:
        return torch.sort(impacts, dim=1, descending=True, stable=True).indices[:, :k]
    width = impacts.shape[1]
    values = torch.where(impacts.isnan(), float("nan"), impacts + 0.0)  # one NaN, −0.0 as 0.0: as the sort
    bits = values.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats' bits reversed
    keys = ordered.long() << 32 | (width - 1 - torch.arange(width, device=impacts.device))
    return width - 1 - (keys.topk(k, dim=1).values & 0xFFFFFFFF)


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
    def _order_bits(base, cols, valid):
        """Impacts (≥ 0) as int32 bits, which order like the values (−0.0 counted as 0.0)."""
        values = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
        return tl.where(values == 0.0, 0, values.to(tl.int32, bitcast=True))

    @triton.jit
    def _select_count_kernel(IMPACTS, COUNTS, ORDER, ROWS, GROUPS, stride_row, stride_order, sigma,
                             USE_SIGMA: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr):
        """One program per (sentence, group): select its activated neurons and add them to the counts.

        GROUPS holds, per group, where its columns start in a row of IMPACTS (and of COUNTS), its
        width W, its k and where its k indices start in a row of ORDER; ROWS, the row of ORDER each
        sentence writes.

        Top-k without sorting the row: a radix select finds the k-th largest impact v in four
        passes over the row (one byte of its bits per pass, from a 256-bin histogram of the
        impacts that match the bytes found so far); a last pass gathers, in index order, every
        impact above v and the first ties at v, exactly k; only those k are sorted, as int64 keys
        (bits << 32 | W − 1 − index) whose descending order lists the largest impacts first and,
        among equal ones, the lower index first (the stable order of `top_k_order`).
        """
        row = tl.program_id(0)
        group = GROUPS + 4 * tl.program_id(1)
        first = tl.load(group)
        W = tl.load(group + 1)
        base = IMPACTS + row * stride_row + first
        counts = COUNTS + first
        offs = tl.arange(0, BLOCK)
        if USE_SIGMA:
            for start in range(0, W, BLOCK):
                cols = start + offs
                valid = cols < W
                values = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
                tl.atomic_add(counts + cols, (values > sigma).to(tl.int32), mask=valid)
        else:
            k = tl.load(group + 2)
            order = ORDER + tl.load(ROWS + row) * stride_order + tl.load(group + 3)
            bins = tl.arange(0, 512)  # bytes 0…255; bin 256 takes what does not match
            prefix = tl.zeros([], dtype=tl.int32)  # the bytes found so far (the bits are ≥ 0)
            need = k  # how many of those matching the prefix to take
            for byte in tl.static_range(4):
                shift = 24 - 8 * byte
                hist = tl.zeros([512], dtype=tl.int32)
                for start in range(0, W, BLOCK):
                    cols = start + offs
                    valid = cols < W
                    bits = _order_bits(base, cols, valid)
                    match = valid
                    if byte > 0:
                        match = match & ((bits >> (shift + 8)) == (prefix >> (shift + 8)))
                    hist += tl.histogram(tl.where(match, (bits >> shift) & 255, 256), 512)
                hist = tl.where(bins < 256, hist, 0)
                at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # matching with byte ≥ bin
                digit = tl.max(tl.where(at_least >= need, bins, -1), axis=0)
                need -= tl.sum(tl.where(bins > digit, hist, 0), axis=0)
                prefix = prefix | (digit << shift)
            # prefix is now the bits of the k-th largest impact; `need` of its ties are taken.
            taken = tl.zeros([], dtype=tl.int32)
            ties = tl.zeros([], dtype=tl.int32)
            for start in range(0, W, BLOCK):
                cols = start + offs
                valid = cols < W
                bits = _order_bits(base, cols, valid)
                equal = (valid & (bits == prefix)).to(tl.int32)
                take = (valid & (bits > prefix)) | ((equal != 0) & (ties + tl.cumsum(equal, axis=0) - equal < need))
                take32 = take.to(tl.int32)
                tl.store(order + taken + tl.cumsum(take32, axis=0) - take32, cols, mask=take)
                taken += tl.sum(take32, axis=0)
                ties += tl.sum(equal, axis=0)
            tl.debug_barrier()  # the k gathered indices, written by other threads of this program
            slots = tl.arange(0, K_BLOCK)
            in_k = slots < k
            index = tl.load(order + slots, mask=in_k, other=0)
            bits = _order_bits(base, index, in_k).to(tl.int64)
            keys = tl.where(in_k, (bits << 32) | (W - 1 - index).to(tl.int64), -1)
            index = (W - 1 - (tl.sort(keys, descending=True) & 0xFFFFFFFF)).to(tl.int32)
            tl.debug_barrier()
            tl.store(order + slots, index, mask=in_k)
            tl.atomic_add(counts + index, tl.full([K_BLOCK], 1, tl.int32), mask=in_k)


MAX_TOP_K = 16384  # the k selected impacts are sorted as int64 keys in one program's shared memory


@functools.lru_cache(maxsize=64)
def _group_table(widths: tuple, ks: tuple, device: torch.device) -> torch.Tensor:
    """Per group (first column, width, k, first slot of its order): int32 [G, 4] on `device`, made
    once per layout (a detection has one), so that a launch copies nothing to the device."""
    firsts = [sum(widths[:g]) for g in range(len(widths))]
    slots = [sum(ks[:g]) for g in range(len(ks))]
    return torch.tensor(list(zip(firsts, widths, ks, slots)), dtype=torch.int32, device=device)


@on_input_device
def select_count_triton(impacts: torch.Tensor, counts: torch.Tensor, k=None, sigma: float | None = None,
                        widths=None, order: torch.Tensor | None = None,
                        rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """One launch for a batch [B, ΣW] of impacts: adds each neuron's activations to `counts`
    (int32 [ΣW], in place) and, in top-k mode, writes each sentence's top-k order (int32, largest
    first; None with σ). The same selection as `select_count_torch` / `top_k_order`: impacts must be
    non-negative floats. Any width; k up to MAX_TOP_K.

    The columns may be several groups side by side (`widths`, one per group; default one group of
    all columns), each selected on its own (`k` an int, or one per group; indices within the group).
    `order` [N, Σk] takes them (group after group in a row) at rows `rows` (int64 [B] on the device),
    as detection keeps every sentence's order without an indexed copy; by default a new [B, Σk].
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if (k is None) == (sigma is None):
        raise ValueError("give exactly one of k and sigma")
    b, total = impacts.shape
    widths = (total,) if widths is None else tuple(widths)
    ks = (0,) * len(widths) if k is None else tuple(k) if isinstance(k, (tuple, list)) else (k,) * len(widths)
    if sum(widths) != total or len(ks) != len(widths):
        raise ValueError(f"impacts of {total} columns do not split into groups of widths {widths} with k {ks}")
    for w, k_g in zip(widths, ks):
        if k is not None and not 1 <= k_g <= min(w, MAX_TOP_K):
            raise ValueError(f"top-k of {k_g} out of {w}: the kernel selects 1 to min(width, {MAX_TOP_K})")
    impacts = impacts if impacts.stride(-1) == 1 else impacts.contiguous()
    if k is not None and order is None:
        order = torch.empty(b, sum(ks), dtype=torch.int32, device=impacts.device)
    if k is not None and rows is None:
        rows = torch.arange(b, device=impacts.device)
    if order is not None and (order.shape[1] != sum(ks) or order.stride(1) != 1):
        raise ValueError(f"order must be [N, {sum(ks)}] with unit stride along its rows, not {tuple(order.shape)}")
    widest = max(widths)
    _select_count_kernel[(b, len(widths))](
        impacts, counts, counts if order is None else order, counts if rows is None else rows,
        _group_table(widths, ks, impacts.device), impacts.stride(0), 0 if order is None else order.stride(0),
        float(sigma or 0.0), USE_SIGMA=sigma is not None,
        BLOCK=min(4096, triton.next_power_of_2(widest)), K_BLOCK=triton.next_power_of_2(max(ks) or 1),
        num_warps=8 if widest > 4096 else 4)
    return order
