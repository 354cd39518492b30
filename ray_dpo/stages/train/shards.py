"""Deterministic per-rank shards: each rank reads only its own rows, and every optimizer step sees the same global
rows whatever the number of workers.

The driver deals the rows of one fixed order once: row i goes to rank `(i // block) % world` (block = micro-batch
size for training, 1 for validation), one small task per block of the dataset, so rank r holds micro-batches
r, r+W, r+2W, ... as object-store blocks. A worker iterates its blocks directly: a resumed run starts by SLICING its
shard at the rows it already trained on (no reading and collating of skipped batches), and no Ray Data executor runs
inside the workers. Rows read per epoch across all ranks = rows used, not W times that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray
import torch

if TYPE_CHECKING:
    from ray_dpo.stages.data.handoff import Handoff

TASK_CPUS = 0.25  # light work: a whole CPU per task (Ray's default) can starve beside a trainer's workers


@dataclass(frozen=True)
class Shard:
    """One rank's rows, in order: object-store blocks and their row counts."""

    blocks: tuple[ray.ObjectRef, ...]
    rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.rows)


@ray.remote(num_cpus=TASK_CPUS)
def _num_rows(table: pa.Table) -> int:
    return table.num_rows


@ray.remote(num_cpus=TASK_CPUS)
def _deal_block(table: pa.Table, start: int, block: int, world: int, limit: int) -> tuple[pa.Table, ...]:
    index = np.arange(start, start + table.num_rows)
    owner = np.where(index < limit, (index // block) % world, -1)
    parts = tuple(table.filter(pa.array(owner == rank)) for rank in range(world))
    return parts if world > 1 else parts[0]


def deal(dataset: ray.data.Dataset | Handoff, *, world: int, block: int, limit: int | None = None) -> list[Shard]:
    """Rows 0..limit-1 of `dataset` (in its order) dealt to `world` ranks in runs of `block` rows. A `Handoff` is
    consumed: each of its blocks is freed once dealt, so the rows are never in the object store twice."""
    from ray_dpo.stages.data.handoff import block_refs  # Ray Data's import only where rows are dealt

    refs = block_refs(dataset)
    counts = ray.get([_num_rows.remote(ref) for ref in refs])
    limit = sum(counts) if limit is None else limit
    blocks: list[list[ray.ObjectRef]] = [[] for _ in range(world)]
    rows: list[list[int]] = [[] for _ in range(world)]
    start = 0
    for i, count in enumerate(counts):
        if start >= limit:
            break
        index = np.arange(start, min(start + count, limit))
        per_rank = np.bincount((index // block) % world, minlength=world)
        parts = _deal_block.options(num_returns=world).remote(refs[i], start, block, world, limit)
        refs[i] = None  # a handed-off block is freed once dealt
        for rank, part in enumerate(parts if world > 1 else [parts]):
            if per_rank[rank]:
                blocks[rank].append(part)
                rows[rank].append(int(per_rank[rank]))
        start += count
    return [Shard(tuple(blocks[rank]), tuple(rows[rank])) for rank in range(world)]


def _as_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def micro_batches(
    shard: Shard,
    batch_size: int,
    collate: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]],
    *,
    skip_rows: int = 0,
    drop_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `batch_size` consecutive rows of the shard, starting `skip_rows` in. The next block is
    fetched while the current one is consumed."""
    refs = list(zip(shard.blocks, shard.rows, strict=True))
    while refs and skip_rows >= refs[0][1]:  # whole blocks already trained on: never fetched
        skip_rows -= refs.pop(0)[1]
    pending: list[pa.Table] = []
    held = 0
    for i, (ref, _) in enumerate(refs):
        if i + 1 < len(refs):
            ray.wait([refs[i + 1][0]], fetch_local=True, timeout=0)  # starts the transfer, does not block
        table = ray.get(ref)
        if skip_rows:
            table, skip_rows = table.slice(skip_rows), 0
        pending.append(table)
        held += table.num_rows
        while held >= batch_size:
            rows = pa.concat_tables(pending)
            yield collate(_as_numpy(rows.slice(0, batch_size)))
            pending, held = [rows.slice(batch_size)], held - batch_size
    if held and not drop_last:
        yield collate(_as_numpy(pa.concat_tables(pending)))
