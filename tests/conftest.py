import os

import pytest

# Triton kernels run on the CPU through the interpreter unless a GPU run asks otherwise.
if os.environ.get("NEUROLANG_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The eager twin by default (no compile time per test); test_compiled.py checks the fused path.
os.environ.setdefault("NEUROLANG_COMPILE", "0")
# Under pytest-xdist (`-n auto`), the workers share the cores rather than each taking them all.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


def pytest_configure(config):
    """One line, not every kernel test failing inside the interpreter, where it cannot run."""
    from kernels.dispatch import interpreter_problem, triton_available

    if os.environ.get("TRITON_INTERPRET") == "1" and triton_available() and (problem := interpreter_problem()):
        raise pytest.UsageError(problem)
