"""Triton kernels against their PyTorch twins and float64: on the CPU through Triton's interpreter,
or on a GPU with NEUROLANG_GPU_TESTS=1."""
import contextlib
import os

import pytest
import torch
import triton
import triton.language as tl

from kernels import masked_column_sumsq_torch, masked_column_sumsq_triton, qk_impact_reference, qk_impact_triton
from kernels.dispatch import interpreter_problem, on_input_device, resolve_backend
from kernels.qk_impact import METRICS, AttentionSpec, _capped_change, _expm1, _tanh
from neurolang.cli import main
from test_qk_impact import CASES, inputs, rope, saturated_soft_cap_case, spec_for

DEVICE = "cuda" if os.environ.get("NEUROLANG_GPU_TESTS") == "1" and torch.cuda.is_available() else "cpu"
# The interpreter computes every dot in float32, so there `tf32x3` checks the kernels' own split
# of each operand into three products; on a GPU it also checks the TF32 products themselves.
# (One-TF32 `tf32` is about 1e-3 relative: benchmarks/bench_kernels.py --accuracy reports it.)
PRECISIONS = ("ieee", "tf32x3", "fp16x3")
# The plain-tile layouts beside "stacked" (a block of channels a program): one channel a program, or
# a channel and its rotary partner ("pair", the default under fp16x3 up to head_dim 128). Both share
# most of their code (and their products' code, `_split` and `_dot`, with "stacked"), so some tests
# run one precision each; the tests name the layout they check.
PLAIN = ("channel", "pair")


@triton.jit
def _expm1_of(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, _expm1(tl.load(X + offs, mask=offs < N)), mask=offs < N)


def on_device(*tensors):
    return [t.float().to(DEVICE) for t in tensors]


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty that fills floating tensors with NaN: a kernel that reads memory nobody wrote
    (the stacked kernels read key tiles past T unmasked, `KEY_SLACK`) then returns NaN."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        x = empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("precision, layout", [(p, "stacked") for p in PRECISIONS] + [("fp16x3", "channel"),
                                                                                    ("tf32x3", "pair")])
def test_qk_kernel_matches_float64_reference(case, metric, precision, layout):
    hq, hk, d, t, softcap, window, norm = case
    seed = 11 + CASES.index(case)
    q, k, v, mask = inputs(hq, hk, d, t, seed)
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, softcap, window, norm, seed)
    ref_q, ref_k = qk_impact_reference(q, k, v, cos, sin, mask, spec, metric)
    tri_q, tri_k = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, metric, precision,
                                    layout=layout)
    assert tri_q.dtype == torch.float32
    tri_q, tri_k = tri_q.cpu(), tri_k.cpu()
    # The float32 twin's bound: relative 1e-5, or 1e-7 of the largest impact (1e-12 when all are 0).
    torch.testing.assert_close(tri_q.double(), ref_q, rtol=1e-5, atol=max(1e-7 * float(ref_q.max()), 1e-12))
    torch.testing.assert_close(tri_k.double(), ref_k, rtol=1e-5, atol=max(1e-7 * float(ref_k.max()), 1e-12))


@pytest.mark.parametrize("precision, layout", [(p, "stacked") for p in PRECISIONS] + [("fp16x3", x) for x in PLAIN])
def test_qk_kernel_heads_of_any_scale_and_huge_padding(precision, layout):
    """Values 1e-4 and 1e4 in two KV heads, a query head at 1e-3 (near-uniform attention), and
    padding tokens 1e9 times larger than the real ones: fp16x3 scales each head on its own
    and ignores the padding (which would otherwise set, and overflow, the scale)."""
    hq, hk, d, t = 4, 2, 8, 11
    q, k, v, mask = inputs(hq, hk, d, t, 9)
    v = v.view(3, t, hk, d) * torch.tensor([1e-4, 1e4], dtype=v.dtype)[:, None]
    q = q.view(3, t, hq, d) * torch.tensor([1e-3, 1, 1, 1], dtype=q.dtype)[:, None]
    pad = torch.where(mask, 1.0, 1e9).to(q.dtype)[:, :, None]
    q, k, v = q.reshape(3, t, -1) * pad, k * pad, v.reshape(3, t, -1) * pad
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, None, None, False, 9)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec)
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, precision=precision, layout=layout)
    for a, r in zip((x.cpu() for x in tri), ref):
        # Head by head: each to 1e-7 of its own largest impact, whatever the other heads' scale.
        for a_head, r_head in zip(a.view(3, -1, d).unbind(1), r.view(3, -1, d).unbind(1)):
            torch.testing.assert_close(a_head.double(), r_head, rtol=1e-5, atol=1e-7 * float(r_head.max()))


@pytest.mark.parametrize("block_m, block_n, block_c, layout", [(16, 32, None, "stacked"), (16, 32, 2, "stacked"),
                                                               (16, 16, 4, "stacked"), (32, 16, 4, "stacked"),
                                                               (16, 16, None, "channel"), (32, 16, None, "pair"),
                                                               (16, 32, None, "pair"), (64, 32, None, "pair")])
def test_qk_kernel_tiles_longer_than_one_block(block_m, block_n, block_c, layout):
    """T spans several query and key tiles, with a window shorter than a tile; the head's channels
    in one block (of 8, two past head_dim), in three, or in two with the last one half empty, or
    one or a partner pair a program; key tiles as long as, or shorter than, query tiles (64 × 32:
    the plain-tile layouts' GPU shape, one query tile here)."""
    hq, hk, d, t = 3, 1, 6, 37
    q, k, v, mask = inputs(hq, hk, d, t, 5)
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, 4.0, 7, True, 5)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec)
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, block_m=block_m, block_n=block_n,
                           block_c=block_c, layout=layout)
    for a, r in zip((t.cpu() for t in tri), ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7 * float(r.max()))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("d, t", [(6, 37), (8, 70)])
