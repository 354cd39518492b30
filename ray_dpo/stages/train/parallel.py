"""How a model is spread over the workers: DDP (every rank holds it all) or FSDP2 (`fully_shard` per transformer
block: parameters, gradients and optimizer state sharded; bf16 parameters with fp32 gradient reduction under
`train.precision=bf16`), and the checkpoint I/O each needs.

DDP checkpoints are rank 0's `model.safetensors` + `optimizer.pt`. FSDP checkpoints are sharded with
`torch.distributed.checkpoint` (every rank writes its own `__<rank>_0.distcp`, rank 0 the `.metadata`); the final
one also holds the gathered `model.safetensors`, so evaluation, registration and export read it like any other.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import ray.train.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ray_dpo.core.kinds import module_kind, peft_base
from ray_dpo.core.logps import core_model

SCHEDULER_FILE = "scheduler.json"


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a model (ours or Hugging Face): the units FSDP shards one at a time."""
    inner = peft_base(core_model(model))
    return list(inner.blocks) if module_kind(inner) == "ours" else list(inner.get_decoder().layers)


def shard(model: nn.Module, device: torch.device, *, bf16: bool) -> nn.Module:
    """FSDP2: each block its own unit (all-gathered just before it runs), the rest (embeddings, tied head) in the
    root unit."""
    model.to(device)
    # inputs are token ids, masks and positions (autocast picks the compute dtype): nothing for FSDP to cast, and its
    # cast would rebuild the prefix-sharing mask (a dataclass) field by field
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
        if bf16
        else None
    )
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def distribute(model: nn.Module, strategy: str, device: torch.device, *, bf16: bool) -> nn.Module:
    if strategy == "fsdp":
        return shard(model, device, bf16=bf16)
    return ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU); moves to device


def unwrap(model: nn.Module) -> nn.Module:
    """The module to run without gradient synchronisation: DDP's inner module (FSDP modules run as they are)."""
    return getattr(model, "module", model)


def gradient_sync(model: nn.Module, sync: bool):
    """Accumulate without communicating on all but the last micro-batch of a step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def grad_norm(model: nn.Module, clip: float) -> float:
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / ".metadata").is_file()


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Every rank: its shard of model and optimizer state; the LR schedule as JSON (no pickle)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
    (directory / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))


def load_sharded(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(json.loads((Path(directory) / SCHEDULER_FILE).read_text()))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (a collective: every rank calls it; others get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
