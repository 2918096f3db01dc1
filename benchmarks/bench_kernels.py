"""Kernel benchmarks: each impact operation against the plain PyTorch reference on the same inputs.

Layer shapes of Llama-3.1-8B (32 heads × 128, 8 KV heads, FFN 14336), Qwen2.5-7B (28 × 128,
4 KV heads, FFN 18944) and Gemma2-9B (16 × 256, 8 KV heads, FFN 14336, soft-cap 50, window 4096).
For Q/K the reference is the straightforward Appendix-A form (`qk_impact_reference`: zero each
channel, broadcast over channels, per head and sentence). Reported: median time, ratio to the
reference, and peak extra memory (CUDA: max_memory_allocated; CPU: growth of the process's peak
RSS, each measurement in a fresh process, so a `compiled` row includes the compiler's own memory).

    python benchmarks/bench_kernels.py                      # every implementation this device has
    python benchmarks/bench_kernels.py --seq-lens 256,1024,2048 --out benchmarks/results/x.md
    python -m pytest benchmarks/bench_kernels.py            # pytest-benchmark, small shapes

Selection (top 1 % of 8 rows of FFN width, counts and ranks) is timed too: its reference is the
PyTorch twin (stable sort + index_add), its fast path the single-launch Triton kernel.

On CUDA every row runs in this one process (peak memory from max_memory_allocated); the table
adds two floors: for Q/K, one FlashAttention forward of the same layer (bf16, causal, SDPA's flash
backend) times head_dim, the work the kernel must do; for the FFN impact (a batch of 8 sentences,
H in bf16), the time to read H once at the bandwidth of a device-to-device copy measured in the
same run. `--sweep [ffn,qk]` times the kernels' tile sizes (and Q/K dot precisions) at one T,
`--breakdown` splits one Q/K call's time by GPU kernel, and
`--accuracy` compares each precision with the float64 reference (T = 256).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from kernels import (AttentionSpec, masked_column_sumsq_torch, qk_impact_reference, qk_impact_torch,
                     select_count_torch, top_k_size)
from kernels import qk_impact
from kernels.qk_impact import PRECISIONS, SHORT_SENTENCE, default_layout

FFN_BATCH = 8  # sentences per FFN-impact call
SHAPES = {
    "llama3.1-8b": dict(n_heads=32, n_kv_heads=8, head_dim=128, ffn=14336, softcap=None, window=None),
    "qwen2.5-7b": dict(n_heads=28, n_kv_heads=4, head_dim=128, ffn=18944, softcap=None, window=None),
    "gemma2-9b": dict(n_heads=16, n_kv_heads=8, head_dim=256, ffn=14336, softcap=50.0, window=4096),
    # Not one of the shapes: head_dim 128 with a soft-cap, where the default layout is
    # "stacked" (`default_layout`); named with --shapes.
    "gemma2-27b": dict(n_heads=32, n_kv_heads=16, head_dim=128, ffn=36864, softcap=50.0, window=4096),
}
TABLE_SHAPES = "llama3.1-8b,qwen2.5-7b,gemma2-9b"  # the issue's


def make_inputs(shape: str, t: int, device: str, seed: int = 0, qk_batch: int = 1):
    """Random inputs of one layer of `shape`: q, k, v of `qk_batch` sentences of t tokens (and
    their bfloat16 copies), H of FFN_BATCH sentences, a batch of FFN impacts, the attention spec."""
    s = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    d, hq, hk = s["head_dim"], s["n_heads"], s["n_kv_heads"]
    q = torch.randn(qk_batch, t, hq * d, generator=gen)
    k = torch.randn(qk_batch, t, hk * d, generator=gen)
    v = torch.randn(qk_batch, t, hk * d, generator=gen)
    pos = torch.arange(t, dtype=torch.float32)
    inv = 1 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    h = torch.randn(FFN_BATCH, t, s["ffn"], generator=gen, dtype=torch.bfloat16)  # no float32 copy on the way
    mask = torch.ones(qk_batch, t, dtype=torch.bool)
    h_mask = torch.ones(FFN_BATCH, t, dtype=torch.bool)
    impacts = torch.rand(8, s["ffn"], generator=gen)  # a batch of 8 sentences' FFN impacts, for selection
    spec = AttentionSpec(hq, hk, d, d ** -0.5, s["softcap"], s["window"])
    to = lambda x: x.to(device)  # noqa: E731
    # The same q, k, v as a bfloat16 model's projections give them (`--dtype bfloat16`): bfloat16
    # tensors, whose v the Q/K kernels take for its own big part and skip a value product for
    # (`_exact_in_big_part`).
    bf16 = {f"{n}_bf16": to(x.bfloat16()) for n, x in (("q", q), ("k", k), ("v", v))}
    return dict(q=to(q), k=to(k), v=to(v), cos=to(emb.cos()[None]), sin=to(emb.sin()[None]), h=to(h),
                mask=to(mask), h_mask=to(h_mask), impacts=to(impacts), spec=spec, **bf16)


def implementations(device: str):
    """name -> (operation, callable(inputs)) available on this device."""
    impls = {
        "qk/reference": lambda x: qk_impact_reference(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"], x["spec"]),
        "qk/torch": lambda x: qk_impact_torch(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"], x["spec"]),
        "ffn/reference": lambda x: torch.linalg.vector_norm(x["h"].float() * x["h_mask"][..., None], dim=1),
        "ffn/torch": lambda x: masked_column_sumsq_torch(x["h"], x["h_mask"]).sqrt(),
        # Selection of the top 1 % of a batch of 8 FFN rows, with counts and ranks (independent of T).
        "select/reference": lambda x: select_count_torch(x["impacts"], k=top_k_size(0.01, x["impacts"].shape[1])),
    }
    if device == "cuda":
        from kernels import masked_column_sumsq_triton, qk_impact_triton, select_count_triton

        impls["qk/triton"] = lambda x: qk_impact_triton(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"], x["spec"])
        impls["qk/triton-bf16"] = lambda x: qk_impact_triton(x["q_bf16"], x["k_bf16"], x["v_bf16"], x["cos"], x["sin"],
                                                             x["mask"], x["spec"])
        for precision in ("ieee", "tf32", "fp16x3"):
            impls[f"qk/triton-{precision}"] = (
                lambda x, precision=precision: qk_impact_triton(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"],
                                                                x["spec"], precision=precision))
        # The stacked layout where the default is another ("pair" under fp16x3 up to head_dim 128).
        impls["qk/triton-stacked"] = lambda x: qk_impact_triton(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"],
                                                                x["spec"], layout="stacked")
        impls["ffn/triton"] = lambda x: masked_column_sumsq_triton(x["h"], x["h_mask"]).sqrt()
        impls["select/triton"] = lambda x: select_count_triton(
            x["impacts"], torch.zeros(x["impacts"].shape[1], dtype=torch.int32, device="cuda"),
            k=top_k_size(0.01, x["impacts"].shape[1]))
    else:
        impls["qk/torch-compiled"] = impls["qk/torch"]  # the same call with NEUROLANG_COMPILE=1
    return impls


def measure_one(name: str, shape: str, t: int, device: str, repeats: int) -> dict:
    """Time and peak memory of one implementation, in this (fresh) process."""
    os.environ["NEUROLANG_COMPILE"] = "1" if name.endswith("compiled") else "0"
    inputs = make_inputs(shape, t, device)
    fn = implementations(device)[name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn(inputs)  # warm-up (and compilation)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(inputs)
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"name": name, "shape": shape, "T": t, "median_s": statistics.median(times), "peak_bytes": peak}


def time_cuda(fn, inputs) -> tuple[float, int]:
    """Median seconds and peak extra bytes of fn(inputs) on CUDA, in this process.

    A first call compiles and measures peak memory; a second decides the clock: calls over 0.2 s
    are timed twice with the host clock, faster ones with `triton.testing.do_bench` (median, L2
    flushed each run). (Deciding on the first call timed a kernel's first use, compilation
    included, with the host clock and launch overhead: 3× the floor for FFN, H200.)
    """
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    start = time.perf_counter()
    fn(inputs)
    torch.cuda.synchronize()
    if time.perf_counter() - start > 0.2:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn(inputs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times), peak
    return triton.testing.do_bench(lambda: fn(inputs), warmup=25, rep=200, return_mode="median") / 1e3, peak


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, bytes read plus bytes written."""
    import triton.testing

    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    seconds = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") / 1e3
    return 2 * src.numel() * src.element_size() / seconds


