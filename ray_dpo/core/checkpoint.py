"""The checkpoint layout, owned here: every file name, what kind of model a directory holds, and our TransformerLM's
weights as safetensors + `model_config.json`. Loading never unpickles weights (`optimizer.pt` is read with
`weights_only=True`).

A model directory is one of:

  ours      `model_config.json` + `model.safetensors`: our `TransformerLM`
  hf        `config.json` + safetensors weights: any Hugging Face causal LM
  adapter   `adapter_config.json` + `base.json`: PEFT LoRA adapters on the Hugging Face base `base.json` names
  sharded   `.metadata` + `__<rank>_0.distcp` (FSDP, torch.distributed.checkpoint) + the architecture's config
            (and `adapter_config.json` when it trains LoRA adapters)

beside the tokenizer's files and `encoding.json` (`ray_dpo.core.encoding`). A training checkpoint adds
`optimizer.pt` or `scheduler.json`, `state.json`, TR-DPO's `reference.safetensors` (DDP) and one manifest per
writing rank (`ray_dpo.stages.train`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.tokenizer import ByteTokenizer, HFTokenizer

WEIGHTS_FILE = "model.safetensors"  # ours (and a small Hugging Face model's single weights file)
CONFIG_FILE = "model_config.json"  # ours
HF_CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_FILE = "base.json"  # an adapter directory's pointer to its base model (a URI every node opens)
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the per-rank `.distcp` files
SCHEDULER_FILE = "scheduler.json"  # the LR schedule of a sharded checkpoint (its optimizer state is in the shards)
# TR-DPO's moving reference (whole weights, or its LoRA adapter set), training state beside a DDP checkpoint's model;
# FSDP keeps it in the shards
REFERENCE_FILE = "reference.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

DirectoryKind = Literal["ours", "hf", "adapter", "sharded"]


def directory_kind(files: Iterable[str]) -> DirectoryKind | None:
    """What a directory holding these file names is (whole weights win over shards); None: not a model."""
    names = set(files)
    weights = any(n.endswith(".safetensors") and not n.startswith("adapter_") and n != REFERENCE_FILE for n in names)
    if CONFIG_FILE in names and WEIGHTS_FILE in names:
        return "ours"
    if ADAPTER_CONFIG_FILE in names and any(n.startswith("adapter_model.") for n in names):
        return "adapter"
    if HF_CONFIG_FILE in names and weights:
        return "hf"
    if SHARDED_METADATA in names and (CONFIG_FILE in names or HF_CONFIG_FILE in names):
        return "sharded"
    return None


def local_kind(directory: str | Path) -> DirectoryKind:
    """`directory_kind` of a local directory; ValueError naming what a model directory holds when it is none."""
    directory = Path(directory)
    found = directory_kind(p.name for p in directory.iterdir()) if directory.is_dir() else None
    if found is None:
        raise ValueError(
            f"{directory}: not a model checkpoint (expected model_config.json + model.safetensors, config.json + "
            "*.safetensors, adapter_config.json, or a sharded checkpoint's .metadata)"
        )
    return found


def save_model(
    directory: str | Path, model: TransformerLM, tokenizer: ByteTokenizer | HFTokenizer | None = None
) -> Path:
    """Write `model.safetensors` and `model_config.json` (and `tokenizer.json` when given) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    _save_weights(model, str(directory / WEIGHTS_FILE))  # handles tied embeddings
    save_model_config(directory, model.config)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def save_model_config(directory: str | Path, config: ModelConfig) -> None:
    """The TransformerLM's own keys only (a richer settings object may carry more)."""
    values = {f.name: getattr(config, f.name) for f in fields(ModelConfig)}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(values, indent=2))


def load_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} not found")
    return ModelConfig(**json.loads(path.read_text()))


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> TransformerLM:
    """Rebuild the model from `model_config.json` and load `model.safetensors` (strict)."""
    directory = Path(directory)
    model = TransformerLM(load_model_config(directory))
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint: {weights} not found")
    _load_weights(model, str(weights), strict=True, device=str(device))
    return model.to(device)


OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def save_training_state(directory: str | Path, optimizer_state: dict | None, state: dict) -> Path:
    """Write `state.json` and, when given, `optimizer.pt` (optimizer + LR-schedule state dicts: tensors and plain
    types only; sharded checkpoints keep theirs elsewhere).

    `state` is JSON: step, epoch, epoch_step (optimizer steps into that epoch: the data position), seed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
    return directory


def load_training_state(directory: str | Path) -> tuple[dict | None, dict]:
    """`(optimizer_state or None, state)` from `save_training_state`; `optimizer.pt` is read with
    `weights_only=True`."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint: {directory / STATE_FILE} not found")
    optimizer = directory / OPTIMIZER_FILE
    optimizer_state = torch.load(optimizer, map_location="cpu", weights_only=True) if optimizer.is_file() else None
    return optimizer_state, json.loads((directory / STATE_FILE).read_text())
