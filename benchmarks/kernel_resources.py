"""Registers, spills and shared memory of the Q/K impact kernels per configuration, without a GPU.

Triton compiles the kernel for a target (default sm_90a: H100/H200) on any machine, and its
bundled `ptxas -v` reports the resources of each configuration. Spilled registers go to local
memory and usually cost time, so this narrows what a (scarce) GPU session should time with
`bench_kernels.py --sweep`. It times nothing.

    python benchmarks/kernel_resources.py                  # the default tile configurations
    python benchmarks/kernel_resources.py --stages 1,2     # also with fewer pipeline stages
    python benchmarks/kernel_resources.py --every-variant  # every specialisation compiles, within limits
    python benchmarks/kernel_resources.py --column         # the FFN/O/V column-norm kernel
    python benchmarks/kernel_resources.py --channel        # the one-channel Q/K kernel (block_c = 1)
    python benchmarks/kernel_resources.py --v-exact        # any of these for a bfloat16 model's v
    python benchmarks/kernel_resources.py --base           # the base-attention kernel, every precision
    python benchmarks/kernel_resources.py --operand        # the kernel that rotates and splits q, k, v
"""
import argparse
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402
from bench_kernels import FFN_SWEEP  # noqa: E402
from kernels.column_norms import _column_sumsq_kernel, default_column_block  # noqa: E402
from kernels.qk_impact import (OPERAND_TILE, OPERAND_WARPS, PRECISIONS, SHORT_SENTENCE,  # noqa: E402
                               _base_attention_kernel, _operand_kernel, _qk_channel_kernel, _qk_kernel,
                               _qk_rough_kernel, base_attention_tiles, default_channel_block, default_key_block,
                               default_q_slice, default_stages, default_w_by_dot, default_warps)

OPERANDS = ("QB", "QS", "KB", "KS", "VB", "VS")  # float16 halves under fp16x3, else the float32 values
TYPES = dict(TOKENS="*i32", COUNTED="*i8", ROUGH="*i8", T="i32", D="i32", n_heads="i32", group="i32", scaling="fp32", softcap="fp32", series_limit="fp32",
             window="i32", near_limit="fp32")
SM90_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90 (227 KiB)
# (precision, BLOCK_M, BLOCK_N, BLOCK_C, warps)
CONFIGS = [("fp16x3", 16, 64, 8, 8), ("fp16x3", 16, 32, 8, 8), ("fp16x3", 32, 32, 4, 8), ("fp16x3", 16, 32, 4, 4),
           ("tf32x3", 16, 32, 8, 8), ("tf32", 16, 32, 8, 8), ("ieee", 16, 32, 8, 8)]


def ptxas_path(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, TypeError):
        return triton.knobs.nvidia.ptxas.path


def resources(kernel, arch: int, precision: str, block_m: int, block_n: int, block_c: int, warps: int, stages: int | None,
              head_dim: int = 128, **flags) -> dict:
    """Registers, spill bytes and shared memory of one specialisation (`flags`: IS_KEY, HAS_NORM,
    HAS_CAP, HAS_WINDOW, PROBS, MASK_KEYS, PAIR, V_EXACT, absent ones False; Q_SLICE, W_BY_DOT
    and BOUNDED, absent as the launch sets them; block_c is ignored by the one-channel kernels)."""
    params = list(inspect.signature(kernel.fn).parameters)
    block_d = max(16, triton.next_power_of_2(head_dim))
    constants = dict(IS_KEY=False, HAS_NORM=False, HAS_CAP=False, HAS_WINDOW=False, PROBS=False, MASK_KEYS=False,
                     PAIR=False, V_EXACT=False, Q_SLICE=default_q_slice(block_d, block_n, precision),
                     W_BY_DOT=default_w_by_dot(precision), BOUNDED=not flags.get("HAS_NORM", False)) | flags | dict(
        PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
        BLOCK_D=block_d)
    constants = {name: value for name, value in constants.items() if name in params}
    operand = "*fp16" if precision == "fp16x3" else "*fp32"
    signature = {name: "constexpr" if name in constants else TYPES.get(name, operand if name in OPERANDS else "*fp32")
                 for name in params}
    # As the runtime specialises a launch: pointers (and head_dim 128/256, T) divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params)
             if signature[name].startswith("*") or name in ("T", "D")}
    options = {"num_warps": warps} | ({} if stages is None else {"num_stages": stages})
    return compile_report(kernel, signature, constants, attrs, options, arch)


