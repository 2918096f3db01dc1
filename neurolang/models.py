"""Loading models the way `transformers` users expect, without ever touching the network.

`model_name_or_path` is a local Hugging Face directory, a hub id already in the local cache, a
single GGUF file (converted once into a cached Hugging Face directory, then reused), or
`tiny:<family>` for a built-in random model.
"""
import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from neurolang.adapters import IMAGE_TEXT, check_supported
from neurolang.errors import NeurolangError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_PREFIX = "tiny:"


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise NeurolangError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (a GPU when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise NeurolangError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu")
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise NeurolangError(f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) here")
        return torch.device(name)
    raise NeurolangError(f"unknown device {name!r}; choose cpu, cuda, cuda:N or auto")


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROLANG_CACHE", Path.home() / ".cache" / "neurolang"))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1 or os.sep == "\\" and "\\" in name


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise NeurolangError(
            f"model {repo_id!r} is neither a local path nor in the local Hugging Face cache "
            "(neurolang never downloads; fetch it first with `huggingface-cli download`)"
        ) from None


def _check_directory(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise NeurolangError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise NeurolangError(f"{config_file} is not valid JSON ({err.msg}, line {err.lineno})") from None
    check_supported(SimpleNamespace(**config))


@contextlib.contextmanager
def quiet_bars_off_a_terminal():
    """transformers' own progress bars (`Loading weights`, `Writing model shards`) only where
    stderr is a terminal: in a scan's or a training run's log file each is a stream of
    carriage-return updates."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def gguf_to_directory(gguf_file: Path) -> Path:
    """Convert a GGUF file once into a cached, dequantized Hugging Face directory; reuse it after."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise NeurolangError("reading GGUF files needs the gguf package: pip install 'neurolang[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"neurolang: converting {gguf_file.name} once into {target} (this can take many minutes)",
          file=sys.stderr, flush=True)
    kwargs = dict(gguf_file=gguf_file.name, local_files_only=True)
    with quiet_bars_off_a_terminal():
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
        config = quantized.config
        check_supported(config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    os.replace(partial, target)
    return target


def resolve_model_path(model_name_or_path: str) -> Path:
    """The local Hugging Face directory behind a path, a cached hub id or a GGUF file."""
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        _check_directory(path)
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise NeurolangError(f"{path} is a file but not a .gguf model; pass a model directory or a GGUF file")
        return gguf_to_directory(path)
    if _looks_like_path(model_name_or_path):
        raise NeurolangError(f"no such model file or directory: {model_name_or_path}")
    cached = _from_hub_cache(model_name_or_path)
    _check_directory(cached)
    return cached


def text_model(model):
    """The text model of an image-text model (`IMAGE_TEXT`), as the ordinary causal LM of its text
    family: the same modules, not copies. Its forward on text is the image-text model's exactly;
    the vision tower is dropped, and `save_pretrained` writes a text-only checkpoint."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # a shell: its modules are replaced by the loaded ones
        text = AutoModelForCausalLM.from_config(model.config.text_config)
    text.model, text.lm_head = model.model.language_model, model.lm_head
    text.config.tie_word_embeddings = text.lm_head.weight is text.model.embed_tokens.weight
    text.config._name_or_path = model.config._name_or_path
    text.generation_config = model.generation_config
    return text


def weights_stamp(model) -> str:
    """Names, sizes and modification times of the weight files the model was loaded from ('' for
    a model built in memory). It tells a checkpoint from another saved later at the same path,
    which the sampled fingerprint may not (training changes a few rows by little): resumed work
    is keyed by it."""
    path = Path(getattr(model.config, "_name_or_path", "") or "")
    if not path.is_dir():
        return ""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _check_sentencepiece(path: Path) -> None:
    """A checkpoint whose tokenizer is only a SentencePiece model (`tokenizer.model`, no
    `tokenizer.json`: LLaMA-1 conversions, for one) is converted by `transformers` with
    sentencepiece and protobuf; without them it fails with a message about tiktoken."""
    if (path / "tokenizer.json").is_file() or not (path / "tokenizer.model").is_file():
        return
    try:
        import google.protobuf  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError:
        raise NeurolangError(f"{path} has only a SentencePiece tokenizer (tokenizer.model), which needs "
                             "sentencepiece and protobuf: pip install sentencepiece protobuf") from None


def load_model(model_name_or_path: str, torch_dtype: str = "float32", device: str = "auto"):
    """(model, tokenizer), in eval mode on the device, tokenizer padding on the right."""
    dtype, target = resolve_dtype(torch_dtype), resolve_device(device)
    if model_name_or_path.startswith(TINY_PREFIX):
        from neurolang.tiny import FAMILIES, byte_tokenizer, tiny_model

        family = model_name_or_path[len(TINY_PREFIX):]
        if family not in FAMILIES:
            raise NeurolangError(f"no built-in tiny model {family!r}; choose tiny:<{'|'.join(FAMILIES)}>")
        return tiny_model(family, dtype=dtype).to(target), byte_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_name_or_path)
    _check_sentencepiece(path)
    try:  # the tokenizer first: it fails in seconds where a model takes minutes to load
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        with quiet_bars_off_a_terminal():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:  # ImportError: a tokenizer library not installed
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NeurolangError(f"cannot load {path}: {first_line}") from None
    if model.config.model_type in IMAGE_TEXT:
        model = text_model(model)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(target).eval(), tokenizer
