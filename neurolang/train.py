"""Neuron-targeted training (SPEC §5, paper §4, Appendices E–F) and the LoRA baseline.

Only the parameters owned by the selected neurons are trained: for an `ffn` neuron the gate and
up rows and the down column of its channel, for `q`/`k`/`v` the projection row (and bias entry),
for `o` the `o_proj` column. They live in small delta tensors; forward hooks add each delta's
contribution to its projection's output (rows: `y[..., idx] += x Δᵀ + Δb`; columns:
`y += x[..., idx] Δᵀ`), which equals adding the deltas onto the frozen weights. So backward produces
gradients only for the deltas, and the optimizer holds state only for them. `merge` writes them into
the weights (the selected rows/columns only), giving an ordinary checkpoint.
"""
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.training_args import ParallelMode

from neurolang.ablate import random_control, set_size, union
from neurolang.adapters import GROUPS, ModelAdapter
from neurolang.classify import classify
from neurolang.detect import SCORES_FILE, NeuronSets, atomic_write_text, check_corpus_unchanged
from neurolang.errors import NeurolangError
from neurolang.models import quiet_bars_off_a_terminal

STRATEGIES = ("auto", "all", "shared", "exclusive", "random")
METHODS = ("neurons", "lora")
DELTAS_FILE = "neuron_deltas.safetensors"
TRAIN_FILE = "train.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The paper's runs (SPEC §5): AdamW, lr 5e-5, global batch 128 (8 × 16 here), 1 epoch, 3 % warmup,
# linear decay, 1024-token blocks. bf16 is left to the user (`--bf16`): CPUs run float32.
PAPER_TRAINING_ARGUMENTS = dict(learning_rate=5e-5, num_train_epochs=1.0, warmup_steps=0.03,
                                lr_scheduler_type="linear", optim="adamw_torch", weight_decay=0.0,
                                per_device_train_batch_size=8, gradient_accumulation_steps=16,
                                logging_steps=10, save_steps=200, save_total_limit=2, report_to="none",
                                ddp_find_unused_parameters=False)
BLOCK_SIZE = 1024


def _owned(layer, group):
    """(name, module, axis) of every weight slice a neuron of `group` owns; axis 0 = rows, 1 = columns."""
    if group == "ffn":
        return [("gate", layer.gate_proj, 0), ("up", layer.up_proj, 0), ("down", layer.down_proj, 1)]
    if group == "o":
        return [("o", layer.o_proj, 1)]
    return [(group, getattr(layer, f"{group}_proj"), 0)]


class NeuronDeltas(nn.Module):
    """Trainable deltas of the parameters owned by a neuron set, applied to a frozen model by hooks."""

    def __init__(self, adapter: ModelAdapter, masks: dict[str, torch.Tensor]):
        super().__init__()
        self.weights, self.biases = nn.ParameterDict(), nn.ParameterDict()
        self._targets, self._handles = {}, []
        for layer in adapter.layers:
            for group in GROUPS:
                idx = masks[group][layer.index].nonzero().flatten()
                if not len(idx):
                    continue
                self.register_buffer(f"index_{layer.index}_{group}", idx.to(layer.q_proj.weight.device))
                for name, module, axis in _owned(layer, group):
                    key, weight = f"{layer.index}_{name}", module.weight
                    shape = (len(idx), weight.shape[1]) if axis == 0 else (weight.shape[0], len(idx))
                    self.weights[key] = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=weight.device))
                    if axis == 0 and module.bias is not None:
                        self.biases[key] = nn.Parameter(torch.zeros(len(idx), dtype=torch.float32, device=weight.device))
                    self._targets[key] = (module, axis, f"{layer.index}_{group}")

    def index(self, key: str) -> torch.Tensor:
        """The channels (rows or columns) that the delta `key` ("<layer>_<part>") covers."""
        return getattr(self, f"index_{self._targets[key][2]}")

    def attach(self) -> "NeuronDeltas":
        """Install the hooks that add the deltas' contributions (idempotent)."""
        self.detach_hooks()
        for key, (module, axis, _) in self._targets.items():
            self._handles.append(module.register_forward_hook(self._hook(key, axis)))
        return self

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, key, axis):
        def rows(module, args, output):
            x = args[0]
            bias = self.biases[key].to(x.dtype) if key in self.biases else None
            change = nn.functional.linear(x, self.weights[key].to(x.dtype), bias)
            return output.index_add(-1, self.index(key), change.to(output.dtype))

        def columns(module, args, output):
            x = args[0]
            return output + nn.functional.linear(x.index_select(-1, self.index(key)),
                                                 self.weights[key].to(x.dtype)).to(output.dtype)
        return rows if axis == 0 else columns

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def merge(self) -> None:
        """Add the deltas onto the weights of the selected rows/columns only, and remove the hooks."""
        self.detach_hooks()
        for key, (module, axis, _) in self._targets.items():
            idx, delta = self.index(key), self.weights[key]
            w = module.weight
            if axis == 0:
                w[idx] = (w[idx].float() + delta).to(w.dtype)
                if key in self.biases:
                    module.bias[idx] = (module.bias[idx].float() + self.biases[key]).to(module.bias.dtype)
            else:
                w[:, idx] = (w[:, idx].float() + delta).to(w.dtype)

    def save(self, path) -> None:
        tensors = {f"weight.{k}": v.detach().cpu().contiguous() for k, v in self.weights.items()}
        tensors |= {f"bias.{k}": v.detach().cpu().contiguous() for k, v in self.biases.items()}
        tensors |= {f"index.{name[len('index_'):]}": idx.cpu().contiguous() for name, idx in self.named_buffers()}
        partial = Path(str(path) + ".partial")
        save_file(tensors, partial, metadata={"format": "pt", "layout": "neurolang-neuron-deltas-1"})
        partial.replace(path)

    @torch.no_grad()
    def load(self, path) -> None:
        tensors = load_file(path)
        for name, idx in self.named_buffers():
            stored = tensors.get(f"index.{name[len('index_'):]}")
            if stored is None or not torch.equal(stored, idx.cpu()):
                raise NeurolangError(f"{path} was trained on another neuron set")
        for key in self.weights:
            self.weights[key].copy_(tensors[f"weight.{key}"])
            if key in self.biases:
                self.biases[key].copy_(tensors[f"bias.{key}"])


