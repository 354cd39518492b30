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
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train.torch
import torch
import torch.distributed.checkpoint as dcp
from ray.train import Checkpoint
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ray_dpo.core import checkpoint as layout
from ray_dpo.core.kinds import module_kind, peft_base
from ray_dpo.core.logps import core_model

SCHEDULER_FILE = "scheduler.json"


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a model (ours or Hugging Face): the units FSDP shards one at a time."""
    inner = peft_base(core_model(model))
    return list(inner.blocks) if module_kind(inner) == "ours" else list(inner.get_decoder().layers)


def shard(model: nn.Module, device: torch.device, *, bf16: bool, on_meta: bool = False) -> nn.Module:
    """FSDP2: each block its own unit (all-gathered just before it runs), the rest (embeddings, tied head) in the
    root unit. `on_meta`: the parameters are still on the meta device (the caller allocates the shards)."""
    if not on_meta:
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


def reshard(model: nn.Module) -> None:
    """Make FSDP's shards the parameters again. FSDP2 keeps a root's parameters gathered after a forward that no
    backward follows (a frozen reference): before its shards are written in place, the gathered copy must go, or the
    next forward would run on it."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def grad_norm(model: nn.Module, clip: float) -> float:
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def save_sharded(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, extra: dict | None = None
) -> None:
    """Every rank: its shard of model and optimizer state, and of `extra` (a task's own tensors: TR-DPO's
    reference); the LR schedule as JSON (no pickle)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, **({"task": extra} if extra else {})}
    dcp.save(state, checkpoint_id=str(directory))
    (directory / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))


def load_sharded(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict | None = None,
) -> None:
    """Every rank: its shard of model and optimizer state, read from the checkpoint in storage (only the files its
    read plan needs are fetched), `extra`'s tensors in place, and the LR schedule."""
    from ray_dpo.stages.storage import small_files

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, **({"task": extra} if extra else {})}
    with planned_reader(checkpoint) as reader:
        dcp.load(state, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    with small_files(checkpoint, (SCHEDULER_FILE,)) as directory:
        scheduler.load_state_dict(json.loads((Path(directory) / SCHEDULER_FILE).read_text()))


def full_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapters as whole tensors on the CPU, names as in the PEFT model (a collective: every rank calls it).
    Only the adapters are gathered: no rank ever holds the whole base."""
    from ray_dpo.core.logps import core_model

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for name, p in core_model(model).named_parameters()
        if "lora_" in name
    }


class PlannedDownloadReader(FileSystemReader):
    """torch.distributed.checkpoint's reader over a checkpoint in storage: this rank downloads `.metadata` and then
    only the files its load plan reads (with the same world size: its own `__<rank>_0.distcp`)."""

    def __init__(self, checkpoint: Checkpoint, local_dir: str):
        super().__init__(local_dir)
        self.remote, self.local_dir = checkpoint, Path(local_dir)
        self._fetch(layout.SHARDED_METADATA)

    def _fetch(self, relative_path: str) -> None:
        target = self.local_dir / relative_path
        if not target.is_file():
            source = f"{self.remote.path.rstrip('/')}/{relative_path}"
            with self.remote.filesystem.open_input_stream(source) as stream, open(target, "wb") as out:
                while chunk := stream.read(64 << 20):
                    out.write(chunk)

    def read_data(self, plan, planner):
        for relative_path in {self.storage_data[item.storage_index].relative_path for item in plan.items}:
            self._fetch(relative_path)
        return super().read_data(plan, planner)


@contextlib.contextmanager
def planned_reader(checkpoint: Checkpoint) -> Iterator[FileSystemReader]:
    """A DCP reader for a sharded checkpoint: reads it in place when it is local, else downloads only what this rank
    reads."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield FileSystemReader(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="ray-dpo-shards-") as tmp:
        yield PlannedDownloadReader(checkpoint, tmp)
