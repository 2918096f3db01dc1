"""Deactivating neuron sets by masking their channels (SPEC §4), and seeded random controls.

Masking is done with hooks on the unmodified model, never by copying or editing weights:
ffn channels are zeroed at the input of `down_proj` (what zeroing their `gate_proj`/`up_proj`
rows and biases produces), q/k/v channels at the output of their projection (what zeroing the
weight row and bias produces), o channels at the input of `o_proj` (zeroing its column).
"""
from contextlib import contextmanager

import torch

from neurolang.adapters import GROUPS, ModelAdapter

RANDOM_KINDS = ("matched", "uniform")


def empty_masks(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    return {g: torch.zeros(adapter.n_layers, w, dtype=torch.bool) for g, w in adapter.widths().items()}


def union(*sets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {g: torch.stack([s[g] for s in sets]).any(0) for g in GROUPS}


def set_size(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


@contextmanager
def deactivated(adapter: ModelAdapter, masks: dict[str, torch.Tensor]):
    """Within the block, the neurons in `masks` ({group: bool [n_layers, width]}) are off.

    Contexts compose (nested blocks deactivate the union) and everything is undone on exit.
    """
    handles = []

    def scale_input(keep):
        def hook(module, args):
            return (args[0] * keep.to(args[0].dtype),) + tuple(args[1:])
        return hook

    def scale_output(keep):
        def hook(module, args, output):
            return output * keep.to(output.dtype)
        return hook

    try:
        for layer in adapter.layers:
            i = layer.index
            device = layer.q_proj.weight.device
            keep = {g: ~masks[g][i].to(device) for g in GROUPS if masks[g][i].any()}
            if "ffn" in keep:
                handles.append(layer.down_proj.register_forward_pre_hook(scale_input(keep["ffn"])))
            if "o" in keep:
                handles.append(layer.o_proj.register_forward_pre_hook(scale_input(keep["o"])))
            for g in ("q", "k", "v"):
                if g in keep:
                    handles.append(getattr(layer, f"{g}_proj").register_forward_hook(scale_output(keep[g])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def random_control(masks: dict[str, torch.Tensor], kind: str, seed: int) -> dict[str, torch.Tensor]:
    """A random set of the same total size: `matched` draws the same count per (layer, group);
    `uniform` draws uniformly over all neurons of the model (the paper's choice)."""
    if kind not in RANDOM_KINDS:
        raise ValueError(f"unknown random control {kind!r}; choose one of {', '.join(RANDOM_KINDS)}")
    gen = torch.Generator().manual_seed(seed)
    out = {g: torch.zeros_like(masks[g]) for g in GROUPS}
    if kind == "matched":
        for g in GROUPS:
            for layer in range(masks[g].shape[0]):
                n = int(masks[g][layer].sum())
                if n:
                    out[g][layer, torch.randperm(masks[g].shape[1], generator=gen)[:n]] = True
        return out
    sizes = [masks[g].numel() for g in GROUPS]
    chosen = torch.randperm(sum(sizes), generator=gen)[:set_size(masks)]
    offset = 0
    for g, size in zip(GROUPS, sizes):
        picked = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
        out[g].view(-1)[picked] = True
        offset += size
    return out
