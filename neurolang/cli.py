"""The `neurolang` command line."""
import argparse
import os
import sys
import time
from pathlib import Path

from neurolang import __version__
from neurolang.corpus import PAPER_LANGS
from neurolang.errors import NeurolangError
from neurolang.score import HIGH_BOUNDARY, LOW_BOUNDARY

DEFAULT_MODEL = "tiny:llama"
BACKEND_HELP = ("auto (default: Triton kernels for CUDA tensors, PyTorch on the CPU), torch, or triton "
                "(on the CPU only with TRITON_INTERPRET=1)")
QK_METRIC_HELP = "Q/K impact: output change (default; the paper's) or probability change (the released code's)"


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


def _out_dir(text: str) -> str:
    """An output directory that can be made or written: checked before any model loads."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got ''")
    path = Path(text)
    existing = next(p for p in (path, *path.parents) if p.exists())  # '.' or '/' at worst
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {existing}")
    return text


def _model_options(parser, default_help=f"default {DEFAULT_MODEL}", default=DEFAULT_MODEL):
    parser.add_argument("--model", default=default, metavar="MODEL",
                        help="local Hugging Face directory, cached hub id, GGUF file, or tiny:<family> "
                             f"(a built-in random model; {default_help})")
    _placement_options(parser)


def _placement_options(parser):
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")


def _detection_options(parser, threshold: bool, seed_help: str):
    """The options of detection, shared by detect and scan; `threshold` adds --sigma, exclusive of --ratio."""
    parser.add_argument("--corpus", default="builtin",
                        help="'builtin' (default) or a directory of <lang>.txt, <lang>.jsonl or <lang>/ (datasets)")
    parser.add_argument("--langs", type=_langs, default=",".join(PAPER_LANGS),
                        help="comma-separated (default: %(default)s)")
    selection = parser.add_mutually_exclusive_group() if threshold else parser
    selection.add_argument("--ratio", type=float, default=0.01,
                           help="top fraction ρ activated per sentence (default 0.01)")
    if threshold:
        selection.add_argument("--sigma", type=float, help="fixed impact threshold σ instead of a top fraction")
    parser.add_argument("--tau", type=float, default=1.0,
                        help="fraction of sentences a neuron must be activated in (default 1.0)")
    parser.add_argument("--max-sentences", type=int, default=200,
                        help="detection sentences per language (default 200)")
    parser.add_argument("--eval-sentences", type=int, default=40, help="held-out sentences per language (default 40)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per sentence (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="sentences per forward pass (default 8)")
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    parser.add_argument("--backend", default="auto", help=BACKEND_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurolang", description="Language-related neurons of LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser("verify", help="check the fast impact path against the naive-loop oracle",
                       description="Zero sampled neurons of the model one at a time, re-run their sub-layer "
                                   "and compare the change with the fast path; exit 1 above tolerance.")
    _model_options(v)
    v.add_argument("--layers", type=_layers,
                   help="comma-separated layer numbers or 'all' (default: first, middle and last)")
    v.add_argument("--neurons-per-group", type=_neurons, default=16, metavar="N",
                   help="neurons sampled per group and layer, or 'all' (default 16)")
    v.add_argument("--backend", default="auto", help=BACKEND_HELP)
    v.add_argument("--qk-metric", default="output", choices=("output", "probs"), help=QK_METRIC_HELP)
    v.add_argument("--text", metavar="FILE", help="sentences to use, one per line (default: built-in sample)")
    v.add_argument("--max-length", type=int, default=256, help="longest sentence in tokens (default 256)")
    v.add_argument("--tolerance", type=float, help="worst relative error allowed (default by dtype: 1e-4 in float32)")
    v.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("detect", help="detect the language-related neurons of a model",
                       description="Count, per language, the sentences in which each neuron is among the top "
                                   "ρ of its layer and group; N_ℓ = neurons activated in at least τ of them.")
    _model_options(d)
    d.add_argument("--out", type=_out_dir, required=True, help="output directory (neurons.safetensors, detect.json)")
    _detection_options(d, threshold=True, seed_help="seed of the detection / held-out split")
    d.add_argument("--text-field", default="text", help="field of JSON Lines / dataset records (default text)")
    d.add_argument("--qk-metric", default="output", choices=("output", "probs"), help=QK_METRIC_HELP)
    d.add_argument("--compat", choices=("released-code",),
                   help="score and select as the authors' released code (SPEC §7; not the paper's method): FFN "
                        "Σ|up|, Q/K Σ(ΔA)² on post-RoPE channels for both, V/O Σ|y|, swapped top-k sizes; "
                        "models without grouped-query attention only")
    c = sub.add_parser("classify", help="shared / exclusive / unique neurons and their statistics",
                       description="Read DIR/neurons.safetensors, write DIR/classes.safetensors and DIR/stats.json; "
                                   "or, with --compare, print how DIR's sets overlap another run's.")
    c.add_argument("dir", help="a directory written by `neurolang detect`")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--compare", metavar="OTHER",
                     help="another detection of a model of the same shape: print the overlap of N_ℓ, shared, "
                          "exclusive and unique sets (Jaccard, per group), write nothing")
    how.add_argument("--layer-stages", metavar="RANGES", type=_layer_stages,
                     help="the early, middle and late layers of the stage table, as 0-7,8-23,24-31 (default: "
                          "thirds; the paper's Tables 3 and 5 use 0-7,8-23,24-31 for Llama-3.1-8B, "
                          "0-5,6-29,30-35 for Qwen2.5-3B and 0-5,6-34,35-41 for Gemma2-9B); `score` keeps them")
    s = sub.add_parser("score", help="perplexity with neuron sets deactivated: ΔPPL, Imp, LAS and stage",
                       description="Deactivate shared, exclusive and random neurons in turn and measure perplexity "
                                   "on the held-out split; write DIR/scores.json.")
    s.add_argument("dir", help="a directory written by `neurolang detect`")
    _model_options(s, default_help="default: the model named in DIR/detect.json", default=None)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0, help="seed of the random controls (default 0)")
    s.add_argument("--low", type=float, default=LOW_BOUNDARY,
                   help="LAS below this is the low stage (default log 2: shared neurons matter less than exclusive)")
    s.add_argument("--high", type=float, default=HIGH_BOUNDARY,
                   help="LAS from this on is the high stage (default log 11: Imp of 10)")
    s.add_argument("--validate-threshold", action="store_true",
                   help="Appendix B: lower ρ until a random control moves no language's PPL by more than --tolerance")
    s.add_argument("--tolerance", type=float, default=0.05, help="relative PPL rise allowed (default 0.05)")
    s.add_argument("--shrink", type=float, default=0.5, help="factor applied to ρ at each step (default 0.5)")
    s.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the evaluation sentences for the 95%% intervals of Imp and LAS "
                        "(default 1000; 0: none)")
    e = sub.add_parser("eval", help="MGSM / MMMLU accuracy per language from local files, or compare runs",
                       description="Evaluate a model on MGSM (greedy generation, exact match of the last number) or "
                                   "MMMLU (K-shot, log-likelihood of the option letter) and write OUT/results.json; "
                                   "or print the before/after table of earlier runs with --compare.")
    _model_options(e)
    e.add_argument("--task", choices=("mgsm", "mmmlu"))
    e.add_argument("--langs", type=_langs, default="zh,fr,de,th,sw", help="comma-separated (default: %(default)s)")
    e.add_argument("--data", help="directory holding mgsm_<lang>.tsv or mmlu_<LOCALE>.csv files")
    e.add_argument("--limit", type=int, help="first N items per language (default: all)")
    e.add_argument("--shots", type=int, help="exemplars per prompt (default 4 for MGSM, 5 for MMMLU)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=48, help="MGSM generation length (default 48)")
    e.add_argument("--max-length", type=int, default=2048,
                   help="longest prompt plus generation in tokens; longer prompts lose exemplars (default 2048)")
    e.add_argument("--out", type=_out_dir, help="output directory (results.json)")
    e.add_argument("--compare", nargs="+", metavar="RUN", help="print the before/after table of these eval runs")
    t = sub.add_parser("train", allow_abbrev=False, help="train only the language-related neurons (or a LoRA of equal size)",
                       description="Train the parameters owned by a neuron set of a detection run and write an "
                                   "ordinary transformers checkpoint with the changes merged.",
                       epilog="Every flag of transformers.TrainingArguments is accepted under its own name "
                              "(--learning-rate, --max-steps, --num-train-epochs, --per-device-train-batch-size, "
                              "--gradient-accumulation-steps, --bf16, --save-steps, --logging-steps, ...). "
                              "Defaults follow the paper: AdamW, lr 5e-5, 1 epoch, batch 8 x 16 accumulation, "
                              "3% warmup, linear decay. An interrupted run resumes from OUT/checkpoints.")
    _model_options(t, default_help="default: the model named in NEURONS/detect.json", default=None)
    t.add_argument("--neurons", required=True, metavar="DIR", help="a directory written by `neurolang detect`")
    t.add_argument("--strategy", default="auto", choices=("auto", "all", "shared", "exclusive", "random"),
                   help="auto (default): from the stage in DIR/scores.json (low: all, medium: shared, high: "
                        "exclusive); random: as many random neurons per layer and group as --match selects")
    t.add_argument("--match", default="auto", choices=("auto", "all", "shared", "exclusive"),
                   help="the set a random strategy matches in size (default auto)")
    t.add_argument("--langs", type=_langs, help="languages to train on (default: all of the detection run)")
    t.add_argument("--data", default="builtin",
                   help="'builtin' (default) or a directory of <lang>.txt, <lang>.jsonl or <lang>/ (datasets); "
                        "the detection run's evaluation lines are held out when it is the detection corpus")
    t.add_argument("--text-field", default="text")
    t.add_argument("--max-documents", type=int, help="documents per language (default: all)")
    t.add_argument("--block-size", type=int, default=1024, help="tokens per packed training block (default 1024)")
    t.add_argument("--method", default="neurons", choices=("neurons", "lora"),
                   help="neurons (default) or lora: peft LoRA on all projections, rank matched to the neuron set")
    t.add_argument("--out", type=_out_dir, required=True, help="output directory: the merged checkpoint, deltas, train.json")
    sc = sub.add_parser("scan", help="verify, detect, classify, score (and eval) many models; resumable",
                        description="Run every stage for each model into RUN/<model>/ (finished stages are never "
                                    "redone; a failing model is recorded and skipped, and the exit status is then 1), keep "
                                    "RUN/results.parquet "
                                    "(one row per model) and write the report. Without --models: the demo model.")
    sc.add_argument("--models", help="comma-separated paths / cached hub ids / GGUF files / tiny:<family>, or a CSV "
                                     "or YAML file with name, path, family, size, release_date, layer_stages, or paper: the "
                                     "paper's 20 "
                                     "models, from the local Hugging Face cache (default: SmolLM2-135M from the demo "
                                     "extra)")
    sc.add_argument("--out", type=_out_dir, default="runs/scan", help="run directory (default runs/scan)")
    _placement_options(sc)
    _detection_options(sc, threshold=False, seed_help="seed of the split, of verify's samples and of score's "
                                                       "random controls")
    sc.add_argument("--eval", dest="eval_task", choices=("mgsm", "mmmlu"), help="also evaluate every model")
    sc.add_argument("--eval-data", help="the benchmark's directory for --eval")
    sc.add_argument("--eval-limit", type=int, help="items per language for --eval")
    sc.add_argument("--workers", type=int, default=1, help="models at once on this machine, one GPU each (default 1)")
    sc.add_argument("--ray-address", help="run one Ray task per model: 'local' or a cluster address (RUN on a shared disk)")
    sc.add_argument("--no-report", action="store_true", help="skip writing RUN/report")
    r = sub.add_parser("report", help="HTML and Markdown report with the paper's figures for a scan",
                       description="Read RUN/results.parquet and the models' files; write RUN/report/.")
    r.add_argument("run", help="a directory written by `neurolang scan`")
    return parser


def _langs(text: str):
    langs = [part.strip() for part in text.split(",") if part.strip()]
    if not langs or len(set(langs)) != len(langs):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated language codes, got {text!r}")
    return langs


def _layer_stages(text: str):
    from neurolang.classify import parse_layer_stages

    try:
        return parse_layer_stages(text)
    except NeurolangError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _check_backend(args) -> None:
    """A bad --backend, or one the --device cannot run, fails before any model loads."""
    from kernels.dispatch import resolve_backend
    from neurolang.models import resolve_device

    try:
        resolve_backend(args.backend, resolve_device(args.device))
    except ValueError as err:
        raise NeurolangError(str(err)) from None


def cmd_detect(args) -> int:
    from neurolang.classify import classify, format_table
    from neurolang.detect import check_options, detect
    from neurolang.models import load_model

    check_options(ratio=args.ratio, sigma=args.sigma, tau=args.tau, max_sentences=args.max_sentences,
                  eval_sentences=args.eval_sentences, max_length=args.max_length, batch_size=args.batch_size)
    _check_backend(args)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    sets = detect(model, tokenizer, args.corpus, args.langs, ratio=args.ratio, sigma=args.sigma, tau=args.tau,
                  max_sentences=args.max_sentences, eval_sentences=args.eval_sentences, max_length=args.max_length,
                  batch_size=args.batch_size, seed=args.seed, metric=args.qk_metric, backend=args.backend,
                  text_field=args.text_field, model_name=args.model, progress=sys.stderr.isatty(),
                  compat=args.compat, resume_dir=args.out)
    sets.save(args.out)
    for lang, info in sets.info["per_language"].items():
        cut = f", {info['truncated']} truncated to {args.max_length} tokens" if info["truncated"] else ""
        resumed = ", kept from the interrupted run" if info.get("resumed") else ""
        print(f"{lang}: {info['sentences']} sentences, {info['tokens']} tokens, {info['seconds']:.1f}s "
              f"({info['tokens_per_second']:.0f} tok/s, impacts {info['impact_seconds']:.1f}s){cut}{resumed}")
    print(format_table(classify(sets).stats))
    print(f"wrote {args.out}/neurons.safetensors and detect.json in {sets.info['seconds']:.1f}s")
    return 0


def cmd_classify(args) -> int:
    from neurolang.classify import classify, compare, format_comparison, format_table
    from neurolang.detect import NeuronSets

    if args.compare:
        result = compare(NeuronSets.load(args.dir), NeuronSets.load(args.compare))
        print(format_comparison(result, (args.dir, args.compare)))
        return 0
    result = classify(NeuronSets.load(args.dir), layer_stages=args.layer_stages)
    result.save(args.dir)
    print(format_table(result.stats))
    print(f"wrote {args.dir}/classes.safetensors and stats.json")
    return 0


def cmd_score(args) -> int:
    from neurolang.detect import NeuronSets
    from neurolang.models import load_model
    from neurolang.score import check_options, format_scores, score

    check_options(batch_size=args.batch_size, low=args.low, high=args.high, tolerance=args.tolerance,
                  shrink=args.shrink, bootstrap=args.bootstrap)
    model_name = args.model or NeuronSets.load(args.dir).info.get("model")
    if not model_name:
        raise NeurolangError(f"{args.dir}/detect.json names no model: pass --model")
    model, tokenizer = load_model(model_name, args.dtype, args.device)
    scores = score(model, tokenizer, args.dir, batch_size=args.batch_size, seed=args.seed, low=args.low,
                   high=args.high, validate=args.validate_threshold, tolerance=args.tolerance, shrink=args.shrink,
                   bootstrap=args.bootstrap, progress=sys.stderr.isatty())
    for step in scores["threshold_validation"] or []:
        rises = ", ".join(f"{lang} {100 * r:+.1f}%" for lang, r in step["random_ppl_rise"].items())
        print(f"threshold ρ = {step['ratio']:.4g}: random-control PPL rise {rises}"
              + (" ok" if step["passed"] else " too high") + (f" ({step['note']})" if "note" in step else ""))
    print(format_scores(scores))
    print(f"wrote {args.dir}/scores.json in {scores['seconds']:.1f}s")
    return 0


def cmd_eval(args) -> int:
    from neurolang.eval import (
        ModelRunner,
        evaluate,
        format_comparison,
        format_results,
        load_results,
        save_results,
    )
    from neurolang.models import load_model

    if args.compare:
        print(format_comparison({run: load_results(run) for run in args.compare}))
        return 0
    missing = [flag for flag, value in (("--task", args.task), ("--data", args.data), ("--out", args.out)) if not value]
    if missing:
        raise NeurolangError(f"eval needs {', '.join(missing)} (or --compare RUN ...)")
    if args.batch_size < 1:
        raise NeurolangError("--batch-size must be positive")
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    results = evaluate(ModelRunner(model, tokenizer, args.batch_size), args.task, args.langs, args.data,
                       limit=args.limit, shots=args.shots, max_new_tokens=args.max_new_tokens,
                       max_length=args.max_length, progress=sys.stderr.isatty(), resume_dir=args.out,
                       model_name=args.model)
    results["model"] = args.model
    results["options"].update(dtype=args.dtype, batch_size=args.batch_size)
    path = save_results(results, args.out)
    resumed = [lang for lang, info in results["per_language"].items() if info.get("resumed")]
    if resumed:
        print(f"{', '.join(resumed)}: kept from the interrupted run")
    print(format_results(results))
    print(f"wrote {path} in {results['seconds']:.1f}s")
    return 0


def training_arguments(argv, out: str, device):
    """transformers.TrainingArguments from the Trainer flags in `argv`, with the paper's defaults."""
    from transformers import HfArgumentParser, TrainingArguments

    from neurolang.train import PAPER_TRAINING_ARGUMENTS, check_training_arguments

    parser = HfArgumentParser(TrainingArguments, prog="neurolang train")

    def fail(message):
        raise NeurolangError(f"bad training flag: {message}")

    parser.error = fail
    if device.type == "cuda" and device.index not in (None, 0):
        # The Trainer places each process's model on its own first visible GPU (cuda:0, or the
        # local rank's under torchrun), wherever it was loaded.
        raise NeurolangError(f"train runs on the Trainer's GPU, not --device {device}: choose the GPU with "
                             f"CUDA_VISIBLE_DEVICES={device.index} (several GPUs: torchrun)")
    parser.set_defaults(output_dir=str(Path(out) / "checkpoints"), use_cpu=device.type == "cpu",
                        **PAPER_TRAINING_ARGUMENTS)
    try:
        (args,) = parser.parse_args_into_dataclasses(argv)
    except ValueError as err:
        raise NeurolangError(f"bad training flag: {str(err).splitlines()[0]}") from None
    check_training_arguments(args)
    return args


