"""Pair scoring on an actor pool: sequence log-probs of chosen and rejected responses under one or more models.

`score_pairs_pool(dataset, {"ref": checkpoint}, ...)` adds `<name>_chosen_logp` and `<name>_rejected_logp` to every
row of a `read_preferences` dataset: the reference pass (`add_reference_logps`: columns `ref_chosen_logp`,
`ref_rejected_logp`, so training workers hold only the policy, `dpo.reference=precomputed`). Each actor loads its
models ONCE (a callable class in `map_batches`); the scoring itself is `ray_dpo.core.pairs.score_batch`, the
trainer's. Rows go through as Arrow tables, so their token columns reach the trainer with their types.

The cache (`ReferenceCache`, `reference_logps`): the pass's log-probs kept in storage under a key of the reference's
weights (`weights_digest`), the encoding and the scoring settings, one Parquet part per pass of (row key, log-probs);
a row is found by its tokens (`row_keys`), whatever file, split or order it comes from. A later run or sweep with the
same key reads them instead of running the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data.dataset import MaterializedDataset
from ray.train import Checkpoint
from torch import nn

from ray_dpo.core.pairs import score_batch
from ray_dpo.errors import UserError
from ray_dpo.stages import models as loader
from ray_dpo.stages import storage
from ray_dpo.stages.data import collate_preferences
from ray_dpo.stages.data.order import row_keys

Model = str | os.PathLike | Checkpoint | nn.Module  # a checkpoint (directory, URI, staged) or a module (pickled)


class PairScorer:
    """Ray Data callable class: `{name: model}`, loaded once per actor; adds `<name>_{chosen,rejected}_logp`."""

    def __init__(
        self,
        models: dict[str, Model],
        *,
        prefix_sharing: bool,
        device: str,
        bf16: bool,
        pack_len: int | None = None,
    ):
        loader.reuse_freed_memory()
        self.device = torch.device(device)
        dtype = torch.bfloat16 if bf16 else None  # as the trainer holds a live reference
        self.models = {
            name: (m if isinstance(m, nn.Module) else loader.load(m, self.device, dtype=dtype))
            .to(self.device, dtype=dtype)
            .eval()
            .requires_grad_(False)
            for name, m in models.items()
        }
        self.prefix_sharing, self.pack_len = prefix_sharing, pack_len
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The rows as they came (Arrow in, Arrow out: token columns keep their list<int32> type for the trainer's
        collate), plus the log-prob columns."""
        rows = {k: batch[k].to_numpy(zero_copy_only=False) for k in ("prompt", "chosen", "rejected")}
        # pad id 0 is a valid id for any vocabulary; padding is right of every scored token, so under a causal
        # model its value cannot change the result (the masks come from the lengths, not from pad_id)
        tensors = {k: v.to(self.device) for k, v in collate_preferences(rows, pad_id=0).items()}
        with torch.inference_mode(), self.autocast:
            for name, model in self.models.items():
                scored = score_batch(model, tensors, prefix_sharing=self.prefix_sharing, pack_len=self.pack_len)
                chosen, rejected = scored.sequence("sum")  # sums: each loss normalises them itself
                batch = batch.append_column(f"{name}_chosen_logp", pa.array(chosen.float().cpu().numpy()))
                batch = batch.append_column(f"{name}_rejected_logp", pa.array(rejected.float().cpu().numpy()))
        return batch


