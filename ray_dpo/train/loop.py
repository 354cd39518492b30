"""The per-worker training loop of a Ray Train `TorchTrainer`: setup, one global batch per step, validation,
rank-0 MLflow logging, checkpoints and resume. What it trains comes from a `Task` (`ray_dpo.train.tasks`).

Why the loss does not depend on the number of workers: every optimizer step consumes exactly one GLOBAL batch of
`batch_size` rows. Rank r holds the micro-batches r, r+W, r+2W, ... of one fixed row order (the driver's sharding,
`ray_dpo.train.driver`), so step s is always rows [s*G, (s+1)*G) whatever W and grad_accum are. Each micro-batch
contributes `loss_sum * W / global_count` to the backward pass and DDP averages over W ranks: the gradient is the
global mean.

Failure injection for tests: RAY_DPO_FAIL_AT="step:rank:/abs/marker" in the driver's env (see `maybe_fail`).
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
from typing import Any, Literal

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ray_dpo.checkpoint import load_model, load_training_state, save_model, save_training_state
from ray_dpo.config import Config
from ray_dpo.tokenizer import TOKENIZER_FILE
from ray_dpo.train.tasks import TASKS, Task

FAIL_ENV = "RAY_DPO_FAIL_AT"  # "step:rank:marker_path": that rank exits once at that step (failure-recovery tests)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, typed: built by the driver, pickled once into `train_loop_config`."""

    task: Literal["dpo", "sft"]
    config: Config
    init_checkpoint: str  # weights (and tokenizer) the run starts from
    reference_checkpoint: str | None  # the frozen reference (dpo.reference=live)
    micro_batch: int  # rows per micro-batch on one rank
    steps_per_epoch: int
    total_steps: int
    lr: float
    pad_id: int
    metric_prefix: str  # "train" (DPO) or "sft": train metrics are `<prefix>/loss`, ...
    val_prefix: str  # "val" or "sft_val"
    perf_key: str  # tokens/s metric name
    run_id: str | None = None  # the MLflow run the driver created (rank 0 logs into it)
    tracking_uri: str | None = None
    fail_at: str | None = None  # failure injection (FAIL_ENV)


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def all_reduce_sum(values: Tensor, device: torch.device) -> Tensor:
    """Sum of `values` over all ranks, ON `device` (the process group's: NCCL rejects CPU tensors). The result
    stays on `device`; read it with `.tolist()` / `.item()`."""
    values = values.to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def maybe_fail(spec: str | None, step: int, rank: int) -> None:
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

    spec: WorkerSpec
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    task: Task
    autocast: Callable[[], Any]
    state: dict[str, Any]  # step, epoch, epoch_step (optimizer steps into the epoch), metrics


