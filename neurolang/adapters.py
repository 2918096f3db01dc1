"""Architecture adapters: where each decoder layer's internals live in an unmodified `transformers`
model, and the forward hooks that expose them (SPEC §1, §2).

The adapter never re-implements a model: it reads the module tree and the config, and its hooks
observe the raw q/k/v projection outputs, the rotary cos/sin handed to the attention module, the
input of `o_proj` and the input of `down_proj`.
"""
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kernels import AttentionSpec, HeadNorm
from neurolang.errors import NeurolangError

GROUPS = ("ffn", "q", "k", "v", "o")

# model_type -> family name users know; Gemma's RMS norms multiply by (1 + weight).
FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2/Qwen2.5",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
}
# Image-text checkpoints (Gemma3 4B, 12B, 27B) whose text model is a supported family: that text
# model is loaded alone (`models.text_model`).
IMAGE_TEXT = {"gemma3": "gemma3_text"}
_ONE_PLUS_WEIGHT_NORM = {"gemma", "gemma2", "gemma3_text"}


def supported_families() -> str:
    image_text = ", ".join(f"{FAMILIES[text]} image-text ({key})" for key, text in IMAGE_TEXT.items())
    return ", ".join(f"{name} ({key})" for key, name in FAMILIES.items()) + f", and the text model of {image_text}"


def check_supported(config) -> None:
    """Raise a one-line error unless the config is a supported decoder-only family (or an
    image-text model whose text model is one)."""
    model_type = getattr(config, "model_type", None)
    model_type = IMAGE_TEXT.get(model_type, model_type)
    if model_type not in FAMILIES:
        raise NeurolangError(
            f"unsupported architecture {model_type!r}; supported families: {supported_families()}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise NeurolangError(f"{model_type} with bidirectional attention is not a causal language model")


@dataclass(frozen=True)
class Layer:
    """Handles on one decoder layer's modules and the constants of its attention."""

    index: int
    attn: nn.Module
    mlp: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    spec: AttentionSpec


@dataclass
class Captured:
    """What the hooks saw of one layer during one forward pass (tensors as the model made them)."""

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None  # input of o_proj
    ffn_hidden: torch.Tensor | None = None  # input of down_proj
    ffn_up: torch.Tensor | None = None  # output of up_proj (only with capture_up)


def _head_norm(module: nn.Module | None, one_plus: bool) -> HeadNorm | None:
    if module is None:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    scale = module.weight.detach().float()
    return HeadNorm(scale=1.0 + scale if one_plus else scale, eps=float(eps))


class ModelAdapter:
    """Exposes the decoder layers of a supported causal LM and hooks into them."""

    def __init__(self, model: nn.Module):
        config = model.config
        check_supported(config)
        self.model = model
        self.config = config
        self.family = config.model_type
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.decoder = decoder
        self.layers = [self._layer(i, block) for i, block in enumerate(decoder.layers)]

    def _layer(self, index: int, block: nn.Module) -> Layer:
        attn, mlp = block.self_attn, block.mlp
        cfg = self.config
        head_dim = attn.head_dim
        n_heads = attn.q_proj.out_features // head_dim
        n_kv_heads = attn.k_proj.out_features // head_dim
        if hasattr(attn, "sliding_window"):
            window = attn.sliding_window
        else:  # Mistral passes its window from the config at call time.
            window = getattr(cfg, "sliding_window", None) if self.family == "mistral" else None
        one_plus = self.family in _ONE_PLUS_WEIGHT_NORM
        spec = AttentionSpec(
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            scaling=float(attn.scaling),
            softcap=getattr(attn, "attn_logit_softcapping", None),
            sliding_window=window,
            q_norm=_head_norm(getattr(attn, "q_norm", None), one_plus),
            k_norm=_head_norm(getattr(attn, "k_norm", None), one_plus),
        )
        return Layer(index, attn, mlp, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                     mlp.gate_proj, mlp.up_proj, mlp.down_proj, spec)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def widths(self) -> dict[str, int]:
        """Neurons per layer and group (SPEC §1); K/V live in KV-head space."""
        layer = self.layers[0]
        return {"ffn": layer.down_proj.in_features, "q": layer.q_proj.out_features,
                "k": layer.k_proj.out_features, "v": layer.v_proj.out_features,
                "o": layer.o_proj.in_features}

    def neuron_count(self) -> int:
        """|LLM|: the sum of all group widths over all layers."""
        return self.n_layers * sum(self.widths().values())

    @contextmanager
    def hooks(self, layer_indices, on_attention, on_ffn, capture_up: bool = False):
        """Install capture hooks on the given layers for the duration of the block.

        `on_attention(layer, captured)` runs when the layer's `o_proj` is about to be applied
        (q, k, v, cos, sin and the o_proj input are then known); `on_ffn(layer, captured)` when
        its `down_proj` is about to be applied. Both see the tensors of the current forward pass.
        `capture_up` also keeps the output of `up_proj` for `on_ffn`.
        """
        handles = []
        try:
            for index in layer_indices:
                layer = self.layers[index]
                cap = Captured()
                handles += self._install(layer, cap, on_attention, on_ffn, capture_up)
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _install(layer: Layer, cap: Captured, on_attention, on_ffn, capture_up=False):
        signature = inspect.signature(layer.attn.forward)

        def attn_pre(module, args, kwargs):
            bound = signature.bind_partial(*args, **kwargs)
            cos, sin = bound.arguments["position_embeddings"]
            cap.cos, cap.sin = cos, sin

        def store(name):
            def hook(module, args, output):
                setattr(cap, name, output)
            return hook

        def o_pre(module, args):
            cap.attn_out = args[0]
            on_attention(layer, cap)
            cap.q = cap.k = cap.v = cap.attn_out = cap.cos = cap.sin = None

        def down_pre(module, args):
            cap.ffn_hidden = args[0]
            on_ffn(layer, cap)
            cap.ffn_hidden = cap.ffn_up = None

        return ([layer.up_proj.register_forward_hook(store("ffn_up"))] if capture_up else []) + [
            layer.attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
            layer.q_proj.register_forward_hook(store("q")),
            layer.k_proj.register_forward_hook(store("k")),
            layer.v_proj.register_forward_hook(store("v")),
            layer.o_proj.register_forward_pre_hook(o_pre),
            layer.down_proj.register_forward_pre_hook(down_pre),
        ]