def flash_forward_seconds(x) -> float:
    """One causal FlashAttention forward (bf16, SDPA's flash backend) of the layer `x` describes."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    spec, t = x["spec"], x["q"].shape[1]
    heads = lambda y, n: y.view(1, t, n, spec.head_dim).transpose(1, 2).to(torch.bfloat16).contiguous()  # noqa: E731
    q, k, v = heads(x["q"], spec.n_heads), heads(x["k"], spec.n_kv_heads), heads(x["v"], spec.n_kv_heads)
    k = k.repeat_interleave(spec.group_size, 1)
    v = v.repeat_interleave(spec.group_size, 1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def selected(names, ops: str) -> list:
    """The implementations `--ops` names: whole operations (qk) or single ones (qk/triton)."""
    wanted = ops.split(",")
    return [n for n in names if n in wanted or n.split("/")[0] in wanted]


def run_cuda(args, progress) -> tuple[list, dict]:
    """Each implementation's time and peak memory on CUDA; `progress(rows, floors)` after each row."""
    os.environ["NEUROLANG_COMPILE"] = "0"  # the eager twin: on CUDA the kernels are the fast path
    rows, floors = [], {"bandwidth": copy_bandwidth()}
    names = selected(implementations("cuda"), args.ops)
    for shape in args.shapes.split(","):
        for t in (int(x) for x in args.seq_lens.split(",")):
            inputs = make_inputs(shape, t, "cuda")
            floors[("qk", shape, t)] = flash_forward_seconds(inputs) * inputs["spec"].head_dim
            floors[("ffn", shape, t)] = inputs["h"].numel() * inputs["h"].element_size() / floors["bandwidth"]
            for name in names:
                if name.startswith("qk/reference") and t > args.max_reference_t:
                    continue
                spec = inputs["spec"]
                if name == "qk/triton-stacked" and default_layout(spec.head_dim, "fp16x3", spec.softcap, t) == "stacked":
                    continue  # the same as qk/triton
                try:
                    seconds, peak = time_cuda(implementations("cuda")[name], inputs)
                    rows.append({"name": name, "shape": shape, "T": t, "median_s": seconds, "peak_bytes": peak})
                except Exception as err:  # noqa: BLE001 - a row that fails is reported, the table goes on
                    rows.append({"name": name, "shape": shape, "T": t, "error": f"{type(err).__name__}: {err}"[:200]})
                torch.cuda.empty_cache()
                print(rows[-1], file=sys.stderr, flush=True)
                progress(rows, floors)
            del inputs
    return rows, floors


