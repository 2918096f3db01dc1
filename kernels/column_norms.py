"""Masked column norms: the one reduction behind the FFN, O and V impacts (SPEC §2).

Zeroing one input channel c of a linear map W changes its output by the outer product
X[:, c] W[:, c]ᵀ, whose Frobenius norm is ‖X[:, c]‖₂ · ‖W[:, c]‖₂. So the FFN impact (X = input
of `down_proj`), the O impact (X = input of `o_proj`) and, summed over a KV group's query heads,
the V impact all reduce to per-sentence column sums of squares over the real tokens.
"""
import torch

from kernels.dispatch import full_float32_matmuls, on_input_device


@full_float32_matmuls()
def masked_column_sumsq_torch(x: torch.Tensor, token_mask: torch.Tensor, chunk_elements: int = 1 << 20) -> torch.Tensor:
    """Σ_t x[b, t, c]² over the real tokens (token_mask[b, t] true), in float32 (float64 stays).

    x: [B, T, C] in any float dtype; token_mask: [B, T] bool. Returns [B, C].
    Works through x a few tokens at a time, so extra memory is about two float32 chunks of
    `chunk_elements` elements (8 MiB at the default), whatever the size of x.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, t, c = x.shape
    out = torch.zeros(b, c, dtype=acc, device=x.device)
    step = max(1, chunk_elements // max(1, b * c))
    for t0 in range(0, t, step):
        part = x[:, t0:t0 + step].to(acc)
        out += torch.einsum("bt,btc->bc", token_mask[:, t0:t0 + step].to(acc), part * part)
    return out


def weight_column_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W[:, c]‖₂ for a `nn.Linear` weight of shape [out, in], in float32 (float64 stays); on a GPU a
    bfloat16 or float16 weight is read as it is, not copied to float32 first (PyTorch's reduction
    casts as it reads: no 235 MB temporary for a Llama-3.1-8B down_proj, every layer and batch)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(weight, dim=0, dtype=acc)


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch twin stays available
    triton = None

if triton is not None:

    @triton.jit
    def _column_sumsq_kernel(X, TOKENS, PARTIAL, T, C, span, stride_b, stride_t,
                             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
        """Program (sentence b, column block, token span s): Σ x² over the real tokens of span s.

        BLOCK_C is 16 bytes × 32 threads × warps wide, so every thread holds one 16-byte piece of
        every row of a tile: the sum over a tile's tokens stays in the thread (no barrier) and
        the accumulator is a few registers. Tiles stream through shared memory by asynchronous
        copies issued ahead of their use (Triton's pipelining, STAGES deep; at 3 the token mask is
        read two tiles ahead and H copied one ahead, so a tile's copy overlaps the previous
        tile's sum)."""
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        s = tl.program_id(2)
        col_ok = cols < C
        sentence = X + b.to(tl.int64) * stride_b  # a batch may hold over 2^31 elements; a sentence does not
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in tl.range(s * span, tl.minimum(T, (s + 1) * span), BLOCK_T, num_stages=STAGES):
            ts = t0 + tl.arange(0, BLOCK_T)
            keep = tl.load(TOKENS + b * T + ts, mask=ts < T, other=0) != 0
            x = tl.load(sentence + ts[:, None] * stride_t + cols[None, :],
                        mask=keep[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x * x, axis=0)
        tl.store(PARTIAL + (s * tl.num_programs(0) + b) * C + cols, acc, mask=col_ok)


def default_column_block(element_size: int, num_warps: int) -> int:
    """Columns a program reads: 16 bytes a thread, 32 threads a warp (1024 bf16 at 4 warps)."""
    return 16 // element_size * 32 * num_warps


@on_input_device
def masked_column_sumsq_triton(x: torch.Tensor, token_mask: torch.Tensor, programs: int = 2048, block_t: int = 8,
                               num_warps: int = 4, stages: int = 3, block_c: int | None = None) -> torch.Tensor:
    """The Triton kernel of `masked_column_sumsq_torch`: one pass over x, float32 accumulation.
    token_mask may also be an int32 tensor of 0 and 1 (then copied asynchronously with the tiles).

    Tokens are split into spans so that about `programs` programs share the read even for one
    sentence; the spans' partial sums (a few rows of [B, C]) are added at the end. A program
    reads tiles of `block_t` tokens × `block_c` columns (by default 16 bytes a thread: 1024
    bf16 columns at 4 warps), `stages` deep; these are tuning knobs
    (`benchmarks/bench_kernels.py --sweep` times them on a GPU).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, t, c = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    tokens = token_mask.contiguous()  # bool (or int32) as it is: no conversion launch
    block_c = min(block_c or default_column_block(x.element_size(), num_warps), triton.next_power_of_2(c))
    column_blocks = triton.cdiv(c, block_c)
    spans = max(1, min(triton.cdiv(t, block_t), programs // (b * column_blocks)))
    span = triton.cdiv(triton.cdiv(t, spans), block_t) * block_t
    spans = triton.cdiv(t, span)
    partial = torch.empty(spans, b, c, dtype=torch.float32, device=x.device)
    _column_sumsq_kernel[(b, column_blocks, spans)](x, tokens, partial, t, c, span, x.stride(0), x.stride(1),
                                                   BLOCK_T=block_t, BLOCK_C=block_c, STAGES=stages,
                                                   num_warps=num_warps)
    return partial[0] if spans == 1 else partial.sum(0)
