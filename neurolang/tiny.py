"""Tiny randomly initialised models of every supported family, with a byte-level tokenizer.

They exist so that every formula can be checked against the naive-loop oracle without
downloading anything. Shapes are chosen to exercise the awkward cases: grouped-query attention
with group sizes 1, 3 and 4, head dims that are not powers of two, projection biases, q/k norms,
soft-capping and sliding windows shorter than a sentence. Weights are drawn at unit scale so that
attention is far from uniform, as in a trained model.
"""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

_SPECIALS = ["<pad>", "<s>", "</s>"]
_COMMON = dict(vocab_size=260, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
               max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=12),
    "mistral": lambda: MistralConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                     sliding_window=5),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_attention_heads=4, num_key_value_heads=4, head_dim=10),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                 attention_bias=True),
    "gemma": lambda: GemmaConfig(**_COMMON, num_attention_heads=3, num_key_value_heads=1, head_dim=12),
    "gemma2": lambda: Gemma2Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                                   sliding_window=4, attn_logit_softcapping=5.0, query_pre_attn_scalar=7,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, num_attention_heads=6, num_key_value_heads=2,
                                            head_dim=8, sliding_window=4, query_pre_attn_scalar=10,
                                            layer_types=["sliding_attention", "full_attention",
                                                         "sliding_attention"]),
}
FAMILIES = tuple(CONFIGS)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens after three specials) built offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="right")


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random model of `family` (a key of CONFIGS), deterministic for a given seed."""
    if family not in CONFIGS:
        raise ValueError(f"no tiny model for {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    return random_weights_(model, seed).to(dtype).eval()


def random_weights_(model, seed: int = 0):
    """Draw every weight of `model` in place, at unit scale (embeddings N(0, 1), matrices
    N(0, 1/fan_in), biases N(0, 0.09), norm weights around 1), on the model's device and in its
    dtype; the same numbers for a given seed on a given device."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    one_plus = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            if name.endswith("embed_tokens.weight"):
                p.copy_(noise)
            elif p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:  # norm weights: Gemma multiplies by (1 + w), the others by w
                p.copy_(0.2 * noise if one_plus else 1 + 0.2 * noise)
    return model