def score_pairs_pool(
    dataset: ray.data.Dataset,
    models: dict[str, Model],
    *,
    prefix_sharing: bool = False,
    pack_len: int | None = None,
    bf16: bool = False,
    batch_size: int = 32,
    concurrency: int = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
) -> MaterializedDataset:
    """`dataset` with `<name>_chosen_logp`, `<name>_rejected_logp` (float32) for each model, MATERIALIZED, row order
    kept. concurrency: actors in the pool; num_gpus per actor (> 0 puts the models on cuda); num_cpus per actor,
    default 0.5 on CPU so a 2-CPU machine keeps room for the read tasks (a pool of 1-CPU actors there can hang).
    The log-probs are sums over each response's tokens, whatever the loss (it divides by token counts itself);
    `bf16`: models held in bf16 and run under bf16 autocast, as the trainer's live reference under
    `train.precision=bf16`; `pack_len`: each batch's pairs packed into rows of up to that many tokens
    (`data.packing`)."""
    if concurrency < 1 or batch_size < 1:
        raise UserError(f"concurrency and batch_size must be >= 1, got {concurrency} and {batch_size}")
    for name, model in models.items():
        local = isinstance(model, (str, os.PathLike)) and not isinstance(model, Checkpoint)  # Checkpoint is PathLike
        if local and "://" not in str(model) and not Path(model).is_dir():
            raise UserError(f"{name} checkpoint: {model} is not a directory")
    if concurrency > 1 and isinstance(dataset, MaterializedDataset) and dataset.num_blocks() < concurrency:
        dataset = dataset.repartition(concurrency)  # one block feeds one actor: give every actor work
    scored = dataset.map_batches(
        PairScorer,
        fn_constructor_kwargs=dict(
            models=models,
            prefix_sharing=prefix_sharing,
            pack_len=pack_len,
            device="cuda" if num_gpus else "cpu",
            bf16=bf16,
        ),
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus if num_cpus is not None else (1.0 if num_gpus else 0.5),
        num_gpus=num_gpus,
    )
    scored.context.execution_options.preserve_order = True  # keep a bucketed order intact
    return scored.materialize()


def add_reference_logps(dataset: ray.data.Dataset, reference: Model, **pool) -> MaterializedDataset:
    """`dataset` + `ref_chosen_logp`, `ref_rejected_logp` (the training batch contract's names)."""
    return score_pairs_pool(dataset, {"ref": reference}, **pool)


# --- the cache: reference log-probs computed once per reference, encoding and scoring settings ---------------------

CACHE_DIR = "reference_logps"  # <train.storage_path>/reference_logps/<key>/
CACHE_VERSION = 1  # bumped when what a key covers changes
DIGEST_FILE = "weights.digest.json"  # written beside staged weights the first time their digest is needed
KEY_COLUMNS = ("_key0", "_key1")
LOGP_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
FOUND = "_found"


