"""FSDP models whose ranks only ever hold their shard: built with parameters on the meta device, sharded, then each
rank allocates its shard and reads only its rows of every weight, from the safetensors files of a checkpoint or from
a sharded checkpoint's own files (downloading only the files its read plan needs).

    model = build_sharded(source, device, spec=ShardSpec(...))   # a `LogpsModel` under FSDP2, weights in place

A rank's peak memory then grows with its shard, not with the model: no whole fp32 copy per rank, no random init.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from ray.train import Checkpoint
from torch import nn
from torch.distributed.tensor import DTensor

from ray_dpo.core import checkpoint as layout
from ray_dpo.core.kinds import is_peft
from ray_dpo.core.logps import LogpsModel
from ray_dpo.stages import models, storage
from ray_dpo.stages.train import parallel


@dataclass(frozen=True)
class ShardSpec:
    bf16_compute: bool  # FSDP's bf16 parameters (all-gathered) with fp32 gradient reduction
    dtype: torch.dtype = torch.float32  # the sharded parameters' storage: bf16 for a frozen reference under bf16
    prepare: Callable[[nn.Module], nn.Module] | None = None  # on the meta model: fresh LoRA adapters, checkpointing
    frozen: bool = False  # a reference: no gradients


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built in here put their parameters on the meta device (no memory, no init cost) and keep their
    buffers real: rotary tables and other non-persistent buffers are computed as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def init_adapters(model: nn.Module, seed: int) -> None:
    """LoRA's initial values as a function of (seed, parameter name) alone: A as kaiming-uniform (PEFT's default),
    B zero. A DDP rank's whole model and an FSDP rank's shard then start from the same adapters."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                full = _adapter_init(name, tuple(param.shape), seed)
                _local(param).copy_(_rows(param, full))


def _adapter_init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if "lora_B" in name:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
    bound = 1 / math.sqrt(shape[-1])  # kaiming_uniform_(a=sqrt(5)) on a (out, in) weight
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _rows(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a full tensor: FSDP2 shards dim 0 in equal chunks (the last ones may be short or empty)."""
    if not isinstance(param, DTensor):
        return full
    rows = full.shape[0] if full.dim() else 1
    chunk = -(-rows // dist.get_world_size())
    start = min(dist.get_rank() * chunk, rows)
    local = _local(param)
    return full.reshape(rows, *full.shape[1:])[start : start + local.shape[0]].reshape(local.shape)


class _SafetensorsWeights:
    """Rows of named tensors in a directory's safetensors files (one file, or the shards an index names)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        index = Path(directory) / "model.safetensors.index.json"
        files = sorted({*json.loads(index.read_text())["weight_map"].values()}) if index.is_file() else None
        files = files or sorted(
            p.name for p in Path(directory).glob("*.safetensors") if not p.name.startswith("adapter")
        )
        self.handles = [safe_open(str(Path(directory) / f), framework="pt") for f in files]
        self.where = {key: handle for handle in self.handles for key in handle.keys()}

    def rows(self, names: list[str], param: torch.Tensor) -> torch.Tensor:
        name = next((n for n in names if n in self.where), None)
        if name is None:
            raise KeyError(f"none of {names} in the checkpoint's safetensors files")
        view = self.where[name].get_slice(name)
        shape = view.get_shape()
        if not isinstance(param, DTensor) or not shape:
            return view[:]
        chunk = -(-shape[0] // dist.get_world_size())
        start = min(dist.get_rank() * chunk, shape[0])
        return view[start : start + _local(param).shape[0]]


def _file_names(model: nn.Module) -> dict[int, list[str]]:
    """Each parameter (by identity) -> the names it has in a checkpoint's files: PEFT's wrapping names removed, and
    every name of a tied weight (the files hold one of them)."""
    names: dict[int, list[str]] = {}
    for name, param in model.state_dict(keep_vars=True).items():
        plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "") if is_peft(model) else name
        names.setdefault(id(param), []).append(plain)
    return names


def build_sharded(source: str | Checkpoint, device: torch.device, *, spec: ShardSpec, seed: int) -> LogpsModel:
    """An FSDP2 `LogpsModel` of the model in `source`: from whole weights (safetensors), each rank's rows read in
    place; from a sharded checkpoint, only the architecture (the caller loads the shards: `parallel.load_sharded`)."""
    sharded_checkpoint = layout.SHARDED_METADATA in models.file_names(source)
    files = storage.small_files(source, SKELETON_FILES) if sharded_checkpoint else storage.node_local(source)
    with files as directory:
        with params_on_meta():
            model = models.skeleton(directory)
            if spec.prepare is not None:
                model = spec.prepare(model)
            model.to(spec.dtype)
        if spec.frozen:
            model.requires_grad_(False)
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        wrapped = parallel.shard(LogpsModel(model), device, bf16=spec.bf16_compute, on_meta=True)
        wrapped.to_empty(device=device)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
            if not sharded_checkpoint:
                weights = _SafetensorsWeights(directory)
                names = _file_names(model)
                for param in {id(p): p for p in model.parameters()}.values():
                    if any("lora_" in n for n in names[id(param)]):
                        continue  # fresh adapters: not in the base's files
                    _local(param).copy_(weights.rows(names[id(param)], param))
                if any("lora_" in n for n, _ in model.named_parameters()):
                    init_adapters(model, seed)
    return wrapped


SKELETON_FILES = (layout.CONFIG_FILE, layout.HF_CONFIG_FILE, layout.ADAPTER_CONFIG_FILE, layout.SHARDED_METADATA)