def compile_report(kernel, signature: dict, constants: dict, attrs: dict, options: dict, arch: int) -> dict:
    """Compile one specialisation for sm_{arch}a; ptxas's registers and spills and whether it
    serialised the wgmma (its warning C7515: a wait after every product), Triton's shared memory,
    and the SASS instructions a thread runs in the kernel's longest loop (a key tile, `nvdisasm`)."""
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas_path(arch), f"-arch=sm_{arch}a", "-v", ptx, "-o", cubin],
                                capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(os.path.dirname(ptxas_path(arch)), "nvdisasm"), "-c", cubin],
                              capture_output=True, text=True).stdout
    number = lambda pattern: int(re.search(pattern, report).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_bytes": number(r"(\d+) bytes spill stores"),
            "shared_bytes": compiled.metadata.shared, "serialised": "C7515" in report,
            "loop_instructions": longest_loop(sass)}


def longest_loop(sass: str) -> int:
    """Instructions between a label and the furthest backward branch to it (0 without a loop)."""
    labels, count, longest = {}, 0, 0
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = count
        elif re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", line):
            count += 1
            target = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
            if target and target.group(1) in labels:
                longest = max(longest, count - labels[target.group(1)])
    return longest


def every_variant(arch: int, head_dim: int, precision: str, v_exact: bool) -> None:
    """Compile both stacked kernels in all 32 specialisations (query/key channel, q/k norm, soft-cap,
    window, metric) at the stacked layout's defaults for this head_dim and sentences past
    `SHORT_SENTENCE`; report the worst."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    warps = default_warps(block_d, precision)
    block_n = default_key_block(block_d, precision, SHORT_SENTENCE + 1, v_exact)
    stages, block_c = default_stages(block_d, block_n, precision, v_exact), default_channel_block(16, head_dim, warps, precision)
    names = ("IS_KEY", "HAS_NORM", "HAS_CAP", "HAS_WINDOW", "PROBS")
    worst = {"registers": (0, ""), "spill_bytes": (0, ""), "shared_bytes": (0, "")}
    count = serialised = 0
    for kernel in (_qk_kernel, _qk_rough_kernel):
        for bits in itertools.product((False, True), repeat=len(names)):
            flags = dict(zip(names, bits))
            label = f"{kernel.fn.__name__} " + " ".join(n for n, on in flags.items() if on)
            r = resources(kernel, arch, precision, 16, block_n, block_c, warps, stages, head_dim, V_EXACT=v_exact,
                          **flags)
            count += 1
            serialised += r["serialised"]
            for key in worst:
                if r[key] > worst[key][0]:
                    worst[key] = (r[key], label)
    print(f"head_dim {head_dim} ({precision}{', v exact' if v_exact else ''}, 16 × {block_n}, BLOCK_C {block_c}, "
          f"{warps} warps, {stages} stages): {count} "
          f"specialisations compiled; most registers {worst['registers'][0]} ({worst['registers'][1]}), most spills "
          f"{worst['spill_bytes'][0]} B ({worst['spill_bytes'][1]}), most shared memory "
          f"{worst['shared_bytes'][0]} B ({worst['shared_bytes'][1]}; sm_90 allows {SM90_SHARED_BYTES} B); "
          f"wgmma serialised in {serialised}", flush=True)


# The one-channel kernel's (layout, head_dim, BLOCK_M, BLOCK_N, warps, stages): bench_kernels.py --sweep's.
CHANNEL_CONFIGS = [("channel", 128, 64, 32, 4, 2), ("pair", 128, 64, 32, 4, 2), ("channel", 128, 128, 32, 8, 2),
                   ("pair", 128, 128, 32, 8, 2), ("pair", 128, 64, 16, 4, 2), ("channel", 256, 64, 16, 4, 2)]
CHANNEL_VARIANTS = {"query channels": {}, "key channels": dict(IS_KEY=True), "padding before tokens": dict(MASK_KEYS=True),
                    "q/k norm": dict(HAS_NORM=True), "soft-cap + window": dict(HAS_CAP=True, HAS_WINDOW=True)}


def channel_resources(arch: int, v_exact: bool) -> None:
    """The one-channel Q/K kernel (layouts "channel" and "pair"; fp16x3, output metric) at the
    sweep's configurations."""
    print(f"One-channel Q/K kernel on sm_{arch}a (compiled offline, triton {triton.__version__}), fp16x3"
          f"{', v exact' if v_exact else ''}, output "
          "metric; loop: SASS instructions a thread runs per key tile (the longest of the kernel's loops), and "
          "per (channel, row, key) it covers\n")
    print("| layout | head_dim | BLOCK_M × BLOCK_N | warps | stages | variant | registers | spills | shared memory | "
          "wgmma serialised | loop | per element |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layout, head_dim, block_m, block_n, warps, stages in CHANNEL_CONFIGS:
        for variant, flags in CHANNEL_VARIANTS.items():
            pair = layout == "pair"
            r = resources(_qk_channel_kernel, arch, "fp16x3", block_m, block_n, 1, warps, stages, head_dim, PAIR=pair,
                          V_EXACT=v_exact, **flags)
            per_thread = block_m * block_n * (2 if pair else 1) / (32 * warps)
            print(f"| {layout} | {head_dim} | {block_m} × {block_n} | {warps} | {stages} | {variant} | {r['registers']} "
                  f"| {r['spill_bytes']} B | {r['shared_bytes'] // 1024} KiB | {'yes' if r['serialised'] else 'no'} | "
                  f"{r['loop_instructions']} | {r['loop_instructions'] / per_thread:.1f} |", flush=True)


def base_resources(arch: int) -> None:
    """The base-attention kernel at `base_attention_tiles`, every precision and head_dim 128 and
    256, plain and with soft-cap + window + exact v (the most flags)."""
    params = list(inspect.signature(_base_attention_kernel.fn).parameters)
    print(f"Base-attention kernel on sm_{arch}a (compiled offline, triton {triton.__version__}), 4 warps, 2 stages\n")
    print("| precision | head_dim | BLOCK_M × BLOCK_N | variant | registers | spills | shared memory | "
          "wgmma serialised | loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for precision in PRECISIONS:
        for head_dim in (128, 256):
            block_m, block_n = base_attention_tiles(head_dim, precision)
            for variant, flags in (("plain", dict(HAS_CAP=False, HAS_WINDOW=False, V_EXACT=False)),
                                   ("soft-cap + window + v exact", dict(HAS_CAP=True, HAS_WINDOW=True, V_EXACT=True))):
                constants = flags | dict(PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim)
                operand = "*fp16" if precision == "fp16x3" else "*fp32"
                signature = {name: "constexpr" if name in constants else
                             TYPES.get(name, operand if name in OPERANDS else "*fp32") for name in params}
                attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params)
                         if signature[name].startswith("*") or name in ("T", "D")}
                r = compile_report(_base_attention_kernel, signature, constants, attrs, {"num_warps": 4, "num_stages": 2},
                                   arch)
                print(f"| {precision} | {head_dim} | {block_m} × {block_n} | {variant} | {r['registers']} | "
                      f"{r['spill_bytes']} B | {r['shared_bytes'] // 1024} KiB | {'yes' if r['serialised'] else 'no'} | "
                      f"{r['loop_instructions']} |", flush=True)


