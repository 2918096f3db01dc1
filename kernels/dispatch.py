"""Which implementation runs: Triton kernels for CUDA tensors, the PyTorch twins on the CPU.

`auto` (the default) picks by the tensors' device; `torch` or `triton` force one, and so does the
environment variable NEUROLANG_BACKEND. With TRITON_INTERPRET=1 the Triton kernels run on the CPU
through Triton's interpreter (slowly: for tests on small shapes).
"""
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """`torch` or `triton` for tensors on `device`; raises ValueError with a one-line reason."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("NEUROLANG_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"NEUROLANG_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("the triton backend needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to emulate it on the CPU)")
    return backend