def add_neuron_deltas(model, masks: dict[str, torch.Tensor]) -> NeuronDeltas:
    """Freeze `model` and attach trainable deltas for the neurons in `masks` (as `model.neuron_deltas`)."""
    model.requires_grad_(False)
    deltas = NeuronDeltas(ModelAdapter(model), masks)
    if not deltas.parameter_count():
        raise NeurolangError("the chosen neuron set is empty: nothing to train")
    model.neuron_deltas = deltas.attach()
    return deltas


def merge_neuron_deltas(model) -> NeuronDeltas:
    """Merge `model.neuron_deltas` into the weights and detach it; the model is ordinary again."""
    deltas = model.neuron_deltas
    deltas.merge()
    del model.neuron_deltas
    return deltas


class NeuronTrainer(Trainer):
    """A Trainer whose checkpoints hold only the neuron deltas (plus the usual optimizer, scheduler
    and RNG states), and which resumes from them."""

    def save_model(self, output_dir=None, _internal_call=False):
        output_dir = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.accelerator.unwrap_model(self.model).neuron_deltas.save(output_dir / DELTAS_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.accelerator.unwrap_model(model or self.model)
        model.neuron_deltas.load(Path(resume_from_checkpoint) / DELTAS_FILE)


# ---------------------------------------------------------------- which neurons

def select_neurons(run_dir, strategy: str, langs, seed: int = 0, match: str = "auto"):
    """(masks, resolved strategy) for a detection run: `all` = ∪ N_ℓ over `langs`, `shared`, `exclusive`
    = ∪ exclusive_ℓ over `langs`, `auto` = the strategy of the stage in scores.json, `random` = a
    seeded draw of the same count per layer and group as the set `match` names."""
    if strategy not in STRATEGIES:
        raise NeurolangError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    sets = NeuronSets.load(run_dir)
    unknown = [lang for lang in langs if lang not in sets.langs]
    if unknown:
        raise NeurolangError(f"{run_dir} has no neurons for {', '.join(unknown)} (it holds {', '.join(sets.langs)})")
    if strategy == "random":
        if match in ("random",) or match not in STRATEGIES:
            raise NeurolangError(f"--match must be auto, all, shared or exclusive, got {match!r}")
        base, resolved = select_neurons(run_dir, match, langs, seed)
        return random_control(base, "matched", seed), f"random (matching {resolved})"
    if strategy == "auto":
        scores_file = Path(run_dir) / SCORES_FILE
        if not scores_file.is_file():
            raise NeurolangError(f"--strategy auto needs {scores_file}: run `neurolang score {run_dir}` first")
        scores = json.loads(scores_file.read_text())
        if not scores.get("strategy"):
            raise NeurolangError(f"{scores_file} has no stage ({scores.get('las_undefined')}); pick --strategy")
        strategy = scores["strategy"]
    classes = classify(sets)
    if strategy == "all":
        return union(*(sets.members[lang] for lang in langs)), strategy
    if strategy == "shared":
        return classes.shared, strategy
    return union(*(classes.exclusive[lang] for lang in langs)), strategy


def neuron_parameter_count(adapter: ModelAdapter, masks) -> int:
    """Parameters a neuron set owns (what NeuronDeltas trains), without building it."""
    layer = adapter.layers[0]
    per = {"ffn": layer.gate_proj.in_features + layer.up_proj.in_features + layer.down_proj.out_features,
           "o": layer.o_proj.out_features}
    for g in ("q", "k", "v"):
        proj = getattr(layer, f"{g}_proj")
        per[g] = proj.in_features + (proj.bias is not None)
    return sum(int(masks[g].sum()) * per[g] for g in GROUPS)


def lora_rank_for(adapter: ModelAdapter, n_parameters: int) -> int:
    """The LoRA rank whose adapters on every projection of every layer hold about `n_parameters`."""
    per_rank = sum(m.in_features + m.out_features for layer in adapter.layers
                   for m in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj,
                             layer.gate_proj, layer.up_proj, layer.down_proj))
    return max(1, round(n_parameters / per_rank))


