"""The one model loader of the recipe: train workers, the reference pass, evaluation actors, SFT and export all load
and save weights here, from a local directory or a staged `ray.train.Checkpoint` (downloaded when remote).

Three kinds of model directory, told apart by their files:

  ours      `model_config.json` + `model.safetensors`: our `TransformerLM`
  hf        `config.json` + safetensors weights: any Hugging Face causal LM (`AutoModelForCausalLM`)
  adapter   `adapter_config.json` + `base.json`: PEFT LoRA adapters on the Hugging Face base that `base.json`
            names (staged in storage like every starting checkpoint): one copy of the base weights

Hugging Face models are held with fp32 master weights; a frozen reference may be held in bf16 (half the memory).
"""

from __future__ import annotations

import ctypes
import json
import platform
from pathlib import Path
from typing import Any

import torch
from ray.train import Checkpoint
from torch import nn

from ray_dpo.core import checkpoint as ours
from ray_dpo.core.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from ray_dpo.stages.storage import local_directory

BASE_FILE = "base.json"  # an adapter directory's pointer to its base model (a URI every node opens)
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def reuse_freed_memory() -> bool:
    """Keep the memory glibc's malloc frees in the process for the next step or batch: True where it took (glibc).
    Every process that runs a model calls it: train workers, the reference pass, evaluation actors.

    By default glibc hands freed blocks back to the OS (its mmap and trim thresholds), so every step pays page
    faults to get its activations back: 37-45 thousand per eager bf16 DPO step of benchmarks/dpo_step.py's
    synthetic shape on a 2-core CPU, 10% of the step (4% compiled); 40-60 thousand per batch of 16 HH-RLHF pairs
    scored in fp32, 13%. Blocks above 32 MiB (glibc's largest mmap threshold) still come from and go back to the
    OS; up to 1 GiB of freed memory stays in the process.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def kind(directory: str | Path) -> str:
    directory = Path(directory)
    if (directory / ours.CONFIG_FILE).is_file():
        return "ours"
    if (directory / "adapter_config.json").is_file():
        return "adapter"
    if (directory / "config.json").is_file():
        return "hf"
    raise ValueError(f"{directory}: not a model directory (no model_config.json, config.json or adapter_config.json)")


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and callable(getattr(model, "save_pretrained", None))


def load(
    source: str | Checkpoint, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None, trainable=False
) -> nn.Module:
    """A model from a checkpoint directory, on `device`. Adapters load onto their base (trainable when asked)."""
    with local_directory(source) as directory:
        found = kind(directory)
        if found == "ours":
            model = ours.load_model(directory, device)
            return model.to(dtype) if dtype is not None else model
        if found == "hf":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
            return model.to(device)
        from peft import PeftModel

        base = load(json.loads((Path(directory) / BASE_FILE).read_text())["base"], device, dtype=dtype)
        return PeftModel.from_pretrained(base, directory, is_trainable=trainable).to(device)


def skeleton(directory: str | Path) -> nn.Module:
    """The model a checkpoint directory describes, randomly initialised: what sharded (FSDP) weights load into."""
    if kind(directory) == "ours":
        from ray_dpo.core.model import TransformerLM

        return TransformerLM(ours.load_model_config(directory))
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))


def load_with_tokenizer(
    source: str | Checkpoint, fallback_tokenizer: str, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """The model and the tokenizer saved beside it (the one it was trained with), else `fallback_tokenizer`; an
    adapter model comes merged into its base (faster to decode with)."""
    with local_directory(source) as directory:
        model = load(directory, device)
        if callable(getattr(model, "merge_and_unload", None)):
            model = model.merge_and_unload()
        has_own = any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)
        return model, load_tokenizer(directory if has_own else fallback_tokenizer)


def save(directory: str | Path, model: nn.Module, *, tokenizer: Tokenizer | None = None, base: str | None = None):
    """Weights (safetensors) and config into `directory`: ours, a Hugging Face directory, or adapters + `base.json`
    (`base`: where the base model is staged)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not is_hf(model) and not callable(getattr(model, "get_base_model", None)):
        ours.save_model(directory, model)
    else:
        model.save_pretrained(str(directory), safe_serialization=True)
        if callable(getattr(model, "get_base_model", None)):
            if base is None:
                raise ValueError("saving LoRA adapters needs the location of their base model")
            (directory / BASE_FILE).write_text(json.dumps({"base": base}))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def save_config(directory: str | Path, model: nn.Module) -> None:
    """The architecture alone (what `skeleton` rebuilds), for sharded checkpoints."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if is_hf(inner):
        inner.config.save_pretrained(str(directory))
    else:
        ours.save_model_config(directory, inner.config)


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory)
    return directory


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str] | str, seed: int):
    """PEFT LoRA adapters on `model` (only they train); raises ValueError when `target_modules` match nothing."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # identical adapter init on every rank
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    return get_peft_model(model, config)


def lora_targets_match(model: nn.Module, target_modules: list[str] | str) -> bool:
    if target_modules == "all-linear":
        return any(isinstance(m, nn.Linear) for m in model.modules())
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    return any(name.rsplit(".", 1)[-1] in names or name in names for name, _ in model.named_modules())


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward, for both model kinds."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if is_hf(inner):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if callable(getattr(model, "enable_input_require_grads", None)):
            model.enable_input_require_grads()  # LoRA: frozen embeddings would cut the graph at the first block
    else:
        inner.gradient_checkpointing = True


def max_positions(model: nn.Module) -> int:
    """The longest sequence the model was built for."""
    config = model.config
    return getattr(config, "max_seq_len", None) or getattr(config, "max_position_embeddings", None) or 2048


def describe(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable, "class": type(model).__name__}
