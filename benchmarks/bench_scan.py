"""End-to-end detection throughput, and its cost against a plain forward pass on the same sentences.

Runs `neurolang.detect` on the built-in corpus (or --corpus) and, on the same sentences in the
same length-sorted batches, a plain forward pass (no hooks, no impacts); prints tokens/s of each,
the ratio of detection time to forward time, and how detection splits between forward and impacts.

    python benchmarks/bench_scan.py --model SmolLM2.gguf [--max-sentences 200] [--out benchmarks/results/x.md]
    python benchmarks/bench_scan.py --model random:llama3.1-8b --dtype bfloat16 --device cuda [--profile 8]

`--profile N` then runs N more batches of the first language's sentences under the PyTorch profiler,
with and without detection's hooks, and splits a layer call into GPU kernels (CUDA), GPU idle time
and the host's busiest operations, each per layer call, and (on a GPU) counts where the host
waits for the GPU.

`random:<shape>` is a model of that architecture and size with random weights (`random_weights_`)
and the tiny models' byte tokenizer, built on the device: no download, the same layers, kernels
and launches as the real model (the byte tokenizer makes more tokens a sentence than the real one).
"""
import argparse
import collections
import platform
import sys
import time
import warnings

import torch
from transformers import Gemma2Config, LlamaConfig, Qwen2Config

RANDOM_PREFIX = "random:"
# The real models' architectures (their config.json), for `random:<shape>`.
RANDOM_CONFIGS = {
    "llama3.1-8b": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
                                       rms_norm_eps=1e-5, pad_token_id=0),
    "qwen2.5-7b": lambda: Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                      rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                      pad_token_id=0),
    "gemma2-9b": lambda: Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                                      head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                      final_logit_softcapping=30.0, sliding_window=4096, pad_token_id=0),
    "smollm2-135m": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                                        rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0),
}


def random_model(shape: str, torch_dtype: str, device: str):
    """(model, tokenizer) of `random:<shape>`: the architecture of RANDOM_CONFIGS[shape], random weights."""
    from transformers import AutoModelForCausalLM

    from neurolang.models import resolve_device, resolve_dtype
    from neurolang.tiny import byte_tokenizer, random_weights_

    if shape not in RANDOM_CONFIGS:
        sys.exit(f"bench_scan: no random model {shape!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    with torch.device(resolve_device(device)):
        model = AutoModelForCausalLM.from_config(RANDOM_CONFIGS[shape](), dtype=resolve_dtype(torch_dtype))
    return random_weights_(model).eval(), byte_tokenizer()


def plain_forward_seconds(model, tokenizer, texts, max_length, batch_size):
    from neurolang.corpus import encode, pad_batch

    device = next(model.parameters()).device
    seconds, tokens = 0.0, 0
    for sentences in texts.values():
        seqs, _ = encode(tokenizer, sentences, max_length)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), batch_size):
            ids, mask = pad_batch([seqs[i] for i in order[start:start + batch_size]], tokenizer.pad_token_id, device)
            begin = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - begin
            tokens += int(mask.sum())
    return seconds, tokens


