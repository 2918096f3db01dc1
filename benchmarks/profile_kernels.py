"""Warm launches of the Q/K and column-norm kernels inside a profiler capture range (CUDA).

For Nsight Compute, which then reports why a kernel takes its time (occupancy, stall reasons,
pipe utilisation) rather than only how long:

    ncu --profile-from-start off --kernel-name regex:'^(_qk_kernel|_column_sumsq_kernel)$' \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python3 benchmarks/profile_kernels.py --shape llama3.1-8b --seq-len 512

Every kernel runs once first (compilation), then once more between
cudaProfilerStart and cudaProfilerStop: the Q/K kernels (query and key channels) in each
precision given, then the column-norm kernel on the benchmark's FFN input. `run_gpu.sh OUT
profile` runs this under ncu when the machine has it.
"""
import argparse

import torch

from bench_kernels import make_inputs
from kernels import masked_column_sumsq_triton, qk_impact_triton


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3.1-8b")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precisions", default="tf32x3,fp16x3")
    parser.add_argument("--values", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of q, k, v (bfloat16: as a bfloat16 model's projections give them)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py: needs a CUDA device")
    x = make_inputs(args.shape, args.seq_len, "cuda")
    q, k, v = (x[f"{name}_bf16"] if args.values == "bfloat16" else x[name] for name in "qkv")
    calls = [lambda p=p: qk_impact_triton(q, k, v, x["cos"], x["sin"], x["mask"], x["spec"], precision=p)
             for p in args.precisions.split(",")]
    calls.append(lambda: masked_column_sumsq_triton(x["h"], x["h_mask"]))
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {args.shape}, T = {args.seq_len}, {args.values} q, k, v: Q/K in {args.precisions}, then the "
          "column-norm kernel")


if __name__ == "__main__":
    main()