def operand_resources(arch: int) -> None:
    """`_operand_kernel` at its tile, with its warps and with half as many: q or k (rotated, float32
    copies, halves) and v (halves only) under fp16x3, and q under the float32 precisions; float32
    and bfloat16 projections, head_dim 128 and 256."""
    params = list(inspect.signature(_operand_kernel.fn).parameters)
    print(f"Operand kernel on sm_{arch}a (compiled offline, triton {triton.__version__}), "
          f"{OPERAND_TILE}-element tiles\n")
    print("| tensor | precision | input | head_dim | warps | registers | spills |")
    print("|---|---|---|---|---|---|---|")
    variants = (("q, k", "fp16x3", dict(ROTATE=True, KEEP_PLAIN=True, KEEP_ROTATED=True, SPLIT=True)),
                ("v", "fp16x3", dict(ROTATE=False, KEEP_PLAIN=False, KEEP_ROTATED=False, SPLIT=True)),
                ("q, k", "others", dict(ROTATE=True, KEEP_PLAIN=True, KEEP_ROTATED=True, SPLIT=False)))
    for (tensor, precision, flags), x_type, head_dim, warps in itertools.product(
            variants, ("*fp32", "*bf16"), (128, 256), (OPERAND_WARPS, OPERAND_WARPS // 2)):
        constants = flags | dict(BLOCK_T=OPERAND_TILE // head_dim, BLOCK_D=head_dim)
        halves = "*fp16" if flags["SPLIT"] else "*fp32"
        signature = {name: "constexpr" if name in constants else x_type if name == "X" else "*i32" if name == "TOKENS"
                     else halves if name in ("BIG", "SMALL") else "i32" if name in ("T", "D") or name.islower()
                     else "*fp32" for name in params}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params) if signature[name].startswith("*")}
        r = compile_report(_operand_kernel, signature, constants, attrs, {"num_warps": warps, "enable_fp_fusion": False},
                           arch)
        print(f"| {tensor} | {precision} | {x_type[1:]} | {head_dim} | {warps} | {r['registers']} | "
              f"{r['spill_bytes']} B |", flush=True)


def column_resources(arch: int) -> None:
    """The FFN/O/V column-norm kernel at the configurations `bench_kernels.py --sweep` times
    (bf16 H; the mask bool or int32)."""
    params = list(inspect.signature(_column_sumsq_kernel.fn).parameters)
    print(f"Column-norm kernel on sm_{arch}a (compiled offline, triton {triton.__version__}), bf16 H\n")
    print("| BLOCK_T | BLOCK_C | warps | stages | mask | registers / thread | spill stores | shared memory |")
    print("|---|---|---|---|---|---|---|---|")
    # The sweep's configurations; the program count changes only the grid, not the compiled code.
    configs = dict.fromkeys((block_t, warps, stages, mask) for block_t, warps, stages, _, mask in FFN_SWEEP)
    for block_t, warps, stages, mask_dtype in configs:
        block_c = default_column_block(2, warps)  # bf16
        mask = "*i1" if mask_dtype == torch.bool else "*i32"
        signature = dict(X="*bf16", TOKENS=mask, PARTIAL="*fp32", T="i32", C="i32", span="i32", stride_b="i32",
                         stride_t="i32", BLOCK_T="constexpr", BLOCK_C="constexpr", STAGES="constexpr")
        attrs = {(params.index(name),): [["tt.divisibility", 16]]
                 for name in ("X", "TOKENS", "PARTIAL", "T", "C", "span", "stride_b", "stride_t")}
        r = compile_report(_column_sumsq_kernel, signature, dict(BLOCK_T=block_t, BLOCK_C=block_c, STAGES=stages),
                           attrs, {"num_warps": warps}, arch)
        print(f"| {block_t} | {block_c} | {warps} | {stages} | {mask[1:]} | {r['registers']} | {r['spill_bytes']} B | "
              f"{r['shared_bytes'] // 1024} KiB |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--stages", default="default", help="comma list of num_stages ('default': Triton's)")
    parser.add_argument("--head-dim", type=int, help="default: 128 (with --every-variant: 128 and 256)")
    parser.add_argument("--every-variant", action="store_true",
                        help="compile all specialisations at the defaults, head_dim 128 and 256")
    parser.add_argument("--precisions", default="tf32x3,fp16x3", help="with --every-variant: comma list")
    parser.add_argument("--column", action="store_true", help="the FFN/O/V column-norm kernel instead")
    parser.add_argument("--channel", action="store_true", help="the one-channel Q/K kernel (block_c = 1) instead")
    parser.add_argument("--base", action="store_true", help="the base-attention kernel instead")
    parser.add_argument("--operand", action="store_true", help="the kernel that rotates and splits q, k, v instead")
    parser.add_argument("--v-exact", action="store_true",
                        help="Q/K kernels for v that is its own big part (a bfloat16 model's): two value products of three")
    args = parser.parse_args()
    if args.column:
        column_resources(args.arch)
        return
    if args.base:
        base_resources(args.arch)
        return
    if args.operand:
        operand_resources(args.arch)
        return
    if args.channel:
        channel_resources(args.arch, args.v_exact)
        return
    if args.every_variant:
        for precision in args.precisions.split(","):
            for head_dim in (128, 256) if args.head_dim is None else (args.head_dim,):
                every_variant(args.arch, head_dim, precision, args.v_exact)
        return
    args.head_dim = args.head_dim or 128
    stages = [None if s == "default" else int(s) for s in args.stages.split(",")]
    print(f"Q/K kernel on sm_{args.arch}a (compiled offline, triton {triton.__version__}), head_dim {args.head_dim}, "
          f"query channels, no soft-cap/window/norm{', v exact' if args.v_exact else ''}\n")
    print("| kernel | precision | BLOCK_M | BLOCK_N | BLOCK_C | warps | stages | registers / thread | spill stores | "
          "shared memory | wgmma serialised | loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for stage in stages:
        for precision, block_m, block_n, block_c, warps in CONFIGS:
            if args.head_dim > 128:
                block_c //= 2  # the same 128 × 128 value-product accumulator
            for kernel in (_qk_kernel, _qk_rough_kernel):
                r = resources(kernel, args.arch, precision, block_m, block_n, block_c, warps, stage, args.head_dim,
                              V_EXACT=args.v_exact)
                name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
                print(f"| {name} | {precision} | {block_m} | {block_n} | {block_c} | {warps} | {stage or 'default'} | "
                      f"{r['registers']} | {r['spill_bytes']} B | {r['shared_bytes'] // 1024} KiB | "
                      f"{'yes' if r['serialised'] else 'no'} | {r['loop_instructions']} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
