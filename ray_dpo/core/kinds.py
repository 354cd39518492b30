"""What kind of model a module is, decided in one place: ours (`TransformerLM`), a Hugging Face causal LM, or any
other tokens -> logits module; seen through the wrappers a trainer puts around it (torch.compile, DDP / FSDP's
`.module`) and through PEFT's LoRA wrapper.

Hugging Face and PEFT types are recognised by class (transformers' `PreTrainedModel`, peft's `PeftModel`), read from
`sys.modules`: a module of either kind exists only once its library was imported, so neither is imported here.
"""

from __future__ import annotations

import sys
from typing import Literal

from torch import nn

from ray_dpo.core.model import TransformerLM

ModuleKind = Literal["ours", "hf", "other"]


def is_hf(model: object) -> bool:
    """A Hugging Face `PreTrainedModel` (not wrapped)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def is_peft(model: object) -> bool:
    """A PEFT model (LoRA adapters on a base model)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def peft_base(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (its LoRA layers stay in place), or `model` itself."""
    return model.get_base_model() if is_peft(model) else model


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module inside torch.compile and DDP / FSDP `.module` wrappers (PEFT kept); whether a `.module` wrapper
    was crossed (DDP syncs gradients only for graphs built through its own forward)."""
    crossed = False
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model, crossed = model.module, True
        else:
            return model, crossed


def inner_model(model: nn.Module) -> nn.Module:
    """The model itself: through every wrapper, PEFT's included."""
    return peft_base(unwrap(model)[0])


def module_kind(model: nn.Module) -> ModuleKind:
    inner = inner_model(model)
    if isinstance(inner, TransformerLM):
        return "ours"
    return "hf" if is_hf(inner) else "other"


def architecture(model: nn.Module) -> str:
    """The model's class name (a Hugging Face architecture such as `Qwen2ForCausalLM`)."""
    return type(inner_model(model)).__name__
