"""Ray Train (V2) DPO: one `TorchTrainer` of N DDP workers, checkpoints, resume, validation, rank-0 MLflow logging.

    result = train_dpo(config, train_ds, val_ds, run_id=..., tracking_uri=..., init_checkpoint=ckpt,
                       reference_checkpoint=ckpt, pad_id=tok.pad_id)   # -> TrainResult(checkpoint, steps, ...)

Layout: driver side (`train_dpo` -> `run_training`: TorchTrainer, RunConfig(name, storage_path), CheckpointConfig,
FailureConfig, `GlobalBatchShards`), then worker side (`setup_worker`, `train_step`, `train_loop`, `validate`,
`save_checkpoint`). Failure injection for tests: RAY_DPO_FAIL_AT="step:rank:/abs/marker" in the driver's env.

The worker loop (`train_loop`) is generic over a `Task` (how to collate a batch and score it); DPO is the task here,
the SFT warm start (`ray_dpo.sft`) is another one on the same machinery.

Why the loss does not depend on the number of workers: every optimizer step consumes exactly one GLOBAL batch of
`train.batch_size` rows. `GlobalBatchShards` hands rank r the micro-batches r, r+W, r+2W, ... of one fixed row order,
so step s is always rows [s*G, (s+1)*G) whatever W and grad_accum are. Each micro-batch contributes
`loss_sum * W / global_count` to the backward pass and DDP averages over W ranks: the gradient is the global mean.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ray_dpo.checkpoint import load_model, load_training_state, save_model, save_training_state
from ray_dpo.config import Config, config_from_dict
from ray_dpo.dpo import DPO
from ray_dpo.errors import UserError
from ray_dpo.tokenizer import TOKENIZER_FILE

ROW = "_row"  # global row index column added before fit: fixes which rows form each global batch
FAIL_ENV = "RAY_DPO_FAIL_AT"  # "step:rank:marker_path": that rank exits once at that step (failure-recovery tests)
DPO_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class TrainingDivergedError(UserError):
    """The loss or gradient norm became NaN/Inf; training stopped before that step changed weights."""


@dataclass
class TrainResult:
    checkpoint: str  # final checkpoint directory (model.safetensors, optimizer.pt, state.json, ...)
    steps: int  # optimizer steps done in total (including those before a resume)
    metrics: dict[str, float]  # last train/* and val/* metrics
    resumed_from: int = 0  # step of the checkpoint the last worker group started from (0 = fresh start)


@dataclass
class Task:
    """What a worker trains: `collate` numpy rows -> tensors; `score(batch, training)` ->
    (loss_sum, metric_sums, count, tokens): sums over the batch's `count` units (pairs for DPO, tokens for SFT)."""

    collate: Callable[[dict[str, np.ndarray]], dict[str, Tensor]]
    count: Callable[[dict[str, Tensor]], float]
    score: Callable[[dict[str, Tensor], bool], tuple[Tensor, dict[str, Tensor], float, float]]
    metric_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- driver side


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
    callbacks: list[ray.train.UserCallback] | None = None,
) -> TrainResult:
    """DPO on `train.num_workers` DDP workers starting from `init_checkpoint`; live reference from
    `reference_checkpoint` (identical on every rank) unless `dpo.reference == "precomputed"` or reference-free.
    Re-running with the same `train.run_name` and `train.storage_path` resumes from the latest checkpoint."""
    live = config.dpo.reference == "live" and not config.dpo.reference_free
    if live and not reference_checkpoint:
        raise UserError("train: dpo.reference=live needs a reference checkpoint")
    precomputed = config.dpo.reference == "precomputed" and not config.dpo.reference_free
    for name, ds in (("train", train_ds), ("val", val_ds)):
        if precomputed and ds is not None and "ref_chosen_logp" not in ds.columns():
            raise UserError(f"train: dpo.reference=precomputed but the {name} data has no ref_chosen_logp column")
    loop = {"reference_checkpoint": _abs(reference_checkpoint) if live else None}
    return run_training(
        make_dpo_task,
        config,
        name=config.train.run_name,
        datasets={"train": train_ds, "val": val_ds},
        batch_size=config.train.batch_size,
        epochs=config.train.epochs,
        lr=config.train.lr,
        init_checkpoint=init_checkpoint,
        run_id=run_id,
        tracking_uri=tracking_uri,
        pad_id=pad_id,
        prefix="train",
        max_steps=config.train.max_steps,
        extra=loop,
        callbacks=callbacks,
    )


