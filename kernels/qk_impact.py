"""Exact Q/K neuron impacts (SPEC §2): what zeroing one pre-RoPE channel of q_proj / k_proj does.

Zeroing channel c of head h's raw query q (bias included) changes its post-RoPE query by the
rotary column R_i[:, c] = cos_i[c]·e_c + σ_c·sin_i[p]·e_p (p the rotation partner, σ = ±1), and,
with a per-head RMS norm, rescales the head vector of each token i by r_i = rms(q_i)/rms(q_i⊖c).
The scaled pre-soft-cap logits of query i and key j therefore become

    x'_ij = r_i · (x_ij − Δ_ij),   Δ_ij = s·q̂_i[c]·(cos_i[c]·k_j[c] + σ_c·sin_i[p]·k_j[p])

(q̂ the normed pre-RoPE query, k post-RoPE): two rank-1 terms. For a key channel the roles of
rows and columns swap and the change reaches every query head of the KV group.

Impacts are computed from the logit change δ_ij = ℓ'_ij − ℓ_ij without forming A − A' by
subtracting two softmaxes: with e_ij = expm1(δ_ij) and W_i = Σ_j A_ij·e_ij,

    (A' − A)_ij = A_ij·(e_ij − W_i) / (1 + W_i),

which keeps full relative precision even when a neuron moves the attention very little (rows
that change a lot fall back to a direct, max-shifted softmax, see `_rough_sq`). The
PyTorch twin first takes out of δ_i its A-weighted mean Σ_j A_ij·δ_ij, which the softmax
ignores, so that W is small exactly where A moves little and never below 0, and only W past 2^20
needs the direct softmax (`_gentle`; the Triton kernels do not take the mean out yet: where a
dominant key's logit moves while it stays dominant, their U − W·O of the expm1 form, or past
|W| = ½ the direct softmax's A'V − O, cancels to float32's noise; see tests/fuzz_qk_impact.py).
Soft-capping is handled the same way, as a difference that never subtracts two tanh:
tanh(a + d) − tanh(a) = sinh(d) / (cosh a · cosh(a + d)) (`_tanh_change`).

Two metrics: `output`, ‖(A − A')V‖_F (the paper's, the default), and `probs`, ‖A − A'‖²_F (what
the authors' released code computes). Both are summed over the query heads a neuron reaches.
"""
import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import torch

from kernels.dispatch import full_float32_matmuls, on_input_device

METRICS = ("output", "probs")
PRECISIONS = ("ieee", "tf32x3", "tf32", "fp16x3")
LAYOUTS = ("stacked", "channel", "pair")  # the Triton kernels' programs: see `qk_impact_triton`


@dataclass(frozen=True)
class HeadNorm:
    """A per-head RMS norm (Qwen3, Gemma3 `q_norm`/`k_norm`): x · rsqrt(mean(x²) + eps) · scale."""

    scale: torch.Tensor  # [head_dim], the effective multiplier (Gemma's 1 + weight)
    eps: float


@dataclass(frozen=True)
class AttentionSpec:
    """Everything about one attention layer that the impacts depend on, beyond its activations."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None = None
    sliding_window: int | None = None
    q_norm: HeadNorm | None = None
    k_norm: HeadNorm | None = None

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _heads(x: torch.Tensor, n: int, d: int, acc: torch.dtype | None) -> torch.Tensor:
    """x [B, T, n·D] as [B, n, T, D] in dtype `acc` (None: x's own, a view where x's strides allow)."""
    return (x if acc is None else x.to(acc)).unflatten(-1, (n, d)).transpose(1, 2)


def _normalise(x: torch.Tensor, norm: HeadNorm | None):
    """Normed heads and, per (token, channel), r and r − 1 of zeroing that channel (or None)."""
    if norm is None:
        return x, None, None
    d = x.shape[-1]
    sq = x.square()
    sumsq = sq.sum(-1, keepdim=True)
    xn = x * torch.rsqrt(sumsq / d + norm.eps) * norm.scale.to(x)
    rest = (sumsq - sq).clamp_min(0) / d + norm.eps
    r_sq_minus_1 = (sq / d) / rest
    r = torch.sqrt(1 + r_sq_minus_1)
    return xn, r, r_sq_minus_1 / (r + 1)


def _key_range(rows: slice, window: int | None) -> slice:
    """The keys query rows `rows` can see: up to the last row (causal), from the first row's window."""
    return slice(0 if window is None else max(0, rows.start - window + 1), rows.stop)


def _allowed(token_mask: torch.Tensor, rows: slice, keys: slice, window: int | None) -> torch.Tensor:
    """[B, I, K] keys `keys` each query row may attend to: causal, real keys, inside the window."""
    i = torch.arange(rows.start, rows.stop, device=token_mask.device)[:, None]
    j = torch.arange(keys.start, keys.stop, device=token_mask.device)[None, :]
    ok = j <= i
    if window is not None:
        ok = ok & (i - j < window)
    # The diagonal keeps padded query rows finite; their contributions are dropped anyway.
    return (ok[None] & token_mask[:, None, keys]) | (i == j)[None]


def _expm1_(x: torch.Tensor, small: bool = False) -> torch.Tensor:
    """exp(x) − 1 to float32 rounding, in place where eager (x is the caller's temporary); `small`:
    the caller knows |x| ≤ ½. Under torch.compile not torch.expm1, which PyTorch 2.13's vectorised
    CPU code computes as exp(x) − 1 (pytorch/pytorch#189803), every digit lost as x nears 0: there
    the Taylor polynomial Σ_{n ≤ 9} xⁿ/n! (under 1e-9 relative) for |x| ≤ ½, exp(x) − 1 beyond."""
    if not torch.compiler.is_compiling():
        return x.expm1_()
    poly = torch.full_like(x, 1 / math.factorial(9))
    for n in range(8, 0, -1):
        poly = poly * x + 1 / math.factorial(n)
    return x * poly if small else torch.where(x.abs() <= 0.5, x * poly, torch.exp(x) - 1)


def _tanh_change(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """tanh(a + d) − tanh(a) to float32 rounding for any a and d: sinh(d) / (cosh a · cosh(a + d))
    in exponentials of non-positive arguments, 2·sign(d)·E·(1 − e^-2|d|) / ((1 + e^-2|a|)(1 + e^-2|s|)),
    s = a + d, E = e^(−2·min(|a|, |s|)) where a and s have one sign, else 1. (The shorter
    tanh(d)·(1 − tanh a·tanh s) cancels once |a| passes 2: 1e-4 relative at 4, all digits at 10.)"""
    s = a + d
    same_sign = a * s > 0
    u = torch.exp(-2 * a.abs())  # a: [B, K, I, 1], shared by the channels
    v = s.abs_().mul_(-2).exp_()  # e^-2|s|; in place from here on (the eager twin's time and memory)
    out = torch.maximum(u, v).masked_fill_(~same_sign, 1.0)  # E: the larger of e^-2|a|, e^-2|s|
    out.mul_(_expm1_(d.abs().mul_(-2))).mul_(torch.sign(d)).mul_(-2)
    return out.div_(v.add_(1).mul_(1 + u))


def _capped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return x if softcap is None else (x / softcap).tanh_().mul_(softcap)  # one new tensor, x kept


def _base_logits(x: torch.Tensor, token_mask: torch.Tensor, rows: slice, keys: slice, spec: AttentionSpec) -> torch.Tensor:
    """Soft-capped scaled scores [B, I, K] of query rows `rows` and keys `keys`, −inf where not allowed."""
    return _capped(x, spec.softcap).masked_fill(~_allowed(token_mask, rows, keys, spec.sliding_window), float("-inf"))


def _times_expm1(p: torch.Tensor, logp: torch.Tensor, dl: torch.Tensor) -> torch.Tensor:
    """A·(e^Δ − 1) for A = p = exp(logp) and logit changes Δ = dl, as the kernels' `_weighted_expm1`:
    p·expm1(Δ) for |Δ| ≤ ½; exp(logp + Δ) − p beyond, exact where A is tiny (or subnormal) but
    A' = A·e^Δ is not; 0 at masked keys (logp = −inf), inf where A' overflows, which fails the
    caller's gentle test."""
    near = _expm1_(dl.clamp(-0.5, 0.5), small=True).mul_(p)
    return torch.where(dl.abs() <= 0.5, near, torch.exp(logp + dl).sub_(p))


def _gentle(w_sum: torch.Tensor) -> torch.Tensor:
    """Rows whose expm1 form is exact to rounding: W ≤ 2^20 (False for inf and NaN). With the
    A-weighted mean change taken out, W = Σ_j A_ij·e^Δ_ij − 1 ≥ 0 up to rounding (Jensen), so 1 + W
    never cancels, and the errors of U and W·O grow as 1 + W does, which the division takes back:
    a large W loses no more than the direct softmax does (the same float32 error against float64 on
    SmolLM2-135M's Thai sentences either way). Past 2^20 the products A·e·V could overflow where V
    is large: those rows take `_rough_sq`. (The Triton kernels, which keep the mean in, take
    |W| ≤ ½.)"""
    return w_sum <= 2.0 ** 20


def _chunk_sq(x, logp, p, masked, out, v, valid_rows, row_c, row_p, col_c, col_p, r, r_m1,
              softcap: float | None, metric: str):
    """Σ over the valid rows that move gently of ‖ΔA_i V‖² (or ‖ΔA_i‖²) for a chunk of channels,
    [B, C]; and, for `_rough_sq`, the other valid (row, channel) pairs [B, I, C] and the logit
    changes [B, K, I, C].

    Laid out keys first and channels last, [B, K, I, C]: the element-wise work runs along the
    channels (whole vectors even for sentences of a few tokens) and the product with V is one
    batched matmul of a transposed view. x, logp, p, masked: [B, K, I, 1] base logits (pre-cap),
    log-probs (−inf where masked), probabilities and the mask; out: [B, I, 1, D] base output;
    v: [B, K, D]. The scaled logit change before normalisation is Δ = row_c·col_c + row_p·col_p
    (a channel and its rotary partner, [B, 1, I, C] times [B, K, 1, C]); with a head norm,
    x' = r·(x − Δ), r per row (query channels, [B, 1, I, C]) or per key (key channels, [B, K, 1, C]).
    A row moves gently (`_gentle`) where the expm1 form (A·e − A·W) / (1 + W) is exact to
    rounding, however small the change.
    """
    delta = torch.addcmul(row_c * col_c, row_p, col_p)
    dx = delta.neg_() if r is None else torch.addcmul(r_m1 * x, r, delta, value=-1.0)
    if softcap is not None:
        dl = softcap * _tanh_change(x / softcap, dx / softcap)
    else:
        dl = dx
    dl = dl.masked_fill_(masked, 0.0)
    # Less the row's A-weighted mean change, which the softmax ignores: W then stays small wherever
    # A moves little, also where a dominant key's logit moves a lot and it stays dominant (W would
    # be e^Δ − 1, and U − W·O, like the direct softmax's A'V − O, would lose every digit).
    # Masked keys (A = 0) then change by −mean; `_times_expm1` gives them 0 all the same.
    dl = dl.sub_((p * dl).sum(1, keepdim=True))
    pe = _times_expm1(p, logp, dl)
    w_sum = pe.sum(1, keepdim=True)  # [B, 1, I, C]
    b, k, i, c = pe.shape
    if metric == "output":
        # ΔO_i = (Σ_j p_ij·e_ij·V_j − W_i·O_i) / (1 + W_i): the expm1 form without forming A' − A.
        u = torch.bmm(pe.reshape(b, k, i * c).transpose(1, 2), v).view(b, i, c, -1)  # Σ_j A·e·V_j
        w = w_sum.view(b, i, c, 1)
        per_row = ((u - w * out) / (1 + w)).square().sum(-1)
    else:
        per_row = ((pe - p * w_sum) / (1 + w_sum)).square().sum(1)
    gentle = _gentle(w_sum).view(b, i, c)
    valid = valid_rows[..., None]
    return torch.where(valid & gentle, per_row, 0.0).sum(1), valid & ~gentle, dl


def _rough_sq(logp, out, v, rough, dl, metric: str, budget: int = 1 << 21) -> torch.Tensor:
    """`_chunk_sq`'s sums for the (row, channel) pairs `rough` [B, I, C] past `_gentle`, [B, C]:
    their new softmax directly, shifted by its own maximum (no overflow). Rare: none of 22 million
    pairs in every fifth layer call of SmolLM2-135M on 60 Thai sentences. Gathered `budget` elements
    at a time (pairs × keys × head_dim)."""
    sq = torch.zeros(rough.shape[0], rough.shape[2], dtype=dl.dtype, device=dl.device)
    seq, row, chan = rough.nonzero(as_tuple=True)
    step = max(1, budget // (v.shape[1] * v.shape[2]))
    for n0 in range(0, seq.numel(), step):
        s, i, c = (x[n0:n0 + step] for x in (seq, row, chan))
        base = logp[s, :, i, 0]  # [pairs, K]
        new = torch.softmax(base + dl[s, :, i, c], dim=-1)
        if metric == "output":
            change = torch.bmm(new[:, None], v[s])[:, 0] - out[s, i, 0]
        else:
            change = new - base.exp()
        sq.index_put_((s, c), change.square().sum(-1), accumulate=True)
    return sq


_compiled_chunk = None


def _chunk_function():
    """The fused (torch.compile) chunk on the CPU unless NEUROLANG_COMPILE=0; else eager."""
    global _compiled_chunk
    if os.environ.get("NEUROLANG_COMPILE", "1") == "0":
        return _chunk_sq
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_sq, dynamic=True)
    return _compiled_chunk


def _run_chunk(*args):
    args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)  # stable strides: fewer recompiles
    fn = _chunk_function()
    try:
        sq, rough, dl = fn(*args)
    except Exception as err:  # a machine without a working compiler: stay correct, say so once
        if fn is _chunk_sq:
            raise
        warnings.warn(f"torch.compile failed ({type(err).__name__}); using the eager Q/K twin", stacklevel=2)
        os.environ["NEUROLANG_COMPILE"] = "0"
        sq, rough, dl = _chunk_sq(*args)
    if bool(rough.any()):
        logp, out, v, metric = args[1], args[4], args[5], args[-1]
        sq = sq + _rough_sq(logp, out, v, rough, dl, metric)
    return sq