def add_lora(model, rank: int):
    """The peft LoRA baseline (Appendix E.3): rank `rank`, alpha 2·rank, on all seven projections."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise NeurolangError("--method lora needs peft: pip install 'neurolang[train]'") from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ---------------------------------------------------------------- data

def training_texts(data, langs, text_field="text", held_out=None, max_documents=None) -> dict[str, list[str]]:
    """{lang: documents} from `builtin` or a corpus directory; `held_out`, the info of a detection
    run on this corpus, leaves out its evaluation lines, so that their PPL stays held out."""
    from neurolang.corpus import load_corpus

    if max_documents is not None and max_documents < 1:
        raise NeurolangError(f"--max-documents must be positive, got {max_documents}")
    texts = load_corpus(data, langs, text_field)
    evaluation = {}
    if held_out is not None:
        check_corpus_unchanged(held_out, texts)
        evaluation = {lang: set(info["evaluation_lines"]) for lang, info in held_out["per_language"].items()}
    out = {}
    for lang in langs:
        out[lang] = [t for i, t in enumerate(texts[lang]) if i not in evaluation.get(lang, ())][:max_documents]
        if not out[lang]:
            raise NeurolangError(f"no {lang} training text left after holding out the evaluation split")
    return out


def pack(tokenizer, documents, block_size: int = BLOCK_SIZE):
    """A `datasets.Dataset` of causal-LM blocks: documents tokenized, joined with EOS, cut into
    `block_size` tokens (the last, shorter block is kept)."""
    from datasets import Dataset

    if block_size < 2:
        raise NeurolangError("--block-size must be at least 2")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [tok for ids in tokenizer(list(documents))["input_ids"] for tok in ids + eos]
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) >= 2]
    if not blocks:
        raise NeurolangError("the training text is empty")
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks],
                              "labels": blocks})


# ---------------------------------------------------------------- the whole run

def check_training_arguments(args: TrainingArguments) -> None:
    """Refuse the Trainer settings that would train nothing or fail deep inside torch (transformers
    checks only some), with the flag's name, before any work."""
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise NeurolangError("nothing to train: give --max-steps or --num-train-epochs above 0")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise NeurolangError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("learning_rate", "weight_decay", "adam_epsilon"):
        if not getattr(args, name) >= 0:
            raise NeurolangError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise NeurolangError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")