def setup_worker(spec: WorkerSpec) -> _Worker:
    """Model from the latest checkpoint (resume) or `init_checkpoint`, DDP, AdamW + warmup/cosine, the task."""
    t = spec.config.train
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
        model = load_model(spec.init_checkpoint)
    if t.compile:
        model.compile()
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU); moves to device
    # fused: one kernel over all parameters, on CPU and CUDA alike (torch >= 2.4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=t.weight_decay, fused=True)
    schedule = functools.partial(lr_factor, warmup=t.warmup_steps, total=spec.total_steps, min_ratio=t.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if optimizer_state is not None:  # after prepare_model: the state is cast to the parameters' device
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    return _Worker(
        spec=spec,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        task=TASKS[spec.task](spec, model, device),
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


def train_step(w: _Worker, micro_batches: list[dict[str, Tensor]]) -> tuple[list[float], float, float]:
    """Forward/backward of one global batch -> (all-reduced metric sums + tokens, global count, grad norm).

    Each micro-batch backpropagates `loss_sum * W / global_count`; DDP averages over W ranks, so the gradient
    is the mean over the GLOBAL batch. Gradients are all-reduced once per step (no_sync on the others).
    """
    task, model, accum = w.task, w.model, len(micro_batches)
    global_count = all_reduce_sum(torch.tensor(float(sum(map(task.count, micro_batches)))), w.device).item()
    sums = torch.zeros(len(task.metric_names) + 1, dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        sync = i == accum - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync(), w.autocast():
            loss_sum, metric_sums, _, tokens = task.score(batch, True)
            (loss_sum * w.world / global_count).backward()
        sums += torch.tensor([*(metric_sums[k].item() for k in task.metric_names), tokens], dtype=torch.float64)
    clip = w.spec.config.train.grad_clip
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf).item()
    return all_reduce_sum(sums, w.device).tolist(), global_count, grad_norm


def train_loop(loop_config: dict[str, WorkerSpec]) -> dict[str, Any]:
    """The per-worker function: setup, then one global batch per step; validation, logging and checkpoints."""
    spec = loop_config["spec"]
    w = setup_worker(spec)
    t, state = spec.config.train, w.state
    tracker = _Tracker(spec, w.rank)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), _optional_shard("val")
    resumed_from, metrics = state["step"], dict(state["metrics"])
    while state["step"] < spec.total_steps:
        batches = iter(
            train_shard.iter_torch_batches(batch_size=spec.micro_batch, collate_fn=w.task.collate, drop_last=True)
        )
        for _ in range(state["epoch_step"] * t.grad_accum):  # data position: skip what the checkpoint trained on
            next(batches)
        while state["epoch_step"] < spec.steps_per_epoch and state["step"] < spec.total_steps:
            step, started = state["step"], time.perf_counter()
            maybe_fail(spec.fail_at, step, w.rank)
            torch.manual_seed(t.seed + 1_000_003 * step + w.rank)  # dropout RNG: a function of (seed, step, rank)
            try:
                micro_batches = [next(batches) for _ in range(t.grad_accum)]
            except StopIteration:  # cannot happen: steps_per_epoch comes from the driver's row count
                raise RuntimeError(
                    f"train: rank {w.rank} ran out of rows at step {step}, epoch {state['epoch']}"
                ) from None
            sums, count, grad_norm = train_step(w, micro_batches)
            loss = sums[0] / count
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # identical on every rank: all stop
                return {
                    "error": f"train: non-finite {spec.metric_prefix} loss ({loss}) or grad norm ({grad_norm}) at "
                    f"step {step + 1}; stopped before updating weights, latest checkpoint kept. "
                    "Lower train.lr, raise train.warmup_steps or check the data.",
                    "steps": step,
                }
            lr = w.scheduler.get_last_lr()[0]
            w.optimizer.step()
            w.scheduler.step()
            w.optimizer.zero_grad(set_to_none=True)
            step += 1
            state.update(step=step, epoch_step=state["epoch_step"] + 1)
            p = spec.metric_prefix
            metrics = {f"{p}/{k}": sums[i] / count for i, k in enumerate(w.task.metric_names)}
            metrics.update({f"{p}/lr": lr, f"{p}/grad_norm": grad_norm})
            metrics[spec.perf_key] = sums[-1] / (time.perf_counter() - started)
            metrics = _after_step(w, metrics, val_shard, tracker)
            if state["epoch_step"] == 0:  # _after_step rolled over to the next epoch
                break
    return {"steps": state["step"], "metrics": metrics, "resumed_from": resumed_from}


def _after_step(w: _Worker, metrics: dict[str, float], val_shard, tracker: _Tracker) -> dict[str, float]:
    """Log, validate, roll the epoch over, checkpoint or report. Returns the metrics kept for the result."""
    spec, t, state = w.spec, w.spec.config.train, w.state
    step, last = state["step"], state["step"] == spec.total_steps
    if step % t.log_every == 0 or last:
        tracker.log(metrics, step)
    report = {}
    if val_shard is not None and (step % t.eval_every == 0 or last):
        report = validation_metrics(w, val_shard)
        tracker.log(report, step)
    metrics = {**state["metrics"], **metrics, **report}
    state["metrics"] = metrics
    if state["epoch_step"] == spec.steps_per_epoch:  # a checkpoint taken now resumes at the next epoch's start
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


def validation_metrics(w: _Worker, shard) -> dict[str, float]:
    """Metrics over the whole validation split: every rank scores its rows, sums and counts are all-reduced."""
    task, module = w.task, getattr(w.model, "module", w.model)
    module.eval()
    sums = torch.zeros(len(task.metric_names) + 1, dtype=torch.float64)
    with torch.no_grad(), w.autocast():
        for batch in shard.iter_torch_batches(batch_size=w.spec.micro_batch, collate_fn=task.collate):
            _, metric_sums, count, _ = task.score(batch, False)
            sums += torch.tensor([*(metric_sums[k].item() for k in task.metric_names), count], dtype=torch.float64)
    module.train()
    *totals, count = all_reduce_sum(sums, w.device).tolist()
    return {
        f"{w.spec.val_prefix}/{k}": total / max(count, 1.0) for k, total in zip(task.metric_names, totals, strict=True)
    }


def save_checkpoint(w: _Worker, metrics: dict[str, float]) -> None:
    """Rank 0 writes the checkpoint layout (docs/ARCHITECTURE.md) to a temp dir and reports it; every rank must
    call `report`."""
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    directory = Path(tempfile.mkdtemp(prefix="ray-dpo-ckpt-"))
    try:
        save_model(directory, w.model)
        tokenizer = Path(w.spec.init_checkpoint) / TOKENIZER_FILE
        if tokenizer.is_file():
            shutil.copy(tokenizer, directory / TOKENIZER_FILE)
        payload = {"optimizer": w.optimizer.state_dict(), "scheduler": w.scheduler.state_dict()}
        save_training_state(directory, payload, {**w.state, "seed": w.spec.config.train.seed})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _Tracker:
    """Rank 0 logs to the MLflow run the driver created; other ranks do nothing (never a run per worker)."""

    def __init__(self, spec: WorkerSpec, rank: int):
        self.enabled = rank == 0 and bool(spec.run_id) and bool(spec.tracking_uri)
        self.uri, self.run_id = spec.tracking_uri, spec.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            from ray_dpo import tracking

            tracking.log_metrics(self.uri, self.run_id, metrics, step=step)