def test_qk_stacked_kernel_reads_past_the_keys_only_what_is_masked(metric, precision, d, t, nan_empty):
    """The stacked kernels read K and V tiles unmasked (`KEY_SLACK`): past T, the next head's rows
    and, after the last head, zeros; past head_dim (6 of 16 dims), the next row's values. All of it
    must meet a zero (q's dims past head_dim, A·e of keys not attended to) or a dropped column,
    whatever the model's values there (padding 1e6 times larger), in memory allocated NaN."""
    hq, hk = 4, 2
    q, k, v, mask = inputs(hq, hk, d, t, 13)
    pad = torch.where(mask, 1.0, 1e6).to(q.dtype)[:, :, None]
    q, k, v = q * pad, k * pad, v * pad
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, 5.0, 20, False, 13)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec, metric)
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, metric, precision, block_n=64,
                           layout="stacked")
    for a, r in zip((x.cpu() for x in tri), ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7 * float(r.max()))


@pytest.mark.parametrize("bound", [True, False])
@pytest.mark.parametrize("outlier", ["key partner", "query row"])
@pytest.mark.parametrize("softcap", [2.0, None])
def test_qk_stacked_kernel_change_bound_sees_an_outlier(softcap, outlier, bound, launches, monkeypatch):
    """A stacked program first bounds its changes of logit over all its key tiles
    (`_change_bound`): within a quarter cap no tile checks its own for the soft-cap's Taylor form,
    and within `NEAR_LIMIT` A·(e^Δ − 1) is one polynomial. Small logits everywhere but one
    outlier, whose changes reach a cap and more in a few tiles: channel 4 of the first token's k
    (which channel 0's rotary partner term meets: programs of 2 channels, so channel 0's has only
    its column norms to see it), or channel 1 of one query row. The bound must see it, or those
    tiles take a form out of its reach. Against float64, with the bound (CHANGE_BOUND) and
    without (every tile checking, both forms everywhere)."""
    import kernels.qk_impact as qk

    monkeypatch.setattr(qk, "CHANGE_BOUND", bound)
    hq, hk, d, t = 4, 2, 8, 40
    q, k, v, mask = inputs(hq, hk, d, t, 21)
    q, k = 0.1 * q, 0.1 * k
    if outlier == "key partner":
        k[:, 0, 4] = 60.0  # KV head 0, channel 4 (position 0: unrotated)
    else:
        q[:, 17, d + 1] = 60.0  # query head 1, row 17
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, softcap, None, False, 21)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec)
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, block_c=2, layout="stacked")
    for a, r in zip((x.cpu() for x in tri), ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7 * float(r.max()))
    assert [kw["BOUNDED"] for _, kw in launches[::2]] == [bound] * 2  # the main kernels


@pytest.fixture
def launches(monkeypatch):
    """The Q/K kernels' launches, as (kernel, keyword arguments), in order."""
    import kernels.qk_impact as qk

    seen = []

    class Spy:
        def __init__(self, name):
            self.kernel = getattr(qk, name)

        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((self.kernel, kw)) or self.kernel[grid](*args, **kw)

    for name in ("_qk_kernel", "_qk_rough_kernel", "_qk_channel_kernel", "_qk_channel_rough_kernel"):
        monkeypatch.setattr(qk, name, Spy(name))
    return seen


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("q_slice, w_by_dot", [(16, True), (16, False), (0, False)])
def test_qk_stacked_kernel_q_read_in_slices_and_w_on_the_matrix_units(metric, q_slice, w_by_dot, launches,
                                                                       monkeypatch):
    """The stacked kernel's two ways to fewer registers, each on and off: q read again each key
    tile in head_dim slices (`Q_SLICE`: here 16 of head_dim 24 padded to 32, so the second slice
    runs past it) instead of held, and W summed by a product with ones beside the value product
    (`W_BY_DOT`, the output metric) instead of element-wise. Against float64, with a soft-cap, a
    window, GQA group 3 and several key tiles, under fp16x3 (the precision that has them). (Held
    q with W on the matrix units is the default up to head_dim 128, which the other tests check.)"""
    import kernels.qk_impact as qk

    monkeypatch.setattr(qk, "default_q_slice", lambda block_d, block_n, precision: q_slice)
    monkeypatch.setattr(qk, "W_BY_DOT", w_by_dot)
    hq, hk, d, t = 6, 2, 24, 37
    q, k, v, mask = inputs(hq, hk, d, t, 31)
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, 4.0, 20, False, 31)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec, metric)
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, metric, "fp16x3", block_n=16,
                           layout="stacked")
    for a, r in zip((x.cpu() for x in tri), ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7 * float(r.max()))
    assert [kw["Q_SLICE"] for _, kw in launches] == [q_slice] * 4
    assert [kw["W_BY_DOT"] for _, kw in launches[::2]] == [w_by_dot] * 2  # the main kernels


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("precision, layout", [(p, "stacked") for p in PRECISIONS] + [("fp16x3", "pair")])
def test_qk_kernel_soft_cap_far_below_the_logits(metric, precision, layout):
    """As the twin's test: logits around ten times the cap, where cap·tanh saturates."""
    q, k, v, cos, sin, mask, spec = saturated_soft_cap_case()
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec, metric)
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, metric, precision, layout=layout)
    for a, r in zip((x.cpu() for x in tri), ref):
        # Every impact here is tiny (~1e-6: saturated logits barely move). fp16x3 resolves each
        # A·(e^Δ − 1) to 2^-40 absolute (one fixed scale for all rows), ~1e-11 on these impacts.
        atol = 1e-10 if precision == "fp16x3" else 1e-7 * float(r.max())
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("precision, layout", [(p, "stacked") for p in PRECISIONS] + [("fp16x3", x) for x in PLAIN])
@pytest.mark.parametrize("from_channel", [85.0, 95.0])
def test_qk_kernel_brings_back_a_key_whose_probability_underflowed(from_channel, metric, precision, layout):
    """Query 2 gives key 1 a logit of −5 − `from_channel` (its probability is subnormal in float32,
    and 0 on a GPU), `from_channel` of which comes from channel 0: zeroing that channel (of q or
    of k) brings key 1 back to e^-5 of the others. At 85 that is a gentle change which only
    exp(log A + Δ) gets right (A·(e^Δ − 1) would use A's few bits, or 0 on a GPU); at 95, e^Δ
    overflows float32 and the row is the rough kernel's."""
    q = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)[None]
    k = torch.tensor([[0.0, 0, 0, 0], [-from_channel, -5, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)[None]
    v = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cos, sin = torch.ones(1, 3, 4, dtype=torch.float64), torch.zeros(1, 3, 4, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    spec = AttentionSpec(1, 1, 4, 1.0)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec, metric)
    assert float(ref[0][0, 0]) > 1e-3 * float(ref[0].max())  # the case is not negligible
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, metric, precision, layout=layout)
    for a, r in zip((x.cpu() for x in tri), ref):
        # Key 1's new probability is exp(log A + Δ) with log A ≈ −90 and Δ ≈ 85, each known to
        # float32's spacing at 64–128 (7.6e-6): one ulp of either is 7.6e-6 relative on the
        # result (1.05e-5 seen on an H100), so 3e-5 is about four.
        torch.testing.assert_close(a.double(), r, rtol=3e-5, atol=1e-7 * float(r.max()))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("layout", ["stacked", "pair"])  # "channel" shares "pair"'s rough kernel
def test_qk_kernel_rows_that_change_a_lot(metric, layout, nan_empty):
    """Large logits (q, k × 6): many rows leave the expm1 form for the direct softmax. Partial sums
    are allocated NaN: every program of both kernels writes its own (the rough kernel's without
    such rows, zeros)."""
    hq, hk, d, t = 4, 2, 8, 21
    q, k, v, mask = inputs(hq, hk, d, t, 3)
    q, k = 6 * q, 6 * k
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, None, 5, False, 3)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec, metric)
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, metric, layout=layout)
    for a, r in zip((x.cpu() for x in tri), ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-7 * float(r.max()))


