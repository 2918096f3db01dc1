"""Neuron-targeted training: exact sparse gradients, untouched weights, resume, merge, LoRA, the command."""
import copy
import json

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from neurolang.ablate import random_control, set_size
from neurolang.adapters import GROUPS, ModelAdapter
from neurolang.cli import main
from neurolang.detect import detect
from neurolang.errors import NeurolangError
from neurolang.models import load_model
from neurolang.score import perplexity
from neurolang.train import (DELTAS_FILE, _owned, add_neuron_deltas, lora_rank_for, merge_neuron_deltas,
                             neuron_parameter_count, pack, select_neurons, train, training_texts)
from neurolang.tiny import tiny_model

peft = pytest.importorskip("peft")


def random_masks(model, fraction=0.2, seed=0):
    adapter = ModelAdapter(model)
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.rand(adapter.n_layers, w, generator=gen) < fraction for g, w in adapter.widths().items()}


def owned_mask(model, masks):
    """{parameter name: bool mask of the entries the selected neurons own}."""
    adapter = ModelAdapter(model)
    names = {id(p): n for n, p in model.named_parameters()}
    owned = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for layer in adapter.layers:
        for g in GROUPS:
            idx = masks[g][layer.index].nonzero().flatten()
            for _, module, axis in _owned(layer, g):
                w = owned[names[id(module.weight)]]
                if axis == 0:
                    w[idx] = True
                    if module.bias is not None:
                        owned[names[id(module.bias)]][idx] = True
                else:
                    w[:, idx] = True
    return owned


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_deltas_equal_edited_weights_and_give_exact_sparse_gradients(family):
    model = tiny_model(family)
    masks = random_masks(model)
    ids = torch.randint(3, 260, (2, 11), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    deltas = add_neuron_deltas(model, masks)
    with torch.no_grad():
        for p in deltas.parameters():
            p.copy_(0.05 * torch.randn(p.shape))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("neuron_deltas"))
    # Reference: the same deltas written into the weights of a full model, full gradients.
    edited = copy.deepcopy(model)
    merge_neuron_deltas(edited)
    reference.load_state_dict(edited.state_dict())
    ref_out = reference(ids, labels=ids)
    ref_out.loss.backward()
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-5)
    params = dict(reference.named_parameters())
    checked = 0
    for key, (module, axis, _) in deltas._targets.items():
        name = module_name(model, module)
        grad, idx = params[f"{name}.weight"].grad, deltas.index(key)
        expected = grad[idx] if axis == 0 else grad[:, idx]
        torch.testing.assert_close(deltas.weights[key].grad, expected, rtol=1e-5, atol=1e-7)
        if key in deltas.biases:
            torch.testing.assert_close(deltas.biases[key].grad, params[f"{name}.bias"].grad[idx],
                                       rtol=1e-5, atol=1e-7)
            checked += 1
        checked += 1
    assert checked >= 5 * 3
    assert deltas.parameter_count() == neuron_parameter_count(ModelAdapter(reference), masks)


def module_name(model, module):
    return next(n for n, m in model.named_modules() if m is module)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model, tokenizer = load_model("tiny:llama", device="cpu")
    sets = detect(model, tokenizer, "builtin", ["en", "fr"], max_sentences=8, eval_sentences=4, ratio=0.1,
                  tau=0.5, progress=False, model_name="tiny:llama")
    out = tmp_path_factory.mktemp("train") / "run"
    sets.save(out)
    return out


def _args(out, max_steps=4, save_steps=2):
    return TrainingArguments(output_dir=str(out / "checkpoints"), max_steps=max_steps, save_steps=save_steps,
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, report_to="none",
                             use_cpu=True, seed=0, disable_tqdm=True)


