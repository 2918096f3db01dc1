"""Registers, spills and shared memory of the Q/K impact kernels per configuration, without a GPU.

Triton compiles the kernel for a target (default sm_90a: H100/H200) on any machine, and its
bundled `ptxas -v` reports the resources of each configuration. Spilled registers go to local
memory and usually cost time, so this narrows what a (scarce) GPU session should time with
`bench_kernels.py --sweep`. It times nothing.

    python benchmarks/kernel_resources.py                  # the default tile configurations
    python benchmarks/kernel_resources.py --stages 1,2     # also with fewer pipeline stages
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.qk_impact import _qk_kernel, _qk_rough_kernel  # noqa: E402

POINTERS = ("QN", "QR", "KN", "KR", "V", "COS", "SIN", "R", "RM1", "LSE", "OUT")
SCALARS = dict(TOKENS="*i32", PARTIAL="*fp32", ROUGH="*i8", T="i32", D="i32", n_heads="i32", group="i32", scaling="fp32",
               softcap="fp32", window="i32")
# (precision, BLOCK_M, BLOCK_N, BLOCK_C, warps)
CONFIGS = [("tf32x3", 16, 32, 8, 8), ("tf32x3", 16, 16, 8, 8), ("tf32x3", 16, 64, 8, 8), ("tf32x3", 32, 32, 4, 8),
           ("tf32x3", 16, 32, 4, 4), ("tf32x3", 16, 32, 8, 4), ("tf32", 16, 32, 8, 8), ("ieee", 16, 32, 8, 8)]


def ptxas_path(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, TypeError):
        return triton.knobs.nvidia.ptxas.path


def resources(kernel, arch: int, precision: str, block_m: int, block_n: int, block_c: int, warps: int, stages: int | None,
              head_dim: int = 128, is_key: bool = False, softcap: bool = False) -> dict:
    constants = dict(IS_KEY=is_key, HAS_NORM=False, HAS_CAP=softcap, HAS_WINDOW=softcap, PROBS=False,
                     PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
                     BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    signature = {name: "*fp32" for name in POINTERS} | SCALARS | {name: "constexpr" for name in constants}
    options = {"num_warps": warps} | ({} if stages is None else {"num_stages": stages})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas_path(arch), f"-arch=sm_{arch}a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True).stderr
    number = lambda pattern: int(re.search(pattern, report).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_bytes": number(r"(\d+) bytes spill stores"),
            "shared_bytes": compiled.metadata.shared}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--stages", default="default", help="comma list of num_stages ('default': Triton's)")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    stages = [None if s == "default" else int(s) for s in args.stages.split(",")]
    print(f"Q/K kernel on sm_{args.arch}a (compiled offline, triton {triton.__version__}), head_dim {args.head_dim}, "
          "query channels, no soft-cap/window/norm\n")
    print("| kernel | precision | BLOCK_M | BLOCK_N | BLOCK_C | warps | stages | registers / thread | spill stores | "
          "shared memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for stage in stages:
        for precision, block_m, block_n, block_c, warps in CONFIGS:
            if args.head_dim > 128:
                block_c //= 2  # the same 128 × 128 value-product accumulator
            for kernel in (_qk_kernel, _qk_rough_kernel):
                r = resources(kernel, args.arch, precision, block_m, block_n, block_c, warps, stage, args.head_dim)
                name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
                print(f"| {name} | {precision} | {block_m} | {block_n} | {block_c} | {warps} | {stage or 'default'} | "
                      f"{r['registers']} | {r['spill_bytes']} B | {r['shared_bytes'] // 1024} KiB |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