@pytest.mark.parametrize("padding, window, metric, layout", [("right", None, "output", "channel"),
                                                             ("anywhere", 20, "output", "pair"),
                                                             ("anywhere", None, "probs", "channel"),
                                                             ("right", 20, "probs", "pair")])
def test_qk_plain_tile_kernel_unmasked_tiles_and_padding_anywhere(padding, window, metric, layout, nan_empty):
    """The plain-tile layouts skip the mask on key tiles that every row of the query tile sees
    whole (here most of them: 37 tokens, tiles of 16, no window or one of 20 that cuts through
    tiles), and mask padding keys only when padding comes before a real token."""
    hq, hk, d, t = 3, 1, 6, 37
    q, k, v, mask = inputs(hq, hk, d, t, 5)  # right-padded
    if padding == "anywhere":
        mask[0, :5] = False
        mask[1, 10:12] = False
        mask[2, 3] = False
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, None, window, True, 5)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec, metric)
    tri = qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, metric, block_m=16, block_n=16,
                           layout=layout)
    for a, r in zip((x.cpu() for x in tri), ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7 * float(r.max()))


@pytest.mark.parametrize("precision, layout", [("fp16x3", "stacked"), ("tf32x3", "stacked"), ("fp16x3", "pair")])
@pytest.mark.parametrize("scale, rtol", [(1, 1e-5), (6, 1e-4)])  # × 6: rows that change a lot (the rough kernels)
def test_qk_kernel_v_of_a_bfloat16_model(precision, layout, scale, rtol, monkeypatch):
    """v_proj outputs of a bfloat16 model (a bfloat16 tensor: 8-bit mantissas) are their own big
    part under fp16x3 and tf32x3, so the value products skip the small part's product; the impacts
    still match float64. A float32 v is not taken for one (it needs the third product)."""
    import kernels.qk_impact as qk

    hq, hk, d, t = 4, 2, 8, 21
    q, k, v, mask = inputs(hq, hk, d, t, 13)
    q, k = scale * q, scale * k
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, None, 9, True, 13)
    exact = []
    detect = qk._exact_in_big_part
    monkeypatch.setattr(qk, "_exact_in_big_part", lambda *args: exact.append(detect(*args)) or exact[-1])
    for values, expected in ((v.to(torch.bfloat16), True), (v, False)):
        ref = qk_impact_reference(q, k, values.double(), cos, sin, mask, spec)
        q32, k32, cos32, sin32 = on_device(q, k, cos, sin)
        v_in = values.to(DEVICE) if expected else values.float().to(DEVICE)
        tri = qk_impact_triton(q32, k32, v_in, cos32, sin32, mask.to(DEVICE), spec, precision=precision, layout=layout)
        assert exact[-1] is expected
        for a, r in zip((x.cpu() for x in tri), ref):
            torch.testing.assert_close(a.double(), r, rtol=rtol, atol=1e-7 * float(r.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("d, t", [(8, 21), (6, 70), (256, 5)])  # BLOCK_T is 4096 // BLOCK_D rows: 256, 256, 16
def test_operand_kernel_is_rope_and_the_float16_split_to_the_bit(dtype, precision, d, t, nan_empty):
    """`_operand_kernel` against the same steps in PyTorch, bit for bit: q [B, T, H·D] of the model's
    dtype read as heads in place; float32 q; q·cos + rotate_half(q)·sin (two rounded products, a
    rounded sum); under fp16x3 the rotated q times 2^(15 − e) per head (e: torch.frexp's exponent of
    its largest |entry| over real tokens) as float16 and the float16 of the rest, padding 0, and
    2^(e − 15). Heads of very different sizes, an all-zero head (e = 0) and one of entries near
    2^-115 (frexp exponent −113: the scale capped at 2^126, so that 2^-s stays a normal float) included.
    After the rotated values and the halves, the `KEY_SLACK` rows of zeros (memory allocated NaN)."""
    import kernels.qk_impact as qk

    b, h = 3, 4
    gen = torch.Generator().manual_seed(d + t)
    x = torch.randn(b, t, h * d, generator=gen) * torch.tensor([1e-3, 1.0, 0.0, 0.0]).repeat_interleave(d)
    x[1, :, d:2 * d] *= 1e5
    x[..., 3 * d:] = (1 + torch.rand(b, t, d, generator=gen)) * 2.0 ** -115  # normal floats, no subnormal products
    x = x.to(dtype)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, t // 2:] = False
    mask[2, 1:] = False
    cos, sin = (f.expand(b, t, d).contiguous().float() for f in rope(t, d, torch.float64))
    heads = x.unflatten(-1, (h, d)).transpose(1, 2)  # a strided view, as the wrapper passes it
    on_gpu = qk._operand(heads.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), mask.int().to(DEVICE), precision, True, True,
                         keys=True)
    for part in on_gpu[1:4]:
        if part is not None:
            after = part.new_empty(0).set_(part.untyped_storage())[part.numel():]
            assert after.numel() == qk._slack_rows(d) * d and not bool(after.any())
    plain, rotated, big, small, unscale = (None if y is None else y.cpu() for y in on_gpu)
    want_plain = heads.float()
    want_rotated = want_plain * cos[:, None] + qk._rotate_half(want_plain) * sin[:, None]
    assert torch.equal(plain, want_plain) and torch.equal(rotated, want_rotated)
    if precision != "fp16x3":  # the rotated values are both parts (the same tensor, before .cpu() copies it)
        assert on_gpu[2] is on_gpu[1] and on_gpu[3] is on_gpu[1] and torch.equal(unscale, torch.ones(b, h))
        return
    padding = ~mask[:, None, :, None]
    _, e = torch.frexp(want_rotated.abs().masked_fill(padding, 0.0).amax((2, 3)))
    shift = (15 - e).clamp_max(126)
    scaled = torch.ldexp(want_rotated, shift[..., None, None]).masked_fill(padding, 0.0)
    assert torch.equal(big, scaled.half()) and torch.equal(small, (scaled - scaled.half().float()).half())
    assert torch.equal(unscale, torch.ldexp(torch.ones(b, h), -shift))
    assert torch.isfinite(big.float() + small.float()).all() and shift.max() == 126 and (e == 0).any()


# Sequences several of the base kernel's 64-row and 64-key tiles long, with a window that cuts
# through tiles and padding (`inputs` pads the second and third sentences).
LONG_CASES = [(4, 2, 8, 150, 5.0, 70, False), (3, 1, 6, 130, None, None, False)]


@pytest.mark.parametrize("case", CASES + LONG_CASES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_base_attention_kernel_matches_dense_float64(case, precision):
    """The unperturbed log-sum-exp and output the impact kernels measure against (one
    FlashAttention-style launch, from the impacts' own operand parts) against dense float64
    attention written out per head."""
    import kernels.qk_impact as qk

    hq, hk, d, t, softcap, window, norm = case
    q, k, v, mask = inputs(hq, hk, d, t, 7)
    spec = spec_for(hq, hk, d, softcap, window, norm, 7)
    heads = lambda x, n: x.view(x.shape[0], t, n, d).transpose(1, 2).contiguous()  # noqa: E731
    qh, kh, vh = heads(q, hq), heads(k, hk), heads(v, hk)
    tokens = mask.int().to(DEVICE)
    no_rotation = torch.ones(q.shape[0], t, d), torch.zeros(q.shape[0], t, d)
    _, parts, unscale, v_exact = qk._operands(*on_device(qh, kh, vh, *no_rotation), tokens, spec, precision)
    lse, out = (x.cpu().double() for x in qk._base_attention(parts, unscale, v_exact, tokens, spec, precision))
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    for h in range(hq):
        g = h // (hq // hk)
        logits = spec.scaling * qh[:, h].double() @ kh[:, g].double().transpose(-1, -2)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        seen = (j <= i) & (i - j < (window or t)) & mask[:, None, :] | (i == j)
        logits = logits.masked_fill(~seen, float("-inf"))
        # Real tokens only (fp16x3 zeroes the padding's operands; its rows never count). The
        # log-sum-exps here are about 5, where a float32 ulp is 4.8e-7: 2e-6 is 4 ulp, room for the
        # GPU's approximate exp2 and log2 (about 2 ulp each; 2.4 ulp seen on an H100).
        torch.testing.assert_close(lse[:, h][mask], torch.logsumexp(logits, -1)[mask], rtol=0, atol=2e-6)
        torch.testing.assert_close(out[:, h][mask], (torch.softmax(logits, -1) @ vh[:, g].double())[mask], rtol=1e-5,
                                   atol=1e-6 * float(vh.abs().max()))


def test_qk_kernel_runs_a_batch_past_its_offsets_a_few_sentences_at_a_time(monkeypatch):
    """A batch whose B·heads·T·D passes the kernels' 32-bit offsets is split by sentences (here
    the limit is lowered to two sentences a call): the same impacts as in one call."""
    import kernels.qk_impact as qk

    hq, hk, d, t = 4, 2, 6, 5
    q, k, v, mask = inputs(hq, hk, d, t, 3)  # 3 sentences
    cos, sin = rope(t, d, torch.float64)
    cos, sin = (torch.cat([x.expand(1, t, d).roll(shift, 1) for shift in range(3)]) for x in (cos, sin))  # positions per sentence
    spec = spec_for(hq, hk, d, None, None, False, 3)
    args = (*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec)
    whole = qk_impact_triton(*args)
    monkeypatch.setattr(qk, "MAX_KERNEL_OFFSET", 2 * hk * t * d + qk._slack_rows(d) * d + 1)  # K and V: 2 sentences
    split = qk_impact_triton(*args)
    for a, b in zip(whole, split):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    monkeypatch.setattr(qk, "MAX_KERNEL_OFFSET", hq * t * d)
    with pytest.raises(ValueError, match="too long for the Q/K kernel"):
        qk_impact_triton(*args)


@pytest.mark.parametrize("precision, d, t, kernel, tiles, inputs_kind", [
    ("fp16x3", 8, 65, "_qk_channel_kernel", dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, PAIR=True),
     "float32"),  # past SHORT_SENTENCE
    ("fp16x3", 8, 64, "_qk_kernel", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_C=8, num_warps=8, num_stages=3, HAS_CAP=False),
     "float32"),  # a short sentence: stacked, 32 keys
    ("fp16x3", 8, 65, "_qk_kernel", dict(BLOCK_M=16, BLOCK_N=64, num_stages=3, HAS_CAP=True, Q_SLICE=0),
     "soft-cap"),  # its Taylor form
    ("fp16x3", 136, 5, "_qk_kernel", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_C=8, num_warps=8, num_stages=2, Q_SLICE=64,
                                          W_BY_DOT=True), "float32"),  # past 128
    ("fp16x3", 136, 5, "_qk_kernel", dict(BLOCK_N=64, num_stages=2, Q_SLICE=0, W_BY_DOT=True),
     "bfloat16 v"),  # no small part of v to hold: 64 keys, and q held
    ("tf32x3", 136, 5, "_qk_kernel", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_C=2, num_warps=4, num_stages=2, Q_SLICE=0,
                                          W_BY_DOT=False), "float32"),  # both fp16x3's alone
    ("tf32x3", 8, 5, "_qk_kernel", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_C=8, num_warps=8, num_stages=3),
     "float32")])  # 64 keys: no shared memory