def test_training_changes_only_the_selected_neurons_and_lowers_the_loss(run_dir, tmp_path):
    model, tokenizer = load_model("tiny:llama", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks, _ = select_neurons(run_dir, "all", ["fr"])
    blocks = pack(tokenizer, training_texts("builtin", ["fr"])["fr"], 64)["input_ids"]
    loss_before = perplexity(model, blocks, tokenizer.pad_token_id)
    summary = train(model, tokenizer, run_dir, tmp_path / "out", strategy="all", langs=["fr"],
                    training_args=_args(tmp_path / "out", max_steps=6), block_size=64)
    owned = owned_mask(model, masks)
    for name, p in model.named_parameters():
        assert torch.equal(p[~owned[name]], before[name][~owned[name]]), name  # bit-identical
    changed = sum(int((p != before[n])[owned[n]].sum()) for n, p in model.named_parameters())
    assert changed > 0.9 * sum(int(m.sum()) for m in owned.values())
    assert perplexity(model, blocks, tokenizer.pad_token_id) < 0.9 * loss_before
    assert summary["steps"] == 6 and summary["trainable_parameters"] == neuron_parameter_count(ModelAdapter(model), masks)
    assert set(summary["ppl_after"]) == {"en", "fr"}
    # Held out: none of the detection run's evaluation lines is trained on.
    info = json.loads((run_dir / "detect.json").read_text())
    assert summary["held_out_evaluation_lines"] and summary["documents"]["fr"] == 240 - len(
        info["per_language"]["fr"]["evaluation_lines"])


def test_merged_checkpoint_reloads_with_the_wrapped_models_logits(run_dir, tmp_path):
    model, tokenizer = load_model("tiny:llama", device="cpu")
    train(model, tokenizer, run_dir, tmp_path / "out", strategy="exclusive", langs=["fr"],
          training_args=_args(tmp_path / "out"), block_size=64)
    wrapped, _ = load_model("tiny:llama", device="cpu")
    masks, _ = select_neurons(run_dir, "exclusive", ["fr"])
    add_neuron_deltas(wrapped, masks).load(tmp_path / "out" / DELTAS_FILE)
    reloaded, _ = load_model(str(tmp_path / "out"), device="cpu")
    ids = torch.randint(3, 260, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, wrapped(ids).logits, rtol=1e-5, atol=1e-5)


class Interrupt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_resume_after_interruption_reaches_the_uninterrupted_result(run_dir, tmp_path):
    straight, tokenizer = load_model("tiny:llama", device="cpu")
    train(straight, tokenizer, run_dir, tmp_path / "a", strategy="all", training_args=_args(tmp_path / "a"),
          block_size=64)
    interrupted, _ = load_model("tiny:llama", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, tokenizer, run_dir, tmp_path / "b", strategy="all", training_args=_args(tmp_path / "b"),
              block_size=64, callbacks=[Interrupt()])
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "train.json").exists()
    resumed, _ = load_model("tiny:llama", device="cpu")
    summary = train(resumed, tokenizer, run_dir, tmp_path / "b", strategy="all", training_args=_args(tmp_path / "b"),
                    block_size=64)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_random_strategy_matches_counts_per_layer_and_group(run_dir):
    chosen, _ = select_neurons(run_dir, "all", ["en", "fr"])
    drawn, name = select_neurons(run_dir, "random", ["en", "fr"], seed=3, match="all")
    assert name == "random (matching all)"
    for g in GROUPS:
        assert torch.equal(drawn[g].sum(1), chosen[g].sum(1))
    assert not all(torch.equal(drawn[g], chosen[g]) for g in GROUPS)
    assert all(torch.equal(drawn[g], random_control(chosen, "matched", 3)[g]) for g in GROUPS)


def test_lora_baseline_matches_the_parameter_budget(run_dir, tmp_path):
    model, tokenizer = load_model("tiny:llama", device="cpu")
    masks, _ = select_neurons(run_dir, "all", ["en", "fr"])
    adapter = ModelAdapter(model)
    rank = lora_rank_for(adapter, neuron_parameter_count(adapter, masks))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = train(model, tokenizer, run_dir, tmp_path / "lora", strategy="all", method="lora",
                    training_args=_args(tmp_path / "lora"), block_size=64)
    assert summary["lora_rank"] == rank
    per_rank = summary["trainable_parameters"] / rank
    assert abs(summary["trainable_parameters"] - summary["neuron_parameters"]) <= per_rank / 2 or rank == 1
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    reloaded, _ = load_model(str(tmp_path / "lora"), device="cpu")
    assert any(not torch.equal(p, before[n]) for n, p in reloaded.named_parameters())
    assert set_size(masks) == summary["neurons_selected"]


