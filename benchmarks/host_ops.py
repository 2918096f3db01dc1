"""Host work of detection's Triton path per layer call, without a GPU.

Every Triton kernel is stubbed (its launch does nothing), so what remains is what the host does
for a layer call: PyTorch operations and Triton launches. Counted on a small Llama-shaped model
with random weights, over the same length-sorted batches with detection's hooks and without them.
On a GPU each operation that launches a kernel and each Triton launch costs the host some
microseconds; when the host is the bottleneck (short sentences: `bench_scan.py --profile`), these
counts are what a change to the hooks and wrappers moves.

    python benchmarks/host_ops.py [--batch-size 8] [--batches 40]
"""
import argparse
import collections
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # the triton backend on CPU tensors; the kernels never run

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import kernels.column_norms  # noqa: E402
import kernels.qk_impact  # noqa: E402
import kernels.select_count  # noqa: E402
from neurolang.adapters import ModelAdapter  # noqa: E402
from neurolang.corpus import pad_batch  # noqa: E402
from neurolang.detect import count_activations  # noqa: E402
from neurolang.tiny import random_weights_  # noqa: E402


def stub_triton_launches() -> collections.Counter:
    """Make every Triton kernel of the package a no-op when launched; count the launches by name."""
    launches = collections.Counter()
    for module in (kernels.qk_impact, kernels.select_count, kernels.column_norms):
        for name in dir(module):
            kernel = getattr(module, name)
            if hasattr(kernel, "fn") and hasattr(type(kernel), "__getitem__"):
                type(kernel).__getitem__ = lambda self, grid: (lambda *a, **k: launches.update([self.fn.__name__]))
    return launches


def top_level_ops(run) -> collections.Counter:
    """The PyTorch operations `run` calls itself (not those inside other operations), by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::") and
                               (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    launches = stub_triton_launches()
    config = LlamaConfig(vocab_size=260, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, pad_token_id=0)
    model = random_weights_(AutoModelForCausalLM.from_config(config)).eval()
    adapter = ModelAdapter(model)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(30, 38, (args.batch_size * args.batches,), generator=gen).tolist()
    seqs = sorted((torch.randint(3, 250, (n,), generator=gen).tolist() for n in lengths), key=len)
    calls = adapter.n_layers * args.batches

    def plain():
        for start in range(0, len(seqs), args.batch_size):
            ids, mask = pad_batch(seqs[start:start + args.batch_size], 0)
            with torch.inference_mode():
                model.model(input_ids=ids, attention_mask=mask.long(), use_cache=False)

    def detection():
        count_activations(adapter, seqs, 0, batch_size=args.batch_size, backend="triton")

    seconds = {}
    for name, run in (("plain forward", plain), ("detection", detection)):
        run()  # warm
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
    launches.clear()
    ops = top_level_ops(detection) - top_level_ops(plain)
    print(f"Host work a layer call, tiny llama ({config.num_attention_heads} heads × {config.head_dim}), "
          f"{args.batches} batches of {args.batch_size} sentences of 30–37 tokens, Triton kernels stubbed, "
          f"torch {torch.__version__}:\n")
    for name, s in seconds.items():
        print(f"- {name}: {s / calls * 1e6:.0f} µs")
    print(f"- PyTorch operations beyond the forward's: {sum(ops.values()) / calls:.1f}; Triton launches: "
          f"{sum(launches.values()) / calls:.1f} ({', '.join(f'{k} {v / calls:g}' for k, v in launches.most_common())})\n")
    for name, n in ops.most_common(12):
        print(f"  {name}: {n / calls:.2f}")


if __name__ == "__main__":
    main()