def _chunks(n: int, t: int, d: int, budget: int) -> tuple[int, int, int]:
    """(sequences, channels, query rows) a chunk takes: its [sequences, rows, channels, keys or
    head_dim] tensors stay within `budget` elements unless one sequence, channel and row exceed it.
    Rows come in at least four chunks once a sentence passes 64 tokens (the causal mask then
    spares a chunk the keys after its last row: 5/8 of the work of whole rows)."""
    width = max(t, d)
    channels = d if d * width <= budget else max(1, budget // width)
    rows = max(1, min(t, budget // (channels * width), max(16, -(-t // 4))))
    return max(1, min(n, budget // (channels * rows * width))), channels, rows


@full_float32_matmuls()
def qk_impact_torch(q, k, v, cos, sin, token_mask, spec: AttentionSpec, metric: str = "output",
                    chunk_elements: int = 1 << 21):
    """Exact impacts of every Q and K neuron of one layer, per sentence.

    q: [B, T, n_heads·D], k, v: [B, T, n_kv_heads·D], the raw projection outputs (biases
    included, before q/k norm and RoPE); cos, sin: [B or 1, T, D]; token_mask: [B, T] bool.
    Returns (q_impact [B, n_heads·D], k_impact [B, n_kv_heads·D]) in float32 (float64 stays);
    `output` gives ‖(A − A')V‖_F, `probs` gives ‖A − A'‖²_F.

    The work goes in chunks of (sentence, query head) sequences × channels × query rows
    (`_chunks`): sentences of a few tokens share a chunk across heads and sentences, long ones are
    cut into row chunks that see only the keys they can attend to.

    Memory: beyond float32 copies of q, k, v, cos, sin (O(B·heads·T·D)), the working set is a
    few (about eight; more with soft-capping) float32 tensors of at most `chunk_elements`
    elements each (sequences × rows × channels × keys or head_dim), so peak extra memory is about
    32·chunk_elements bytes (64 MiB at the default) whatever B, T and the head count are; with
    soft-capping, eager, 194 MiB peak (process RSS) at gemma2-9b's shape and T = 256. Chunks of
    2^21 elements were the fastest of 2^16 … 2^21 on the 2-core CI machine at llama3.1-8b's shape
    (8 sentences, T = 32 and 64) and SmolLM2's (9 × 64, 3 KV heads; 8 sentences, T = 12 to 96)
    and about level with 2^20 at T = 256 (one sentence), as before at 2^18 … 2^22. A tensor past
    32 MiB (glibc's largest mmap threshold) is new pages each time, about 6 ms for 32 MiB here, which
    is why the head_dim-wide tensors count too.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown Q/K metric {metric!r}; choose one of {', '.join(METRICS)}")
    acc = _accumulation_dtype(q)
    b, t, _ = q.shape
    d, hq, hk, group = spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.group_size
    s = spec.scaling
    token_mask = token_mask.bool()
    cos = cos.to(acc).expand(b, t, d)
    sin = sin.to(acc).expand(b, t, d)
    qn, rq, rq_m1 = _normalise(_heads(q, hq, d, acc), spec.q_norm)
    kn, rk, rk_m1 = _normalise(_heads(k, hk, d, acc), spec.k_norm)
    vv = _heads(v, hk, d, acc)
    qr = qn * cos[:, None] + _rotate_half(qn) * sin[:, None]
    kr = kn * cos[:, None] + _rotate_half(kn) * sin[:, None]
    # One sequence per (sentence, query head): the query side flattened to [B·n_heads, T, D], the
    # key side to [B·n_kv_heads, T, D], each sequence's KV head in `kv`.
    qn, rq, rq_m1, qr, kn, rk, rk_m1, kr, vv = (None if x is None else x.flatten(0, 1)
                                                for x in (qn, rq, rq_m1, qr, kn, rk, rk_m1, kr, vv))
    n = b * hq
    sentence = torch.arange(n, device=q.device) // hq
    kv = sentence * hk + torch.arange(n, device=q.device) % hq // group
    q_sq = torch.zeros(n, d, dtype=acc, device=q.device)
    k_sq = torch.zeros(n, d, dtype=acc, device=q.device)  # per query head, summed over the group at the end
    n_seq, n_chan, n_rows = _chunks(n, t, d, chunk_elements)
    for n0 in range(0, n, n_seq):
        seqs = slice(n0, min(n, n0 + n_seq))
        kv_heads, sentences = kv[seqs], sentence[seqs]
        mask = token_mask[sentences]
        for i0 in range(0, t, n_rows):
            rows = slice(i0, min(t, i0 + n_rows))
            keys = _key_range(rows, spec.sliding_window)  # K keys: the others are masked anyway
            q_rows, k_keys, v_keys = qr[seqs, rows], kr[kv_heads, keys], vv[kv_heads, keys]  # [N, I | K, D]
            x = s * q_rows @ k_keys.transpose(-1, -2)  # [N, I, K]
            logp = torch.log_softmax(_base_logits(x, mask, rows, keys, spec), dim=-1)
            p = logp.exp()
            out = (p @ v_keys)[:, :, None]  # [N, I, 1, D]
            x, logp, p = (y.transpose(1, 2).contiguous()[..., None] for y in (x, logp, p))  # [N, K, I, 1]
            masked = torch.isinf(logp)
            valid = mask[:, rows]
            cos_rows, sin_rows = cos[sentences, rows], sin[sentences, rows]
            cos_keys, sin_keys = cos[sentences, keys], sin[sentences, keys]
            k_plain = kn[kv_heads, keys]  # [N, K, D]
            rk_keys, rk_m1_keys = (None, None) if rk is None else (rk[kv_heads, keys], rk_m1[kv_heads, keys])
            for c0 in range(0, d, n_chan):
                ch = torch.arange(c0, min(d, c0 + n_chan), device=q.device)
                partner = (ch + d // 2) % d
                sign = torch.where(ch < d // 2, 1.0, -1.0).to(acc)
                # Query channels: the change of q̂_i[c] along its rotary column.
                qh = s * qn[seqs, rows][..., ch]  # [N, I, C]
                row_c = (qh * cos_rows[..., ch])[:, None]  # [N, 1, I, C]
                row_p = (qh * sign * sin_rows[..., partner])[:, None]
                col_c = k_keys[..., ch][:, :, None]  # [N, K, 1, C]
                col_p = k_keys[..., partner][:, :, None]
                r = r_m1 = None
                if rq is not None:
                    r = rq[seqs, rows][..., ch][:, None]
                    r_m1 = rq_m1[seqs, rows][..., ch][:, None]
                q_sq[seqs, ch] += _run_chunk(x, logp, p, masked, out, v_keys, valid, row_c, row_p, col_c, col_p, r,
                                             r_m1, spec.softcap, metric)
                # Key channels of the sequence's KV head: the same with rows and columns swapped.
                kh = s * k_plain[..., ch]  # [N, K, C]
                col_c = (kh * cos_keys[..., ch])[:, :, None]  # [N, K, 1, C]
                col_p = (kh * sign * sin_keys[..., partner])[:, :, None]
                row_c = q_rows[..., ch][:, None]  # [N, 1, I, C]
                row_p = q_rows[..., partner][:, None]
                r = r_m1 = None
                if rk is not None:
                    r = rk_keys[..., ch][:, :, None]
                    r_m1 = rk_m1_keys[..., ch][:, :, None]
                k_sq[seqs, ch] += _run_chunk(x, logp, p, masked, out, v_keys, valid, row_c, row_p, col_c, col_p, r,
                                             r_m1, spec.softcap, metric)
    q_sq = q_sq.view(b, hq, d)
    k_sq = k_sq.view(b, hk, group, d).sum(2)
    return _finish(q_sq, metric), _finish(k_sq, metric)


def _finish(sq: torch.Tensor, metric: str) -> torch.Tensor:
    """`output` is a norm; `probs` is, as the released code has it, a squared norm."""
    return (sq.sqrt() if metric == "output" else sq).reshape(sq.shape[0], -1)


@full_float32_matmuls()
def qk_impact_reference(q, k, v, cos, sin, token_mask, spec: AttentionSpec, metric: str = "output"):
    """The straightforward Appendix-A form: for every channel at once, literally zero it in the raw
    projection, redo norm, RoPE, scores, soft-cap, masks and softmax, and compare (A − A')V.

    Broadcasts over channels ([D, T, T] per head and sentence): memory O(D·T²). Computed in the
    input dtype (pass float64 for a high-precision reference). Same shapes as `qk_impact_torch`.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown Q/K metric {metric!r}; choose one of {', '.join(METRICS)}")
    b, t, _ = q.shape
    d, hk, group = spec.head_dim, spec.n_kv_heads, spec.group_size
    dt = q.dtype
    zero_each = (1 - torch.eye(d, dtype=dt, device=q.device))[:, None, :]  # [D(channel), 1, D]
    q_imp = torch.zeros(b, spec.n_heads, d, dtype=dt, device=q.device)
    k_imp = torch.zeros(b, hk, d, dtype=dt, device=q.device)

    def prep(x, norm, c, s_):
        if norm is not None:
            x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps) * norm.scale.to(x)
        return x * c + _rotate_half(x) * s_

    def attend(qx, kx, vx, allowed):
        scores = _capped(spec.scaling * qx @ kx.transpose(-1, -2), spec.softcap)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return probs, probs @ vx

    def distance(p0, o0, p1, o1):
        if metric == "output":
            return (o0 - o1).square().sum((-1, -2))
        return (p0 - p1).square().sum((-1, -2))

    for bi in range(b):
        pos = torch.nonzero(token_mask[bi]).flatten()
        c, s_ = cos.expand(b, t, d)[bi, pos].to(dt), sin.expand(b, t, d)[bi, pos].to(dt)
        allowed = pos[None, :] <= pos[:, None]
        if spec.sliding_window is not None:
            allowed &= pos[:, None] - pos[None, :] < spec.sliding_window
        qh = q[bi, pos].to(dt).view(len(pos), spec.n_heads, d).transpose(0, 1)
        kh = k[bi, pos].to(dt).view(len(pos), hk, d).transpose(0, 1)
        vh = v[bi, pos].to(dt).view(len(pos), hk, d).transpose(0, 1)
        for g in range(hk):
            kg = prep(kh[g], spec.k_norm, c, s_)
            kz = prep(kh[g] * zero_each, spec.k_norm, c, s_)  # [D, T, D]
            for h in range(g * group, (g + 1) * group):
                qx = prep(qh[h], spec.q_norm, c, s_)
                p0, o0 = attend(qx, kg, vh[g], allowed)
                p1, o1 = attend(prep(qh[h] * zero_each, spec.q_norm, c, s_), kg, vh[g], allowed)
                q_imp[bi, h] = distance(p0, o0, p1, o1)
                p1, o1 = attend(qx, kz, vh[g], allowed)
                k_imp[bi, g] += distance(p0, o0, p1, o1)
    return _finish(q_imp, metric), _finish(k_imp, metric)


# ----------------------------------------------------------------------------------------------
# Triton kernels: one program per (sentence·head, query tile, block of channels), looping over the
# key tiles the query tile can see. A block's channels share everything that does not depend on
# the channel: the base logits Q·Kᵀ, the masks and probabilities, the K and V tiles; their
# perturbed probabilities are stacked into one [channels·rows, keys] @ [keys, head_dim] product.
# They never materialise channels × T × T: per program the state is a few [channels·BLOCK_M,
# BLOCK_D] tiles. `_qk_kernel` does the common (gentle) rows and flags the others, which
# `_qk_rough_kernel` then does in a second launch (see `_chunk_sq` and `_rough_sq` for the two forms).
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch twin stays available
    triton = None

if triton is not None:
    # Triton's interpreter (the tests on a CPU) runs no inline PTX: there `_exp2` imitates it.
    _PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
    LOG2_E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _exp2(x):
        """2^x. On a GPU one ex2.approx.ftz: results under 2^-126 flush to 0, which costs nothing
        here (they are only ever added to, or multiply, numbers that dwarf them) and saves the
        three instructions per exp that Triton's exp spends keeping them subnormal. The
        interpreter flushes the same results, so that the tests see what the GPU does."""
        if _PTX:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.where(x < -126.0, 0.0, tl.exp2(x))

    @triton.jit
    def _reciprocal(x):
        """1/x for x of normal size. On a GPU one rcp.approx.ftz (1 ulp) instead of the full
        division's range checks (about ten instructions an element in sm_90a SASS)."""
        if _PTX:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return 1.0 / x

    @triton.jit
    def _opaque(x):
        """x itself, through an empty inline asm (output tied to input: no instruction) that the
        compiler cannot see through. Given to a wgmma as its accumulator, it makes Triton wait for
        the previous products first (see `_qk_kernel`)."""
        if _PTX:
            return tl.inline_asm_elementwise("", "=r,0", [x], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return x

    @triton.jit
    def _exp(x):
        """exp(x), as `_exp2`."""
        return _exp2(x * LOG2_E)

    @triton.jit
    def _expm1_small(x):
        """exp(x) − 1 for |x| ≤ ½ to float32 rounding: x·P(x), P of degree 6 fitted to (eˣ − 1)/x
        by Remez for the least largest relative error (3e-9; in float32, 1.3e-7 at worst, as the
        degree-8 Taylor form it replaces, for one FMA fewer), FMAs."""
        poly = 0.0001984119153348729
        poly = poly * x + 0.0013997324276715517
        poly = poly * x + 0.008333634585142136
        poly = poly * x + 0.041665319353342056
        poly = poly * x + 0.16666662693023682
        poly = poly * x + 0.5000000596046448
        poly = poly * x + 1.0
        return poly * x

    @triton.jit
    def _expm1_near(x):
        """exp(x) − 1 for |x| ≤ 1 (`NEAR_LIMIT`) to float32 rounding, by one polynomial: x·P(x), P of
        degree 7 fitted to (eˣ − 1)/x for the least largest relative error (2.4e-8; in float32
        with FMAs, 1.6e-7 at worst, numpy emulation), FMAs. Twice `_expm1_small`'s reach for one
        FMA more, and no exp and no select."""
        poly = 2.4760299437023273e-05
        poly = poly * x + 0.0002037028357947945
        poly = poly * x + 0.001389550753790144
        poly = poly * x + 0.008330309620013104
        poly = poly * x + 0.04166626134547569
        poly = poly * x + 0.1666671525981125
        poly = poly * x + 0.5000000492046018
        poly = poly * x + 1.0
        return poly * x

    @triton.jit
    def _expm1(x):
        """exp(x) − 1 to float32 rounding: the polynomial for |x| ≤ ½, where exp(x) − 1 would
        cancel; exp(x) − 1 beyond, where it does not."""
        return tl.where(tl.abs(x) <= 0.5, _expm1_small(x), _exp(x) - 1.0)

    @triton.jit
    def _weighted_expm1(p, logp, dl):
        """A·(exp(Δ) − 1), A = exp(logp) = p, for logit changes Δ = dl: p times the polynomial for
        |Δ| ≤ ½; exp(logp + Δ) − p beyond, which stays exact where A is tiny (subnormal, or 0
        on a GPU) but A' = A·exp(Δ) is not. Where A' overflows, inf (NaN where logp = −inf)."""
        return tl.where(tl.abs(dl) <= 0.5, p * _expm1_small(dl), _exp(logp + dl) - p)

    @triton.jit
    def _tile_tanh_change(a, u, d):
        """tanh(a + d) − tanh(a), as the torch twin's `_tanh_change`; u = e^-2|a| comes from the
        caller (shared by a block's channels). The division is `_reciprocal`'s."""
        s = a + d
        v = _exp(-2.0 * tl.abs(s))
        e = tl.where(a * s > 0, tl.maximum(u, v), 1.0)
        em = _expm1(-2.0 * tl.abs(d))  # −(1 − e^-2|d|)
        return 2.0 * e * tl.where(d < 0, em, -em) * _reciprocal((1.0 + u) * (1.0 + v))

    @triton.jit
    def _capped_change(a, t, u, d, softcap, series_limit, series_all):
        """softcap·(tanh(a + d) − tanh(a)) for a tile: t = tanh a and u = e^-2|a| come from the
        caller (shared by a block's channels). Where every |d| of the tile is at most
        `series_limit` (one branch for the whole program; `TANH_SERIES_LIMIT`): the addition
        formula (1 − t²)·τ / (1 + t·τ), τ = tanh d by its Taylor polynomial of degree 9 (under
        4e-9 relative for |d| ≤ ¼), 1 − t² as w·(2 − w), w = 1 − |t| = 2u / (1 + u), which stays
        exact where a saturates, and 1 + t·τ > 0.75 cannot cancel. Otherwise `_tile_tanh_change`,
        exact for any d. Compiled for sm_90a at head_dim 256 (16 rows, 8 channels, 32 keys), the
        soft-cap adds 18 SASS instructions per (channel, row, key) one way and 37 the other.
        `series_all`: the program knows already that all its tiles are within the limit
        (`_change_bound`), and skips the tile's maximum (a reduction across the program, with
        3 of the key loop's 8 barriers in sm_90a SASS at gemma's tiles)."""
        within = series_all
        if not series_all:
            within = tl.max(tl.abs(d)) <= series_limit
        if within:
            w = 2.0 * u * _reciprocal(1.0 + u)
            d2 = d * d
            poly = 62.0 / 2835.0
            poly = poly * d2 - 17.0 / 315.0
            poly = poly * d2 + 2.0 / 15.0
            poly = poly * d2 - 1.0 / 3.0
            tau = d + (d * d2) * poly
            change = (softcap * w * (2.0 - w)) * tau * _reciprocal(1.0 + t * tau)
        else:
            change = softcap * _tile_tanh_change(a, u, d)
        return change

    @triton.jit
    def _tanh(y):
        """tanh(y) = −e / (2 + e), e = exp(−2|y|) − 1, with the sign of y; the division is the
        GPU's approximate reciprocal (1 ulp: the exp already costs as much), `_reciprocal`."""
        e = _expm1(-2.0 * tl.abs(y))
        t = -e * _reciprocal(2.0 + e)
        return tl.where(y < 0, -t, t)

    @triton.jit
    def _split(x, PRECISION: tl.constexpr, PRESCALED: tl.constexpr = False):
        """x (float32) as (big, small) parts for `_dot`. tf32x3: a part with TF32's 10-bit mantissa
        (rounded to nearest, ties away, on its bits: exact in a TF32 product) and the rest — as
        Triton's own split, less its per-element guards against inf and NaN, which these finite
        operands never are (about a third of the key loop's instructions in sm_90a SASS). fp16x3:
        x·2^15 as a float16 and the float16 of the rest, for probability-like x (|x| ≤ 1.5 wherever
        the result is used; larger values make inf or NaN, which stay in their own rows);
        PRESCALED: x is x·2^15 already (`_value_scale`)."""
        if PRECISION == "tf32x3":
            big = ((x.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)
            return big, x - big
        elif PRECISION == "fp16x3":
            scaled = x if PRESCALED else x * 32768.0
            big = scaled.to(tl.float16)
            return big, (scaled - big.to(tl.float32)).to(tl.float16)
        else:
            return x, x

    @triton.jit
    def _value_scale(PRECISION: tl.constexpr, PROBS: tl.constexpr):
        """(s, 2^s): the scale `_split` gives a value product's left operand under fp16x3, which
        the stacked kernel builds A·e in directly (a multiplication per (channel, row, key)
        fewer); 1 otherwise."""
        if PRECISION == "fp16x3" and not PROBS:
            return 15.0, 32768.0
        else:
            return 0.0, 1.0

    @triton.jit
    def _load(PTR, offsets, mask):
        """tl.load, 0 where masked; mask None: unmasked (no predicates, no zeroed registers)."""
        if mask is None:
            return tl.load(PTR + offsets)
        else:
            return tl.load(PTR + offsets, mask=mask, other=0.0)

    @triton.jit
    def _load_operand(BIG, SMALL, offsets, mask, PRECISION: tl.constexpr, EXACT: tl.constexpr):
        """A tile of q, k or v as (big, small) parts for `_dot`: fp16x3 reads the two float16 halves
        `_operand_kernel` made; the others read the float32 values and `_split` them.
        EXACT (an operand that is its own big part, `_exact_in_big_part`): the big part alone, twice.
        mask None: unmasked, for key tiles (`KEY_SLACK`)."""
        if EXACT:
            big = _load(BIG, offsets, mask)
            return big, big
        elif PRECISION == "fp16x3":
            return _load(BIG, offsets, mask), _load(SMALL, offsets, mask)
        else:
            return _split(_load(BIG, offsets, mask), PRECISION)

    @triton.jit
    def _dot(a_big, a_small, b_big, b_small, acc, PRECISION: tl.constexpr, B_EXACT: tl.constexpr):
        """acc + a @ b from the parts of `_split` / `_load_operand`. tf32x3 and fp16x3: three
        products (small parts first), each part carrying 11 significant bits, so float32-level
        accuracy (fp16x3 on the float16 units, twice the TF32 rate); two where b has no small part
        (B_EXACT: its product would add exact zeros); ieee and tf32: one product of the values
        themselves (the small parts are the same tensors, unused)."""
        if PRECISION == "tf32x3":
            acc = tl.dot(a_small, b_big, acc, input_precision="tf32")
            if not B_EXACT:
                acc = tl.dot(a_big, b_small, acc, input_precision="tf32")
            return tl.dot(a_big, b_big, acc, input_precision="tf32")
        elif PRECISION == "fp16x3":
            acc = tl.dot(a_small, b_big, acc)
            if not B_EXACT:
                acc = tl.dot(a_big, b_small, acc)
            return tl.dot(a_big, b_big, acc)
        else:
            return tl.dot(a_big, b_big, acc, input_precision=PRECISION)

    @triton.jit
    def _block(QN, QR, QB, QS, COS, SIN, R, RM1, LSE, UNSCALE, COUNTED, T, D, n_heads, group, scaling, softcap,
               window, IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """What a program (sentence·head, query tile, channel block) needs before its key loop."""
        bh = tl.program_id(0)
        m_tile = tl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        g = h // group
        half = D // 2
        chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        chan_ok = chans < D
        partners = (chans + half) % D
        sign = tl.where(chans < half, 1.0, -1.0)
        rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < T
        q_base = (b * n_heads + h) * T * D
        k_base = (b * (n_heads // group) + g) * T * D
        cs_base = b * T * D
        q_big, q_small = _load_operand(QB, QS, q_base + rows[:, None] * D + dims[None, :],
                                       row_ok[:, None] & (dims < D)[None, :], PRECISION, False)
        # What undoes the host's scaling of the operand parts (fp16x3; 1 otherwise): of Q·Kᵀ, folded
        # into the logits' scaling, and of the value product.
        logit_scale = scaling * tl.load(UNSCALE + 2 * bh)
        value_unscale = tl.load(UNSCALE + 2 * bh + 1)
        lse = tl.load(LSE + (b * n_heads + h) * T + rows, mask=row_ok, other=0.0)
        counted = tl.load(COUNTED + b * T + rows, mask=row_ok, other=0) != 0
        # Row-side factors [channels, rows] of the rank-2 change Δ = row_c·col_c + row_p·col_p: the
        # query's channel and partner (key channels), or the rotary coefficients and q-norm
        # factors of each query channel. Times −1 / cap (−1 without a soft-cap), once here, so
        # that the key loop's products give −Δ already in the units of the soft-cap's argument.
        row_scale = -1.0
        if HAS_CAP:
            row_scale = -1.0 / softcap
        at_c = rows[None, :] * D + chans[:, None]
        at_p = rows[None, :] * D + partners[:, None]
        ok = chan_ok[:, None] & row_ok[None, :]
        r_row = tl.full([BLOCK_C, BLOCK_M], 1.0, dtype=tl.float32)
        rm1_row = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32)
        if IS_KEY:
            row_c = row_scale * tl.load(QR + q_base + at_c, mask=ok, other=0.0)
            row_p = row_scale * tl.load(QR + q_base + at_p, mask=ok, other=0.0)
        else:
            qn_c = (row_scale * scaling) * tl.load(QN + q_base + at_c, mask=ok, other=0.0)
            row_c = qn_c * tl.load(COS + cs_base + at_c, mask=ok, other=0.0)
            row_p = qn_c * sign[:, None] * tl.load(SIN + cs_base + at_p, mask=ok, other=0.0)
            if HAS_NORM:
                r_row = tl.load(R + q_base + at_c, mask=ok, other=1.0)
                rm1_row = tl.load(RM1 + q_base + at_c, mask=ok, other=0.0)
        # Only the key tiles this query tile can see: up to its last row (causal), from its
        # first row's window start.
        hi = tl.minimum(T, (m_tile + 1) * BLOCK_M)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(0, m_tile * BLOCK_M - window + 1)
        return (b, chans, chan_ok, partners, sign, rows, row_ok, q_base, k_base, cs_base, q_big, q_small, logit_scale,
                value_unscale, lse, counted, row_c, row_p, r_row, rm1_row, lo, hi)

    @triton.jit
    def _allowed_keys(rows, cols, col_ok, b, TOKENS, T, window, HAS_WINDOW: tl.constexpr):
        """[rows, keys] the keys each query row may attend to, as `_allowed`: causal, real keys,
        inside the window, and always its own (which keeps padded rows finite)."""
        key_valid = tl.load(TOKENS + b * T + cols, mask=col_ok, other=0) != 0
        allowed = (cols[None, :] <= rows[:, None]) & key_valid[None, :]
        if HAS_WINDOW:
            allowed = allowed & (rows[:, None] - cols[None, :] < window)
        return (allowed | (cols[None, :] == rows[:, None])) & col_ok[None, :]

    @triton.jit
    def _tile_change(q_big, q_small, QB, QS, q_base, logit_scale, lse, rows, row_ok, n0, b, k_base, cs_base, chans,
                     chan_ok, partners, sign, row_c, row_p, r_row, rm1_row, KN, KR, KB, KS, COS, SIN, R, RM1, TOKENS,
                     T, D, scaling, softcap, window, series_limit, series_all,
                     IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, Q_SLICE: tl.constexpr):
        """For one key tile: the allowed mask and base log-probabilities [1, rows, keys], shared by
        the block, and each channel's logit change [channels, rows, keys] (0 where not allowed).
        Q_SLICE 0: q's parts are the loop-invariant q_big, q_small, which stay in registers across
        the key loop; else q is read again (from QB, QS) each tile, Q_SLICE of head_dim at a time
        with K's matching slice (`default_q_slice`)."""
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        dims = tl.arange(0, BLOCK_D)
        # Unmasked (`KEY_SLACK`): keys past T and dims past D read other finite values, which
        # meet q's zero dims past D and then the allowed mask.
        if Q_SLICE == 0:
            k_big, k_small = _load_operand(KB, KS, k_base + cols[:, None] * D + dims[None, :], None, PRECISION, False)
            x = _dot(q_big, q_small, tl.trans(k_big), tl.trans(k_small),
                     tl.zeros([q_big.shape[0], BLOCK_N], dtype=tl.float32), PRECISION, False)
        else:
            x = tl.zeros([rows.shape[0], BLOCK_N], dtype=tl.float32)
            # 0, but not to the compiler, which would otherwise read q once before the loop, as the
            # loop-invariant load it is, and hold it in registers again.
            again = tl.where(T < 0, n0, 0)
            for d0 in tl.static_range(0, BLOCK_D, Q_SLICE):
                part = d0 + tl.arange(0, Q_SLICE)
                q_big, q_small = _load_operand(QB, QS, again + q_base + rows[:, None] * D + part[None, :],
                                               row_ok[:, None] & (part < D)[None, :], PRECISION, False)
                k_big, k_small = _load_operand(KB, KS, k_base + cols[:, None] * D + part[None, :], None, PRECISION,
                                               False)
                x = _dot(q_big, q_small, tl.trans(k_big), tl.trans(k_small), x, PRECISION, False)
        x = logit_scale * x
        # From here on everything per (row, key) is computed in the layout of the [channels, rows,
        # keys] tiles (a thread holds a key's channels in registers: no work is repeated), so the
        # logits change layout once, through shared memory. Broadcast from the product's layout,
        # a, tanh a, e^-2|a| and log A each changed it: at gemma2-9b's tiles (sm_90a SASS) 16
        # barriers a key tile, now 8 (sm90a-qk-kernel-resources.md).
        x = x[None, :, :]
        allowed = (_allowed_keys(rows, cols, col_ok, b, TOKENS, T, window, HAS_WINDOW) & row_ok[:, None])[None, :, :]
        if HAS_CAP:
            inv_cap = 1.0 / softcap  # once: per element, a multiplication instead of a division
            a = x * inv_cap
            t = _tanh(a)
            logit = softcap * t
        else:
            logit = x
        logp = tl.where(allowed, logit - lse[None, :, None], -float("inf"))
        at_c = cols[None, :] * D + chans[:, None]
        at_p = cols[None, :] * D + partners[:, None]
        ok = chan_ok[:, None] & col_ok[None, :]
        if IS_KEY:
            kn_c = scaling * tl.load(KN + k_base + at_c, mask=ok, other=0.0)
            col_c = kn_c * tl.load(COS + cs_base + at_c, mask=ok, other=0.0)
            col_p = kn_c * sign[:, None] * tl.load(SIN + cs_base + at_p, mask=ok, other=0.0)
        else:
            col_c = tl.load(KR + k_base + at_c, mask=ok, other=0.0)
            col_p = tl.load(KR + k_base + at_p, mask=ok, other=0.0)
        # The change of the logit before the soft-cap, divided by the cap with one (the row factors
        # carry −1 / cap): −Δ, and with a head norm r·(x − Δ) − x = (r − 1)·x − r·Δ.
        dx = row_c[:, :, None] * col_c[:, None, :] + row_p[:, :, None] * col_p[:, None, :]
        if HAS_NORM:
            if IS_KEY:
                r = tl.load(R + k_base + at_c, mask=ok, other=1.0)[:, None, :]
                rm1 = tl.load(RM1 + k_base + at_c, mask=ok, other=0.0)[:, None, :]
            else:
                r = r_row[:, :, None]
                rm1 = rm1_row[:, :, None]
            if HAS_CAP:
                dx = rm1 * a + r * dx
            else:
                dx = rm1 * x + r * dx
        if HAS_CAP:
            dl = _capped_change(a, t, _exp(-2.0 * tl.abs(a)), dx, softcap, series_limit, series_all)
        else:
            dl = dx
        # chan_ok changes nothing (those channels' factors are 0) but makes the mask a [channels,
        # rows, keys] one: LLVM then joins its terms once per (row, key) and selects once per
        # element, not once per term (sm_90a SASS: one FSEL per (channel, row, key) fewer).
        return allowed, logp, tl.where(allowed & chan_ok[:, None, None], dl, 0.0)

    @triton.jit
    def _change_bound(COLNORM, row_c, row_p, chans, chan_ok, b, n_heads, group, D):
        """A bound on |row_c·col_c + row_p·col_p|, the change of logit (÷ cap with a soft-cap, whose
        row factors carry it) of every (channel, row, key) this program will meet: by Cauchy–Schwarz,
        the largest over its channels of ‖(row_c, row_p)‖ over its rows times COLNORM's
        ‖(col_c, col_p)‖ over its KV head's keys ([B, KV heads, D], `_column_norms`), with 2^-20 to
        spare for the rounding of the products."""
        kv = b * (n_heads // group) + (tl.program_id(0) % n_heads) // group
        col = tl.load(COLNORM + kv * D + chans, mask=chan_ok, other=0.0)
        row = tl.sqrt_rn(tl.max(row_c * row_c + row_p * row_p, axis=1))
        return tl.max(row * col, axis=0) * (1.0 + 2.0 ** -20)

    @triton.jit
    def _qk_kernel(
        QN, QR, KN, KR, QB, QS, KB, KS, VB, VS, COS, SIN, R, RM1, LSE, OUT, UNSCALE, TOKENS, COUNTED, PARTIAL, ROUGH,
        T, D, n_heads, group, scaling, softcap, window, series_limit,
        IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        PROBS: tl.constexpr, PRECISION: tl.constexpr, V_EXACT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        Q_SLICE: tl.constexpr, W_BY_DOT: tl.constexpr, COLNORM, near_limit, BOUNDED: tl.constexpr,
    ):
        """The common case, rows that move gently: W_i = Σ_j A_ij·e_ij and ‖ΔO_i‖ (or ‖ΔA_i‖²) by
        the expm1 form. Rows that move a lot are flagged in ROUGH for `_qk_rough_kernel`.

        BOUNDED (no q/k norm, whose factors `_change_bound` leaves out): each program first bounds
        its changes of logit. Within a quarter cap (`TANH_SERIES_LIMIT`) its tiles take the
        soft-cap's Taylor form unchecked; within `near_limit` (`NEAR_LIMIT`) A·(e^Δ − 1) needs
        only `_expm1_near`: a branch each tile on a value the whole program shares, so that each
        program runs its own form's instructions only (sm_90a counts at `NEAR_LIMIT`; the forms
        tried and dropped are in sm90a-qk-kernel-resources.md).

        The value product's accumulator goes through `_opaque` each key tile, which makes Triton
        wait for the tile's products before the next tile's instead of carrying them across the
        loop's back edge, where ptxas then serialised every wgmma (note C7515: 12 waits a 16 × 64
        tile, 3 with it; sm_90a, triton 3.6.0; `benchmarks/kernel_resources.py`). A multiplication
        by a 1.0 the compiler could not see did the same for 4 instructions per (channel, row, key)
        at gemma's tiles, 2 at head_dim 128."""
        (b, chans, chan_ok, partners, sign, rows, row_ok, q_base, k_base, cs_base, q_big, q_small, logit_scale,
         value_unscale, lse, counted, row_c, row_p, r_row, rm1_row, lo, hi) = _block(
            QN, QR, QB, QS, COS, SIN, R, RM1, LSE, UNSCALE, COUNTED, T, D, n_heads, group, scaling, softcap, window,
            IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW, PRECISION, BLOCK_M, BLOCK_C, BLOCK_D)
        series_all = False
        near = False
        if BOUNDED:
            bound = _change_bound(COLNORM, row_c, row_p, chans, chan_ok, b, n_heads, group, D)
            if HAS_CAP:  # |cap·(tanh(a + d) − tanh a)| ≤ cap·|d|
                series_all = bound <= series_limit
                near = bound * softcap <= near_limit
            else:
                near = bound <= near_limit
        dims = tl.arange(0, BLOCK_D)
        # W_i = Σ_j A_ij·e_ij. W_BY_DOT (output metric): as the product of A·e's parts with a tile of
        # ones beside the value product, [channels·rows, 16] identical columns; else element-wise,
        # reduced over keys once after the loop (per tile, the reductions cost 160 shuffles a thread
        # in sm_90a SASS), in [channels, rows, keys] registers (`W_BY_DOT`).
        if W_BY_DOT and not PROBS:
            w_acc = tl.zeros([BLOCK_C * BLOCK_M, 16], dtype=tl.float32)
        else:
            w_acc = tl.zeros([BLOCK_C, BLOCK_M, BLOCK_N], dtype=tl.float32)
        u_acc = tl.zeros([BLOCK_C * BLOCK_M, BLOCK_D], dtype=tl.float32)
        shift, scale = _value_scale(PRECISION, PROBS)
        for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
            _, logp, dl = _tile_change(
                q_big, q_small, QB, QS, q_base, logit_scale, lse, rows, row_ok, n0, b, k_base, cs_base, chans,
                chan_ok, partners, sign, row_c, row_p, r_row, rm1_row, KN, KR, KB, KS, COS, SIN, R, RM1, TOKENS, T,
                D, scaling, softcap, window, series_limit, series_all, IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW,
                PRECISION, BLOCK_N, BLOCK_D, Q_SLICE)
            # However large the logit change, A·e is exact to rounding; where A' overflows, W
            # becomes infinite (or NaN), so the row fails the gentle test and the rough kernel
            # redoes it. A·e comes out times 2^s, as the value product's split wants it
            # (`_value_scale`): from A·2^s (exact) and, for the far form, log2 A + s.
            logp2 = logp * LOG2_E
            p = _exp2(logp2) * scale
            if near:
                pe = p * _expm1_near(dl)
            else:
                pe = _weighted_expm1_2(p, logp2 + shift, dl)
            if PROBS or not W_BY_DOT:
                w_acc += pe
            if not PROBS:
                cols = n0 + tl.arange(0, BLOCK_N)
                # Unmasked (`KEY_SLACK`): keys past T meet A·e = 0; dims past D are dropped below.
                v_big, v_small = _load_operand(VB, VS, k_base + cols[:, None] * D + dims[None, :], None, PRECISION,
                                               V_EXACT)
                pe_big, pe_small = _split(tl.reshape(pe, [BLOCK_C * BLOCK_M, BLOCK_N]), PRECISION, True)
                u_acc = _dot(pe_big, pe_small, v_big, v_small, _opaque(u_acc), PRECISION, V_EXACT)
                if W_BY_DOT:
                    # `_opaque` on the result: the loop carries no product still running (see above)
                    ones = tl.full([BLOCK_N, 16], 1.0, dtype=pe_big.dtype)
                    w_acc = _opaque(_dot(pe_big, pe_small, ones, ones, w_acc, PRECISION, True))
        if W_BY_DOT and not PROBS:
            w_sum = tl.reshape(tl.sum(w_acc, axis=1), [BLOCK_C, BLOCK_M]) * (1.0 / (16.0 * scale))
        else:
            w_sum = tl.sum(w_acc, axis=2) * (1.0 / scale)
        counted = counted[None, :]  # `_counted_rows`
        gentle = tl.abs(w_sum) <= 0.5  # False for NaN
        flags = ROUGH + (tl.program_id(0) * D + chans[:, None]) * T + rows[None, :]
        tl.store(flags, (counted & ~gentle).to(tl.int8), mask=chan_ok[:, None] & row_ok[None, :])
        if PROBS:
            # Σ_j (A'_ij − A_ij)² = Σ_j ((A_ij·e_ij − A_ij·W_i) / (1 + W_i))², now that W is known.
            per_row = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32)
            for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
                allowed, logp, dl = _tile_change(
                    q_big, q_small, QB, QS, q_base, logit_scale, lse, rows, row_ok, n0, b, k_base, cs_base, chans,
                    chan_ok, partners, sign, row_c, row_p, r_row, rm1_row, KN, KR, KB, KS, COS, SIN, R, RM1, TOKENS, T,
                    D, scaling, softcap, window, series_limit, series_all, IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW,
                    PRECISION, BLOCK_N, BLOCK_D, Q_SLICE)
                p = _exp(logp)
                change = (_weighted_expm1(p, logp, dl) - p * w_sum[:, :, None]) / (1.0 + w_sum[:, :, None])
                per_row += tl.sum(tl.where(allowed, change * change, 0.0), axis=2)
        else:
            out = tl.load(OUT + q_base + rows[:, None] * D + dims[None, :],
                          mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
            u = tl.reshape(u_acc, [BLOCK_C, BLOCK_M, BLOCK_D]) * value_unscale
            u = tl.where((dims < D)[None, None, :], u, 0.0)  # the unmasked V tiles' dims past D
            change = (u - w_sum[:, :, None] * out[None, :, :]) / (1.0 + w_sum[:, :, None])
            per_row = tl.sum(change * change, axis=2)  # columns past D are 0 in u and out
        total = tl.sum(tl.where(counted & gentle, per_row, 0.0), axis=1)
        tl.store(PARTIAL + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * D + chans, total, mask=chan_ok)

    @triton.jit
    def _qk_rough_kernel(
        QN, QR, KN, KR, QB, QS, KB, KS, VB, VS, COS, SIN, R, RM1, LSE, OUT, UNSCALE, TOKENS, COUNTED, PARTIAL, ROUGH,
        T, D, n_heads, group, scaling, softcap, window, series_limit,
        IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        PROBS: tl.constexpr, PRECISION: tl.constexpr, V_EXACT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        Q_SLICE: tl.constexpr,
    ):
        """Rows flagged by `_qk_kernel` (a large change): the new softmax directly, with its own
        running max and sum, which stays accurate where the expm1 form would cancel or overflow.
        A separate launch, so that the common kernel carries none of its registers; a program
        without flagged rows writes zeros."""
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        flags = ROUGH + (tl.program_id(0) * D + chans[:, None]) * T + rows[None, :]
        rough = tl.load(flags, mask=(chans < D)[:, None] & (rows < T)[None, :], other=0) != 0
        if tl.sum(tl.sum(rough.to(tl.int32), axis=1), axis=0) > 0:
            (b, chans, chan_ok, partners, sign, rows, row_ok, q_base, k_base, cs_base, q_big, q_small, logit_scale,
             value_unscale, lse, counted, row_c, row_p, r_row, rm1_row, lo, hi) = _block(
                QN, QR, QB, QS, COS, SIN, R, RM1, LSE, UNSCALE, COUNTED, T, D, n_heads, group, scaling, softcap,
                window, IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW, PRECISION, BLOCK_M, BLOCK_C, BLOCK_D)
            dims = tl.arange(0, BLOCK_D)
            m_new = tl.full([BLOCK_C, BLOCK_M], -float("inf"), dtype=tl.float32)
            l_new = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32)
            a_new = tl.zeros([BLOCK_C * BLOCK_M, BLOCK_D], dtype=tl.float32)
            for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
                allowed, logp, dl = _tile_change(
                    q_big, q_small, QB, QS, q_base, logit_scale, lse, rows, row_ok, n0, b, k_base, cs_base, chans,
                    chan_ok, partners, sign, row_c, row_p, r_row, rm1_row, KN, KR, KB, KS, COS, SIN, R, RM1, TOKENS, T,
                    D, scaling, softcap, window, series_limit, False, IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW,
                    PRECISION, BLOCK_N, BLOCK_D, Q_SLICE)
                z = logp + dl
                m_next = tl.maximum(m_new, tl.max(z, axis=2))
                m_safe = tl.where(m_next == -float("inf"), 0.0, m_next)  # a row with no key yet
                shift = tl.exp(m_new - m_safe)
                pz = tl.exp(z - m_safe[:, :, None])
                l_new = l_new * shift + tl.sum(pz, axis=2)
                if not PROBS:
                    cols = n0 + tl.arange(0, BLOCK_N)
                    v_big, v_small = _load_operand(VB, VS, k_base + cols[:, None] * D + dims[None, :],
                                                   (cols < T)[:, None] & (dims < D)[None, :], PRECISION, V_EXACT)
                    pz_big, pz_small = _split(tl.reshape(pz, [BLOCK_C * BLOCK_M, BLOCK_N]), PRECISION)
                    a_new = _dot(pz_big, pz_small, v_big, v_small,
                                 a_new * tl.reshape(shift, [BLOCK_C * BLOCK_M])[:, None], PRECISION, V_EXACT)
                m_new = m_next
            m_new = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows past T: keep them finite
            l_new = tl.where(l_new == 0.0, 1.0, l_new)
            if PROBS:
                per_row = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32)
                for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
                    allowed, logp, dl = _tile_change(
                        q_big, q_small, QB, QS, q_base, logit_scale, lse, rows, row_ok, n0, b, k_base, cs_base, chans,
                        chan_ok, partners, sign, row_c, row_p, r_row, rm1_row, KN, KR, KB, KS, COS, SIN, R, RM1, TOKENS, T,
                        D, scaling, softcap, window, series_limit, False, IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW,
                        PRECISION, BLOCK_N, BLOCK_D, Q_SLICE)
                    change = tl.exp(logp + dl - m_new[:, :, None]) / l_new[:, :, None] - tl.exp(logp)
                    per_row += tl.sum(tl.where(allowed, change * change, 0.0), axis=2)
            else:
                out = tl.load(OUT + q_base + rows[:, None] * D + dims[None, :],
                              mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
                change = tl.reshape(a_new, [BLOCK_C, BLOCK_M, BLOCK_D]) * value_unscale / l_new[:, :, None] \
                    - out[None, :, :]
                per_row = tl.sum(change * change, axis=2)
            total = tl.sum(tl.where(rough, per_row, 0.0), axis=1)
            tl.store(PARTIAL + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * D + chans, total,
                     mask=chan_ok)
        else:
            tl.store(PARTIAL + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * D + chans,
                     tl.zeros([BLOCK_C], dtype=tl.float32), mask=chans < D)

    # ------------------------------------------------------------------------------------------
    # One channel, or a channel and its rotary partner, a program (layout "channel" or "pair"): the
    # same impacts with plain [rows, keys] tiles. The logits come out of the Q·Kᵀ product in the
    # layout the value product takes its left operand in, so nothing passes through shared memory
    # (the stacked kernel's [channels, rows, keys] tiles do, with 5 barriers a key tile in sm_90a
    # SASS at head_dim 128); the price is a Q·Kᵀ product and the per-key work (mask, A) for one or
    # two channels instead of a block of eight. A partner pair shares them, and its rotary columns.
    # Logits are kept in base 2 (log2 A); only the key tiles on the diagonal or the window's edge
    # are masked.
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _query_tile(QB, QS, T, D, n_heads, group, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """A program's query tile (program ids: sentence·head, query tile): the sentence, first row,
        rows, which are real, where its q and its KV head's k/v start, and its q operand parts."""
        bh = tl.program_id(0)
        b = bh // n_heads
        g = (bh % n_heads) // group
        m_start = tl.program_id(1) * BLOCK_M
        rows = m_start + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < T
        q_base = bh * T * D
        k_base = (b * (n_heads // group) + g) * T * D
        q_big, q_small = _load_operand(QB, QS, q_base + rows[:, None] * D + dims[None, :],
                                       row_ok[:, None] & (dims < D)[None, :], PRECISION, False)
        return b, m_start, rows, row_ok, q_base, k_base, q_big, q_small

    @triton.jit
    def _channel_program(QB, QS, LSE, UNSCALE, COUNTED, T, D, n_heads, group, scaling, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """What a program (sentence·head, query tile, channels) needs before its key loop, but the
        channels' own factors (`_row_factors`)."""
        bh = tl.program_id(0)
        b, m_start, rows, row_ok, q_base, k_base, q_big, q_small = _query_tile(QB, QS, T, D, n_heads, group,
                                                                               PRECISION, BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
        counted = tl.load(COUNTED + b * T + rows, mask=row_ok, other=0) != 0
        return (b, rows, row_ok, q_base, k_base, b * T * D, q_big, q_small, scaling * tl.load(UNSCALE + 2 * bh),
                tl.load(UNSCALE + 2 * bh + 1), lse, counted, m_start, tl.minimum(T, m_start + BLOCK_M))

    @triton.jit
    def _row_factors(QN, QR, COS, SIN, R, RM1, q_base, cs_base, rows, row_ok, c, partner, D, scaling,
                     IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_M: tl.constexpr):
        """Channel c's row factors of −Δ (negated), and for a query channel with a q-norm, r and r − 1."""
        r_row = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        rm1_row = tl.zeros([BLOCK_M], dtype=tl.float32)
        if IS_KEY:
            row_c = -tl.load(QR + q_base + rows * D + c, mask=row_ok, other=0.0)
            row_p = -tl.load(QR + q_base + rows * D + partner, mask=row_ok, other=0.0)
        else:
            sign = tl.where(c < D // 2, 1.0, -1.0)
            qn_c = -scaling * tl.load(QN + q_base + rows * D + c, mask=row_ok, other=0.0)
            row_c = qn_c * tl.load(COS + cs_base + rows * D + c, mask=row_ok, other=0.0)
            row_p = qn_c * sign * tl.load(SIN + cs_base + rows * D + partner, mask=row_ok, other=0.0)
            if HAS_NORM:
                r_row = tl.load(R + q_base + rows * D + c, mask=row_ok, other=1.0)
                rm1_row = tl.load(RM1 + q_base + rows * D + c, mask=row_ok, other=0.0)
        return row_c, row_p, r_row, rm1_row

    @triton.jit
    def _key_tiles(m_start, window, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Where a query tile's key tiles start, and where the ones every row sees whole (no mask)
        start and end: [first, inner_lo) is on the window's edge, [inner_hi, …) on the diagonal."""
        inner_hi = m_start // BLOCK_N * BLOCK_N
        first = 0
        inner_lo = 0
        if HAS_WINDOW:
            first = tl.maximum(0, m_start - window + 1) // BLOCK_N * BLOCK_N
            inner_lo = tl.minimum(tl.maximum(first, tl.cdiv(tl.maximum(0, m_start + BLOCK_M - window), BLOCK_N) * BLOCK_N),
                                  inner_hi)
        return first, inner_lo, inner_hi

    @triton.jit
    def _base_tile(q_big, q_small, logit_scale, lse, rows, n0, b, k_base, KB, KS, TOKENS, T, D, softcap, window,
                   MASKED: tl.constexpr, MASK_KEYS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_CAP: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """For one key tile, what its channels share: log2 of the base probabilities [rows, keys]
        (−inf where not allowed), the scaled logits x and, with a soft-cap, a = x / cap and e^-2|a|
        (x otherwise: unused)."""
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        dims = tl.arange(0, BLOCK_D)
        k_big, k_small = _load_operand(KB, KS, k_base + cols[:, None] * D + dims[None, :],
                                       col_ok[:, None] & (dims < D)[None, :], PRECISION, False)
        x = _dot(q_big, q_small, tl.trans(k_big), tl.trans(k_small),
                 tl.zeros([q_big.shape[0], BLOCK_N], dtype=tl.float32), PRECISION, False)
        a = x
        cap_exp = x
        if HAS_CAP or HAS_NORM:
            x = x * logit_scale
        if HAS_CAP:
            a = x * (1.0 / softcap)
            cap_exp = _exp(-2.0 * tl.abs(a))
            logp2 = (softcap * _tanh(a) - lse[:, None]) * LOG2_E
        elif HAS_NORM:
            logp2 = x * LOG2_E - (lse * LOG2_E)[:, None]
        else:
            logp2 = x * (logit_scale * LOG2_E) - (lse * LOG2_E)[:, None]
        if MASK_KEYS:  # padding before a real token (right padding needs no mask: the rows that count never see it)
            key_valid = tl.load(TOKENS + b * T + cols, mask=col_ok, other=0) != 0
            logp2 = logp2 + tl.where(key_valid, 0.0, -float("inf"))[None, :]
        if MASKED:
            allowed = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
            if HAS_WINDOW:
                allowed = allowed & (rows[:, None] - cols[None, :] < window)
            logp2 = tl.where(allowed, logp2, -float("inf"))
        return logp2, x, a, cap_exp

    @triton.jit
    def _logit_change(x, a, cap_exp, n0, k_base, cs_base, c, partner, row_c, row_p, r_row, rm1_row, KN, KR, COS, SIN,
                      R, RM1, T, D, scaling, softcap, IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr,
                      HAS_CAP: tl.constexpr, BLOCK_N: tl.constexpr):
        """Channel c's logit change [rows, keys] on one key tile."""
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        if IS_KEY:
            sign = tl.where(c < D // 2, 1.0, -1.0)
            kn_c = scaling * tl.load(KN + k_base + cols * D + c, mask=col_ok, other=0.0)
            col_c = kn_c * tl.load(COS + cs_base + cols * D + c, mask=col_ok, other=0.0)
            col_p = kn_c * sign * tl.load(SIN + cs_base + cols * D + partner, mask=col_ok, other=0.0)
        else:
            col_c = tl.load(KR + k_base + cols * D + c, mask=col_ok, other=0.0)
            col_p = tl.load(KR + k_base + cols * D + partner, mask=col_ok, other=0.0)
        dx = row_c[:, None] * col_c[None, :] + row_p[:, None] * col_p[None, :]  # −Δ
        if HAS_NORM:
            if IS_KEY:
                r = tl.load(R + k_base + cols * D + c, mask=col_ok, other=1.0)[None, :]
                rm1 = tl.load(RM1 + k_base + cols * D + c, mask=col_ok, other=0.0)[None, :]
            else:
                r = r_row[:, None]
                rm1 = rm1_row[:, None]
            dx = rm1 * x + r * dx
        if HAS_CAP:  # the exact form only: `_capped_change`'s branch took this kernel's spills from 496 B to
            # 1436 B a thread (sm_90a, "pair", head_dim 128, soft-cap + window; its Taylor form alone: 268 B)
            return softcap * _tile_tanh_change(a, cap_exp, dx * (1.0 / softcap))
        else:
            return dx

    @triton.jit
    def _weighted_expm1_2(p, logp2, dl):
        """`_weighted_expm1` from A = p and log2 A."""
        return tl.where(tl.abs(dl) <= 0.5, p * _expm1_small(dl), _exp2(logp2 + dl * LOG2_E) - p)

    @triton.jit
    def _channel_step(w0, u0, w1, u1, q_big, q_small, logit_scale, lse, rows, n0, b, k_base, cs_base, c, partner,
                      rc0, rp0, r0, rm0, rc1, rp1, r1, rm1, KN, KR, KB, KS, VB, VS, COS, SIN, R, RM1, TOKENS, T, D,
                      scaling, softcap, window, MASKED: tl.constexpr, MASK_KEYS: tl.constexpr, PAIR: tl.constexpr,
                      IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      PROBS: tl.constexpr, PRECISION: tl.constexpr, V_EXACT: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        """One key tile of the gentle kernel: per channel (c, and its partner with PAIR), W and
        (output metric) Σ_j A·e·V_j accumulate."""
        logp2, x, a, cap_exp = _base_tile(q_big, q_small, logit_scale, lse, rows, n0, b, k_base, KB, KS, TOKENS, T, D,
                                          softcap, window, MASKED, MASK_KEYS, HAS_NORM, HAS_CAP, HAS_WINDOW, PRECISION,
                                          BLOCK_N, BLOCK_D)
        p = _exp2(logp2)
        cols = n0 + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        if not PROBS:
            v_big, v_small = _load_operand(VB, VS, k_base + cols[:, None] * D + dims[None, :],
                                           (cols < T)[:, None] & (dims < D)[None, :], PRECISION, V_EXACT)
        dl = _logit_change(x, a, cap_exp, n0, k_base, cs_base, c, partner, rc0, rp0, r0, rm0, KN, KR, COS, SIN, R, RM1,
                           T, D, scaling, softcap, IS_KEY, HAS_NORM, HAS_CAP, BLOCK_N)
        pe = _weighted_expm1_2(p, logp2, dl)
        w0 += tl.sum(pe, axis=1)
        if not PROBS:
            pe_big, pe_small = _split(pe, PRECISION)
            u0 = _dot(pe_big, pe_small, v_big, v_small, u0, PRECISION, V_EXACT)
        if PAIR:
            dl = _logit_change(x, a, cap_exp, n0, k_base, cs_base, partner, c, rc1, rp1, r1, rm1, KN, KR, COS, SIN, R,
                               RM1, T, D, scaling, softcap, IS_KEY, HAS_NORM, HAS_CAP, BLOCK_N)
            pe = _weighted_expm1_2(p, logp2, dl)
            w1 += tl.sum(pe, axis=1)
            if not PROBS:
                pe_big, pe_small = _split(pe, PRECISION)
                u1 = _dot(pe_big, pe_small, v_big, v_small, u1, PRECISION, V_EXACT)
        return w0, u0, w1, u1

    @triton.jit
    def _channel_total(w_sum, per_row, counted, rows, row_ok, c, ROUGH, PARTIAL, T, D):
        """Flag channel c's rows that moved a lot, and add up the others' squared changes."""
        gentle = tl.abs(w_sum) <= 0.5  # False for NaN
        tl.store(ROUGH + (tl.program_id(0) * D + c) * T + rows, (counted & ~gentle).to(tl.int8), mask=row_ok)
        total = tl.sum(tl.where(counted & gentle, per_row, 0.0), axis=0)
        tl.store(PARTIAL + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * D + c, total)

    @triton.jit
    def _output_rows(u, w_sum, out, value_unscale):
        """‖ΔO_i‖² from U = Σ_j A·e·V_j and W: (U − W·O) / (1 + W)."""
        change = (u * value_unscale - w_sum[:, None] * out) / (1.0 + w_sum[:, None])
        return tl.sum(change * change, axis=1)

    @triton.jit
    def _qk_channel_kernel(
        QN, QR, KN, KR, QB, QS, KB, KS, VB, VS, COS, SIN, R, RM1, LSE, OUT, UNSCALE, TOKENS, COUNTED, PARTIAL, ROUGH,
        T, D, n_heads, group, scaling, softcap, window,
        IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        MASK_KEYS: tl.constexpr, PAIR: tl.constexpr, PROBS: tl.constexpr, PRECISION: tl.constexpr,
        V_EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """`_qk_kernel` for one channel a program, or (PAIR) channel c < D/2 and its partner c + D/2:
        the gentle rows, the others flagged in ROUGH."""
        (b, rows, row_ok, q_base, k_base, cs_base, q_big, q_small, logit_scale, value_unscale, lse, counted, m_start,
         hi) = _channel_program(QB, QS, LSE, UNSCALE, COUNTED, T, D, n_heads, group, scaling, PRECISION, BLOCK_M,
                                BLOCK_D)
        c = tl.program_id(2)
        partner = (c + D // 2) % D
        rc0, rp0, r0, rm0 = _row_factors(QN, QR, COS, SIN, R, RM1, q_base, cs_base, rows, row_ok, c, partner, D,
                                         scaling, IS_KEY, HAS_NORM, BLOCK_M)
        rc1, rp1, r1, rm1 = rc0, rp0, r0, rm0
        if PAIR:
            rc1, rp1, r1, rm1 = _row_factors(QN, QR, COS, SIN, R, RM1, q_base, cs_base, rows, row_ok, partner, c, D,
                                             scaling, IS_KEY, HAS_NORM, BLOCK_M)
        first, inner_lo, inner_hi = _key_tiles(m_start, window, HAS_WINDOW, BLOCK_M, BLOCK_N)
        w0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        u0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        w1 = w0
        u1 = u0
        for n0 in range(first, inner_lo, BLOCK_N):
            w0, u0, w1, u1 = _channel_step(
                w0, u0, w1, u1, q_big, q_small, logit_scale, lse, rows, n0, b, k_base, cs_base, c, partner, rc0, rp0,
                r0, rm0, rc1, rp1, r1, rm1, KN, KR, KB, KS, VB, VS, COS, SIN, R, RM1, TOKENS, T, D, scaling, softcap,
                window, True, MASK_KEYS, PAIR, IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW, PROBS, PRECISION, V_EXACT,
                BLOCK_N, BLOCK_D)
        for n0 in range(inner_lo, inner_hi, BLOCK_N):
            w0, u0, w1, u1 = _channel_step(
                w0, u0, w1, u1, q_big, q_small, logit_scale, lse, rows, n0, b, k_base, cs_base, c, partner, rc0, rp0,
                r0, rm0, rc1, rp1, r1, rm1, KN, KR, KB, KS, VB, VS, COS, SIN, R, RM1, TOKENS, T, D, scaling, softcap,
                window, False, MASK_KEYS, PAIR, IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW, PROBS, PRECISION, V_EXACT,
                BLOCK_N, BLOCK_D)
        for n0 in range(inner_hi, hi, BLOCK_N):
            w0, u0, w1, u1 = _channel_step(
                w0, u0, w1, u1, q_big, q_small, logit_scale, lse, rows, n0, b, k_base, cs_base, c, partner, rc0, rp0,
                r0, rm0, rc1, rp1, r1, rm1, KN, KR, KB, KS, VB, VS, COS, SIN, R, RM1, TOKENS, T, D, scaling, softcap,
                window, True, MASK_KEYS, PAIR, IS_KEY, HAS_NORM, HAS_CAP, HAS_WINDOW, PROBS, PRECISION, V_EXACT,
                BLOCK_N, BLOCK_D)
        if PROBS:
            # Σ_j (A'_ij − A_ij)² = Σ_j ((A_ij·e_ij − A_ij·W_i) / (1 + W_i))², now that W is known (0 where not allowed).
            per0 = tl.zeros([BLOCK_M], dtype=tl.float32)
            per1 = per0
            for n0 in range(first, hi, BLOCK_N):
                logp2, x, a, cap_exp = _base_tile(
                    q_big, q_small, logit_scale, lse, rows, n0, b, k_base, KB, KS, TOKENS, T, D, softcap, window, True,
                    MASK_KEYS, HAS_NORM, HAS_CAP, HAS_WINDOW, PRECISION, BLOCK_N, BLOCK_D)
                p = _exp2(logp2)
                dl = _logit_change(x, a, cap_exp, n0, k_base, cs_base, c, partner, rc0, rp0, r0, rm0, KN, KR, COS, SIN,
                                   R, RM1, T, D, scaling, softcap, IS_KEY, HAS_NORM, HAS_CAP, BLOCK_N)
                change = (_weighted_expm1_2(p, logp2, dl) - p * w0[:, None]) / (1.0 + w0[:, None])
                per0 += tl.sum(change * change, axis=1)
                if PAIR:
                    dl = _logit_change(x, a, cap_exp, n0, k_base, cs_base, partner, c, rc1, rp1, r1, rm1, KN, KR, COS,
                                       SIN, R, RM1, T, D, scaling, softcap, IS_KEY, HAS_NORM, HAS_CAP, BLOCK_N)
                    change = (_weighted_expm1_2(p, logp2, dl) - p * w1[:, None]) / (1.0 + w1[:, None])
                    per1 += tl.sum(change * change, axis=1)
        else:
            dims = tl.arange(0, BLOCK_D)
            out = tl.load(OUT + q_base + rows[:, None] * D + dims[None, :],
                          mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
            per0 = _output_rows(u0, w0, out, value_unscale)
            per1 = _output_rows(u1, w1, out, value_unscale)
        _channel_total(w0, per0, counted, rows, row_ok, c, ROUGH, PARTIAL, T, D)
        if PAIR:
            _channel_total(w1, per1, counted, rows, row_ok, partner, ROUGH, PARTIAL, T, D)

    @triton.jit
    def _qk_channel_rough_kernel(
        QN, QR, KN, KR, QB, QS, KB, KS, VB, VS, COS, SIN, R, RM1, LSE, OUT, UNSCALE, TOKENS, COUNTED, PARTIAL, ROUGH,
        T, D, n_heads, group, scaling, softcap, window,
        IS_KEY: tl.constexpr, HAS_NORM: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        MASK_KEYS: tl.constexpr, PAIR: tl.constexpr, PROBS: tl.constexpr, PRECISION: tl.constexpr,
        V_EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """`_qk_rough_kernel` for one channel a program, paired or not (every tile masked: it runs rarely)."""
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(2)
        rough = tl.load(ROUGH + (tl.program_id(0) * D + c) * T + rows, mask=rows < T, other=0) != 0
        if tl.sum(rough.to(tl.int32), axis=0) > 0:
            (b, rows, row_ok, q_base, k_base, cs_base, q_big, q_small, logit_scale, value_unscale, lse, counted,
             m_start, hi) = _channel_program(QB, QS, LSE, UNSCALE, COUNTED, T, D, n_heads, group, scaling, PRECISION,
                                             BLOCK_M, BLOCK_D)
            partner = (c + D // 2) % D
            row_c, row_p, r_row, rm1_row = _row_factors(QN, QR, COS, SIN, R, RM1, q_base, cs_base, rows, row_ok, c,
                                                        partner, D, scaling, IS_KEY, HAS_NORM, BLOCK_M)
            first, _, _ = _key_tiles(m_start, window, HAS_WINDOW, BLOCK_M, BLOCK_N)  # every tile masked
            dims = tl.arange(0, BLOCK_D)
            m_new = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)  # in base 2
            l_new = tl.zeros([BLOCK_M], dtype=tl.float32)
            a_new = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for n0 in range(first, hi, BLOCK_N):
                logp2, x, a, cap_exp = _base_tile(
                    q_big, q_small, logit_scale, lse, rows, n0, b, k_base, KB, KS, TOKENS, T, D, softcap, window, True,
                    MASK_KEYS, HAS_NORM, HAS_CAP, HAS_WINDOW, PRECISION, BLOCK_N, BLOCK_D)
                z = logp2 + LOG2_E * _logit_change(x, a, cap_exp, n0, k_base, cs_base, c, partner, row_c, row_p, r_row,
                                                   rm1_row, KN, KR, COS, SIN, R, RM1, T, D, scaling, softcap, IS_KEY,
                                                   HAS_NORM, HAS_CAP, BLOCK_N)
                m_next = tl.maximum(m_new, tl.max(z, axis=1))
                m_safe = tl.where(m_next == -float("inf"), 0.0, m_next)  # a row with no key yet
                shift = tl.exp2(m_new - m_safe)
                pz = tl.exp2(z - m_safe[:, None])
                l_new = l_new * shift + tl.sum(pz, axis=1)
                if not PROBS:
                    cols = n0 + tl.arange(0, BLOCK_N)
                    v_big, v_small = _load_operand(VB, VS, k_base + cols[:, None] * D + dims[None, :],
                                                   (cols < T)[:, None] & (dims < D)[None, :], PRECISION, V_EXACT)
                    pz_big, pz_small = _split(pz, PRECISION)
                    a_new = _dot(pz_big, pz_small, v_big, v_small, a_new * shift[:, None], PRECISION, V_EXACT)
                m_new = m_next
            m_new = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows past T: keep them finite
            l_new = tl.where(l_new == 0.0, 1.0, l_new)
            if PROBS:
                per_row = tl.zeros([BLOCK_M], dtype=tl.float32)
                for n0 in range(first, hi, BLOCK_N):
                    logp2, x, a, cap_exp = _base_tile(
                        q_big, q_small, logit_scale, lse, rows, n0, b, k_base, KB, KS, TOKENS, T, D, softcap, window,
                        True, MASK_KEYS, HAS_NORM, HAS_CAP, HAS_WINDOW, PRECISION, BLOCK_N, BLOCK_D)
                    dl = _logit_change(x, a, cap_exp, n0, k_base, cs_base, c, partner, row_c, row_p, r_row, rm1_row, KN,
                                       KR, COS, SIN, R, RM1, T, D, scaling, softcap, IS_KEY, HAS_NORM, HAS_CAP, BLOCK_N)
                    change = tl.exp2(logp2 + dl * LOG2_E - m_new[:, None]) / l_new[:, None] - tl.exp2(logp2)
                    per_row += tl.sum(change * change, axis=1)  # 0 where not allowed
            else:
                out = tl.load(OUT + q_base + rows[:, None] * D + dims[None, :],
                              mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
                change = a_new * value_unscale / l_new[:, None] - out
                per_row = tl.sum(change * change, axis=1)
            total = tl.sum(tl.where(rough, per_row, 0.0), axis=0)
            tl.store(PARTIAL + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * D + c, total)
        else:
            tl.store(PARTIAL + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * D + c, 0.0)

    # ------------------------------------------------------------------------------------------
    # The operands of the products: one launch a tensor instead of about twenty PyTorch operations.
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _operand_kernel(X, stride_b, stride_h, stride_t, COS, SIN, TOKENS, PLAIN, ROTATED, BIG, SMALL, UNSCALE,
                        T, D, n_heads, slack_rows, ROTATE: tl.constexpr, KEEP_PLAIN: tl.constexpr,
                        KEEP_ROTATED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (sentence, head) of x [B, H, T, D] (any float dtype and strides, unit stride along D), as
        `_operands` describes: its float32 copy (KEEP_PLAIN), x·cos + rotate_half(x)·sin in float32 (ROTATE;
        else x; stored with KEEP_ROTATED) and, under fp16x3 (SPLIT), that rotated x times one power of two,
        2^s, as two float16 halves, with 2^-s in UNSCALE (1 without SPLIT). Padding is 0 in the halves.
        The last program also zeroes `slack_rows` rows after the last head of the rotated x and the
        halves (`KEY_SLACK`)."""
        bh = tl.program_id(0)
        b = bh // n_heads
        x_base = X + b * stride_b + (bh % n_heads) * stride_h
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        partners = (dims + D // 2) % D  # rotate_half(x)[d] = −x[d + D/2] below D/2, x[d − D/2] above
        sign = tl.where(dims < D // 2, -1.0, 1.0)
        if SPLIT:  # the largest |rotated x| over real tokens, for the scale
            largest = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for t0 in range(0, T, BLOCK_T):
                steps = t0 + tl.arange(0, BLOCK_T)
                real = tl.load(TOKENS + b * T + steps, mask=steps < T, other=0) != 0
                _, rotated = _operand_tile(x_base, stride_t, COS, SIN, b, steps, dims, partners, sign, T, D, ROTATE)
                largest = tl.maximum(largest, tl.where(real[:, None] & dim_ok[None, :], tl.abs(rotated), 0.0))
            shift = _split_shift(tl.max(tl.max(largest, axis=1), axis=0))
            scale = ((shift + 127) << 23).to(tl.float32, bitcast=True)  # 2^shift, exactly
            tl.store(UNSCALE + bh, ((127 - shift) << 23).to(tl.float32, bitcast=True))
        else:
            tl.store(UNSCALE + bh, 1.0)
        for t0 in range(0, T, BLOCK_T):
            steps = t0 + tl.arange(0, BLOCK_T)
            x, rotated = _operand_tile(x_base, stride_t, COS, SIN, b, steps, dims, partners, sign, T, D, ROTATE)
            at = bh * T * D + steps[:, None] * D + dims[None, :]
            ok = (steps < T)[:, None] & dim_ok[None, :]
            if KEEP_PLAIN:
                tl.store(PLAIN + at, x, mask=ok)
            if KEEP_ROTATED:
                tl.store(ROTATED + at, rotated, mask=ok)
            if SPLIT:
                real = tl.load(TOKENS + b * T + steps, mask=steps < T, other=0) != 0
                scaled = tl.where(real[:, None], rotated * scale, 0.0)  # exact: a power of two
                big = scaled.to(tl.float16)
                tl.store(BIG + at, big, mask=ok)
                tl.store(SMALL + at, (scaled - big.to(tl.float32)).to(tl.float16), mask=ok)  # exact subtraction
        if bh == tl.num_programs(0) - 1:
            zero = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for t0 in range(T, T + slack_rows, BLOCK_T):
                steps = t0 + tl.arange(0, BLOCK_T)
                at = bh * T * D + steps[:, None] * D + dims[None, :]
                ok = (steps < T + slack_rows)[:, None] & dim_ok[None, :]
                if KEEP_ROTATED:
                    tl.store(ROTATED + at, zero, mask=ok)
                if SPLIT:
                    tl.store(BIG + at, zero.to(tl.float16), mask=ok)
                    tl.store(SMALL + at, zero.to(tl.float16), mask=ok)

    @triton.jit
    def _operand_tile(x_base, stride_t, COS, SIN, b, steps, dims, partners, sign, T, D, ROTATE: tl.constexpr):
        """[steps, dims] of x in float32, and the same rotated (or x again without ROTATE)."""
        ok = (steps < T)[:, None] & (dims < D)[None, :]
        x = tl.load(x_base + steps[:, None] * stride_t + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        if ROTATE:
            at = b * T * D + steps[:, None] * D + dims[None, :]
            partner = tl.load(x_base + steps[:, None] * stride_t + partners[None, :], mask=ok, other=0.0)
            # Two rounded products and a rounded sum, as in PyTorch (the launch turns off FMA fusion).
            return x, x * tl.load(COS + at, mask=ok, other=0.0) \
                + (sign[None, :] * partner.to(tl.float32)) * tl.load(SIN + at, mask=ok, other=0.0)
        else:
            return x, x

    @triton.jit
    def _split_shift(largest):
        """s of the scale 2^s that puts `largest` (≥ 0) in [2^14, 2^15): 15 − e for largest = f·2^e,
        f in [½, 1) (torch.frexp; e = 0 for 0), at most 126, so that 2^s and 2^-s are normal floats
        (a head whose entries are all below 2^-111 keeps fewer bits, but no infinity)."""
        e = ((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        return tl.minimum(15 - tl.where(largest == 0.0, 0, e), 126)

    # ------------------------------------------------------------------------------------------
    # The unperturbed attention every impact is measured against, FlashAttention-style.
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _base_attention_kernel(QB, QS, KB, KS, VB, VS, UNSCALE, TOKENS, LSE, OUT, T, D, n_heads, group, scaling,
                               softcap, window, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                               PRECISION: tl.constexpr, V_EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Log-sum-exp [B·H, T] and output [B·H, T, D] of one (sentence·head, query tile): an
        online softmax over the key tiles the tile sees, with the impact kernels' own products
        (the same operand parts, so their logits and these agree) and masks."""
        bh = tl.program_id(0)
        b, m_start, rows, row_ok, q_base, k_base, q_big, q_small = _query_tile(QB, QS, T, D, n_heads, group,
                                                                               PRECISION, BLOCK_M, BLOCK_D)
        dims = tl.arange(0, BLOCK_D)
        logit_scale = scaling * tl.load(UNSCALE + 2 * bh)
        m = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)  # running max, base 2
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        first = 0
        if HAS_WINDOW:
            first = tl.maximum(0, m_start - window + 1) // BLOCK_N * BLOCK_N
        for n0 in range(first, tl.minimum(T, m_start + BLOCK_M), BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            tile = k_base + cols[:, None] * D + dims[None, :]
            tile_ok = col_ok[:, None] & (dims < D)[None, :]
            k_big, k_small = _load_operand(KB, KS, tile, tile_ok, PRECISION, False)
            x = logit_scale * _dot(q_big, q_small, tl.trans(k_big), tl.trans(k_small),
                                   tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, False)
            if HAS_CAP:
                x = softcap * _tanh(x * (1.0 / softcap))
            allowed = _allowed_keys(rows, cols, col_ok, b, TOKENS, T, window, HAS_WINDOW)
            x2 = tl.where(allowed, x * LOG2_E, -float("inf"))
            m_next = tl.maximum(m, tl.max(x2, axis=1))
            m_safe = tl.where(m_next == -float("inf"), 0.0, m_next)  # a row with no key yet
            rescale = _exp2(m - m_safe)
            p = _exp2(x2 - m_safe[:, None])
            total = total * rescale + tl.sum(p, axis=1)
            v_big, v_small = _load_operand(VB, VS, tile, tile_ok, PRECISION, V_EXACT)
            p_big, p_small = _split(p, PRECISION)
            acc = _dot(p_big, p_small, v_big, v_small, acc * rescale[:, None], PRECISION, V_EXACT)
            m = m_next
        m = tl.where(m == -float("inf"), 0.0, m)  # rows past T: keep them finite
        total = tl.where(total == 0.0, 1.0, total)
        tl.store(LSE + bh * T + rows, (m + tl.log2(total)) / LOG2_E, mask=row_ok)
        tl.store(OUT + q_base + rows[:, None] * D + dims[None, :],
                 acc * tl.load(UNSCALE + 2 * bh + 1) / total[:, None], mask=row_ok[:, None] & (dims < D)[None, :])


def _column_norms(kn, kr, cos, sin, scaling: float, keys: bool) -> torch.Tensor:
    """[B, KV heads, D] float32: per channel c, the largest ‖(col_c, col_p)‖ over its KV head's
    tokens, the column factors of the change of logit Δ = row_c·col_c + row_p·col_p the stacked
    kernel forms (`_change_bound`): k's rotated channel c and partner p for a query channel;
    scaling·k̂_c·cos_c and scaling·k̂_c·sin_p for a key channel (k̂ normed, not rotated; cos, sin [B, T, D])."""
    half = kn.shape[-1] // 2
    if keys:
        squares = (kn * kn) * (cos * cos + sin.roll(-half, -1) ** 2)[:, None]
        return squares.amax(2).sqrt_() * abs(scaling)
    squares = kr * kr
    return (squares + squares.roll(-half, -1)).amax(2).sqrt_()


def _counted_rows(token_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, T] int8: the query rows whose impacts count, real tokens that see more than one key (a
    row that sees one key keeps A = 1 whatever the logits: exactly no change)."""
    seen = token_mask.to(torch.int32).cumsum(1)  # real keys up to each row
    if window is not None:
        seen = seen - torch.nn.functional.pad(seen, (window, 0))[:, :seen.shape[1]]
    return (token_mask & (seen > 1)).to(torch.int8).contiguous()


OPERAND_TILE, OPERAND_WARPS = 4096, 8  # `_operand_kernel`'s tile (elements) and warps: no spills on sm_90a,
# where 4 warps spill (`kernel_resources.py --operand`)

# The stacked kernels read their K and V tiles unmasked: in one pipeline stage (gemma2-9b) a masked
# tile is loaded through registers that must first be zeroed, and its predicates computed, 3.1 SASS
# instructions per (channel, row, key) of 60.6 (sm_90a compile; 0.9 of 50.9 at head_dim 128 in
# three stages). Keys past T then read the next head's rows, and past the last head `_slack_rows`
# rows of zeros that `_operand` allocates and `_operand_kernel` writes: finite values that meet the
# allowed mask (K) or A·e = 0 (V).
KEY_SLACK = 128  # the most keys a stacked tile may have


def _slack_rows(d: int) -> int:
    """Rows of d values after the last head: a tile of KEY_SLACK keys from the last row, each
    read as the kernels' block_d values."""
    return KEY_SLACK + triton.cdiv(max(16, triton.next_power_of_2(d)), d)


def _operand(x: torch.Tensor, cos, sin, tokens, precision: str, rotate: bool, keep_plain: bool, keys: bool = False):
    """`_operand_kernel` on x [B, H, T, D] (a view of any float dtype; unit stride along D), one
    launch: (its float32 copy or None, its rotated float32 values or None, big, small, unscale [B, H]).

    fp16x3 splits the rotated x into two float16 halves of x·2^s, one power of two s per head that
    puts its largest entry over real tokens just below 2^15: 11 significant bits each, so the pair
    carries x to about 2^-22 of that largest entry, as tf32x3's TF32 pair does (float16's narrower
    range costs only entries under 2^-39 of it). Padding tokens are 0 in the halves (they would
    overflow a scale they took no part in; they never count). The other precisions read the rotated
    float32 values themselves (big = small = them, unscale 1). For k and v (`keys`), the rotated x
    and the halves are followed in memory by `_slack_rows(d)` rows of zeros (`KEY_SLACK`)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, t, d = x.shape
    split = precision == "fp16x3"
    keep_rotated = rotate or not split
    slack_rows = _slack_rows(d) if keys else 0

    def new(dtype, slack):
        if not slack:
            return torch.empty(b, h, t, d, dtype=dtype, device=x.device)
        flat = torch.empty(b * h * t * d + slack_rows * d, dtype=dtype, device=x.device)
        return flat.as_strided((b, h, t, d), (h * t * d, t * d, d, 1))

    plain = new(torch.float32, False) if keep_plain else None
    rotated = new(torch.float32, keys) if keep_rotated else None
    big, small = (new(torch.float16, keys), new(torch.float16, keys)) if split else (rotated, rotated)
    unscale = torch.empty(b, h, dtype=torch.float32, device=x.device)
    block_d = max(16, triton.next_power_of_2(d))
    _operand_kernel[(b * h,)](
        x, x.stride(0), x.stride(1), x.stride(2), cos, sin, tokens, unscale if plain is None else plain,
        unscale if rotated is None else rotated, big, small, unscale, t, d, h, slack_rows, ROTATE=rotate,
        KEEP_PLAIN=keep_plain, KEEP_ROTATED=keep_rotated, SPLIT=split, BLOCK_T=max(1, OPERAND_TILE // block_d),
        BLOCK_D=block_d, num_warps=OPERAND_WARPS, enable_fp_fusion=False)
    return plain, rotated, big, small, unscale


def _exact_in_big_part(dtype: torch.dtype, precision: str) -> bool:
    """Whether values of `dtype` are their own big part (`_operand`'s float16 halves under fp16x3,
    the kernel's `_split` under tf32x3), as a bfloat16 or float16 model's v_proj outputs are: then
    the value products skip the small part's product (two products of three). Under tf32x3 a
    bfloat16 value (8 significant bits) is exactly a TF32 one (10); under fp16x3 a bfloat16 or
    float16 value scaled into its head's float16 range is exactly a float16 one, but where it falls
    under float16's normal range (under 2^-28 of its head's largest value), whose small part, at
    most 2^-24 of the scaled units, is then dropped: an error under 2^-38 of the head's largest
    value, against fp16x3's 2^-22 for any operand. Decided from the dtype, so no read of the device."""
    if precision == "fp16x3":
        return dtype in (torch.bfloat16, torch.float16)
    return precision == "tf32x3" and dtype == torch.bfloat16


def _operands(qn, kn, vv, cos, sin, tokens, spec: AttentionSpec, precision: str):
    """What the kernels read of q, k and v [B, heads, T, D] (normed, not yet rotated; views of any
    float dtype) with cos, sin [B, T, D] and the token flags [B, T] (float32, int32, contiguous):
    q and k as float32 [B, heads, T, D], before and after RoPE (four tensors); the (big, small)
    parts of the rotated q, k and of v, six tensors (`_operand`); per (sentence, query head) what
    undoes the parts' scaling of Q·Kᵀ and of (probabilities·2^15)·V, [B, H, 2]; and whether v is its
    own big part (`_exact_in_big_part`). Three launches and a handful of small operations."""
    qn, qr, q_big, q_small, q_unscale = _operand(qn, cos, sin, tokens, precision, rotate=True, keep_plain=True)
    kn, kr, k_big, k_small, k_unscale = _operand(kn, cos, sin, tokens, precision, rotate=True, keep_plain=True,
                                                 keys=True)
    _, _, v_big, v_small, v_unscale = _operand(vv, cos, sin, tokens, precision, rotate=False, keep_plain=False,
                                               keys=True)
    kv_head = torch.arange(qn.shape[1], device=qn.device) // spec.group_size
    unscale = torch.stack((q_unscale * k_unscale[:, kv_head],
                           v_unscale[:, kv_head] * (2.0 ** -15 if precision == "fp16x3" else 1.0)), -1).contiguous()
    return ((qn, qr, kn, kr), (q_big, q_small, k_big, k_small, v_big, v_small), unscale,
            _exact_in_big_part(vv.dtype, precision))


def _base_attention(parts, unscale, v_exact: bool, tokens, spec: AttentionSpec, precision: str):
    """Log-sum-exp [B, H, T] and output [B, H, T, D] (float32) of the unperturbed attention, from
    the operands of `_operands` (`_base_attention_kernel`: one launch, no T × T scores)."""
    b, t = tokens.shape
    d = parts[0].shape[-1]
    lse = torch.empty(b, spec.n_heads, t, dtype=torch.float32, device=tokens.device)
    out = torch.empty(b, spec.n_heads, t, d, dtype=torch.float32, device=tokens.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_m, block_n = base_attention_tiles(block_d, precision)
    with _expected_overflow():
        _base_attention_kernel[(b * spec.n_heads, triton.cdiv(t, block_m))](
            *parts, unscale, tokens, lse, out, t, d, spec.n_heads, spec.group_size, float(spec.scaling),
            float(spec.softcap or 1.0), int(spec.sliding_window or 0), HAS_CAP=spec.softcap is not None,
            HAS_WINDOW=spec.sliding_window is not None, PRECISION=precision, V_EXACT=v_exact, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2)
    return lse, out


def base_attention_tiles(block_d: int, precision: str) -> tuple[int, int]:
    """(query rows, keys) of a `_base_attention_kernel` tile (4 warps, 2 stages): 64 × 64, or 64 × 32
    above head_dim 128; smaller where the products' operands take more shared memory or registers.
    Compiled offline for sm_90a (`kernel_resources.py --base`): at most 192 KiB of shared memory
    (232448 B allowed); tf32x3's float32 tiles at 64 rows and head_dim 256 would need 256 KiB, and
    ieee's FMA products spill kilobytes at 64 rows."""
    if precision == "ieee":
        return (32, 16) if block_d <= 128 else (16, 16)
    if precision == "tf32x3":
        return (64, 32) if block_d <= 128 else (32, 32)
    return (64, 64) if block_d <= 128 else (64, 32)


def default_warps(block_d: int, precision: str) -> int:
    """Warps per stacked program: 8, but 4 above head_dim 128 except under fp16x3 (H100, T = 1024,
    gemma2-9b: 8 channels and 8 warps 51.5 ms, 2 channels and 4 warps 64.3, 4 and 8 103.1; H200,
    llama3.1-8b: 23.8 ms with 8 warps, 48.1 with 4). The other precisions keep 2 channels and 4
    warps there: with more, ieee's FMA products spill 22 KB a thread (sm_90a compile)."""
    return 4 if block_d > 128 and precision != "fp16x3" else 8


def default_channel_block(block_m: int, head_dim: int, num_warps: int, precision: str) -> int:
    """Channels per stacked program: the power of two that makes the value-product accumulator
    (block_c·block_m rows × head_dim floats) 2048 floats a warp, 64 registers a thread (8 channels
    of 16 rows at head_dim 128 and 8 warps, 2 at 256 and 4 warps), or 4096 above head_dim 128
    under fp16x3 (8 channels at 256 and 8 warps: `default_warps`), never more than the head has."""
    channels = 1 << (head_dim - 1).bit_length()
    per_warp = 4096 if channels > 128 and precision == "fp16x3" else 2048
    fit = max(1, (per_warp * num_warps) // (block_m * max(16, channels)))
    return min(1 << (fit.bit_length() - 1), channels)


def default_key_block(block_d: int, precision: str, seq_len: int, v_exact: bool = False) -> int:
    """Keys per tile: 64 under fp16x3 up to head_dim 128 (H200, llama3.1-8b T = 1024: 23.8 ms, 32
    keys 27.3 ms; 128 keys overflow shared memory) but for short sentences (`SHORT_SENTENCE`: 32),
    and above it only for v that is its own big part (`_exact_in_big_part`), whose 64-key tiles fit
    in two stages (`default_stages`); else 32. H100, gemma2-9b T = 1024, float32 q, k, v (fp16x3, 8
    channels, 8 warps): 32 keys in two stages 43.6 ms against 64 keys in one 47.1, in one run
    (sm_90a compile: 472 against 896 B spilled a thread; `h100-kernels.md`, run 3). tf32x3's float32
    K and V tiles need about 280 KiB of shared memory at 64 keys and head_dim 128 (an H100 allows 227
    KiB: the launch failed there; `kernel_resources.py` compiles each precision)."""
    if precision != "fp16x3":
        return 32
    if block_d <= 128:
        return 64 if seq_len > SHORT_SENTENCE else 32
    return 64 if block_d <= 256 and v_exact else 32


def default_stages(block_d: int, block_n: int, precision: str, v_exact: bool = False) -> int:
    """Software-pipelining depth: Triton's usual 3 up to head_dim 128; above, where K and V tiles
    in three stages need more shared memory than an H100 has (about 228 KiB), 2 with 32-key tiles,
    and with 64 1, but 2 under fp16x3 where v is its own big part (`_exact_in_big_part`, a bfloat16
    model: no small part of V to hold; 180 KiB, against 244 KiB with it; sm_90a compile, triton
    3.6). H100, gemma2-9b T = 1024: bfloat16 q, k, v with 64 keys in two stages 31.2 ms, with 32 in
    two 34.6 and in three 32.6 (run 4); float32 ones with 64 in one 47.1 and 32 in two 43.6 (run 3,
    `default_key_block`)."""
    if block_d <= 128:
        return 3
    return 2 if block_n < 64 or (precision == "fp16x3" and v_exact) else 1


# Sentences of at most this many tokens (a detection's are mostly 20–60) leave most of the plain
# tiles' 64 query rows as padding: the stacked kernel takes them, with 32-key tiles
# (`default_layout`, `default_key_block`). H100 run 4, llama3.1-8b, 8 sentences of 40 tokens,
# bfloat16 q, k, v: a Q/K call 1.5 ms against pair's 2.1 (stacked with 64-key tiles 1.7;
# `h100-kernels.md`). Longer ones were not timed between 64 and 256 tokens.
SHORT_SENTENCE = 64


def default_layout(head_dim: int, precision: str, softcap: float | None, seq_len: int) -> str:
    """"pair" (plain tiles, a channel and its rotary partner a program) under fp16x3 for an even
    head_dim up to 128 without a soft-cap, past `SHORT_SENTENCE` tokens; "stacked" otherwise. H100,
    T = 1024, float32 q, k, v: llama3.1-8b 17.5 ms against stacked's 19.7, qwen2.5-7b 15.4 against
    17.5, and faster at T = 256 and 2048 too; at head_dim 256 the plain tiles were slower (gemma2-9b,
    one channel a program: 88.8 ms against 64.7; `benchmarks/results/h100-kernels.md`). The other
    precisions were timed stacked only. With a soft-cap (Gemma-2-27B: head_dim 128), where only the
    stacked kernel has the Taylor form (`_capped_change`), its key loop is 49.9 SASS instructions
    per (channel, row, key) against pair's 82.1 (sm_90a compile, soft-cap + window; without the cap,
    in the version the H100 timed, 41.0 against 35, and it took 19.7 against 17.5 ms: times in about
    the instructions' ratio). With a soft-cap, on an H100 (gemma2-27b, T = 1024): stacked 26.9 ms
    against pair's 28.4 (run 4: 22.9 against 28.6)."""
    plain = precision == "fp16x3" and head_dim % 2 == 0 and head_dim <= 128 and softcap is None
    return "pair" if plain and seq_len > SHORT_SENTENCE else "stacked"


# The plain-tile layouts' tiles: 64 query rows, 32-key tiles, 4 warps, 2 stages (the fastest of the
# H100 sweep's five, h100-kernels.md; compiled for sm_90a at head_dim 128, "pair" spills at most
# 128 B without soft-cap, `kernel_resources.py --channel`).
PLAIN_TILES = dict(block_m=64, block_n=32, num_warps=4, num_stages=2)


# The stacked kernels' soft-cap: a key tile whose changes of logit ÷ cap are all at most this
# takes the Taylor form of `_capped_change`, else its exact form (0: the exact form always; the
# plain-tile kernels always take it, see `_logit_change`). H100, T = 1024, float32 q, k, v:
# gemma2-9b 47.1 ms against 52.8 with the exact form alone, gemma2-27b 26.9 against 31.8.
TANH_SERIES_LIMIT = 0.25


# Whether a stacked program without a q/k norm first bounds the changes of logit of all its key
# tiles, once (`_change_bound`), so that with a soft-cap none of its tiles has to find its own
# largest for `TANH_SERIES_LIMIT`, and so that within `NEAR_LIMIT` it can take the one-polynomial
# form of A·(e^Δ − 1). False: every tile checks, and both forms run everywhere. Results agree to
# rounding either way.
CHANGE_BOUND = True


# The stacked programs whose changes of logit are all at most this in size (`_change_bound`) compute
# A·(e^Δ − 1) as A times `_expm1_near`'s polynomial alone; the others take `_weighted_expm1_2`'s
# two forms, the polynomial up to ½ and A·e^Δ − A beyond, both computed for every element. At most
# 1, the polynomial's reach (0: never). Compiled for sm_90a (triton 3.6), SASS instructions a thread
# runs per key tile, within the limit and beyond, against before: gemma2-9b 1611 and 1709 against
# 1764 (bfloat16 v, 64 keys), 981 and 1029 against 1016 (float32 v, 32 keys); gemma2-27b 1491 and
# 1589 against 1670; llama's shape (stacked) 972 and 1071 against 1154
# (`sm90a-qk-kernel-resources.md`). H100 run 4, gemma2-9b T = 1024: 37.0 ms against 38.2 with both
# forms everywhere (float32 q, k, v), 31.2 against 31.8 (bfloat16). With randn q and k (the
# benchmarks' inputs) 98.9 % of gemma2-9b's programs are within 1 at T = 1024 and 61 % at llama's
# shape; in SmolLM2-135M on FLORES sentences, 20 %: a real model gains less.
NEAR_LIMIT = 1.0


# Whether the stacked kernel under fp16x3 sums each row's W = Σ_j A_ij·e_ij (output metric) on the
# matrix units, as the product of A·e's float16 parts with a tile of ones beside the value product,
# instead of element-wise in registers: a [channels, rows, keys] accumulator (32 registers a thread at
# gemma2-9b's 64-key tiles) becomes [channels·rows, 16] (8), for 16/256 more tensor work. W then
# carries the same rounding of A·e as the value product, so ΔO_i = (u_i − W_i·O_i) / (1 + W_i)
# subtracts what that rounding added to both. Compiled for sm_90a (triton 3.6), spills a thread at
# gemma2-9b's shape: 812 → 436 B (bfloat16 v, 64 keys), 412 → 276 B (float32 v, 32 keys);
# gemma2-27b's 248 → 120 B (`sm90a-qk-kernel-resources.md`). Timed with `Q_SLICE` and `NEAR_LIMIT`
# (H100 run 4, gemma2-9b T = 1024): the three took it from 41.9 to 37.0 ms on float32 q, k, v and
# from 34.8 to 31.2 on bfloat16 ones; W's extra rounding, 8.7e-7 → 1.5e-6 of the largest impact
# (float32 values, against the ieee kernel). (tf32x3 at
# head_dim 256, 2 channels and 4 warps, 32 rows a product: 516 → 23204 B, so the other precisions
# sum element-wise.)
W_BY_DOT = True


# Above head_dim 128 with 32-key tiles under fp16x3, the head_dim slice in which the stacked kernels
# read q again each key tile (`_tile_change`); 0: q's float16 parts held in registers across the key
# loop. With mma.sync at 16 rows every warp holds all of q: 128 registers a thread at head_dim 256,
# which left the rest spilling; read again from L2 (16 KiB a tile) in slices of 64, the Q·Kᵀ product
# needs 32. Compiled for sm_90a (triton 3.6), gemma2-9b with `W_BY_DOT`: 276 → 36 B spilled a thread
# with 32-key tiles (float32 or bfloat16 v; no spill reloads left in the key loop), for the same
# instructions. Not with 64-key tiles (436 → 428 B, 4 % more instructions run a tile), nor at
# head_dim 128 (64 registers; little or nothing for about 3 % more instructions), nor under tf32x3,
# which splits q in the kernel and would redo that each tile (21 % more instructions at head_dim
# 256). Timed with `W_BY_DOT` above.
Q_SLICE = 64


def default_q_slice(block_d: int, block_n: int, precision: str) -> int:
    """`Q_SLICE` above head_dim 128 with key tiles of at most 32 under fp16x3, else 0 (q held in
    registers)."""
    return Q_SLICE if block_d > 128 and block_n <= 32 and precision == "fp16x3" else 0


def default_w_by_dot(precision: str) -> bool:
    """`W_BY_DOT` under fp16x3, else False (W summed element-wise)."""
    return W_BY_DOT and precision == "fp16x3"


MAX_KERNEL_OFFSET = 2 ** 31  # the Q/K kernels' offsets are int32


@contextlib.contextmanager
def _expected_overflow():
    """TRITON_INTERPRET's numpy warns where rows overflow on purpose (rough rows, padding): quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
        yield


@on_input_device
def qk_impact_triton(q, k, v, cos, sin, token_mask, spec: AttentionSpec, metric: str = "output",
                     precision: str = "fp16x3", block_m: int | None = None, block_n: int | None = None,
                     block_c: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     layout: str | None = None, right_padded: bool | None = None):
    """The Triton kernel of `qk_impact_torch` (same arguments and results), in float32.

    `precision` is how the tile products use the GPU's matrix units: `fp16x3` (the default: three
    products of 11-bit parts on the float16 units, q, k and v split once a call, see
    `_operand`; the probability changes A·(e^Δ − 1) carry one fixed scale, so to 2^-40
    absolute: a neuron that moves attention by less than about 1e-7 keeps less relative precision;
    where v is a bfloat16 or float16 tensor, as a model of that dtype's v_proj output is, the value
    products skip its small part's product: two of three, `_exact_in_big_part`),
    `tf32x3` (three TF32 products of operands split in `_split`, float32-level accuracy), `ieee`
    (plain float32 FMAs) or `tf32` (one product, about 1e-3 relative). On an H200 at T = 1024
    (llama shape, stacked) fp16x3 took 23.8 ms with 64-key tiles, tf32x3, ieee and tf32 54.3, 77.5
    and 34.9 ms with 32-key tiles (`benchmarks/results/h200-kernels.md`); on an H100 (T = 256) fp16x3
    and tf32x3 came within 2.8e-7 and 6.3e-7 of the float64 impacts (relative to the largest), with
    the same top 1 % (`h100-kernels.md`). The interpreter computes every product in float32.
    `layout` (None: `default_layout`) chooses the programs. `"stacked"`: `block_m` query rows (None:
    16) and `block_c` channels (a power of two; None: `default_channel_block`) a program, looping
    over key tiles of `block_n` keys (None: `default_key_block`) with `num_warps` warps (None:
    `default_warps`) and `num_stages` (Triton's software pipelining; None: `default_stages`).
    `"pair"` (a channel and its rotary partner a program) and `"channel"` (one) run
    `_qk_channel_kernel` on plain [rows, keys] tiles (None: `PLAIN_TILES`; `block_c` unused): no
    shared memory between the products and fewer instructions per (channel, row, key), for a Q·Kᵀ
    product per program. All are tuning knobs: `benchmarks/bench_kernels.py --sweep` times them on
    a GPU and `benchmarks/kernel_resources.py` reports their registers and spills without one.
    `right_padded=True` vouches that no sentence has padding before a real token (as
    `neurolang.impact.check_right_padded` ensures): then the call never waits for the GPU; None
    reads that from the device for the plain-tile layouts, which mask padding keys only where it
    happens (the stacked kernels always mask them).

    Extra memory: float32 copies of q and k (before and after RoPE) and of v (except under fp16x3),
    the float16 halves (fp16x3), cos, sin, the q/k-norm factors, the base output and
    log-sum-exp (all O(B·heads·T·D)), per-tile partial sums and the stacked kernels' column
    norms (`_column_norms`, from a k-sized product); never channels × T × T.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if metric not in METRICS:
        raise ValueError(f"unknown Q/K metric {metric!r}; choose one of {', '.join(METRICS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown dot precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown Q/K kernel layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    acc = torch.float32
    b, t, _ = q.shape
    d, hq, hk = spec.head_dim, spec.n_heads, spec.n_kv_heads
    block_d = max(16, triton.next_power_of_2(d))
    layout = default_layout(d, precision, spec.softcap, t) if layout is None else layout
    if layout == "stacked":
        v_exact = _exact_in_big_part(v.dtype, precision)
        block_n = default_key_block(block_d, precision, t, v_exact) if block_n is None else block_n
        defaults = dict(block_m=16, block_n=block_n, num_warps=default_warps(block_d, precision),
                        num_stages=default_stages(block_d, block_n, precision, v_exact))
    else:
        defaults = PLAIN_TILES
    block_m = defaults["block_m"] if block_m is None else block_m
    block_n = defaults["block_n"] if block_n is None else block_n
    num_warps = defaults["num_warps"] if num_warps is None else num_warps
    num_stages = defaults["num_stages"] if num_stages is None else num_stages
    if layout == "stacked" and block_n > KEY_SLACK:
        raise ValueError(f"the stacked Q/K kernel takes at most {KEY_SLACK} keys a tile (KEY_SLACK), not {block_n}")
    # The kernels index q, the base output and the row flags with 32-bit offsets (B·heads·T·D, and
    # the zeros after the operands): a batch past that runs a few sentences at a time.
    per_call = min((MAX_KERNEL_OFFSET - 1) // (hq * t * d), (MAX_KERNEL_OFFSET - 1 - _slack_rows(d) * d) // (hk * t * d))
    if per_call < 1:
        raise ValueError(f"a sentence of {t} tokens is too long for the Q/K kernel ({hq} heads × {d} channels × "
                         f"{t} tokens ≥ 2^31 offsets)")
    if b > per_call:
        sub = lambda x, i: x if x.shape[0] == 1 else x[i:i + per_call]  # noqa: E731 (cos/sin may be [1, T, D])
        parts = [qk_impact_triton(sub(q, i), sub(k, i), sub(v, i), sub(cos, i), sub(sin, i), token_mask[i:i + per_call],
                                  spec, metric, precision, block_m, block_n, block_c, num_warps, num_stages, layout,
                                  right_padded)
                 for i in range(0, b, per_call)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    token_mask = token_mask.bool()
    tokens = token_mask.to(torch.int32).contiguous()
    cos = cos.to(acc).expand(b, t, d).contiguous()
    sin = sin.to(acc).expand(b, t, d).contiguous()
    # Heads as views of the projections (`_operands` reads them in place); float32 copies only
    # where a q/k norm is computed on them.
    qn, rq, rq_m1 = _normalise(_heads(q, hq, d, acc if spec.q_norm else None), spec.q_norm)
    kn, rk, rk_m1 = _normalise(_heads(k, hk, d, acc if spec.k_norm else None), spec.k_norm)
    (qn, qr, kn, kr), parts, unscale, v_exact = _operands(qn, kn, _heads(v, hk, d, None), cos, sin, tokens, spec,
                                                          precision)
    lse, out = _base_attention(parts, unscale, v_exact, tokens, spec, precision)
    counted = _counted_rows(token_mask, spec.sliding_window)
    n_tiles = triton.cdiv(t, block_m)
    block_c = default_channel_block(block_m, d, num_warps, precision) if block_c is None else block_c
    if block_c < 1 or block_c & (block_c - 1) or block_c * block_m < 16:
        raise ValueError(f"block_c must be a power of two with block_c·block_m ≥ 16, not {block_c}")
    has_norm_q, has_norm_k = rq is not None, rk is not None
    if layout == "stacked":
        kernels = (_qk_kernel, _qk_rough_kernel)
        grids = [(b * hq, n_tiles, triton.cdiv(d, block_c))] * 2
        q_slice = default_q_slice(block_d, block_n, precision)
        specialise = [dict(BLOCK_C=block_c, series_limit=TANH_SERIES_LIMIT, near_limit=NEAR_LIMIT, Q_SLICE=q_slice,
                           W_BY_DOT=default_w_by_dot(precision)),
                      dict(BLOCK_C=block_c, series_limit=TANH_SERIES_LIMIT, Q_SLICE=q_slice)]
    else:  # plain tiles
        if layout == "pair" and d % 2:
            raise ValueError(f"layout='pair' needs an even head_dim, not {d}")
        kernels = (_qk_channel_kernel, _qk_channel_rough_kernel)
        grids = [(b * hq, n_tiles, d // 2 if layout == "pair" else d), (b * hq, n_tiles, d)]
        # Keys need the token mask only where padding comes before a real token (the pipeline pads on the
        # right, `right_padded`); with it, ptxas serialises the kernel's wgmma (sm_90a, triton 3.6), so it is
        # kept off otherwise. Unless the caller vouches, that is read from the device: one wait for the GPU.
        padding_first = bool((tokens[:, 1:] > tokens[:, :-1]).any()) if right_padded is None else not right_padded
        specialise = [dict(MASK_KEYS=padding_first, PAIR=layout == "pair")] * 2
    results = []
    for is_key, r, r_m1, has_norm in ((False, rq, rq_m1, has_norm_q), (True, rk, rk_m1, has_norm_k)):
        # Gentle rows, rough rows: every entry written (a rough program without such rows writes 0).
        partial = torch.empty(2, b * hq, n_tiles, d, dtype=acc, device=q.device)
        rough = torch.empty(b * hq, d, t, dtype=torch.int8, device=q.device)  # rows that change a lot
        dummy = qn  # never read when the norm is absent
        if layout == "stacked":  # the main kernel's column norms, read without a norm (`_change_bound`)
            bounded = not has_norm and CHANGE_BOUND
            specialise[0]["COLNORM"] = _column_norms(kn, kr, cos, sin, spec.scaling, is_key) if bounded else dummy
            specialise[0]["BOUNDED"] = bounded
        for kernel, grid, own, part in zip(kernels, grids, specialise, partial):
            with _expected_overflow():
                kernel[grid](
                    qn, qr, kn, kr, *parts, cos, sin,
                    r.contiguous() if has_norm else dummy, r_m1.contiguous() if has_norm else dummy,
                    lse, out, unscale, tokens, counted, part, rough,
                    t, d, hq, spec.group_size, float(spec.scaling), float(spec.softcap or 1.0),
                    int(spec.sliding_window or 0),
                    IS_KEY=is_key, HAS_NORM=has_norm, HAS_CAP=spec.softcap is not None,
                    HAS_WINDOW=spec.sliding_window is not None, PROBS=metric == "probs", PRECISION=precision,
                    V_EXACT=v_exact, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
                    num_stages=num_stages, **own,
                )
        per_head = partial.sum((0, 2)).view(b, hq, d)
        if is_key:
            per_head = per_head.view(b, hk, spec.group_size, d).sum(2)
        results.append(_finish(per_head, metric))
    return results[0], results[1]
