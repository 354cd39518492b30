"""Driver side of training: build and fit ONE `TorchTrainer` (N DDP workers) for DPO or the SFT warm start.

    result = train_dpo(config, train_ds, val_ds, run_id=..., tracking_uri=..., init_checkpoint=ckpt,
                       reference_checkpoint=ckpt, pad_id=tok.pad_id)   # -> TrainResult(checkpoint, steps, ...)

`RunConfig(name=train.run_name, storage_path=train.storage_path)`: re-running the same name resumes from the
latest checkpoint; `FailureConfig(max_failures)` restarts a failed worker group from it. The workers run
`ray_dpo.train.loop.train_loop` over a typed `WorkerSpec`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch

from ray_dpo.config import Config
from ray_dpo.errors import UserError
from ray_dpo.train.loop import FAIL_ENV, WorkerSpec, train_loop

ROW = "_row"  # global row index column added before fit: fixes which rows form each global batch


class TrainingDivergedError(UserError):
    """The loss or gradient norm became NaN/Inf; training stopped before that step changed weights."""


@dataclass
class TrainResult:
    checkpoint: str  # final checkpoint directory (model.safetensors, optimizer.pt, state.json, ...)
    steps: int  # optimizer steps done in total (including those before a resume)
    metrics: dict[str, float]  # last train/* and val/* metrics
    resumed_from: int = 0  # step of the checkpoint the last worker group started from (0 = fresh start)


def train_dpo(
    config: Config,
    train_ds: ray.data.Dataset,
    val_ds: ray.data.Dataset | None,
    *,
    run_id: str | None,
    tracking_uri: str | None,
    init_checkpoint: str,
    reference_checkpoint: str | None,
    pad_id: int,
    callbacks: list[ray.train.UserCallback] | None = None,  # e.g. Tune's TuneReportCallback in a sweep trial
) -> TrainResult:
    """DPO on `train.num_workers` DDP workers starting from `init_checkpoint`, against the reference of
    `dpo.reference`: loaded from `reference_checkpoint` on every rank (live), columns of the data (precomputed),
    or none. Re-running with the same `train.run_name` and `train.storage_path` resumes from the latest checkpoint."""
    mode = config.dpo.reference
    if mode == "live" and not reference_checkpoint:
        raise UserError("train: dpo.reference=live needs a reference checkpoint")
    for name, ds in (("train", train_ds), ("val", val_ds)):
        if mode == "precomputed" and ds is not None and "ref_chosen_logp" not in ds.columns():
            raise UserError(f"train: dpo.reference=precomputed but the {name} data has no ref_chosen_logp column")
    t = config.train
    return _fit(
        "dpo",
        config,
        name=t.run_name,
        datasets={"train": train_ds, "val": val_ds},
        batch_size=t.batch_size,
        epochs=t.epochs,
        max_steps=t.max_steps,
        lr=t.lr,
        init_checkpoint=init_checkpoint,
        reference_checkpoint=reference_checkpoint if mode == "live" else None,
        run_id=run_id,
        tracking_uri=tracking_uri,
        pad_id=pad_id,
        callbacks=callbacks,
    )


def train_sft(
    config: Config,
    sft_ds: ray.data.Dataset,
    *,
    init_checkpoint: str,
    run_id: str | None,
    tracking_uri: str | None,
    pad_id: int,
) -> TrainResult:
    """SFT for `sft.epochs` at `sft.lr`, global batch `sft.batch_size`; metrics `sft/*`. Ray run `<run_name>-sft`
    (re-running resumes it like DPO). The loss is the mean NLL over every response token of the GLOBAL batch."""
    s = config.sft
    return _fit(
        "sft",
        config,
        name=f"{config.train.run_name}-sft",
        datasets={"train": sft_ds},
        batch_size=s.batch_size,
        epochs=s.epochs,
        max_steps=None,
        lr=s.lr,
        init_checkpoint=init_checkpoint,
        reference_checkpoint=None,
        run_id=run_id,
        tracking_uri=tracking_uri,
        pad_id=pad_id,
    )


def _fit(
    task: Literal["dpo", "sft"],
    config: Config,
    *,
    name: str,
    datasets: dict[str, ray.data.Dataset | None],
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    lr: float,
    init_checkpoint: str,
    reference_checkpoint: str | None,
    run_id: str | None,
    tracking_uri: str | None,
    pad_id: int,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> TrainResult:
    t = config.train
    workers, accum = t.num_workers, t.grad_accum
    if batch_size % (workers * accum):
        raise UserError(
            f"config: train.batch_size={batch_size} must be a multiple of train.num_workers * train.grad_accum "
            f"= {workers * accum} (equal micro-batches on every worker)"
        )
    datasets = {k: v for k, v in datasets.items() if v is not None}
    rows = datasets["train"].count()
    steps_per_epoch = rows // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"config: batch size {batch_size} exceeds the {rows} training rows")
    micro = batch_size // (workers * accum)
    spec = WorkerSpec(
        task=task,
        config=config,
        init_checkpoint=_abs(init_checkpoint),
        reference_checkpoint=_abs(reference_checkpoint),
        micro_batch=micro,
        steps_per_epoch=steps_per_epoch,
        total_steps=max_steps if max_steps is not None else epochs * steps_per_epoch,
        lr=lr,
        pad_id=pad_id,
        metric_prefix="train" if task == "dpo" else task,
        val_prefix="val" if task == "dpo" else f"{task}_val",
        perf_key="perf/tokens_per_s" if task == "dpo" else f"perf/{task}_tokens_per_s",
        run_id=run_id,
        tracking_uri=tracking_uri,
        fail_at=os.environ.get(FAIL_ENV),
    )
    datasets = {k: _with_row_index(v) for k, v in datasets.items()}
    storage = t.storage_path if "://" in t.storage_path else _abs(t.storage_path)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=GlobalBatchShards({"train": micro, "val": 1}),
    )
    result = trainer.fit()
    out = result.return_value or {}
    if out.get("error"):
        raise TrainingDivergedError(out["error"])
    if result.checkpoint is None:
        raise RuntimeError(f"train: run {name!r} finished without a checkpoint")
    return TrainResult(
        checkpoint=result.checkpoint.path,
        steps=out.get("steps", 0),
        metrics=out.get("metrics", {}),
        resumed_from=out.get("resumed_from", 0),
    )


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


SHARD_TASK_CPUS = 0.25


@ray.remote(num_cpus=SHARD_TASK_CPUS)
def _num_rows(table: pa.Table) -> int:
    return table.num_rows


@ray.remote(num_cpus=SHARD_TASK_CPUS)
def _add_row_index(table: pa.Table, start: int) -> pa.Table:
    return table.append_column(ROW, pa.array(np.arange(start, start + table.num_rows, dtype=np.int64)))


def _with_row_index(ds: ray.data.Dataset) -> ray.data.MaterializedDataset:
    """Number the rows 0..n-1 in dataset order, block by block (Dataset.zip is deprecated)."""
    blocks = ds.to_arrow_refs()
    starts = np.cumsum([0, *ray.get([_num_rows.remote(b) for b in blocks])])
    return ray.data.from_arrow_refs([_add_row_index.remote(b, int(s)) for b, s in zip(blocks, starts, strict=False)])


def _owned(row: dict[str, Any], *, block: int, world: int, rank: int) -> bool:
    return (row[ROW] // block) % world == rank


class GlobalBatchShards(ray.train.DataConfig):
    """Deterministic shards: rank r gets the blocks of `block[name]` consecutive rows numbered r, r+W, r+2W, ...

    With block = micro-batch size every optimizer step sees the same global rows for any number of workers
    (`streaming_split` hands blocks to whichever worker asks first), and a resumed run can skip exactly the
    micro-batches it already trained on. Each rank filters the full row stream: fine for token-id rows.
    """

    def __init__(self, block: dict[str, int]):
        super().__init__(datasets_to_split="all")
        self.block = block

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        shards: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for rank in range(world_size):
                owned = functools.partial(_owned, block=self.block.get(name, 1), world=world_size, rank=rank)
                # light per-row work: a whole CPU per task (Ray's default) can starve beside the trainer's workers
                shard = ds.filter(owned, num_cpus=SHARD_TASK_CPUS).drop_columns([ROW], num_cpus=SHARD_TASK_CPUS)
                shard.context.execution_options = self._resolve_execution_options(name)
                shard.context.execution_options.preserve_order = True  # row order = global batch membership
                shards[rank][name] = shard.iterator()
        return shards