def test_qk_kernel_defaults(precision, d, t, kernel, tiles, inputs_kind, launches):
    """With no layout or tiles given, the launch `default_layout` and its tiles choose, and the
    impacts match float64 (up to head_dim 128 plain tiles past `SHORT_SENTENCE` tokens, the stacked
    kernel with 32-key tiles within; head_dim 136: the tiles of head_dim 256, with q read again in
    slices of 64; v of a bfloat16 model doubles the key tiles there, with q held; a soft-cap takes
    the stacked kernel at any head_dim)."""
    import kernels.qk_impact as qk

    q, k, v, mask = inputs(2, 1, d, t, 0)
    v_in = v.to(torch.bfloat16).to(DEVICE) if inputs_kind == "bfloat16 v" else v.float().to(DEVICE)
    v = v_in.cpu().double()
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(2, 1, d, 3.0 if inputs_kind == "soft-cap" else None, None, False, 0)
    q32, k32, cos32, sin32 = on_device(q, k, cos, sin)
    tri = qk.qk_impact_triton(q32, k32, v_in, cos32, sin32, mask.to(DEVICE), spec, precision=precision)
    for a, r in zip((x.cpu() for x in tri), qk_impact_reference(q, k, v, cos, sin, mask, spec)):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7 * float(r.max()))
    main = [kw for launched, kw in launches if launched is getattr(qk, kernel).kernel]
    assert len(main) == 2 and len(launches) == 4  # query and key channels, each with its rough kernel
    assert all(kw[name] == value for kw in main for name, value in tiles.items())