def train(model, tokenizer, run_dir, out, *, strategy="auto", langs=None, data="builtin", method="neurons",
          training_args: TrainingArguments | None = None, block_size=BLOCK_SIZE, seed=0, match="auto",
          text_field="text", max_documents=None, model_name=None, evaluate_ppl=True, callbacks=None) -> dict:
    """Train the neurons `strategy` selects (or a LoRA of equal size) on `langs`' text; write the
    merged checkpoint to `out`, the deltas (or adapter) beside it, and `train.json`."""
    from neurolang.score import evaluation_texts, perplexity

    if method not in METHODS:
        raise NeurolangError(f"unknown method {method!r}; choose {' or '.join(METHODS)}")
    start, out = time.perf_counter(), Path(out)
    if (out / TRAIN_FILE).is_file():
        raise NeurolangError(f"{out} already holds a finished training run; choose another --out")
    args = training_args or TrainingArguments(output_dir=str(out / "checkpoints"), seed=seed, **PAPER_TRAINING_ARGUMENTS)
    check_training_arguments(args)
    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        # One process sees several GPUs: the Trainer would wrap the model in nn.DataParallel, whose
        # replicas call the deltas' hooks with the first GPU's tensors (and it multiplies the
        # batch). One GPU per process; several train through torchrun (DDP), as the Trainer does
        # for model-parallel models.
        args._n_gpu = 1
    sets = NeuronSets.load(run_dir)
    langs = list(langs or sets.langs)
    masks, resolved = select_neurons(run_dir, strategy, langs, seed, match)
    adapter = ModelAdapter(model)
    n_params = neuron_parameter_count(adapter, masks)
    if not n_params:
        raise NeurolangError(f"the {resolved} neuron set of {', '.join(langs)} is empty: nothing to train")
    same_corpus = str(data) == str(sets.info["options"]["corpus"])
    texts = training_texts(data, langs, text_field, sets.info if same_corpus else None, max_documents)
    dataset = pack(tokenizer, [t for lang in langs for t in texts[lang]], block_size)
    eval_seqs = evaluation_texts(sets.info, tokenizer) if evaluate_ppl else {}
    pad = tokenizer.pad_token_id

    def ppl_all(m):
        m.eval()
        return {lang: perplexity(m, seqs, pad) for lang, seqs in eval_seqs.items()}

    ppl_before = ppl_all(model)
    if method == "neurons":
        deltas = add_neuron_deltas(model, masks)
        trainable, rank, trained = deltas.parameter_count(), None, model
        trainer_class = NeuronTrainer
    else:
        rank = lora_rank_for(adapter, n_params)
        trained = add_lora(model, rank)
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        trainer_class = Trainer
    trainer = trainer_class(model=trained, args=args, train_dataset=dataset, callbacks=callbacks,
                            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    last = args.resume_from_checkpoint or _last_checkpoint(args.output_dir)
    train_start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    train_seconds = time.perf_counter() - train_start
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
    if method == "neurons":
        merged, deltas = model, merge_neuron_deltas(model)
        if args.should_save:
            deltas.save(out / DELTAS_FILE)
    else:
        if args.should_save:
            trained.save_pretrained(out / "adapter")
        merged = trained.merge_and_unload()
    if args.should_save:
        with quiet_bars_off_a_terminal():
            merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    summary = {
        "model": model_name, "neurons": str(run_dir), "method": method, "strategy": resolved, "langs": langs,
        "lora_rank": rank, "neurons_selected": set_size(masks), "neuron_parameters": n_params,
        "trainable_parameters": trainable, "data": str(data), "documents": {l: len(texts[l]) for l in langs},
        "held_out_evaluation_lines": same_corpus, "blocks": len(dataset), "block_size": block_size,
        "resumed_from": last, "steps": result.global_step, "train_loss": result.training_loss,
        "log_history": trainer.state.log_history, "ppl_before": ppl_before, "ppl_after": ppl_all(merged),
        "training_arguments": {k: v for k, v in args.to_dict().items() if _jsonable(v)},
        "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - start, 3),
    }
    if args.should_save:
        atomic_write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", out / TRAIN_FILE)
    return summary


def _jsonable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def _last_checkpoint(output_dir):
    """The newest complete Trainer checkpoint in `output_dir`, to resume an interrupted run."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


def format_summary(summary: dict) -> str:
    lines = [f"{summary['method']}: {summary['strategy']} neurons of {', '.join(summary['langs'])}, "
             f"{summary['neurons_selected']} neurons, {summary['trainable_parameters']:,} trainable parameters"
             + (f" (LoRA rank {summary['lora_rank']})" if summary["lora_rank"] else ""),
             f"{summary['steps']} steps, train loss {summary['train_loss']:.4f}, {summary['train_seconds']:.1f}s"]
    if summary["ppl_before"]:
        lines.append(f"{'lang':<6}{'PPL before':>12}{'PPL after':>12}{'change':>9}")
        for lang, before in summary["ppl_before"].items():
            after = summary["ppl_after"][lang]
            lines.append(f"{lang:<6}{before:12.4g}{after:12.4g}{100 * (after / before - 1):+8.1f}%")
    return "\n".join(lines)

