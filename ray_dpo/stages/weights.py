"""Weights staged where every node reads them, `<train.storage_path>/<run>/staged/<name>/`, with the run's encoding
beside them: the starting weights (the reference), the SFT warm start, the published policy.

    reference = stage_weights(source, storage_path, parts, encoding=..., settings=WeightSource(...))

The driver never loads weights. A directory of whole weights (ours, a Hugging Face model) is copied file by file,
streamed. Anything that must be loaded first (a fresh TransformerLM, LoRA adapters to merge into their base, an FSDP
sharded checkpoint to gather, a hub id) is loaded in a Ray task, on a GPU node when training uses GPUs, in the
model's own dtype.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray.train import Checkpoint

from ray_dpo.core.encoding import Encoding
from ray_dpo.stages import models, storage

LOAD_TASK_CPUS = 0.5  # a whole CPU per task can starve beside a trainer's workers on a small machine


@dataclass(frozen=True)
class WeightSource:
    """What to stage: a checkpoint (a local directory, a URI, a `Checkpoint`), a Hugging Face hub id, or nothing (a
    fresh TransformerLM of `model_config`, seeded)."""

    location: str | Checkpoint | None
    model_config: object | None = None  # a `ray_dpo.core.model.ModelConfig` for a fresh model
    seed: int = 0


def stage_weights(
    source: WeightSource, storage_path: str, *parts: str, encoding: Encoding, use_gpu: bool = False
) -> Checkpoint:
    """Stage `source` at `<storage_path>/<parts>` with `encoding` beside it; returns where it is."""
    location = source.location
    local = isinstance(location, str) and not storage.is_uri(location) and Path(location).is_dir()
    if local and models.kind(location) in ("ours", "hf"):
        return _copy(location, storage_path, parts, encoding)
    if local:  # adapters or shards on the driver's disk: staged as they are, then loaded by the task
        location = storage.stage_directory(location, storage_path, *parts[:-1], f"{parts[-1]}-source")
    elif location is not None and storage.is_uri(str(location)) and models.kind(location) in ("ours", "hf"):
        return _copy(location, storage_path, parts, encoding)
    task = _load_and_stage.options(num_cpus=LOAD_TASK_CPUS, num_gpus=1 if use_gpu else 0)
    return ray.get(task.remote(WeightSource(location, source.model_config, source.seed), storage_path, parts, encoding))


def _copy(location: str | Checkpoint, storage_path: str, parts: tuple[str, ...], encoding: Encoding) -> Checkpoint:
    """Whole weights copied file by file into storage (the driver streams them; it loads nothing)."""
    source = storage.as_checkpoint(location)
    filesystem, root = storage.resolve(storage_path)
    destination = "/".join([root.rstrip("/"), *parts])
    filesystem.create_dir(destination, recursive=True)
    if not (isinstance(filesystem, pafs.LocalFileSystem) and Path(destination) == Path(source.path)):
        pafs.copy_files(
            source.path, destination, source_filesystem=source.filesystem, destination_filesystem=filesystem
        )
    with tempfile.TemporaryDirectory(prefix="ray-dpo-encoding-") as tmp:
        encoding.save(tmp)
        return storage.stage_directory(tmp, storage_path, *parts)


@ray.remote
def _load_and_stage(source: WeightSource, storage_path: str, parts: tuple[str, ...], encoding: Encoding) -> Checkpoint:
    import torch

    if source.location is None:
        from ray_dpo.core.model import TransformerLM

        torch.manual_seed(source.seed)
        model = TransformerLM(source.model_config)
    elif (
        isinstance(source.location, str) and not storage.is_uri(source.location) and not Path(source.location).exists()
    ):
        from transformers import AutoModelForCausalLM  # a hub id

        model = AutoModelForCausalLM.from_pretrained(source.location, dtype="auto")
    else:
        model = models.merged(models.load(source.location))
    with tempfile.TemporaryDirectory(prefix="ray-dpo-weights-") as tmp:
        models.save(tmp, model, encoding=encoding)
        return storage.stage_directory(tmp, storage_path, *parts)