def cmd_train(args, rest) -> int:
    from neurolang.detect import NeuronSets
    from neurolang.models import load_model, resolve_device
    from neurolang.train import format_summary, train

    training_args = training_arguments(rest, args.out, resolve_device(args.device))
    sets = NeuronSets.load(args.neurons)
    model_name = args.model or sets.info.get("model")
    if not model_name:
        raise NeurolangError(f"{args.neurons}/detect.json names no model: pass --model")
    # The model goes straight to the Trainer's device for this process: under torchrun, its local
    # rank's GPU (loaded on "cuda", every rank would first put a copy on cuda:0).
    device = training_args.device
    model, tokenizer = load_model(model_name, args.dtype, str(device) if device.type == "cuda" else args.device)
    summary = train(model, tokenizer, args.neurons, args.out, strategy=args.strategy, langs=args.langs,
                    data=args.data, method=args.method, training_args=training_args, block_size=args.block_size,
                    seed=training_args.seed, match=args.match, text_field=args.text_field,
                    max_documents=args.max_documents, model_name=model_name)
    if training_args.should_save:  # the main process of a multi-GPU run speaks for all
        print(format_summary(summary))
        print(f"wrote {args.out} (a transformers checkpoint) and train.json in {summary['seconds']:.1f}s")
    return 0


