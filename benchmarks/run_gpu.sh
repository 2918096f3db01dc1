#!/usr/bin/env bash
# The GPU checks: kernel tests on the device, the Q/K tile sweep (the default on float32- and on
# bfloat16-valued q, k, v, and its neighbours), the Q/K call breakdown and accuracy, the kernel
# table. The sweep step takes gemma2-9b, whose target is the open one, and gemma2-27b (head_dim 128
# with a soft-cap: stacked by default, pair beside it); llama's and qwen's sweeps are in
# h100-kernels.md (`bench_kernels.py --sweep qk --shapes llama3.1-8b` reruns them). (The FFN sweep,
# its target met on the H200: `bench_kernels.py --sweep ffn`.)
# Usage (on a CUDA machine, from the repository root): bash benchmarks/run_gpu.sh OUT_DIR [STEPS]
# STEPS is a comma list of target, tests, sweep, table, profile, scan, short, fuzz, run in that order (default:
# the first three; on an H100 on 2026-11-27 they took 7.3 minutes, and table + scan 4.1, where the
# table's 150 s ran out before gemma2-9b's kernel rows and the tests' 180 s (8 workers) before the
# last 4 of 189 tests; the default limits, 150 + 240 + 240 + 200 + 120 + 120 + 90 + 90 s: one
# 10-minute call runs the first three (about 8 minutes: the sweep has 11 gemma2-9b rows since the
# twenty-first session, 5 in that run, so its last rows may not fit); a 15-minute lease has about 4–5 minutes left after it, for
# `scan,short` (up to 300 s; the table re-times what h100-kernels.md has)).
# target: issue #3's open figure first, so that a short lease still measures it: gemma2-9b's Q/K
# call at T = 1024 beside the reference (time, ratio, peak memory, FlashAttention floor).
# profile: Nsight Compute on warm launches of the Q/K and column-norm kernels (gemma2-9b, T = 1024,
# bfloat16 q, k, v: the stacked kernel of the open target; its stall reasons, occupancy and pipes),
# when `ncu` is on the machine (PROFILE_S, 120 s).
# scan: end-to-end detection against a plain forward pass (`bench_scan.py`) on a Llama-3.1-8B-shaped
# model with random weights in bfloat16, 6 languages × 100 sentences, then 8 batches of it profiled
# per layer call (`--profile`; SCAN_S, 120 s; without the profile 85 s sufficed on an H100), then
# the same detection in batches of 32 (SCAN32_S, 90 s): run 3's profile found the GPU idle 57 % of a
# layer call at batch 8, waiting for the host, whose work per call hardly grows with the batch.
# short: the Q/K tiles at the detection's lengths, 8 sentences of 40 tokens, llama3.1-8b (SHORT_S, 90 s).
# fuzz: the compiled Triton Q/K kernels on fresh random configurations against float64
# (tests/fuzz_qk_impact.py; FUZZ_S, 120 s).
# Each step has its own time limit (TARGET_S, TEST_S, SWEEP_S, TABLE_S, PROFILE_S, SCAN_S, SCAN32_S, SHORT_S,
# FUZZ_S) and writes its log to OUT_DIR as it goes.
set -u
out=${1:?usage: run_gpu.sh OUT_DIR [target,tests,sweep,table,profile,scan,short,fuzz]}
steps=",${2:-target,tests,sweep},"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the image has no package index: no pip install
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } \
  >"$out/env.txt" 2>&1
cat "$out/env.txt"
if [[ $steps == *,target,* ]]; then
  timeout "${TARGET_S:-150}" python3 benchmarks/bench_kernels.py --ops qk/reference,qk/triton,qk/triton-bf16 \
    --shapes gemma2-9b --seq-lens 1024 --out "$out/target.md" 2>&1 | tee "$out/target.log" | grep -v "^{" | tail -8
fi
if [[ $steps == *,tests,* ]]; then
  NEUROLANG_GPU_TESTS=1 timeout "${TEST_S:-240}" python3 -m pytest -q -n 14 -p no:cacheprovider -p no:benchmark \
    tests/test_triton_kernels.py 2>&1 | tee "$out/tests.log" | tail -15
fi
if [[ $steps == *,sweep,* ]]; then
  timeout "${SWEEP_S:-240}" python3 benchmarks/bench_kernels.py --sweep qk --breakdown --accuracy --ops "" \
    --shapes gemma2-9b,gemma2-27b \
    --out "$out/sweep.md" 2>"$out/sweep.log"; tail -3 "$out/sweep.log"
fi
if [[ $steps == *,table,* ]]; then
  timeout "${TABLE_S:-200}" python3 benchmarks/bench_kernels.py --ops qk/reference,qk/triton,qk/triton-bf16,qk/triton-stacked,ffn,select --seq-lens 1024,2048,256 \
    --out "$out/kernels.md" \
    2>&1 | tee "$out/kernels.log" | grep -v "^{" | tail -45
fi
if [[ $steps == *,profile,* ]]; then
  if command -v ncu >/dev/null; then
    timeout "${PROFILE_S:-120}" ncu --profile-from-start off --kernel-name regex:'^(_qk_kernel|_column_sumsq_kernel)$' \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      python3 benchmarks/profile_kernels.py --shape gemma2-9b --seq-len 1024 --precisions fp16x3 --values bfloat16 \
      >"$out/ncu.txt" 2>&1; tail -80 "$out/ncu.txt"
  else
    echo "profile: no ncu (Nsight Compute) on this machine" | tee "$out/ncu.txt"
  fi
fi
if [[ $steps == *,scan,* ]]; then
  timeout "${SCAN_S:-120}" python3 benchmarks/bench_scan.py --model random:llama3.1-8b --dtype bfloat16 --device cuda \
    --max-sentences 100 --profile 8 --out "$out/scan.md" >"$out/scan.log" 2>&1; tail -50 "$out/scan.log"
  timeout "${SCAN32_S:-90}" python3 benchmarks/bench_scan.py --model random:llama3.1-8b --dtype bfloat16 --device cuda \
    --max-sentences 100 --batch-size 32 --out "$out/scan-b32.md" >"$out/scan-b32.log" 2>&1; head -12 "$out/scan-b32.log"
fi
if [[ $steps == *,short,* ]]; then
  timeout "${SHORT_S:-90}" python3 benchmarks/bench_kernels.py --sweep qk --sweep-t 40 --sweep-batch 8 --ops "" \
    --shapes llama3.1-8b --out "$out/short.md" 2>"$out/short.log"; tail -8 "$out/short.log"
fi
if [[ $steps == *,fuzz,* ]]; then
  fuzz_s=${FUZZ_S:-120}
  timeout "$fuzz_s" python3 tests/fuzz_qk_impact.py --paths triton --minutes "$(awk "BEGIN { print ($fuzz_s - 30) / 60 }")" \
    >"$out/fuzz.log" 2>&1; tail -8 "$out/fuzz.log"
fi