def host_waits(run) -> collections.Counter:
    """Where `run` makes the host wait for the GPU (a copy to the host, a value read back, a sync):
    torch's sync debug mode warns at each such operation, here counted by the Python line that
    made it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught
                               if "synchroniz" in str(w.message))


def profile_layer_calls(model, tokenizer, sentences, max_length, batch_size, n_batches) -> str:
    """Where detection's time goes beyond the forward pass: `n_batches` batches of
    `count_activations` under torch.profiler, and the same batches without hooks. Per layer call:
    wall time, GPU busy time of each kernel (CUDA), GPU idle time, the host's operations."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from neurolang.adapters import ModelAdapter
    from neurolang.corpus import encode, pad_batch
    from neurolang.detect import count_activations

    seqs, _ = encode(tokenizer, sentences, max_length)
    seqs = sorted(seqs, key=len)[:batch_size * n_batches]
    adapter = ModelAdapter(model)
    device = next(model.parameters()).device

    def forward():
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[start:start + batch_size], tokenizer.pad_token_id, device)
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask.long(), use_cache=False)

    runs = {"plain forward": forward,
            "detection": lambda: count_activations(adapter, seqs, tokenizer.pad_token_id, batch_size=batch_size)}
    calls = adapter.n_layers * -(-len(seqs) // batch_size)
    lines = [f"Profile: {len(seqs)} sentences ({sum(map(len, seqs)):,} tokens, {min(map(len, seqs))}–"
             f"{max(map(len, seqs))} a sentence), batch {batch_size}, {calls} layer calls; per layer call:", ""]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kernels_of, host_of = {}, {}
    for name, run in runs.items():
        run()  # warm
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            start = time.perf_counter()
            run()
            sync()
            wall_us = (time.perf_counter() - start) * 1e6
        kernels, host = {}, {}
        for e in prof.events():
            table = kernels if e.device_type == DeviceType.CUDA else host
            count, total = table.get(e.name, (0, 0.0))
            table[e.name] = (count + 1, total + (e.time_range.elapsed_us() if table is kernels else e.self_cpu_time_total))
        kernels_of[name], host_of[name] = kernels, host
        busy = sum(total for _, total in kernels.values())
        lines.append(f"- {name}: wall {wall_us / calls:.0f} µs" + (
            f", GPU busy {busy / calls:.0f} µs, idle {(wall_us - busy) / calls:.0f} µs, "
            f"{sum(c for c, _ in kernels.values()) / calls:.1f} kernels" if cuda else ""))
    if cuda:
        waits = host_waits(runs["detection"])
        lines += ["", f"Host waits for the GPU during the detection of these batches (torch's sync debug mode): "
                  f"{sum(waits.values())}" + "".join(f"\n- {site}: {n}" for site, n in waits.most_common(8))]
        extra = {k: v for k, v in kernels_of["detection"].items()
                 if kernels_of["plain forward"].get(k, (0, 0.0))[0] < v[0]}
        lines += ["", "Detection's kernels beyond the forward's (per layer call):", "",
                  "| kernel | launches | GPU µs |", "|---|---:|---:|"]
        for name, (count, total) in sorted(extra.items(), key=lambda kv: -kv[1][1])[:15]:
            lines.append(f"| {name[:70].replace('|', '/')} | {count / calls:.1f} | {total / calls:.1f} |")
    lines += ["", "Detection's busiest host operations (self CPU time, per layer call):", "",
              "| operation | calls | CPU µs |", "|---|---:|---:|"]
    for name, (count, total) in sorted(host_of["detection"].items(), key=lambda kv: -kv[1][1])[:15]:
        lines.append(f"| {name[:70].replace('|', '/')} | {count / calls:.1f} | {total / calls:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", default="builtin")
    parser.add_argument("--langs", default="en,zh,th,fr,de,sw")
    parser.add_argument("--max-sentences", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="also write the table (Markdown) here")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N batches of detection, per layer call (see above)")
    args = parser.parse_args()

    import transformers

    from neurolang.corpus import load_corpus
    from neurolang.adapters import ModelAdapter
    from neurolang.detect import count_activations, detect
    from neurolang.models import load_model

    langs = args.langs.split(",")
    if args.model.startswith(RANDOM_PREFIX):
        model, tokenizer = random_model(args.model[len(RANDOM_PREFIX):], args.dtype, args.device)
    else:
        model, tokenizer = load_model(args.model, args.dtype, args.device)
    device = next(model.parameters()).device
    # Compile first, untimed: Triton specialises its kernels on whether T is a multiple of 16,
    # torch.compile (the CPU) on the first shapes it sees. Three batches: 31 and 32 tokens with
    # padding, then one row fewer.
    lengths = [20, 21] + [31] * (args.batch_size - 1) + [32] * (args.batch_size - 1) + [33] * (args.batch_size - 1)
    warmup = [[tokenizer.pad_token_id + 1] * t for t in lengths]
    count_activations(ModelAdapter(model), warmup, tokenizer.pad_token_id, batch_size=args.batch_size)
    sets = detect(model, tokenizer, args.corpus, langs, max_sentences=args.max_sentences,
                  max_length=args.max_length, batch_size=args.batch_size, progress=False)
    info = sets.info
    texts = load_corpus(args.corpus, langs)
    detection_texts = {lang: [texts[lang][i] for i in info["per_language"][lang]["detection_lines"]] for lang in langs}
    forward_s, tokens = plain_forward_seconds(model, tokenizer, detection_texts, args.max_length, args.batch_size)
    detect_s = sum(p["seconds"] for p in info["per_language"].values())
    impact_s = sum(p["impact_seconds"] for p in info["per_language"].values())
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    lines = [f"Detection, {args.model.split('/')[-1]}, {len(langs)} languages x {args.max_sentences} sentences "
             f"(<= {args.max_length} tokens, {tokens:,} tokens), batch {args.batch_size}, {args.dtype}, {card}; "
             f"torch {torch.__version__}, transformers {transformers.__version__}",
             "",
             "| what | seconds | tokens/s |",
             "|---|---:|---:|",
             f"| plain forward (same batches) | {forward_s:.1f} | {tokens / forward_s:,.0f} |",
             f"| detection (forward + hooks + impacts + top-k counts) | {detect_s:.1f} | {tokens / detect_s:,.0f} |",
             f"| hooks, impacts and top-k counts (detection − plain forward) | {detect_s - forward_s:.1f} | |",
             *([f"| of which impacts (timed in the hooks) | {impact_s:.1f} | |"] if device.type == "cpu" else []),
             "",
             f"Detection / plain forward: {detect_s / forward_s:.1f}x"
             + (f"; impacts are {impact_s / detect_s:.0%} of detection." if device.type == "cpu" else
                " (on a GPU the hooks' clock sees launches, not kernels: no impact share)."),
             "",
             "Command: python " + " ".join(sys.argv)]
    if args.profile:
        lines += ["", profile_layer_calls(model, tokenizer, detection_texts[langs[0]], args.max_length,
                                          args.batch_size, args.profile)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
