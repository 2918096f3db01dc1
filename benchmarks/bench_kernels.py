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

SHAPES = {
    "llama3.1-8b": dict(n_heads=32, n_kv_heads=8, head_dim=128, ffn=14336, softcap=None, window=None),
    "qwen2.5-7b": dict(n_heads=28, n_kv_heads=4, head_dim=128, ffn=18944, softcap=None, window=None),
    "gemma2-9b": dict(n_heads=16, n_kv_heads=8, head_dim=256, ffn=14336, softcap=50.0, window=4096),
}


def make_inputs(shape: str, t: int, device: str, seed: int = 0):
    s = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    d, hq, hk = s["head_dim"], s["n_heads"], s["n_kv_heads"]
    q = torch.randn(1, t, hq * d, generator=gen)
    k = torch.randn(1, t, hk * d, generator=gen)
    v = torch.randn(1, t, hk * d, generator=gen)
    pos = torch.arange(t, dtype=torch.float32)
    inv = 1 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    h = torch.randn(1, t, s["ffn"], generator=gen)
    mask = torch.ones(1, t, dtype=torch.bool)
    impacts = torch.rand(8, s["ffn"], generator=gen)  # a batch of 8 sentences' FFN impacts, for selection
    spec = AttentionSpec(hq, hk, d, d ** -0.5, s["softcap"], s["window"])
    to = lambda x: x.to(device)  # noqa: E731
    return dict(q=to(q), k=to(k), v=to(v), cos=to(emb.cos()[None]), sin=to(emb.sin()[None]), h=to(h),
                mask=to(mask), impacts=to(impacts), spec=spec)


def implementations(device: str):
    """name -> (operation, callable(inputs)) available on this device."""
    impls = {
        "qk/reference": lambda x: qk_impact_reference(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"], x["spec"]),
        "qk/torch": lambda x: qk_impact_torch(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"], x["spec"]),
        "ffn/reference": lambda x: torch.linalg.vector_norm(x["h"].float() * x["mask"][..., None], dim=1),
        "ffn/torch": lambda x: masked_column_sumsq_torch(x["h"], x["mask"]).sqrt(),
        # Selection of the top 1 % of a batch of 8 FFN rows, with counts and ranks (independent of T).
        "select/reference": lambda x: select_count_torch(x["impacts"], k=top_k_size(0.01, x["impacts"].shape[1])),
    }
    if device == "cuda":
        from kernels import masked_column_sumsq_triton, qk_impact_triton, select_count_triton

        impls["qk/triton"] = lambda x: qk_impact_triton(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["mask"], x["spec"])
        impls["ffn/triton"] = lambda x: masked_column_sumsq_triton(x["h"], x["mask"]).sqrt()
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


def run(args) -> str:
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    rows = []
    for shape in args.shapes.split(","):
        for t in (int(x) for x in args.seq_lens.split(",")):
            for name in implementations(device):
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
    return table(rows, device)


def table(rows, device) -> str:
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    lines = [f"device: {device} ({card}), torch {torch.__version__}, threads {torch.get_num_threads()}", "",
             "| op | impl | shape | T | median | speed-up vs reference | peak extra memory (reference ÷ this) |",
             "|---|---|---|---|---|---|---|"]
    ref = {(r["name"].split("/")[0], r["shape"], r["T"]): r for r in rows if r["name"].endswith("/reference") and "error" not in r}
    for r in rows:
        op, impl = r["name"].split("/")
        if "error" in r:
            lines.append(f"| {op} | {impl} | {r['shape']} | {r['T']} | error: {r['error']} | | |")
            continue
        base = ref.get((op, r["shape"], r["T"]))
        ratio = f"{base['median_s'] / r['median_s']:.2f}×" if base else "—"
        mem_ratio = f" ({base['peak_bytes'] / max(r['peak_bytes'], 1):.1f}×)" if base and impl != "reference" else ""
        lines.append(f"| {op} | {impl} | {r['shape']} | {r['T']} | {r['median_s'] * 1e3:.1f} ms | {ratio} | "
                     f"{r['peak_bytes'] / 2**20:.0f} MiB{mem_ratio} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--seq-lens", default=None, help="default: 256,1024,2048 on CUDA, 256 on the CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-reference-t", type=int, default=2048, help="skip the reference above this T")
    parser.add_argument("--out", help="also write the table (Markdown) here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_cuda = torch.cuda.is_available() and args.device != "cpu"
    args.seq_lens = args.seq_lens or ("256,1024,2048" if on_cuda else "256")
    if args.one:
        print(json.dumps(measure_one(args.one, args.shapes, int(args.seq_lens), "cuda" if on_cuda else "cpu",
                                     args.repeats)))
        return
    text = run(args)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"command: python {' '.join(sys.argv)}\n\n{text}\n")


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