@pytest.mark.parametrize("layout", ["stacked", "pair"])
def test_qk_kernel_right_padded_reads_nothing_back(layout, monkeypatch):
    """`right_padded=True` (what the pipeline passes once `check_right_padded` passed): a Q/K call
    reads nothing back from the device, so that on a GPU it never waits for it, and its impacts are
    those of the call that checks the padding itself, to the bit."""
    hq, hk, d, t = 4, 2, 8, 21
    q, k, v, mask = inputs(hq, hk, d, t, 5)
    spec = spec_for(hq, hk, d, 3.0, 9, True, 5)
    args = (*on_device(q, k, v, *rope(t, d, torch.float64)), mask.to(DEVICE), spec)
    checked = qk_impact_triton(*args, layout=layout)

    def read_back(*_, **__):
        raise AssertionError("a value read back from the device")

    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    vouched = qk_impact_triton(*args, layout=layout, right_padded=True)
    monkeypatch.undo()
    for a, b in zip(vouched, checked):
        assert torch.equal(a, b)


def test_qk_channel_blocks():
    from kernels.qk_impact import default_channel_block

    assert [default_channel_block(16, d, 8, "fp16x3") for d in (6, 64, 128, 256)] == [8, 16, 8, 8]
    assert [default_channel_block(16, 256, 4, "tf32x3"), default_channel_block(32, 128, 8, "ieee")] == [2, 4]
    q, k, v, mask = inputs(2, 1, 8, 3, 0)
    cos, sin = rope(3, 8, torch.float64)
    with pytest.raises(ValueError, match="block_c must be a power of two"):
        qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec_for(2, 1, 8, None, None, False, 0),
                         block_c=3)
    with pytest.raises(ValueError, match="unknown Q/K kernel layout 'rows'"):
        qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec_for(2, 1, 8, None, None, False, 0),
                         layout="rows")
    with pytest.raises(ValueError, match="at most 128 keys a tile"):  # past the zeros after K and V
        qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec_for(2, 1, 8, None, None, False, 0),
                         block_n=256, layout="stacked")


def _both_forms_match_and_differ(knob: str, q_scale: float, softcap, seed: int, metric: str, monkeypatch):
    """The stacked kernels with the limit `knob` of qk_impact at its value and at 0, on inputs whose
    q is scaled by `q_scale`: both match float64, and they differ, so the form the limit chooses ran."""
    import kernels.qk_impact as qk

    hq, hk, d, t = 4, 2, 8, 21
    q, k, v, mask = inputs(hq, hk, d, t, seed)
    q = q * q_scale
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, softcap, 9, False, seed)
    ref = qk_impact_reference(q, k, v, cos, sin, mask, spec, metric)
    runs = []
    for limit in (getattr(qk, knob), 0.0):
        monkeypatch.setattr(qk, knob, limit)
        runs.append([x.cpu() for x in qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec, metric,
                                                        layout="stacked")])
        for a, r in zip(runs[-1], ref):
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7 * float(r.max()))
    assert not all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("metric", METRICS)
def test_qk_kernel_soft_cap_in_either_form(metric, monkeypatch):
    """The stacked kernels' soft-cap change by its Taylor form (key tiles whose changes are all
    within `TANH_SERIES_LIMIT` of the cap; here every channel's change of logit is under a quarter
    of the cap, 0.24 at most) and by its exact form alone (limit 0)."""
    _both_forms_match_and_differ("TANH_SERIES_LIMIT", 0.5, 5.0, 12, metric, monkeypatch)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("softcap", [5.0, None])
def test_qk_stacked_kernel_near_programs_take_one_polynomial(softcap, metric, monkeypatch):
    """Programs whose changes of logit are all within `NEAR_LIMIT` (here every one: its bound is at
    most 0.95) compute A·(e^Δ − 1) by `_expm1_near` alone; with the limit 0 they take both forms
    of `_weighted_expm1_2`."""
    _both_forms_match_and_differ("NEAR_LIMIT", 0.25, softcap, 14, metric, monkeypatch)


