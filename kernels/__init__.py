"""Device operations of neurolang: one operation per file, each with a plain-PyTorch twin."""
from kernels.column_norms import masked_column_sumsq_torch, masked_column_sumsq_triton, weight_column_norms
from kernels.dispatch import BACKENDS, resolve_backend
from kernels.qk_impact import AttentionSpec, HeadNorm, qk_impact_reference, qk_impact_torch, qk_impact_triton
from kernels.select_count import count_selected, select_count_torch, select_count_triton, top_k_order, top_k_size

__all__ = [
    "AttentionSpec",
    "BACKENDS",
    "count_selected",
    "HeadNorm",
    "masked_column_sumsq_torch",
    "masked_column_sumsq_triton",
    "qk_impact_reference",
    "qk_impact_torch",
    "qk_impact_triton",
    "resolve_backend",
    "select_count_torch",
    "select_count_triton",
    "top_k_order",
    "top_k_size",
    "weight_column_norms",
]