def cmd_scan(args) -> int:
    from neurolang.scan import ScanOptions, default_model_path, read_models, read_table, scan

    if args.workers < 1:
        raise NeurolangError("--workers must be positive")
    if args.ray_address is None:  # a Ray cluster's workers may have the GPUs this machine lacks
        _check_backend(args)
    entries = read_models(default_model_path() if args.models is None else args.models)
    options = ScanOptions(langs=tuple(args.langs), corpus=args.corpus, dtype=args.dtype, device=args.device,
                          max_sentences=args.max_sentences, eval_sentences=args.eval_sentences,
                          max_length=args.max_length, batch_size=args.batch_size, ratio=args.ratio, tau=args.tau,
                          seed=args.seed, backend=args.backend, eval_task=args.eval_task, eval_data=args.eval_data,
                          eval_limit=args.eval_limit)
    statuses = scan(entries, args.out, options, workers=args.workers, ray_address=args.ray_address,
                    log=lambda message: print(message, file=sys.stderr, flush=True))
    table = read_table(args.out)
    columns = [c for c in ("model", "status", "n_shared", "shared_ratio", "las", "stage") if c in table.columns]
    print(table[columns].to_string(index=False))
    failed = [s for s in statuses if s["status"] == "error"]
    print(f"{len(statuses) - len(failed)} of {len(statuses)} models done; table: {args.out}/results.parquet")
    if not args.no_report:
        from neurolang.report import report

        print(f"report: {report(args.out).parent}/index.html")
    return 1 if failed else 0  # the others are done all the same: a script can tell


def cmd_report(args) -> int:
    from neurolang.report import report

    path = report(args.run)
    print(f"wrote {path} and {path.parent}/index.html")
    return 0


def cmd_verify(args) -> int:
    from neurolang.adapters import ModelAdapter
    from neurolang.corpus import SAMPLE_SENTENCES, read_lines
    from neurolang.models import load_model
    from neurolang.oracle import verify

    sentences = read_lines(args.text) if args.text else list(SAMPLE_SENTENCES.values())
    _check_backend(args)
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


COMMANDS = {"verify": cmd_verify, "detect": cmd_detect, "classify": cmd_classify, "score": cmd_score, "eval": cmd_eval,
            "scan": cmd_scan, "report": cmd_report}


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return cmd_train(args, rest) if args.command == "train" else COMMANDS[args.command](args)
    except (NeurolangError, OSError) as err:  # OSError: a file system's refusal (permissions, a full disk, ...)
        print(f"neurolang: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurolang: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
