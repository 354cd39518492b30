"""Checkpoints in storage: named by step, complete only when every file of every shard is there, found again after
a crash even when Ray's registry never heard of them.

Ray registers a reported checkpoint when its controller next polls the workers; a worker killed inside that window
leaves a complete checkpoint in storage that `ray.train.get_checkpoint()` does not return. So a (re)starting
worker group resumes from the NEWER of Ray's latest checkpoint and the newest complete one found in storage:
at most one checkpoint interval is ever lost.

Layout: `<storage_path>/<run name>/checkpoint_step_<step:08d>/`. Each rank that writes files (rank 0 with DDP, every
rank with FSDP's sharded state) also writes `manifest.rank<r>-of-<n>.json` listing its files and sizes; a directory
is complete when all n manifests are there and every file they list has its size. Upload order does not matter.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
from ray.train import Checkpoint

logger = logging.getLogger(__name__)

PREFIX = "checkpoint_step_"
_MANIFEST = re.compile(r"manifest\.rank(\d+)-of-(\d+)\.json")


def directory_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: str) -> int | None:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return int(name[len(PREFIX) :]) if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() else None


def write_manifest(directory: str | Path, rank: int, world: int) -> None:
    """List this rank's files (written so far, in `directory`) with their sizes; call it last."""
    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file() and not _MANIFEST.match(p.name)}
    (directory / f"manifest.rank{rank}-of-{world}.json").write_text(json.dumps(files))


@dataclass
class Found:
    step: int
    path: str
    missing: list[str]  # why it is incomplete; empty when complete

    @property
    def complete(self) -> bool:
        return not self.missing


def _inspect(filesystem: pafs.FileSystem, path: str) -> list[str]:
    """What a checkpoint directory lacks (files, manifests); [] when it is complete."""
    sizes = {
        info.path.rsplit("/", 1)[-1]: info.size
        for info in filesystem.get_file_info(pafs.FileSelector(path))
        if info.type == pafs.FileType.File
    }
    manifests = {int(m.group(1)): int(m.group(2)) for name in sizes if (m := _MANIFEST.fullmatch(name))}
    if not manifests:
        return ["manifest"]
    world = max(manifests.values())
    missing = [f"manifest of rank {r}" for r in range(world) if r not in manifests]
    for rank in manifests:
        # uploads are asynchronous: a manifest may be listed while its bytes are still arriving
        try:
            with filesystem.open_input_stream(f"{path}/manifest.rank{rank}-of-{world}.json") as stream:
                listed = json.loads(stream.read())
        except (OSError, ValueError):
            missing.append(f"manifest of rank {rank} (unreadable)")
            continue
        missing += [name for name, size in listed.items() if sizes.get(name) != size]
    return missing


def scan(filesystem: pafs.FileSystem, run_path: str) -> list[Found]:
    """Every checkpoint directory of a run in storage, oldest first."""
    infos = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    dirs = sorted((step_of(i.path), i.path) for i in infos if i.type == pafs.FileType.Directory and step_of(i.path))
    return [Found(step, path, _inspect(filesystem, path)) for step, path in dirs]


def newest_complete(filesystem: pafs.FileSystem, run_path: str, *, say_ignored: bool = False) -> Found | None:
    found = scan(filesystem, run_path)
    complete = [f for f in found if f.complete]
    newest = complete[-1] if complete else None
    if say_ignored:
        for f in found:
            if not f.complete and (newest is None or f.step > newest.step):
                logger.warning(
                    "ray-dpo: checkpoint %s is incomplete (missing %s): ignored", f.path, ", ".join(f.missing)
                )
    return newest


def resume_checkpoint(registered: Checkpoint | None, filesystem: pafs.FileSystem, run_path: str) -> Checkpoint | None:
    """The checkpoint to resume from: Ray's latest registered one, or a newer complete one found in storage."""
    found = newest_complete(filesystem, run_path, say_ignored=True)
    registered_step = step_of(registered.path) if registered is not None else None
    if found is not None and (registered is None or registered_step is None or found.step > registered_step):
        if registered is not None:
            logger.warning(
                "ray-dpo: resuming from %s, newer than Ray's latest registered %s", found.path, registered.path
            )
        return Checkpoint(path=found.path, filesystem=filesystem)
    return registered


def prune_unregistered(filesystem: pafs.FileSystem, run_path: str, keep: set[str]) -> None:
    """Delete checkpoint directories Ray does not know (`keep`: the names it does, or will) that the newest complete
    checkpoint supersedes: crash leftovers, found and resumed from once, never registered, so never pruned by Ray's
    `CheckpointConfig(num_to_keep)`."""
    found = scan(filesystem, run_path)
    complete = [f for f in found if f.complete]
    if not complete:
        return
    newest = complete[-1].step
    for f in found:
        name = f.path.rstrip("/").rsplit("/", 1)[-1]
        if f.step < newest and name not in keep:
            filesystem.delete_dir(f.path)