@triton.jit
def _capped_change_of(A, DL, Y, N, softcap, series_limit, series_all, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(A + offs, mask=offs < N)
    change = _capped_change(a, _tanh(a), tl.exp(-2.0 * tl.abs(a)), tl.load(DL + offs, mask=offs < N) / softcap, softcap,
                            series_limit, series_all != 0)
    tl.store(Y + offs, change, mask=offs < N)


@pytest.mark.parametrize("form, limit", [("series", 1e30), ("exact", -1.0)])
def test_kernel_soft_cap_change_is_accurate(form, limit):
    """The kernels' change of a soft-capped logit, cap·(tanh(a + Δ/cap) − tanh a), against float64
    in both its forms (forced: `series_limit` past every |Δ/cap|, or below all): the Taylor form
    for changes up to a quarter of the cap, the exact one for any (here up to 40 caps), for
    logits from 0 to 40 caps of either sign, where tanh saturates."""
    gen = torch.Generator().manual_seed(4)
    cap, n = 30.0, 1 << 14
    a = torch.cat([torch.randn(n // 2, generator=gen), 40 * torch.rand(n // 2, generator=gen) - 20]).double()
    reach = 0.25 if form == "series" else 40.0
    dl = cap * reach * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * 10.0 ** -(8 * torch.rand(n, generator=gen))
    a, dl = a.float().double(), dl.float().double()  # what the kernel reads
    y = torch.empty(n, device=DEVICE)
    _capped_change_of[(n // 1024,)](a.float().to(DEVICE), dl.float().to(DEVICE), y, n, cap, limit, 0, BLOCK=1024)
    expected = cap * torch.sinh(dl / cap) / (torch.cosh(a) * torch.cosh(a + dl / cap))  # tanh(a + d) − tanh(a)
    # Relative to the change itself, also where it is 1e-8 of the cap and a saturates (where
    # tanh(a + d) − tanh(a) would cancel): a few float32 roundings, on a GPU the approximate exp2
    # and reciprocal (about 2^-22 each), and e^-2|a|'s argument −2|a|·log2 e rounded to float32,
    # an error that grows with |a| (3.7e-6 at |a| = 17 in the exact form, interpreter).
    relative = ((y.cpu().double() - expected).abs() / expected.abs().clamp_min(1e-300))
    assert bool((relative < 1e-6 + 2e-7 * a.abs()).all())


def test_kernel_soft_cap_change_known_within_reach_takes_the_series():
    """`series_all` (a program that bounded all its changes beforehand, `_change_bound`)
    takes the Taylor form without the tile's own check, whatever the limit says: the same bits
    as the series forced by the limit, and not the exact form's (changes up to a quarter cap)."""
    gen = torch.Generator().manual_seed(5)
    cap, n = 30.0, 1 << 12
    a = (4 * torch.randn(n, generator=gen)).to(DEVICE)
    dl = (cap * 0.25 * (2 * torch.rand(n, generator=gen) - 1)).to(DEVICE)
    runs = {}
    for name, limit, known in (("known", -1.0, 1), ("series", 1e30, 0), ("exact", -1.0, 0)):
        runs[name] = torch.empty(n, device=DEVICE)
        _capped_change_of[(n // 1024,)](a, dl, runs[name], n, cap, limit, known, BLOCK=1024)
    assert torch.equal(runs["known"], runs["series"]) and not torch.equal(runs["known"], runs["exact"])


def test_kernel_expm1_is_accurate_to_float32_rounding():
    """The kernels' expm1 (a polynomial near 0, exp − 1 beyond) against float64, across the
    range the soft-cap's tanh uses (its argument is −2|y|), including the switch at ±½."""
    x = torch.cat([torch.linspace(-20, 20, 4001), torch.linspace(-0.6, 0.6, 2401), torch.logspace(-30, -1, 200),
                   -torch.logspace(-30, -1, 200), torch.tensor([0.0, 0.5, -0.5])]).to(DEVICE)
    y = torch.empty_like(x)
    _expm1_of[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = torch.expm1(x.double())
    relative = ((y.double() - expected).abs() / expected.abs().clamp_min(1e-300)).cpu()
    poly = x.abs().cpu() <= 0.5
    # The polynomial: two float32 roundings (2^-24 ≈ 6e-8 each); one degree less would be 2.3e-7.
    assert float(relative[poly].max()) < 1.5e-7
    # exp(x) − 1: exp's error (a GPU's ex2.approx: 2^-22 relative), times exp(x) / |exp(x) − 1| ≤ 2.6
    # beyond ½, plus, on a GPU, the rounding of exp's scaled argument (∝ |x|).
    assert bool((relative[~poly] < 7e-7 + 1e-7 * x[~poly].abs().cpu()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 37, 50), (1, 1, 7), (2, 70, 300), (2, 45, 1100)])
def test_column_sumsq_kernel(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen).to(dtype)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[0, shape[1] // 2 + 1:] = False  # right padding
    mask[-1, :shape[1] // 3] = shape[0] == 1  # left padding (another sentence)
    expected = masked_column_sumsq_torch(x.double(), mask)
    got = masked_column_sumsq_triton(x.to(DEVICE), mask.to(DEVICE)).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # The tuning knobs change the tiling (several column blocks and token spans, no pipelining), not the sums.
    tiled = masked_column_sumsq_triton(x.to(DEVICE), mask.to(DEVICE), programs=8, block_t=4, num_warps=1, stages=1,
                                       block_c=32).cpu()
    torch.testing.assert_close(tiled.double(), expected, rtol=1e-5, atol=1e-6)
    as_int = masked_column_sumsq_triton(x.to(DEVICE), mask.int().to(DEVICE)).cpu()  # an int32 mask of 0 and 1
    torch.testing.assert_close(as_int, got, rtol=0, atol=0)
    torch.testing.assert_close(got, masked_column_sumsq_torch(x, mask).float(), rtol=1e-5, atol=1e-6)
    # The twin a few tokens at a time (here one or two per step) adds up the same.
    few = masked_column_sumsq_torch(x, mask, chunk_elements=2 * shape[0] * shape[2])
    torch.testing.assert_close(few.double(), expected, rtol=1e-5, atol=1e-6)


def test_dispatch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("NEUROLANG_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("auto", cuda) == "triton"
    assert resolve_backend("torch", cuda) == "torch"
    monkeypatch.setenv("NEUROLANG_BACKEND", "torch")
    assert resolve_backend("auto", cuda) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cuda", cpu)


def test_an_interpreter_that_cannot_run_is_named_in_one_line(monkeypatch):
    """Triton before 3.7 reads one-element arrays with int(array), which NumPy 2.4 refuses."""
    import numpy
    import triton

    class OneElement:
        def __init__(self, strict):
            self.strict = strict

        def __int__(self):
            if self.strict:
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return 0

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("NEUROLANG_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(numpy, "zeros", lambda *args, **kwargs: OneElement(strict=True))
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert interpreter_problem().endswith("cannot run with NumPy " + numpy.__version__ +
                                          ": install triton>=3.7 or numpy<2.4")
    with pytest.raises(ValueError, match="interpreter .* cannot run"):
        resolve_backend("triton", cpu)
    assert resolve_backend("triton", cuda) == "triton"  # compiled kernels do not use it
    monkeypatch.setattr(triton, "__version__", "3.7.0+git1234")
    assert interpreter_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "zeros", lambda *args, **kwargs: OneElement(strict=False))
    assert interpreter_problem() is None


def test_each_triton_wrapper_makes_its_tensors_device_current(monkeypatch):
    """Triton launches on torch's current device: a wrapper given tensors on cuda:1 enters it."""
    from kernels import select_count_triton

    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)

    class OnSecondGpu(torch.Tensor):  # what the guard reads of a tensor on cuda:1
        is_cuda, device = True, torch.device("cuda", 1)

    on_gpu = torch.ones(2).as_subclass(OnSecondGpu)
    assert on_input_device(lambda n, x: (n, x))(2, x=on_gpu) == (2, on_gpu) and entered == [torch.device("cuda", 1)]
    assert on_input_device(lambda x: x)(torch.ones(3)).sum() == 3 and len(entered) == 1  # the CPU: nothing
    guard = on_input_device(lambda x: x).__code__
    assert all(w.__code__ is guard for w in (qk_impact_triton, masked_column_sumsq_triton, select_count_triton))


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_on_a_second_gpu_match_the_first():
    from kernels import select_count_triton

    hq, hk, d, t = 4, 2, 16, 9
    q, k, v, mask = inputs(hq, hk, d, t, 3)
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, None, None, False, 3)
    results = []
    for device in ("cuda:0", "cuda:1"):
        moved = [x.float().to(device) for x in (q, k, v, cos, sin)]
        q_imp, k_imp = qk_impact_triton(*moved, mask.to(device), spec)
        norms = masked_column_sumsq_triton(moved[0].flatten(2), mask.to(device))
        counts = torch.zeros(q_imp.shape[1], dtype=torch.int32, device=device)
        order = select_count_triton(q_imp, counts, k=3)
        torch.cuda.synchronize(device)
        results.append([x.cpu() for x in (q_imp, k_imp, norms, counts, order)])
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_verify_triton_backend_end_to_end(tmp_path, capsys):
    text = tmp_path / "s.txt"
    text.write_text("Le chat dort sur le toit.\nHabari.\n", encoding="utf-8")
    assert main(["verify", "--model", "tiny:gemma2", "--backend", "triton", "--layers", "0",
                 "--neurons-per-group", "all", "--text", str(text)]) == 0
    out = capsys.readouterr().out
    assert "backend triton" in out and "PASS" in out


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (6, 128), (4, 300), (3, 9000), (2, 18944)])
def test_select_count_kernel_matches_the_twin(shape):
    """Top-k order and counts (ties included: equal impacts go to the lower index) and σ mode,
    for rows of one chunk and of several (the kernel reads 4096 impacts at a time)."""
    from kernels import count_selected, select_count_torch, select_count_triton, top_k_order

    b, w = shape
    gen = torch.Generator().manual_seed(w)
    impacts = torch.rand(b, w, generator=gen)
    impacts[:, ::5] = impacts[:, :1].clone()  # exact ties, in every chunk
    impacts[0] = 0.25  # a row of one value
    if b > 2:
        impacts[1, ::2] = 0.0  # zeros, and −0.0, which is as large as 0.0
        impacts[1, ::3] = -0.0
        impacts[2] = 1 + torch.randint(0, 300, (w,), generator=gen) * 2.0 ** -23  # equal to the last bytes
    for k in sorted({1, max(1, w // 100), max(1, w // 10), w if w < 1000 else 1}):  # (a sort of 9000: minutes here)
        counts = torch.full((w,), 7, dtype=torch.int32, device=DEVICE)  # incremented in place
        order = select_count_triton(impacts.to(DEVICE), counts, k=k)
        assert torch.equal(order.cpu().long(), top_k_order(impacts, k))
        assert torch.equal(counts.cpu(), 7 + count_selected(top_k_order(impacts, k), w))
    counts = torch.zeros(w, dtype=torch.int32, device=DEVICE)
    assert select_count_triton(impacts.to(DEVICE), counts, sigma=0.5) is None
    assert torch.equal(counts.cpu(), select_count_torch(impacts, sigma=0.5))


def test_select_count_kernel_selects_groups_side_by_side_into_given_rows():
    """Groups of different widths and k in one launch, each selected on its own (indices within
    the group), their orders written into given rows of a larger order (as detection keeps its
    ranks), the others untouched; σ mode counts each column once. Checked group by group against
    the twin."""
    from kernels import count_selected, select_count_torch, select_count_triton, top_k_order

    widths, ks = (300, 37, 5000), (3, 37, 50)
    gen = torch.Generator().manual_seed(5)
    impacts = torch.rand(3, sum(widths), generator=gen)
    impacts[:, ::7] = impacts[:, :1].clone()  # ties across the groups' edges
    groups = impacts.split(widths, dim=1)
    counts = torch.full((sum(widths),), 2, dtype=torch.int32, device=DEVICE)
    order = torch.full((5, 2, sum(ks)), -1, dtype=torch.int32, device=DEVICE)  # [sentences, layers, Σk]
    rows = torch.tensor([4, 0, 2], device=DEVICE)
    layer = order[:, 1]
    assert select_count_triton(impacts.to(DEVICE), counts, k=ks, widths=widths, order=layer, rows=rows) is layer
    order, counts = order.cpu().long(), counts.cpu()
    assert (order[:, 0] == -1).all() and (order[[1, 3], 1] == -1).all()
    for values, got, counted, k in zip(groups, order[rows.cpu(), 1].split(ks, dim=1), counts.split(widths), ks):
        assert torch.equal(got, top_k_order(values, k))
        assert torch.equal(counted, 2 + count_selected(top_k_order(values, k), values.shape[1]))
    counts = torch.zeros(sum(widths), dtype=torch.int32, device=DEVICE)
    assert select_count_triton(impacts.to(DEVICE), counts, sigma=0.5, widths=widths) is None
    assert torch.equal(counts.cpu(), select_count_torch(impacts, sigma=0.5))
    with pytest.raises(ValueError, match="do not split into groups"):
        select_count_triton(impacts.to(DEVICE), counts, k=ks, widths=(300, 37))


def test_select_count_kernel_refuses_a_k_it_cannot_sort():
    from kernels import select_count_triton
    from kernels.select_count import MAX_TOP_K

    counts = torch.zeros(MAX_TOP_K + 1, dtype=torch.int32, device=DEVICE)
    for k in (0, MAX_TOP_K + 1):
        with pytest.raises(ValueError, match="the kernel selects 1 to min"):
            select_count_triton(torch.rand(2, MAX_TOP_K + 1, device=DEVICE), counts, k=k)


@pytest.mark.parametrize("family,max_top_k,sigma", [("qwen3", None, None), ("qwen3", 3, None), ("llama", 4, None),
                                                     ("llama", None, 1.0)])
def test_detect_with_the_triton_backend_equals_the_twin(monkeypatch, family, max_top_k, sigma):
    """Also when a k over what the selection kernel sorts takes the twin: tiny qwen3, ρ = 0.1 and
    at most 3, k and v (k = 2) take the kernel, ffn, q and o (k = 4) the twin; tiny llama and at
    most 4, ffn (k = 4), k and v (k = 2) take it, q and o (k = 7) the twin. And in threshold mode."""
    import importlib

    from neurolang.detect import detect
    from neurolang.models import load_model

    if max_top_k is not None:
        monkeypatch.setattr(importlib.import_module("neurolang.detect"), "MAX_TOP_K", max_top_k)

    model, tokenizer = load_model(f"tiny:{family}", device=DEVICE)
    runs = [detect(model, tokenizer, "builtin", ["fr"], max_sentences=2, eval_sentences=1, max_length=12, ratio=0.1,
                   sigma=sigma, tau=0.5, backend=backend, progress=False) for backend in ("torch", "triton")]
    counts = runs[0].counts["fr"]
    assert 0 < sum(c.sum() for c in counts.values()) < 2 * sum(c.numel() for c in counts.values())  # 2 sentences
    for g in counts:
        assert torch.equal(counts[g], runs[1].counts["fr"][g])
        if sigma is None:
            assert torch.equal(runs[0].ranks["fr"][g], runs[1].ranks["fr"][g])


def test_triton_impacts_of_every_layer_take_their_own_rotary_tables(monkeypatch):
    """A forward pass hands every layer the same cos and sin, which the Triton path converts to
    float32 once (`_float32_rotary`); Gemma3's local layers get a second pair (another RoPE base).
    Every layer's impacts on the Triton path equal the twin's, and two conversions serve three layers."""
    import neurolang.impact as impact
    from neurolang.adapters import ModelAdapter
    from neurolang.corpus import pad_batch
    from neurolang.impact import compute_impacts
    from neurolang.tiny import tiny_model

    adapter = ModelAdapter(tiny_model("gemma3_text").to(DEVICE))
    ids, mask = pad_batch([[5, 9, 30, 44, 7, 81, 12], [3, 60, 61]], 0, DEVICE)
    converted = []
    real = impact._float32_rotary
    monkeypatch.setattr(impact, "_float32_rotary",
                        lambda cos, sin, batch, kept: converted.append(cos in kept) or real(cos, sin, batch, kept))
    fast = compute_impacts(adapter, ids, mask, backend="triton")
    assert converted == [False, False, True]  # sliding, full, sliding
    twin = compute_impacts(adapter, ids, mask, backend="torch")
    for layer in twin:
        for group in twin[layer]:
            torch.testing.assert_close(fast[layer][group].cpu(), twin[layer][group].cpu(), rtol=2e-5,
                                       atol=1e-6 * float(twin[layer][group].max()))


def test_impacts_multiply_in_full_float32_whatever_the_process_chose(monkeypatch):
    """`torch.set_float32_matmul_precision("high")` (TF32 products on a GPU, ~1e-3 relative) must
    not reach the impacts' matrix products, in the twins or the Triton wrapper; it is back after."""
    import kernels.column_norms as column_norms
    import kernels.qk_impact as qk

    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def record(*args, **kwargs):
            seen.append((name, torch.backends.cuda.matmul.fp32_precision))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, record)

    spy(qk, "_run_chunk")  # the twin's fused chunk (its products with V)
    spy(column_norms.torch, "einsum")  # the column twin's masked sum
    hq, hk, d, t = 4, 2, 8, 5
    q, k, v, mask = inputs(hq, hk, d, t, 3)
    cos, sin = rope(t, d, torch.float64)
    spec = spec_for(hq, hk, d, None, None, False, 3)
    torch.set_float32_matmul_precision("high")
    try:
        qk.qk_impact_torch(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec)
        qk_impact_triton(*on_device(q, k, v, cos, sin), mask.to(DEVICE), spec)
        masked_column_sumsq_torch(q.float(), mask)
        after = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision("highest")
    assert {name for name, _ in seen} == {"_run_chunk", "einsum"}
    assert {precision for _, precision in seen} == {"ieee"}
    assert after == "high"