def run_training(
    make_task: Callable[..., Task],
    config: Config,
    *,
    name: str,
    datasets: dict[str, ray.data.Dataset | None],
    batch_size: int,
    epochs: int,
    lr: float,
    init_checkpoint: str,
    run_id: str | None,
    tracking_uri: str | None,
    pad_id: int,
    prefix: str,
    max_steps: int | None = None,
    extra: dict[str, Any] | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,  # e.g. Tune's TuneReportCallback in a sweep trial
) -> TrainResult:
    """Build and fit the TorchTrainer shared by DPO and SFT; `make_task(config, loop, model, device) -> Task`."""
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
    total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
    micro = batch_size // (workers * accum)
    loop = {
        "config": config.to_dict(),
        "init_checkpoint": _abs(init_checkpoint),
        "micro_batch": micro,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "lr": lr,
        "prefix": prefix,
        "pad_id": pad_id,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "fail_at": os.environ.get(FAIL_ENV),
        **(extra or {}),
    }
    # materialize: on a 2-CPU machine a lazy dataset starves while the workers hold the CPUs (RAY-FACTS)
    datasets = {k: _with_row_index(v) for k, v in datasets.items()}
    storage = t.storage_path if "://" in t.storage_path else _abs(t.storage_path)
    trainer = ray.train.torch.TorchTrainer(
        functools.partial(train_loop, make_task=make_task),
        train_loop_config=loop,
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


# ---------------------------------------------------------------------------------------------- worker side


def make_dpo_task(config: Config, loop: dict[str, Any], model: nn.Module, device: torch.device) -> Task:
    from ray_dpo.data import collate_preferences  # imported on the worker: ray_dpo.data pulls in Ray Data

    d = config.dpo
    kwargs = dict(
        beta=d.beta,
        pad_id=loop["pad_id"],
        loss_type=d.loss_type,
        label_smoothing=d.label_smoothing,
        rpo_alpha=d.rpo_alpha,
        reference_free=d.reference_free,
        precomputed_reference=True,  # never deep-copy the (DDP) policy: the reference is loaded below
        reduction=d.reduction,
        prefix_sharing=d.prefix_sharing,
    )
    train_dpo, val_dpo = DPO(model, **kwargs), DPO(getattr(model, "module", model), **kwargs)
    if loop.get("reference_checkpoint"):  # identical on every rank because it comes from one checkpoint
        reference = load_model(loop["reference_checkpoint"], device).eval().requires_grad_(False)
        train_dpo.ref_model = val_dpo.ref_model = reference

    def score(batch: dict[str, Tensor], training: bool):
        if train_dpo.ref_model is None and not d.reference_free and "ref_chosen_logp" not in batch:
            raise UserError("train: dpo.reference=precomputed but the batch has no ref_chosen_logp column")
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, metrics = (train_dpo if training else val_dpo).batch_loss(batch)
        n = batch["chosen"].shape[0]
        tokens = (2 * batch["prompt_len"] + batch["chosen_len"] + batch["rejected_len"]).sum().item()
        return loss * n, {k: metrics[k] * n for k in DPO_METRICS}, float(n), float(tokens)

    return Task(
        collate=functools.partial(collate_preferences, pad_id=loop["pad_id"]),
        count=lambda batch: float(batch["chosen"].shape[0]),
        score=score,
        metric_names=DPO_METRICS,
    )


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _all_reduce_sum(values: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _maybe_fail(spec: str | None, step: int, rank: int) -> None:
    """Failure injection: exit this worker process once (a marker file records that it happened)."""
    if not spec:
        return
    fail_step, fail_rank, marker = spec.split(":", 2)
    if step == int(fail_step) and rank == int(fail_rank) and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        # Ray registers a reported checkpoint when its controller next polls the workers (every 2 s): dying
        # within that window would restart from an older one. Wait, as a real crash well after a checkpoint.
        time.sleep(6)
        os._exit(1)


@dataclass
class _Worker:
    """Everything one rank holds after setup."""

    config: Config
    loop: dict[str, Any]
    rank: int
    world: int
    model: nn.Module  # DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    task: Task
    autocast: Callable[[], Any]
    state: dict[str, Any]  # step, epoch, epoch_step (optimizer steps into the epoch), metrics


def setup_worker(loop: dict[str, Any], make_task: Callable[..., Task]) -> _Worker:
    """Model from the latest checkpoint (resume) or `init_checkpoint`, DDP, AdamW + warmup/cosine, the task."""
    config = config_from_dict(loop["config"])
    t = config.train
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, round(t.cpus_per_worker)))  # fractional CPUs: don't oversubscribe the cores
    device = ray.train.torch.get_device()
    _seed_everything(t.seed)
    state, optimizer_state = {"step": 0, "epoch": 0, "epoch_step": 0, "metrics": {}}, None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as directory:
            model = load_model(directory)
            optimizer_state, state = load_training_state(directory)
    else:
        model = load_model(loop["init_checkpoint"])
    if t.compile:
        model.compile()
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU); moves to device
    # fused: one kernel over all parameters, on CPU and CUDA alike (torch >= 2.4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop["lr"], weight_decay=t.weight_decay, fused=True)
    schedule = functools.partial(lr_factor, warmup=t.warmup_steps, total=loop["total_steps"], min_ratio=t.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if optimizer_state is not None:  # after prepare_model: the state is cast to the parameters' device
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    return _Worker(
        config=config,
        loop=loop,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        task=make_task(config, loop, model, device),
        autocast=functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=_use_bf16(t, device)),
        state=state,
    )


