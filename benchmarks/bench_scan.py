"""End-to-end detection throughput, and its cost against a plain forward pass on the same sentences.

Runs `neurolang.detect` on the built-in corpus (or --corpus) and, on the same sentences in the
same length-sorted batches, a plain forward pass (no hooks, no impacts); prints tokens/s of each,
the ratio of detection time to forward time, and how detection splits between forward and impacts.

    python benchmarks/bench_scan.py --model SmolLM2.gguf [--max-sentences 200] [--out benchmarks/results/x.md]
"""
import argparse
import platform
import sys
import time

import torch


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
    args = parser.parse_args()

    import transformers

    from neurolang.corpus import load_corpus
    from neurolang.detect import detect
    from neurolang.models import load_model

    langs = args.langs.split(",")
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    device = next(model.parameters()).device
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
             f"| of which impacts | {impact_s:.1f} | |",
             "",
             f"Detection / plain forward: {detect_s / forward_s:.1f}x; impacts are {impact_s / detect_s:.0%} of detection.",
             "",
             "Command: python " + " ".join(sys.argv)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