def test_train_command(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--neurons", str(run_dir), "--strategy", "shared", "--out", str(out), "--max-steps", "2",
                 "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1", "--block-size", "64",
                 "--learning-rate", "1e-3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "shared neurons" in printed and "PPL before" in printed
    summary = json.loads((out / "train.json").read_text())
    assert summary["training_arguments"]["learning_rate"] == 1e-3 and summary["steps"] == 2
    assert summary["training_arguments"]["warmup_steps"] == 0.03  # the paper's default kept
    assert (out / "config.json").is_file() and (out / DELTAS_FILE).is_file()


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "auto"], "needs"),  # no scores.json yet
    (["--strategy", "all", "--max-steps", "x"], "bad training flag"),
    (["--strategy", "all", "--no-such-flag", "1"], "bad training flag"),
    (["--strategy", "all", "--langs", "sw"], "has no neurons for sw"),
    (["--strategy", "all", "--max-documents", "0"], "--max-documents must be positive"),
    (["--strategy", "all", "--num-train-epochs", "0"], "nothing to train"),
    (["--strategy", "all", "--learning-rate", "-1"], "--learning-rate must be at least 0"),
    (["--strategy", "all", "--per-device-train-batch-size", "0"], "--per-device-train-batch-size must be positive"),
    (["--strategy", "all", "--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be positive"),
    (["--strategy", "all", "--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
])
def test_train_errors_are_one_line(run_dir, tmp_path, capsys, extra, message):
    assert main(["train", "--neurons", str(run_dir), "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_process_that_sees_several_gpus_trains_on_one(run_dir, tmp_path):
    """nn.DataParallel, the Trainer's default there, would call the deltas' hooks on each replica
    with the first GPU's tensors and multiply the batch: one GPU per process (torchrun for more)."""
    args = _args(tmp_path, max_steps=1)
    assert args.device.type == "cpu"
    args._n_gpu = 2  # what the Trainer finds in a plain process on a machine with two GPUs
    model, tokenizer = load_model("tiny:llama", device="cpu")
    summary = train(model, tokenizer, run_dir, tmp_path / "out", strategy="all", training_args=args, block_size=64,
                    max_documents=4, evaluate_ppl=False)  # out is not the checkpoints' parent: train makes it
    assert summary["steps"] == 1 and args.n_gpu == 1 and (tmp_path / "out" / DELTAS_FILE).is_file()


def test_train_refuses_a_gpu_the_trainer_would_not_use(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["train", "--neurons", str(run_dir), "--strategy", "all", "--out", str(tmp_path / "x"),
                 "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA_VISIBLE_DEVICES=1" in err and len(err.splitlines()) == 1


def test_train_loads_the_model_on_the_trainers_device(run_dir, tmp_path, capsys, monkeypatch):
    """Under torchrun the Trainer's device is the local rank's GPU; the model must be loaded there,
    not on cuda:0 by every rank (which would hold N copies)."""
    import neurolang.models

    def recorded(name, dtype, device):
        raise NeurolangError(f"loaded on {device}")

    monkeypatch.setattr(TrainingArguments, "device", property(lambda self: torch.device("cuda", 1)))
    monkeypatch.setattr(neurolang.models, "load_model", recorded)
    assert main(["train", "--neurons", str(run_dir), "--strategy", "all", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().endswith("loaded on cuda:1")


def test_two_process_ddp_run_on_the_cpu(run_dir, tmp_path):
    """The Trainer's DDP path (gloo on the CPU, two processes) trains and writes one checkpoint."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "neurolang.cli", "train", "--neurons", str(run_dir), "--strategy", "all", "--out", str(out),
                           "--max-steps", "2", "--per-device-train-batch-size", "2", "--block-size", "64",
                           "--gradient-accumulation-steps", "1", "--device", "cpu", "--ddp-backend", "gloo"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("PPL before") == 1  # only the main process reports
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 2 and (out / DELTAS_FILE).is_file()
