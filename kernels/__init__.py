"""Device operations of neurolang: one operation per file, each with a plain-PyTorch twin."""
from kernels.column_norms import masked_column_sumsq_torch, weight_column_norms
from kernels.qk_impact import AttentionSpec, HeadNorm, qk_impact_reference, qk_impact_torch
from kernels.select_count import count_selected, select_count_torch, top_k_order, top_k_size

__all__ = [
    "AttentionSpec",
    "count_selected",
    "HeadNorm",
    "masked_column_sumsq_torch",
    "qk_impact_reference",
    "qk_impact_torch",
    "select_count_torch",
    "top_k_order",
    "top_k_size",
    "weight_column_norms",
]
