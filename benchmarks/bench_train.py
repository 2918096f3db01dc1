"""Step time and peak memory of neuron-targeted training against its two alternatives.

- `neurons`: neurolang's sparse deltas (gradients and AdamW state only for the selected rows/columns);
- `masked-full`: full fine-tuning whose gradients are masked to the same neurons after backward
  (full-size gradients and optimizer state);
- `lora`: peft LoRA on all seven projections, rank matched to the neuron set's parameter count.

Each method runs in its own process (so that peak memory is its own): AdamW, one warm-up step,
then the median of `--steps` timed steps (forward, backward, optimizer step). Peak memory is the
CUDA allocator's peak on a GPU, the process's peak resident set on the CPU; both are reported
above the memory held once the model is loaded.

    python benchmarks/bench_train.py --model SmolLM2.gguf [--fraction 0.01] [--out benchmarks/results/x.md]
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("neurons", "masked-full", "lora")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    import torch

    from neurolang.adapters import ModelAdapter
    from neurolang.models import load_model
    from neurolang.train import add_lora, add_neuron_deltas, lora_rank_for, neuron_parameter_count

    torch.manual_seed(0)
    model, _ = load_model(args.model, args.dtype, args.device)
    device = next(model.parameters()).device
    adapter = ModelAdapter(model)
    gen = torch.Generator().manual_seed(0)
    masks = {g: torch.zeros(adapter.n_layers, w, dtype=torch.bool) for g, w in adapter.widths().items()}
    for g, m in masks.items():  # the same count in every layer and group, like a matched random set
        for layer in range(adapter.n_layers):
            m[layer, torch.randperm(m.shape[1], generator=gen)[:max(1, round(args.fraction * m.shape[1]))]] = True
    budget = neuron_parameter_count(adapter, masks)
    ids = torch.randint(100, model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    if args.method == "neurons":
        trainable = list(add_neuron_deltas(model, masks).parameters())
    elif args.method == "lora":
        model = add_lora(model, lora_rank_for(adapter, budget))
        trainable = [p for p in model.parameters() if p.requires_grad]
    else:
        from neurolang.train import _owned

        owned = {}
        for layer in adapter.layers:
            for g in masks:
                idx = masks[g][layer.index].nonzero().flatten().to(device)
                for _, module, axis in _owned(layer, g):
                    for p in (module.weight, module.bias):
                        if p is None or (p.dim() == 1 and axis == 1):
                            continue
                        keep = owned.setdefault(p, torch.zeros_like(p, dtype=torch.bool))
                        if axis == 0:
                            keep[idx] = True
                        else:
                            keep[:, idx] = True
        trainable = list(model.parameters())

        def mask_gradient(param, keep=None):
            if keep is None:
                param.grad.zero_()
            else:
                param.grad.mul_(keep)

        for p in trainable:
            p.register_post_accumulate_grad_hook(lambda q, keep=owned.get(p): mask_gradient(q, keep))
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    if args.gradient_checkpointing:  # activations recomputed in backward: parameters and optimizer state dominate
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mib()
    return {"method": args.method, "step_s": statistics.median(times), "peak_mib": peak - base,
            "trainable": sum(p.numel() for p in trainable if p.requires_grad), "budget": budget,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fraction", type=float, default=0.01, help="neurons selected per layer and group")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--method", choices=METHODS, help="(internal) run one method in this process")
    parser.add_argument("--out", help="also write the table (Markdown) here")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        cmd = [c for i, c in enumerate(cmd) if not (c == "--out" or (i and cmd[i - 1] == "--out"))]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ref = {r["method"]: r for r in rows}
    import torch
    import transformers

    lines = [f"Training step, {args.model.split('/')[-1]}, batch {args.batch_size} x {args.seq_len} tokens, "
             f"{args.dtype}{', gradient checkpointing' if args.gradient_checkpointing else ''}, {rows[0]['device']}, {args.fraction:.2%} of neurons per layer and group "
             f"({rows[0]['budget']:,} parameters); torch {torch.__version__}, transformers {transformers.__version__}",
             "",
             "| method | trainable params | step (s) | peak memory above the loaded model (MiB) | step vs LoRA | memory vs LoRA | memory vs masked-full |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.3f} | {r['peak_mib']:.0f} | "
                     f"{r['step_s'] / ref['lora']['step_s']:.2f}x | {r['peak_mib'] / ref['lora']['peak_mib']:.2f}x | "
                     f"{r['peak_mib'] / ref['masked-full']['peak_mib']:.2f}x |")
    lines.append("")
    lines.append("Command: python " + " ".join(sys.argv))
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
