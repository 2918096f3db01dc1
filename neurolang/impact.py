"""Exact per-sentence impacts of every neuron (SPEC §2), computed layer by layer during one
forward pass of the unmodified model: each layer's activations are turned into impacts as soon
as its hooks fire and are then released, so memory never holds more than one layer's internals.
"""
import time

import torch

from kernels import (masked_column_sumsq_torch, masked_column_sumsq_triton, qk_impact_torch,
                     qk_impact_triton, resolve_backend, weight_column_norms)
from kernels.qk_impact import METRICS
from neurolang.adapters import GROUPS, Captured, Layer, ModelAdapter
from neurolang.errors import NeurolangError

DEFAULT_CHUNK_ELEMENTS = 1 << 22


class _StopForward(Exception):
    """Raised by a hook once the last requested layer is done: later layers need not run."""


def _column_norms(weight: torch.Tensor, kept: dict | None) -> torch.Tensor:
    """`weight_column_norms` of a layer's weight; with a dict `kept`, computed once per weight."""
    if kept is None:
        return weight_column_norms(weight.detach())
    if weight not in kept:
        kept[weight] = weight_column_norms(weight.detach())
    return kept[weight]


def _float32_rotary(cos: torch.Tensor, sin: torch.Tensor, batch: int, kept: dict | None):
    """cos and sin as the Triton kernels read them (float32 [B, T, D], contiguous); with a dict
    `kept`, made once for each pair of tensors: a model hands every layer of a forward pass the same
    pair (Gemma3 a second one to its local layers), so one conversion serves them all."""
    if kept is not None and cos in kept and kept[cos][0] is sin:
        return kept[cos][1:]
    shape = (batch, *cos.shape[1:])
    converted = tuple(x.to(torch.float32).expand(shape).contiguous() for x in (cos, sin))
    if kept is not None:
        kept[cos] = (sin, *converted)
    return converted


def attention_impacts(layer: Layer, cap: Captured, token_mask: torch.Tensor, metric: str = "output",
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, backend: str = "torch",
                      weight_norms: dict | None = None, rotary: dict | None = None) -> dict[str, torch.Tensor]:
    """Q, K, V and O impacts of one layer from what its hooks captured: {group: [B, width]}.
    `token_mask` must be right-padded (`check_right_padded`); `weight_norms` as in `compute_impacts`;
    `rotary`, a dict, keeps the float32 cos and sin of one forward pass for its other layers."""
    spec = layer.spec
    if backend == "triton":
        cos, sin = _float32_rotary(cap.cos, cap.sin, token_mask.shape[0], rotary)
        q, k = qk_impact_triton(cap.q, cap.k, cap.v, cos, sin, token_mask, spec, metric,
                                right_padded=True)  # `compute_impacts` checked: no wait for the GPU
        out_sumsq = masked_column_sumsq_triton(cap.attn_out, token_mask)
    else:
        q, k = qk_impact_torch(cap.q, cap.k, cap.v, cap.cos, cap.sin, token_mask, spec, metric, chunk_elements)
        out_sumsq = masked_column_sumsq_torch(cap.attn_out, token_mask)  # [B, n_heads·D]
    b = out_sumsq.shape[0]
    per_kv = out_sumsq.view(b, spec.n_kv_heads, spec.group_size, spec.head_dim).sum(2)
    return {
        "q": q,
        "k": k,
        "v": per_kv.sqrt().reshape(b, -1),
        "o": out_sumsq.sqrt() * _column_norms(layer.o_proj.weight, weight_norms),
    }


def ffn_impacts(layer: Layer, cap: Captured, token_mask: torch.Tensor, backend: str = "torch",
                weight_norms: dict | None = None) -> torch.Tensor:
    """FFN impacts of one layer: ‖H[:, k]‖₂ · ‖W_down[:, k]‖₂ per sentence, [B, intermediate]."""
    column_sumsq = masked_column_sumsq_triton if backend == "triton" else masked_column_sumsq_torch
    h = column_sumsq(cap.ffn_hidden, token_mask).sqrt()
    return h * _column_norms(layer.down_proj.weight, weight_norms)


def check_right_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    """Token mask as bool; padding must be on the right so positions match an unpadded run."""
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise NeurolangError("batches must be right-padded (tokenizer.padding_side = 'right')")
    if not mask[:, 0].all():
        raise NeurolangError("every sentence in a batch needs at least one token")
    return mask


def compute_impacts(adapter: ModelAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    layers=None, metric: str = "output", backend: str = "auto",
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, on_layer=None, timings=None, compat=None,
                    weight_norms: dict | None = None):
    """Impacts of all neurons of the given layers for a right-padded batch of sentences.

    Returns {layer: {group: float32 tensor [B, width]}}; with `on_layer(layer_index, impacts)`
    given, each layer's impacts go there instead and nothing is kept. Padding tokens are excluded,
    so a padded batch gives the same numbers as its sentences one at a time. With a `timings`
    dict, the seconds spent computing impacts (and in `on_layer`) are added to its "impacts_s".
    `compat="released-code"` returns the released code's scores instead (see neurolang.compat).
    `weight_norms`, a dict, keeps the column norms of o_proj and down_proj from call to call
    (`count_activations` passes one per detection: the weights do not change in between); the
    caller must not reuse it once a weight has changed.
    """
    if metric not in METRICS:
        raise NeurolangError(f"unknown Q/K metric {metric!r}; choose one of {', '.join(METRICS)}")
    try:
        backend = resolve_backend(backend, input_ids.device)
    except ValueError as err:
        raise NeurolangError(str(err)) from None
    if compat is not None:
        from neurolang import compat as released

        if compat not in released.COMPAT_MODES:
            raise NeurolangError(f"unknown --compat {compat!r}; choose {', '.join(released.COMPAT_MODES)}")
        released.check_compatible(adapter)
    layers = sorted(set(range(adapter.n_layers) if layers is None else layers))
    token_mask = check_right_padded(attention_mask)
    results: dict[int, dict[str, torch.Tensor]] = {}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    rotary = {}  # this forward pass's cos and sin in float32 (`_float32_rotary`)

    def on_attention(layer, cap):
        start = time.perf_counter()
        if compat is None:
            pending[layer.index] = attention_impacts(layer, cap, token_mask, metric, chunk_elements, backend,
                                                     weight_norms, rotary)
        else:
            pending[layer.index] = released.attention_scores(layer, cap, token_mask)
        if timings is not None:
            timings["impacts_s"] = timings.get("impacts_s", 0.0) + time.perf_counter() - start

    def on_ffn(layer, cap):
        start = time.perf_counter()
        impacts = pending.pop(layer.index)
        impacts["ffn"] = (ffn_impacts(layer, cap, token_mask, backend, weight_norms) if compat is None
                          else released.ffn_scores(cap, token_mask))
        impacts = {g: impacts[g] for g in GROUPS}
        if on_layer is None:
            results[layer.index] = impacts
        else:
            on_layer(layer.index, impacts)
        if timings is not None:
            timings["impacts_s"] = timings.get("impacts_s", 0.0) + time.perf_counter() - start
        if layer.index == layers[-1]:
            raise _StopForward

    with torch.inference_mode(), adapter.hooks(layers, on_attention, on_ffn, capture_up=compat is not None):
        try:
            adapter.decoder(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False)
        except _StopForward:
            pass
    return results
