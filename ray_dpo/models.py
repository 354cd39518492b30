"""The one model loader of the recipe: train workers, the reference pass, evaluation actors, SFT and export all load
weights through `load`, from a local directory or a staged `ray.train.Checkpoint` (downloaded when remote)."""

from __future__ import annotations

from pathlib import Path

import torch
from ray.train import Checkpoint
from torch import nn

from ray_dpo import checkpoint as files
from ray_dpo.storage import local_directory
from ray_dpo.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer


def load(source: str | Checkpoint, device: str | torch.device = "cpu") -> nn.Module:
    """A model from a checkpoint directory (`model.safetensors` + `model_config.json`), on `device`."""
    with local_directory(source) as directory:
        return files.load_model(directory, device)


def load_with_tokenizer(
    source: str | Checkpoint, fallback_tokenizer: str, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """The model and the tokenizer saved beside it (the one it was trained with), else `fallback_tokenizer`."""
    with local_directory(source) as directory:
        has_own = (Path(directory) / TOKENIZER_FILE).is_file()
        return files.load_model(directory, device), load_tokenizer(directory if has_own else fallback_tokenizer)
