#!/usr/bin/env bash
# The GPU checks: kernel tests on the device, accuracy, Q/K and FFN tile sweeps, kernel table.
# Usage (on a CUDA machine, from the repository root): bash benchmarks/run_gpu.sh OUT_DIR [STEPS]
# STEPS is a comma list of tests, sweep, table (default: all three, about 13 minutes at most;
# a remote runner with a 10-minute limit per command should run "tests,sweep" then "table").
# Each step has its own time limit (TEST_S, SWEEP_S, TABLE_S) and writes its log to OUT_DIR as it goes.
set -u
out=${1:?usage: run_gpu.sh OUT_DIR [tests,sweep,table]}
steps=",${2:-tests,sweep,table},"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the image has no package index: no pip install
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } \
  >"$out/env.txt" 2>&1
cat "$out/env.txt"
if [[ $steps == *,tests,* ]]; then
  NEUROLANG_GPU_TESTS=1 timeout "${TEST_S:-240}" python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark \
    tests/test_triton_kernels.py 2>&1 | tee "$out/tests.log" | tail -15
fi
if [[ $steps == *,sweep,* ]]; then
  timeout "${SWEEP_S:-240}" python3 benchmarks/bench_kernels.py --accuracy --sweep --ops "" --shapes llama3.1-8b,gemma2-9b \
    --out "$out/sweep.md" 2>"$out/sweep.log"; tail -3 "$out/sweep.log"
fi
if [[ $steps == *,table,* ]]; then
  timeout "${TABLE_S:-300}" python3 benchmarks/bench_kernels.py --ops qk/reference,qk/triton,ffn,select --out "$out/kernels.md" \
    2>&1 | tee "$out/kernels.log" | grep -v "^{" | tail -45
fi