def weights_digest(checkpoint: Checkpoint) -> str:
    """sha256 of a staged checkpoint directory: every file's name, size and content (the staging marker aside). Read
    once, then kept beside the files."""
    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    try:
        with fs.open_input_stream(f"{root}/{DIGEST_FILE}") as kept:
            return json.loads(kept.read())["sha256"]
    except (FileNotFoundError, OSError, ValueError, KeyError):
        pass
    files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    names = sorted(f.path for f in files if f.type == pafs.FileType.File)
    digest = hashlib.sha256()
    for path in names:
        name = path[len(root) + 1 :]
        if name in (storage.STAGED_MARKER, DIGEST_FILE):
            continue
        digest.update(f"{name}\0".encode())
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(8 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    value = digest.hexdigest()
    try:
        with fs.open_output_stream(f"{root}/{DIGEST_FILE}") as out:
            out.write(json.dumps({"sha256": value, "files": len(names)}).encode())
    except OSError:  # a read-only checkpoint: computed again next time
        pass
    return value


@dataclass(frozen=True)
class ReferenceCache:
    """Reference log-probs in `<storage_path>/reference_logps/<key>/`: `key.json` (what the key covers) and Parquet
    parts of (row key, `ref_chosen_logp`, `ref_rejected_logp`), one per pass that computed rows."""

    storage_path: str
    key: str
    described: dict[str, Any]

    @classmethod
    def for_reference(
        cls, storage_path: str, reference: Checkpoint, *, encoding: dict[str, Any], scoring: dict[str, Any]
    ) -> ReferenceCache:
        """The cache of `reference`'s log-probs for pairs encoded by `encoding` (`Encoding.to_json()`) and scored
        with `scoring` (precision, layout: whatever changes the numbers)."""
        described = dict(version=CACHE_VERSION, reference=weights_digest(reference), encoding=encoding, scoring=scoring)
        key = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return cls(storage_path, key, described)

    @property
    def location(self) -> tuple[pafs.FileSystem, str]:
        filesystem, root = storage.resolve(self.storage_path)
        return filesystem, f"{root.rstrip('/')}/{CACHE_DIR}/{self.key}"

    @property
    def uri(self) -> str:
        return storage.uri(*self.location)

    def load(self) -> pa.Table | None:
        """Every row stored under this key, sorted by row key; None when nothing is."""
        filesystem, path = self.location
        if filesystem.get_file_info(path).type != pafs.FileType.Directory:
            return None
        parts = [
            pq.read_table(f.path, filesystem=filesystem)
            for f in filesystem.get_file_info(pafs.FileSelector(path))
            if f.path.endswith(".parquet")
        ]
        return pa.concat_tables(parts).sort_by([(KEY_COLUMNS[0], "ascending")]) if parts else None

    def store(self, scored: ray.data.Dataset) -> None:
        """A new part with the row keys and log-probs of `scored` (written aside, then moved into place: a reader
        never sees half a file)."""
        keyed = scored.map_batches(_keyed_logps, batch_format="pyarrow", batch_size=None)
        table = pa.concat_tables(ray.get(keyed.to_arrow_refs()))
        filesystem, path = self.location
        filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(f"{path}/key.json") as out:
            out.write(json.dumps(self.described, indent=1, default=str).encode())
        name = uuid.uuid4().hex
        pq.write_table(table, f"{path}/.{name}.tmp", filesystem=filesystem)
        filesystem.move(f"{path}/.{name}.tmp", f"{path}/part-{name}.parquet")


def _keyed_logps(batch: pa.Table) -> pa.Table:
    keys = row_keys(batch)
    return pa.table({**dict(zip(KEY_COLUMNS, map(pa.array, keys), strict=True)), **{c: batch[c] for c in LOGP_COLUMNS}})


def _look_up(batch: pa.Table, keys: tuple[np.ndarray, np.ndarray], logps: tuple[np.ndarray, np.ndarray]) -> pa.Table:
    """The rows with their stored log-probs (NaN where not stored) and whether each was found."""
    first, second = row_keys(batch)
    at = np.minimum(np.searchsorted(keys[0], first), len(keys[0]) - 1)  # `keys` holds at least one row
    found = (keys[0][at] == first) & (keys[1][at] == second)
    for name, values in zip(LOGP_COLUMNS, logps, strict=True):
        batch = batch.append_column(name, pa.array(np.where(found, values[at], np.nan), pa.float32()))
    return batch.append_column(FOUND, pa.array(found))


def reference_logps(
    dataset: ray.data.Dataset, reference: Model, *, cache: ReferenceCache | None, **pool
) -> tuple[MaterializedDataset, bool]:
    """`add_reference_logps`, read from `cache` when it holds every row (then True: reused); otherwise the pass runs
    and its log-probs join the cache."""
    known = cache.load() if cache is not None else None
    if known is not None and known.num_rows:
        keys = tuple(known[c].to_numpy() for c in KEY_COLUMNS)
        logps = tuple(known[c].to_numpy().astype(np.float32) for c in LOGP_COLUMNS)
        looked = dataset.map_batches(
            _look_up, fn_kwargs=dict(keys=keys, logps=logps), batch_format="pyarrow", batch_size=None
        )
        looked.context.execution_options.preserve_order = True
        looked = looked.materialize()
        found = looked.select_columns([FOUND]).iter_batches(batch_format="numpy", batch_size=None)
        if all(batch[FOUND].all() for batch in found):
            reused = looked.drop_columns([FOUND])
            reused.context.execution_options.preserve_order = True
            return reused.materialize(), True
    scored = add_reference_logps(dataset, reference, **pool)
    if cache is not None:
        cache.store(scored)
    return scored, False
