"""Which implementation runs: Triton kernels for CUDA tensors, the PyTorch twins on the CPU.

`auto` (the default) picks by the tensors' device; `torch` or `triton` force one, and so does the
environment variable NEUROLANG_BACKEND. With TRITON_INTERPRET=1 the Triton kernels run on the CPU
through Triton's interpreter (slowly: for tests on small shapes).
"""
import contextlib
import functools
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton")
# The float32 matrix-product settings that trade precision for speed (TF32 on a GPU, bf16 on some
# CPUs) and their full-precision values: torch 2.9's per-backend `fp32_precision` where it has
# them (mixing it with the older switches makes torch raise), else the GPU's `allow_tf32`.
_FULL_FLOAT32 = ([(m, "fp32_precision", "ieee") for m in (torch.backends.cuda.matmul,
                                                            getattr(torch.backends.mkldnn, "matmul", None))
                  if hasattr(m, "fp32_precision")]
                 or [(torch.backends.cuda.matmul, "allow_tf32", False)])


@contextlib.contextmanager
def full_float32_matmuls():
    """Float32 matrix products at full precision inside, whatever the process chose:
    `torch.set_float32_matmul_precision("high")`, common in training scripts, makes them TF32 on a
    GPU (about 1e-3 relative), and the impacts are promised to float32 rounding. Restored after."""
    previous = [getattr(owner, name) for owner, name, _ in _FULL_FLOAT32]
    for owner, name, value in _FULL_FLOAT32:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(_FULL_FLOAT32, previous):
            setattr(owner, name, value)


def on_input_device(wrapper):
    """Run a Triton wrapper with its first tensor's CUDA device current. Triton launches on
    torch's current device and stream, not on its tensors': without this, a model on `cuda:1`
    would be read by kernels launched on `cuda:0`, on another stream than torch's work."""
    @functools.wraps(wrapper)
    def guarded(*args, **kwargs):
        first = next(x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor))
        if not first.is_cuda:
            return wrapper(*args, **kwargs)
        with torch.cuda.device(first.device):
            return wrapper(*args, **kwargs)
    return guarded


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter (TRITON_INTERPRET=1) cannot run here, or None. Before Triton
    3.7 it reads one-element arrays with `int(array)`, which NumPy 2.4 refuses: every kernel would
    fail inside the interpreter with "only 0-dimensional arrays can be converted to Python scalars"."""
    import numpy
    import triton

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 1.25 to 2.3 only warn
        try:
            int(numpy.zeros(1))
            return None
        except TypeError:
            pass
    release = tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])
    if release >= (3, 7):
        return None
    return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run with NumPy "
            f"{numpy.__version__}: install triton>=3.7 or numpy<2.4")


def check_backend(backend: str) -> None:
    """Raise ValueError unless `backend` is one of BACKENDS (whatever the device)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`torch` or `triton` for tensors on `device`; raises ValueError with a one-line reason."""
    check_backend(backend)
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
        if device.type != "cuda" and (problem := interpreter_problem()):
            raise ValueError(problem)
    return backend
