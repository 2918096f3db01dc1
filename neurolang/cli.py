"""The `neurolang` command line."""
import argparse
import os
import sys
import time

from neurolang.errors import NeurolangError

DEFAULT_MODEL = "tiny:llama"


def _layers(text: str):
    if text == "all":
        return "all"
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers or 'all', got {text!r}") from None


def _neurons(text: str):
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return int(text)


def _model_options(parser):
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL",
                        help="local Hugging Face directory, cached hub id, GGUF file, or tiny:<family> "
                             f"(a built-in random model; default {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurolang", description="Language-related neurons of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser("verify", help="check the fast impact path against the naive-loop oracle",
                       description="Zero sampled neurons of the model one at a time, re-run their sub-layer "
                                   "and compare the change with the fast path; exit 1 above tolerance.")
    _model_options(v)
    v.add_argument("--layers", type=_layers,
                   help="comma-separated layer numbers or 'all' (default: first, middle and last)")
    v.add_argument("--neurons-per-group", type=_neurons, default=16, metavar="N",
                   help="neurons sampled per group and layer, or 'all' (default 16)")
    v.add_argument("--backend", default="torch", help="torch (default)")
    v.add_argument("--qk-metric", default="output", choices=("output", "probs"),
                   help="Q/K impact: output change (the paper's) or probability change (released code's)")
    v.add_argument("--text", metavar="FILE", help="sentences to use, one per line (default: built-in sample)")
    v.add_argument("--max-length", type=int, default=256, help="longest sentence in tokens (default 256)")
    v.add_argument("--tolerance", type=float, help="worst relative error allowed (default by dtype: 1e-4 in float32)")
    v.add_argument("--seed", type=int, default=0)
    return parser


def cmd_verify(args) -> int:
    from neurolang.adapters import ModelAdapter
    from neurolang.corpus import SAMPLE_SENTENCES, read_lines
    from neurolang.models import load_model
    from neurolang.oracle import verify

    sentences = read_lines(args.text) if args.text else list(SAMPLE_SENTENCES.values())
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    adapter = ModelAdapter(model)
    layers = list(range(adapter.n_layers)) if args.layers == "all" else args.layers
    print(f"verifying {args.model} ({adapter.family}, {adapter.n_layers} layers, {adapter.neuron_count():,} neurons) "
          f"on {len(sentences)} sentences", file=sys.stderr, flush=True)
    report = verify(adapter, tokenizer, sentences, layers=layers, neurons_per_group=args.neurons_per_group,
                    metric=args.qk_metric, backend=args.backend, tolerance=args.tolerance, seed=args.seed,
                    max_length=args.max_length)
    print(f"layers {report.layers}, Q/K metric {args.qk_metric}, backend {args.backend}, "
          f"tolerance {report.tolerance:g}, {time.perf_counter() - start:.1f}s")
    print(report.table())
    print("PASS" if report.passed else "FAIL: the fast path disagrees with the oracle")
    return 0 if report.passed else 1


COMMANDS = {"verify": cmd_verify}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except NeurolangError as err:
        print(f"neurolang: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurolang: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
