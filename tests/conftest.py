import os

# Triton kernels run on the CPU through the interpreter unless a GPU run asks otherwise.
if os.environ.get("NEUROLANG_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The eager twin by default (no compile time per test); test_compiled.py checks the fused path.
os.environ.setdefault("NEUROLANG_COMPILE", "0")