def _use_bf16(train: Any, device: torch.device) -> bool:
    """bf16 autocast where the device supports it (CPU, Ampere+ GPUs); otherwise fp32, said once in the log."""
    if train.precision != "bf16":
        return False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print(f"train.precision=bf16: not supported on {torch.cuda.get_device_name(device)}; training in fp32")
        return False
    return True


def train_step(w: _Worker, micro_batches: list[dict[str, Tensor]]) -> tuple[Tensor, float, float]:
    """Forward/backward of one global batch -> (all-reduced metric sums + tokens, global count, grad norm).

    Each micro-batch backpropagates `loss_sum * W / global_count`; DDP averages over W ranks, so the gradient
    is the mean over the GLOBAL batch. Gradients are all-reduced once per step (no_sync on the others).
    """
    task, model, accum = w.task, w.model, len(micro_batches)
    global_count = _all_reduce_sum(torch.tensor(float(sum(map(task.count, micro_batches))))).item()
    sums = torch.zeros(len(task.metric_names) + 1, dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        sync = i == accum - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync(), w.autocast():
            loss_sum, metric_sums, _, tokens = task.score(batch, True)
            (loss_sum * w.world / global_count).backward()
        sums += torch.tensor([*(metric_sums[k].item() for k in task.metric_names), tokens], dtype=torch.float64)
    clip = w.config.train.grad_clip
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf).item()
    return _all_reduce_sum(sums), global_count, grad_norm


def train_loop(loop: dict[str, Any], *, make_task: Callable[..., Task]) -> dict[str, Any]:
    """The per-worker function: setup, then one global batch per step; validation, logging and checkpoints."""
    w = setup_worker(loop, make_task)
    t, state = w.config.train, w.state
    accum, micro, prefix = t.grad_accum, loop["micro_batch"], loop["prefix"]
    total, per_epoch = loop["total_steps"], loop["steps_per_epoch"]
    tracker = _Tracker(loop, w.rank)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), _optional_shard("val")
    resumed_from, metrics = state["step"], dict(state["metrics"])
    while state["step"] < total:
        batches = iter(train_shard.iter_torch_batches(batch_size=micro, collate_fn=w.task.collate, drop_last=True))
        for _ in range(state["epoch_step"] * accum):  # data position: skip what the checkpoint already trained on
            next(batches)
        while state["epoch_step"] < per_epoch and state["step"] < total:
            step, started = state["step"], time.perf_counter()
            _maybe_fail(loop["fail_at"], step, w.rank)
            torch.manual_seed(t.seed + 1_000_003 * step + w.rank)  # dropout RNG: a function of (seed, step, rank)
            try:
                micro_batches = [next(batches) for _ in range(accum)]
            except StopIteration:  # cannot happen: steps_per_epoch comes from the driver's row count
                raise RuntimeError(
                    f"train: rank {w.rank} ran out of rows at step {step}, epoch {state['epoch']}"
                ) from None
            sums, count, grad_norm = train_step(w, micro_batches)
            loss = sums[0].item() / count
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # identical on every rank: all stop
                return {
                    "error": f"train: non-finite {prefix} loss ({loss}) or grad norm ({grad_norm}) at step {step + 1}; "
                    "stopped before updating weights, latest checkpoint kept. "
                    "Lower train.lr, raise train.warmup_steps or check the data.",
                    "steps": step,
                }
            lr = w.scheduler.get_last_lr()[0]
            w.optimizer.step()
            w.scheduler.step()
            w.optimizer.zero_grad(set_to_none=True)
            step += 1
            state.update(step=step, epoch_step=state["epoch_step"] + 1)
            metrics = {f"{prefix}/{k}": sums[i].item() / count for i, k in enumerate(w.task.metric_names)}
            metrics.update({f"{prefix}/lr": lr, f"{prefix}/grad_norm": grad_norm})
            perf = "perf/tokens_per_s" if prefix == "train" else f"perf/{prefix}_tokens_per_s"  # SFT: its own key
            metrics[perf] = sums[-1].item() / (time.perf_counter() - started)
            metrics = _after_step(w, metrics, val_shard, tracker)
            if state["epoch_step"] == 0:  # _after_step rolled over to the next epoch
                break
    return {"steps": state["step"], "metrics": metrics, "resumed_from": resumed_from}


