"""Model weights as safetensors + `model_config.json` (+ `tokenizer.json`). Loading never unpickles."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.tokenizer import ByteTokenizer, HFTokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


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