def run(args, progress=lambda partial_table: None) -> str:
    """The table of every implementation `--ops` names; on CUDA, `progress` gets it after each row."""
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    if device == "cuda":
        return table(*run_cuda(args, lambda rows, floors: progress(table(rows, floors, device))), device)
    rows = []
    for shape in args.shapes.split(","):
        for t in (int(x) for x in args.seq_lens.split(",")):
            for name in selected(implementations(device), args.ops):
                if name.startswith("qk/reference") and t > args.max_reference_t:
                    continue
                cmd = [sys.executable, __file__, "--one", name, "--shapes", shape, "--seq-lens", str(t),
                       "--device", device, "--repeats", str(args.repeats)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    rows.append({"name": name, "shape": shape, "T": t, "error": done.stderr.strip().splitlines()[-1]})
                else:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], file=sys.stderr, flush=True)
    return table(rows, {}, device)


def table(rows, floors, device) -> str:
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    versions = f"torch {torch.__version__}"
    if device == "cuda":
        import triton

        versions += f", triton {triton.__version__}, CUDA {torch.version.cuda}"
    lines = [f"device: {device} ({card}), {versions}, threads {torch.get_num_threads()}", ""]
    if "bandwidth" in floors:
        lines += [f"device-to-device copy: {floors['bandwidth'] / 1e12:.2f} TB/s (read + write)", ""]
    lines += ["| op | impl | shape | T | median | speed-up vs reference | peak extra memory (reference ÷ this) "
              "| floor | time ÷ floor |",
              "|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["name"].split("/")[0], r["shape"], r["T"]): r for r in rows if r["name"].endswith("/reference") and "error" not in r}
    for r in rows:
        op, impl = r["name"].split("/")
        if "error" in r:
            lines.append(f"| {op} | {impl} | {r['shape']} | {r['T']} | error: {r['error']} | | | | |")
            continue
        base = ref.get((op, r["shape"], r["T"]))
        ratio = f"{base['median_s'] / r['median_s']:.2f}×" if base else "—"
        # Below 1 MiB the measurement says little (CPU: RSS pages): report the bound.
        small = r["peak_bytes"] < 2**20
        mem_ratio = (f" ({'≥ ' if small else ''}{base['peak_bytes'] / max(r['peak_bytes'], 2**20):.1f}×)"
                     if base and impl != "reference" else "")
        mem = "< 1 MiB" if small else f"{r['peak_bytes'] / 2**20:.0f} MiB"
        floor = floors.get((op, r["shape"], r["T"]))
        floor_cells = f"{floor * 1e3:.3f} ms | {r['median_s'] / floor:.2f}" if floor else " | "
        lines.append(f"| {op} | {impl} | {r['shape']} | {r['T']} | {r['median_s'] * 1e3:.3f} ms | {ratio} | "
                     f"{mem}{mem_ratio} | {floor_cells} |")
    floor_rows = sorted(k for k in floors if k != "bandwidth" and k[0] == "qk")
    if floor_rows:
        lines += ["", "| shape | T | FlashAttention forward × head_dim | read H once (bf16, 8 sentences) |", "|---|---|---|---|"]
        lines += [f"| {s} | {t} | {floors[('qk', s, t)] * 1e3:.3f} ms | {floors[('ffn', s, t)] * 1e3:.3f} ms |"
                  for _, s, t in floor_rows]
    if floors:
        lines += ["", "floor: qk = one FlashAttention forward (bf16, causal) × head_dim; ffn = bytes of H (bf16, "
                  f"{FFN_BATCH} sentences) ÷ the copy bandwidth above."]
    return "\n".join(lines)


def sweep(shape: str, t: int, batch: int = 1) -> str:
    """Q/K kernel time for each tile size and dot precision at one shape (CUDA), with each
    configuration's largest difference from the plain-float32 (ieee) result on the same inputs,
    relative to its largest impact; `batch` sentences of t tokens."""
    from kernels import qk_impact_triton

    x = make_inputs(shape, t, "cuda", qk_batch=batch)
    values = {"float32": x, "bfloat16": dict(x, q=x["q_bf16"], k=x["k_bf16"], v=x["v_bf16"])}

    def call(y, **options):
        return qk_impact_triton(y["q"], y["k"], y["v"], y["cos"], y["sin"], y["mask"], y["spec"], **options)

    bases = {}
    lines = [f"Q/K kernel sweep, {shape}, T = {t}{f', {batch} sentences' if batch > 1 else ''}:", "",
             "| layout | precision | q, k, v values | BLOCK_M | BLOCK_N | BLOCK_C | warps | stages | median | "
             "max diff from ieee ÷ max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    # (layout, precision, values, BLOCK_M, BLOCK_N, BLOCK_C, warps, num_stages; None: the defaults):
    # the default first, on float32 and on bfloat16 values, then its neighbours. Up to head_dim 128
    # the default is "pair" (a channel and its rotary partner a program, plain 64 × 32 tiles: the
    # fastest of these on an H100, h100-kernels.md), beside the stacked kernel ("stacked": 16 rows
    # and a block of channels a program) and one channel a program ("channel"); with a soft-cap
    # (gemma2-27b) it is stacked, pair beside it. At head_dim 256, by value dtype, the stacked
    # kernel's default (8 channels and 8 warps; 64-key tiles in two stages for bfloat16 values, 32
    # in two for float32 ones, `default_key_block`; H100 run 3: 39.5 and 43.6 ms, before `Q_SLICE`,
    # `W_BY_DOT` and `NEAR_LIMIT`). On bfloat16 values first: the default; "both forms" (every
    # program with both forms of A·(e^Δ − 1), as before `NEAR_LIMIT`); "as run 3" (q held, W summed
    # element-wise and both forms: the form H100 run 3 timed, but for the program bound's
    # Cauchy–Schwarz form, which sends more programs to the soft-cap's series); 8 channels over 32
    # keys in two stages (q read again: nothing spilled in the key loop). Then the float32 default
    # and its "both forms"; 4 channels and 4 warps over 32 keys (two stages, 89 KiB of shared
    # memory; at most 255 registers a thread): two programs an SM, so that one computes while the
    # other's value product runs or it waits at a barrier (a program's own wgmma never overlaps its
    # arithmetic, sm90a-qk-kernel-resources.md), on bfloat16 values and on float32 ones (one stage,
    # 56 KiB); "tile checks" (no program bound: every key tile finds its own largest change of
    # logit, as before `CHANGE_BOUND`), 32 bfloat16 keys in three stages, and the float32 "as run
    # 3" (43.6 ms there). Under a time limit the first rows matter most. At the detection's lengths
    # (T ≤ `SHORT_SENTENCE`: sentences of 20–60 tokens, `--sweep-t 40 --sweep-batch 8`) the plain
    # tiles of 64 rows are mostly padding: the default there is stacked with 32-key tiles (H100 run
    # 4: 1.5 ms against pair's 2.1), beside 64 and 16 keys, 32 rows, and the plain tiles, on bfloat16
    # values as a bfloat16 model's detection has them.
    if t <= SHORT_SENTENCE and x["spec"].head_dim <= 128 and x["spec"].softcap is None:
        configs = [("stacked", "fp16x3", "bfloat16", None, None, None, None, None),
                   ("stacked", "fp16x3", "bfloat16", None, 64, None, None, None),
                   ("stacked", "fp16x3", "bfloat16", None, 16, None, None, None),
                   ("stacked", "fp16x3", "bfloat16", 32, 32, None, None, None),
                   ("pair", "fp16x3", "bfloat16", None, None, None, None, None),
                   ("pair", "fp16x3", "bfloat16", 16, 16, None, 4, 2)]
    elif x["spec"].head_dim <= 128 and x["spec"].softcap is not None:  # the stacked default, pair beside it
        configs = [("stacked", "fp16x3", "float32", None, None, None, None, None),
                   ("stacked, tile checks", "fp16x3", "float32", None, None, None, None, None),
                   ("pair", "fp16x3", "float32", None, None, None, None, None)]
    elif x["spec"].head_dim <= 128:
        configs = [("pair", "fp16x3", "float32", None, None, None, None, None),
                   ("pair", "fp16x3", "bfloat16", None, None, None, None, None),
                   ("stacked", "fp16x3", "float32", None, None, None, None, None),
                   ("stacked", "fp16x3", "bfloat16", None, None, None, None, None),
                   ("channel", "fp16x3", "float32", 64, 32, None, 4, 2),
                   ("pair", "fp16x3", "float32", 64, 16, None, 4, 2),
                   ("pair", "fp16x3", "float32", 128, 32, None, 8, 2),
                   ("channel", "fp16x3", "float32", 128, 32, None, 8, 2)]
    else:  # fewer: each configuration compiles four specialisations (soft-cap and window)
        configs = [("stacked", "fp16x3", "bfloat16", None, None, None, None, None),
                   ("stacked, both forms", "fp16x3", "bfloat16", None, None, None, None, None),
                   ("stacked, as run 3", "fp16x3", "bfloat16", None, None, None, None, None),
                   ("stacked", "fp16x3", "bfloat16", 16, 32, 8, 8, 2),
                   ("stacked", "fp16x3", "float32", None, None, None, None, None),
                   ("stacked, both forms", "fp16x3", "float32", None, None, None, None, None),
                   ("stacked", "fp16x3", "bfloat16", 16, 32, 4, 4, 2),
                   ("stacked", "fp16x3", "float32", 16, 32, 4, 4, 1),
                   ("stacked, tile checks", "fp16x3", "bfloat16", None, None, None, None, None),
                   ("stacked", "fp16x3", "bfloat16", 16, 32, 8, 8, 3),
                   ("stacked, as run 3", "fp16x3", "float32", None, None, None, None, None)]
    # What a row's label after the layout sets in qk_impact for its run (the defaults otherwise).
    variants = {"tile checks": dict(CHANGE_BOUND=False), "both forms": dict(NEAR_LIMIT=0.0),
                "as run 3": dict(Q_SLICE=0, W_BY_DOT=False, NEAR_LIMIT=0.0)}
    defaults = {name: getattr(qk_impact, name) for variant in variants.values() for name in variant}
    for layout, precision, kind, block_m, block_n, block_c, warps, stages in configs:
        y = values[kind]
        fn = lambda z: call(z, precision=precision, block_m=block_m, block_n=block_n, block_c=block_c,  # noqa: E731
                            num_warps=warps, num_stages=stages, layout=layout.split(",")[0])
        for name, value in variants.get(layout.partition(", ")[2], {}).items():
            setattr(qk_impact, name, value)
        try:
            if kind not in bases:
                bases[kind] = call(y, precision="ieee")
            diff = max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(fn(y), bases[kind]))
            cell = f"{time_cuda(fn, y)[0] * 1e3:.1f} ms | {diff:.1e}"
        except Exception as err:  # noqa: BLE001
            cell = f"error: {type(err).__name__}: {str(err)[:120]} |"
        finally:
            for name, value in defaults.items():
                setattr(qk_impact, name, value)
        lines.append(f"| {layout} | {precision} | {kind} | {block_m or 'auto'} | {block_n or 'auto'} | {block_c or 'auto'} | "
                     f"{warps or 'auto'} | {stages or 'default'} | {cell} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


# The FFN sweep's (BLOCK_T, warps, stages, programs, mask dtype): the default first, then more bytes
# in flight per program, more or fewer programs, plain loads (1 stage) with larger tiles, and an
# int32 mask (copied asynchronously with the tiles; a bool one is loaded into registers).
# kernel_resources.py --column compiles the same ones.
FFN_SWEEP = [(8, 4, 3, 2048, torch.bool), (16, 4, 3, 2048, torch.bool), (8, 4, 4, 2048, torch.bool),
             (4, 4, 5, 2048, torch.bool), (8, 8, 3, 2048, torch.bool), (8, 4, 3, 1024, torch.bool),
             (8, 4, 3, 4096, torch.bool), (16, 4, 1, 2048, torch.bool), (32, 4, 1, 2048, torch.bool),
             (8, 4, 3, 2048, torch.int32)]


def ffn_sweep(shape: str, t: int) -> str:
    """FFN-impact kernel time for each tile and warp count (CUDA), as a multiple of reading H once."""
    from kernels import masked_column_sumsq_triton

    x = make_inputs(shape, t, "cuda")
    floor = x["h"].numel() * x["h"].element_size() / copy_bandwidth()
    base = masked_column_sumsq_triton(x["h"], x["h_mask"])
    lines = [f"FFN kernel sweep, {shape}, T = {t}, {FFN_BATCH} sentences (read H once: {floor * 1e3:.3f} ms):", "",
             "| BLOCK_T | warps | stages | programs | mask | median | time ÷ floor |", "|---|---|---|---|---|---|---|"]
    for block_t, warps, stages, programs, mask_dtype in FFN_SWEEP:
        mask = x["h_mask"].to(mask_dtype)
        fn = lambda y: masked_column_sumsq_triton(y["h"], mask, programs=programs, block_t=block_t,  # noqa: E731
                                                  num_warps=warps, stages=stages)
        try:
            assert torch.allclose(fn(x), base, rtol=1e-5)
            seconds = time_cuda(fn, x)[0]
            cell = f"{seconds * 1e3:.3f} ms | {seconds / floor:.2f}"
        except Exception as err:  # noqa: BLE001
            cell = f"error: {type(err).__name__}: {str(err)[:120]} |"
        lines.append(f"| {block_t} | {warps} | {stages} | {programs} | {str(mask_dtype)[6:]} | {cell} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def breakdown(shape: str, t: int) -> str:
    """Where one Q/K call's time goes on CUDA: each GPU kernel's time (torch.profiler), and the
    wall time the GPU spent idle (the host's launches and Python between the kernels)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    x = make_inputs(shape, t, "cuda")
    fn = implementations("cuda")["qk/triton"]
    for _ in range(2):  # compiled and warm
        fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            count, total = kernels.get(e.name, (0, 0.0))
            kernels[e.name] = (count + 1, total + e.time_range.elapsed_us())
    busy = sum(total for _, total in kernels.values())
    lines = [f"Q/K call breakdown, {shape}, T = {t}: wall {wall_us / 1e3:.2f} ms (profiled), GPU busy "
             f"{busy / 1e3:.2f} ms, idle {(wall_us - busy) / 1e3:.2f} ms; {sum(c for c, _ in kernels.values())} "
             "kernel launches", "", "| kernel | launches | total | share of wall |", "|---|---|---|---|"]
    for name, (count, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]:
        lines.append(f"| {name[:80].replace('|', '/')} | {count} | {total / 1e3:.3f} ms | {total / wall_us:.1%} |")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return "\n".join(lines)


def accuracy(shapes: str, t: int = 256) -> str:
    """Each Q/K fast path against the float64 reference: max relative error and top-1 % overlap."""
    from kernels import qk_impact_triton

    os.environ["NEUROLANG_COMPILE"] = "0"
    lines = [f"Q/K accuracy against the float64 reference (T = {t}): max |x − ref| ÷ max |ref| over all "
             "impacts, and the share of the float64 top-1 % (per sentence, q and k) that each selects:", "",
             "| shape | impl | q rel. error | k rel. error | top-1 % overlap |", "|---|---|---|---|---|"]
    for shape in shapes.split(","):
        x = make_inputs(shape, t, "cuda")
        args64 = [x[n].double() for n in ("q", "k", "v", "cos", "sin")]
        ref = qk_impact_reference(*args64, x["mask"], x["spec"])
        impls = {"torch": lambda: qk_impact_torch(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"], x["spec"])}
        for precision in PRECISIONS:
            impls[f"triton-{precision}"] = (lambda precision=precision: qk_impact_triton(
                x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"], x["spec"], precision=precision))
        for name, fn in impls.items():
            try:
                got = fn()
            except Exception as err:  # noqa: BLE001 - a precision that fails is reported, the table goes on
                lines.append(f"| {shape} | {name} | error: {type(err).__name__}: {str(err)[:120]} | | |")
                print(lines[-1], file=sys.stderr, flush=True)
                continue
            errors = [float((a.double() - r).abs().max() / r.abs().max()) for a, r in zip(got, ref)]
            shared = total = 0
            for a, r in zip(got, ref):
                k = top_k_size(0.01, r.shape[1])
                for row_a, row_r in zip(a.topk(k, dim=1).indices, r.topk(k, dim=1).indices):
                    shared += len(set(row_a.tolist()) & set(row_r.tolist()))
                    total += k
            lines.append(f"| {shape} | {name} | {errors[0]:.2e} | {errors[1]:.2e} | {shared / total:.3f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=TABLE_SHAPES, help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--seq-lens", default=None, help="default: 256,1024,2048 on CUDA, 256 on the CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-reference-t", type=int, default=2048, help="skip the reference above this T")
    parser.add_argument("--ops", default="qk,ffn,select",
                        help="operations (qk, ffn, select) or implementations (qk/triton, ...) to time")
    parser.add_argument("--sweep", nargs="?", const="ffn,qk", default="",
                        help="CUDA: ffn (FFN tiles, the first of --shapes) and/or qk (Q/K tiles and precisions, "
                             "each shape); bare: both")
    parser.add_argument("--sweep-t", type=int, default=1024)
    parser.add_argument("--sweep-batch", type=int, default=1, help="sentences of --sweep-t tokens in the Q/K sweep")
    parser.add_argument("--accuracy", action="store_true", help="CUDA: Q/K precisions against float64")
    parser.add_argument("--breakdown", action="store_true",
                        help="CUDA: each GPU kernel's share of one Q/K call (each shape, at --sweep-t)")
    parser.add_argument("--out", help="also write the table (Markdown) here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_cuda = torch.cuda.is_available() and args.device != "cpu"
    args.seq_lens = args.seq_lens or ("256,1024,2048" if on_cuda else "256")
    if args.one:
        print(json.dumps(measure_one(args.one, args.shapes, int(args.seq_lens), "cuda" if on_cuda else "cpu",
                                     args.repeats)))
        return

    def save(*texts):
        """--out gets what is measured so far, after each part and table row, written atomically:
        a run its time limit kills (run_gpu.sh's steps) keeps what it measured."""
        if args.out:
            with open(args.out + ".partial", "w", encoding="utf-8") as f:
                f.write(f"command: python {' '.join(sys.argv)}\n\n" + "\n\n".join(texts) + "\n")
            os.replace(args.out + ".partial", args.out)

    parts = []  # the Q/K sweep first: on a time limit, what is still open comes first
    for shape in args.shapes.split(",") if "qk" in args.sweep else []:
        parts.append(sweep(shape, args.sweep_t, args.sweep_batch))
        save(*parts)
    for shape in args.shapes.split(",") if args.breakdown else []:
        try:  # the profiler needs CUPTI; without it, say so and go on
            parts.append(breakdown(shape, args.sweep_t))
        except Exception as err:  # noqa: BLE001
            parts.append(f"Q/K call breakdown, {shape}: error: {type(err).__name__}: {str(err)[:200]}")
        save(*parts)
    if args.accuracy:
        parts.append(accuracy(args.shapes))
        save(*parts)
    if "ffn" in args.sweep:
        parts.append(ffn_sweep(args.shapes.split(",")[0], 2048))
        save(*parts)
    if args.ops:
        parts.append(run(args, lambda partial_table: save(*parts, partial_table)))
        save(*parts)
    print("\n\n".join(parts))


# pytest-benchmark entry points (small shapes, so that they also run on the CPU)
def _small():
    return make_inputs("qwen2.5-7b", 64, "cuda" if torch.cuda.is_available() else "cpu")


def test_bench_qk_reference(benchmark):
    x = _small()
    benchmark(implementations("cpu")["qk/reference"], x)


def test_bench_qk_torch(benchmark):
    x = _small()
    benchmark(implementations("cpu")["qk/torch"], x)


def test_bench_ffn_torch(benchmark):
    x = _small()
    benchmark(implementations("cpu")["ffn/torch"], x)


if __name__ == "__main__":
    main()