def _after_step(w: _Worker, metrics: dict[str, float], val_shard, tracker: _Tracker) -> dict[str, float]:
    """Log, validate, roll the epoch over, checkpoint or report. Returns the metrics kept for the result."""
    t, state, step, prefix = w.config.train, w.state, w.state["step"], w.loop["prefix"]
    last = step == w.loop["total_steps"]
    if step % t.log_every == 0 or last:
        tracker.log(metrics, step)
    report = {}
    if val_shard is not None and (step % t.eval_every == 0 or last):
        val_prefix = "val" if prefix == "train" else f"{prefix}_val"
        report = validate(w.task, w.model, val_shard, w.autocast, batch_size=w.loop["micro_batch"], prefix=val_prefix)
        tracker.log(report, step)
    metrics = {**state["metrics"], **metrics, **report}
    state["metrics"] = metrics
    if state["epoch_step"] == w.loop["steps_per_epoch"]:  # a checkpoint taken now resumes at the next epoch's start
        state.update(epoch=state["epoch"] + 1, epoch_step=0)
    if step % t.checkpoint_every == 0 or last:
        save_checkpoint(w, {**metrics, "step": step})
    elif report:
        ray.train.report({**metrics, "step": step})  # lets Tune see validation between checkpoints
    return metrics


def _optional_shard(name: str):
    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, ValueError):
        return None


def validate(task: Task, model: nn.Module, shard, autocast, *, batch_size: int, prefix: str) -> dict[str, float]:
    """Metrics over the whole validation split: every rank scores its rows, sums and counts are all-reduced."""
    module = getattr(model, "module", model)  # no DDP hooks: ranks may hold different numbers of val rows
    module.eval()
    sums = torch.zeros(len(task.metric_names) + 1, dtype=torch.float64)
    with torch.no_grad(), autocast():
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=task.collate):
            _, metric_sums, count, _ = task.score(batch, False)
            sums += torch.tensor([*(metric_sums[k].item() for k in task.metric_names), count], dtype=torch.float64)
    module.train()
    sums = _all_reduce_sum(sums)
    count = max(sums[-1].item(), 1.0)
    return {f"{prefix}/{k}": sums[i].item() / count for i, k in enumerate(task.metric_names)}


def save_checkpoint(w: _Worker, metrics: dict[str, float]) -> None:
    """Rank 0 writes the DESIGN.md layout to a temp dir and reports it; every rank must call `report`."""
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    directory = Path(tempfile.mkdtemp(prefix="ray-dpo-ckpt-"))
    try:
        save_model(directory, w.model)
        tokenizer = Path(w.loop["init_checkpoint"]) / TOKENIZER_FILE
        if tokenizer.is_file():
            shutil.copy(tokenizer, directory / TOKENIZER_FILE)
        payload = {"optimizer": w.optimizer.state_dict(), "scheduler": w.scheduler.state_dict()}
        save_training_state(directory, payload, {**w.state, "seed": w.config.train.seed})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _Tracker:
    """Rank 0 logs to the MLflow run the driver created; other ranks do nothing (never a run per worker)."""

    def __init__(self, loop: dict[str, Any], rank: int):
        self.enabled = rank == 0 and bool(loop.get("run_id")) and bool(loop.get("tracking_uri"))
        self.uri, self.run_id = loop.get("tracking_uri"), loop.get("run_id")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            from ray_dpo import tracking

            tracking.log_metrics(self.uri, self.run_id, metrics, step=step)
