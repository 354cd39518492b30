"""The per-worker training loop of a Ray Train `TorchTrainer`: setup, one global batch per step, validation,
reports, checkpoints and resume. What it trains comes from a `Task` (`ray_dpo.stages.train.tasks`).

Why the loss does not depend on the number of workers: every optimizer step consumes exactly one GLOBAL batch of
`batch_size` rows. Rank r holds the micro-batches r, r+W, r+2W, ... of one fixed row order (`train.shards`),
so step s is always rows [s*G, (s+1)*G) whatever W and grad_accum are. Each micro-batch contributes
`loss_sum * W / global_count` to the backward pass and DDP averages over W ranks: the gradient is the global mean.

Workers never log to MLflow: they `ray.train.report` each logged step (train metrics, validation, checkpoints) and the
driver logs what rank 0 reported (`ray_dpo.stages.train.driver`). All collectives run on the process group's device.

Failure injection for tests: RAY_DPO_FAIL_AT="step:rank:/abs/marker" in the driver's env (see `maybe_fail`); it
applies to the DPO stage only, so a recipe with an SFT stage first still fails where the test expects.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ray_dpo.config import ModelSettings
from ray_dpo.core import checkpoint as layout
from ray_dpo.core.checkpoint import load_training_state, save_training_state
from ray_dpo.core.dpo import mix_into
from ray_dpo.core.encoding import ENCODING_FILE
from ray_dpo.core.kinds import is_peft
from ray_dpo.core.logps import LogpsModel, core_model
from ray_dpo.errors import UserError
from ray_dpo.stages import models, storage
from ray_dpo.stages.train import checkpoints, parallel, shard_load
from ray_dpo.stages.train.shard_load import ShardSpec
from ray_dpo.stages.train.shards import Shard, micro_batches
from ray_dpo.stages.train.spec import WorkerSpec
from ray_dpo.stages.train.tasks import TASKS, Task

FAIL_ENV = "RAY_DPO_FAIL_AT"  # "step:rank:marker_path": that rank exits once at that step (failure-recovery tests)


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


def maybe_fail(spec: str | None, step: int, rank: int, run_path: tuple[Any, str], checkpoint_every: int) -> None:
    """Failure injection: this worker process dies once, at the start of `step`, once the last checkpoint due
    before it is complete in storage: right after it when `step` is a checkpoint step, inside the window where Ray
    may not have registered it yet."""
    if not spec:
        return
    fail_step, fail_rank, marker = spec.split(":", 2)
    if step == int(fail_step) and rank == int(fail_rank) and not os.path.exists(marker):
        filesystem, path = run_path
        due = step - step % checkpoint_every
        deadline = time.monotonic() + 60
        while due and time.monotonic() < deadline:
            newest = checkpoints.newest_complete(filesystem, path)
            if newest is not None and newest.step >= due:
                break
            time.sleep(0.05)
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
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
    encoding_files: dict[str, bytes]  # the tokenizer and encoding the run started with, saved in every checkpoint
    run_path: tuple[Any, str]  # (filesystem, path) of this run's checkpoints in storage
    known_checkpoints: set[str]  # checkpoint directories Ray knows (or will): never pruned here
    unsaved_reports: list[dict[str, Any]] = field(default_factory=list)  # reported since the last checkpoint


def setup_worker(spec: WorkerSpec) -> _Worker:
    """Model from the checkpoint to resume from (Ray's latest, or a newer complete one in storage) or
    `init_checkpoint`, distributed (DDP or FSDP), AdamW + warmup/cosine, the task."""
    t = spec.config.train
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, round(t.cpus_per_worker)))  # fractional CPUs: don't oversubscribe the cores
    models.reuse_freed_memory()
    device = ray.train.torch.get_device()
    bf16 = _use_bf16(t, device)
    _seed_everything(t.seed)
    run_storage = ctx.get_storage()
    run_path = (run_storage.storage_filesystem, run_storage.experiment_fs_path)
    resume = checkpoints.resume_checkpoint(ray.train.get_checkpoint(), *run_path)
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "metrics": {}}
    m = spec.config.model
    source = resume or spec.init_checkpoint
    sharded = layout.SHARDED_METADATA in models.file_names(source)  # listed: nothing downloaded
    if sharded != (resume is not None and t.strategy == "fsdp"):
        raise UserError(
            f"train: checkpoint {storage.checkpoint_uri(source)} was written with train.strategy="
            f"{'fsdp' if sharded else 'ddp'}; resume it with that strategy (or start a new train.run_name)"
        )
    adapters = bool(m.lora_r) and resume is None and models.kind(spec.init_checkpoint) != "ours"
    # TR-DPO with LoRA: the moving reference is a second adapter set on the same base
    reference_adapters = spec.task == "dpo" and spec.config.dpo.sync_ref_model and bool(m.lora_r)

    def prepare(model: nn.Module) -> nn.Module:  # before distributing (under FSDP: still on the meta device)
        if adapters:  # fresh adapters on the base: only they train
            model = with_lora(model, m, t.seed)
        if reference_adapters and is_peft(model):  # a resume then reads its values from the checkpoint
            models.add_reference_adapter(model)
        if m.gradient_checkpointing:
            models.enable_gradient_checkpointing(model)
        return model

    with storage.small_files(source, (*layout.TOKENIZER_FILES, ENCODING_FILE, layout.STATE_FILE)) as directory:
        encoding_files = {  # the tokenizer and encoding the run started with, saved into every checkpoint
            name: (Path(directory) / name).read_bytes()
            for name in (*layout.TOKENIZER_FILES, ENCODING_FILE)
            if (Path(directory) / name).is_file()
        }
        if resume is not None:
            state = json.loads((Path(directory) / layout.STATE_FILE).read_text())
    if t.strategy == "fsdp":  # each rank allocates and reads only its shard
        model = shard_load.build_sharded(
            source, device, spec=ShardSpec(bf16_compute=bf16, prepare=prepare), seed=t.seed
        )
        if t.compile:
            core_model(model).compile()
    else:
        # a LoRA base is frozen: held in bf16 under bf16 compute (half its memory; the adapters stay fp32)
        dtype = torch.bfloat16 if bf16 and m.lora_r else None
        with storage.local_directory(source) as directory:
            model = prepare(models.load(directory, trainable=True, dtype=dtype))
        if adapters:
            shard_load.init_adapters(model, t.seed)
        if t.compile:
            model.compile()
        # the module DDP wraps scores inside its forward: gradient sync covers the (chunked) head too
        model = parallel.distribute(LogpsModel(model), "ddp", device, bf16=bf16)
    if reference_adapters and adapters:  # the reference starts as the trained adapters do: the base itself
        pairs = models.reference_adapter_pairs(core_model(model))
        mix_into([(reference, trained) for _, reference, trained in pairs], 1.0)
    # fused: one kernel over all parameters, on CPU and CUDA alike (torch >= 2.4); FSDP's sharded (DTensor)
    # parameters take the foreach implementation
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trained, lr=spec.lr, weight_decay=t.weight_decay, fused=t.strategy == "ddp")
    schedule = functools.partial(lr_factor, warmup=t.warmup_steps, total=spec.total_steps, min_ratio=t.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    task = TASKS[spec.task](spec, model, device, state.get("task", {}))
    if resume is not None:  # after distributing: optimizer state lands on the parameters' devices and shards
        if sharded:  # this rank reads its own shard files, straight from storage
            parallel.load_sharded(storage.as_checkpoint(resume), model, optimizer, scheduler, extra=task.tensors())
        else:
            with storage.local_directory(resume) as directory:
                optimizer_state, _ = load_training_state(directory)
                _load_task_tensors(directory, task)
            optimizer.load_state_dict(optimizer_state["optimizer"])
            scheduler.load_state_dict(optimizer_state["scheduler"])
    known = set()
    if ctx.get_world_rank() == 0:
        reported = ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
        known = {r.checkpoint.path.rstrip("/").rsplit("/", 1)[-1] for r in reported}
    return _Worker(
        spec=spec,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        task=task,
        autocast=functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16),
        state=state,
        encoding_files=encoding_files,
        run_path=run_path,
        known_checkpoints=known,
    )


def _load_task_tensors(directory: str, task: Task) -> None:
    """A DDP checkpoint's task tensors (TR-DPO's reference) back into the task's own, in place."""
    tensors = task.tensors()
    if not tensors:
        return
    path = Path(directory) / layout.REFERENCE_FILE
    if not path.is_file():
        raise UserError(
            f"train: checkpoint {directory} has no {layout.REFERENCE_FILE}: it was written without "
            "dpo.sync_ref_model=true; resume it with the settings it was written with (or start a new train.run_name)"
        )
    saved = load_file(str(path))
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(saved[name])


def with_lora(model: nn.Module, m: ModelSettings, seed: int) -> nn.Module:
    """`model.lora_*`'s adapters on `model`."""
    kwargs = dict(alpha=m.lora_alpha, dropout=m.lora_dropout, target_modules=m.lora_target_modules)
    return models.add_lora(model, r=m.lora_r, seed=seed, **kwargs)


def _use_bf16(train: Any, device: torch.device) -> bool:
    """bf16 autocast where the device supports it (CPU, Ampere+ GPUs); otherwise fp32, said once in the log."""
    if train.precision != "bf16":
        return False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print(f"train.precision=bf16: not supported on {torch.cuda.get_device_name(device)}; training in fp32")
        return False
    return True


def train_step(w: _Worker, batches: list[dict[str, Tensor]]) -> tuple[list[float], float, float]:
    """Forward/backward of one global batch -> (all-reduced metric sums + tokens, global count, grad norm).

    Each micro-batch backpropagates `loss_sum * W / global_count`; DDP averages over W ranks, so the gradient
    is the mean over the GLOBAL batch. Gradients are all-reduced once per step (no_sync on the others).
    """
    task, model, accum = w.task, w.model, len(batches)
    global_count = all_reduce_sum(torch.tensor(float(sum(map(task.count, batches)))), w.device).item()
    sums = torch.zeros(len(task.summed) + 1, dtype=torch.float64)
    with w.autocast():
        contexts = task.prepare(batches, True)  # statistics of the whole global batch, for the losses that read them
    for i, batch in enumerate(batches):
        with parallel.gradient_sync(model, i == accum - 1), w.autocast():
            loss_sum, metric_sums, _, tokens = task.score(batch, True, contexts[i])
            (loss_sum * w.world / global_count).backward()
        sums += torch.tensor([*(float(metric_sums[k]) for k in task.summed), tokens], dtype=torch.float64)
    grad_norm = parallel.grad_norm(model, w.spec.config.train.grad_clip)
    return all_reduce_sum(sums, w.device).tolist(), global_count, grad_norm


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function: setup, then one global batch per step; validation, reports and checkpoints."""
    spec, shards = loop_config["spec"], loop_config["shards"]
    w = setup_worker(spec)
    t, state = spec.config.train, w.state
    train_shard: Shard = shards["train"][w.rank]
    val_shard: Shard | None = shards["val"][w.rank] if "val" in shards else None
    resumed_from, metrics, rows_read = state["step"], dict(state["metrics"]), 0
    for report in state.get("reports", []):  # a crash may have lost them before the driver saw them: sent again,
        ray.train.report(report)  # the driver logs each step once
    while state["step"] < spec.total_steps:
        skip = state["epoch_step"] * t.grad_accum * spec.micro_batch  # data position: what the checkpoint trained on
        batches = micro_batches(train_shard, spec.micro_batch, w.task.collate, skip_rows=skip)
        rows_read = 0  # rows this rank reads in this epoch
        while state["epoch_step"] < spec.steps_per_epoch and state["step"] < spec.total_steps:
            step, started = state["step"], time.perf_counter()
            maybe_fail(spec.fail_at, step, w.rank, w.run_path, t.checkpoint_every)
            torch.manual_seed(t.seed + 1_000_003 * step + w.rank)  # dropout RNG: a function of (seed, step, rank)
            try:
                step_batches = [next(batches) for _ in range(t.grad_accum)]
            except StopIteration:  # cannot happen: steps_per_epoch comes from the driver's row count
                raise RuntimeError(
                    f"train: rank {w.rank} ran out of rows at step {step}, epoch {state['epoch']}"
                ) from None
            rows_read += sum(len(b["prompt_len"]) for b in step_batches)
            sums, count, grad_norm = train_step(w, step_batches)
            loss = sums[0] / count  # the first metric is the loss
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
            w.task.after_step(step + 1)  # TR-DPO: the reference follows the policy every tau steps
            if t.strategy == "fsdp":
                models.return_freed_memory()
            state.update(step=step + 1, epoch_step=state["epoch_step"] + 1)
            p = spec.metric_prefix
            *totals, tokens = sums
            fresh = {
                f"{p}/{k}": v for k, v in w.task.metrics(dict(zip(w.task.summed, totals, strict=True)), count).items()
            }
            fresh.update({f"{p}/lr": lr, f"{p}/grad_norm": grad_norm})
            fresh[spec.perf_key] = tokens / (time.perf_counter() - started)
            metrics = _after_step(w, fresh, val_shard)
            if state["epoch_step"] == 0:  # _after_step rolled over to the next epoch
                break
    rows_read = int(all_reduce_sum(torch.tensor(float(rows_read)), w.device).item())
    return {"steps": state["step"], "metrics": metrics, "resumed_from": resumed_from, "rows_read": rows_read}


def _after_step(w: _Worker, fresh: dict[str, float], val_shard: Shard | None) -> dict[str, float]:
    """Validate, roll the epoch over, report (with a checkpoint when due). Returns the metrics kept for the result.
    A report carries only this step's metrics: the driver logs each once."""
    spec, t, state = w.spec, w.spec.config.train, w.state
    step, last = state["step"], state["step"] == spec.total_steps
    report = fresh if step % t.log_every == 0 or last else {}
    if val_shard is not None and (step % t.eval_every == 0 or last):
        report = {**report, **validation_metrics(w, val_shard)}
    state["metrics"] = {**state["metrics"], **fresh, **report}
    if state["epoch_step"] == spec.steps_per_epoch:  # a checkpoint taken now resumes at the next epoch's start
        state.update(epoch=state["epoch"] + 1, epoch_step=0)
    report = {**report, "step": step, "total_steps": spec.total_steps}
    if step % t.checkpoint_every == 0 or last:
        # the reports since the last checkpoint travel with this one: a group that resumes from it sends them again
        state["reports"], w.unsaved_reports = [*w.unsaved_reports, report], []
        save_checkpoint(w, report)
    elif len(report) > 2:  # something to log (every log_every steps and at validations)
        ray.train.report(report)
        w.unsaved_reports.append(report)
    return state["metrics"]


def validation_metrics(w: _Worker, shard: Shard) -> dict[str, float]:
    """Metrics over the whole validation split: every rank scores its rows, sums and counts are all-reduced. Losses
    that read statistics of the batch read those of the whole split (`Task.prepare`)."""
    task, module = w.task, parallel.unwrap(w.model)
    module.eval()
    sums = torch.zeros(len(task.summed) + 1, dtype=torch.float64)
    with torch.no_grad(), w.autocast():
        batches = list(micro_batches(shard, w.spec.micro_batch, task.collate, drop_last=False))
        for batch, context in zip(batches, task.prepare(batches, False), strict=True):
            _, metric_sums, count, _ = task.score(batch, False, context)
            sums += torch.tensor([*(float(metric_sums[k]) for k in task.summed), count], dtype=torch.float64)
    module.train()
    *totals, count = all_reduce_sum(sums, w.device).tolist()
    metrics = task.metrics(dict(zip(task.summed, totals, strict=True)), count)
    return {f"{w.spec.val_prefix}/{k}": v for k, v in metrics.items()}


def save_checkpoint(w: _Worker, metrics: dict[str, float]) -> None:
    """Write the checkpoint layout (docs/ARCHITECTURE.md) and a manifest to a temp dir and report it, uploaded
    asynchronously under `checkpoint_step_<step>`: rank 0 alone with DDP, every rank its shard with FSDP (Ray merges
    them into one directory). Every rank must call `report`. Then rank 0 prunes superseded checkpoints Ray never
    registered (crash leftovers)."""
    name = checkpoints.directory_name(w.state["step"])
    sharded = w.spec.config.train.strategy == "fsdp"
    if not sharded and w.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    directory = Path(tempfile.mkdtemp(prefix="ray-dpo-ckpt-"))
    state = {**w.state, "task": w.task.state(), "seed": w.spec.config.train.seed}
    core = core_model(w.model)
    base = storage.checkpoint_uri(w.spec.init_checkpoint)  # LoRA: adapters point at the staged base
    tensors = w.task.tensors()  # TR-DPO's moving reference: a resume must continue from it, not the original
    if sharded:  # every rank its shard; no rank gathers the whole model (readers load shards: models.load)
        parallel.save_sharded(directory, w.model, w.optimizer, w.scheduler, extra=tensors)
        last = w.state["step"] == w.spec.total_steps
        # small: gathered whole; the policy's adapters only (TR-DPO's reference adapters are in the shards)
        adapters = parallel.full_adapters(w.model) if last and is_peft(core) else None
        adapters = models.without_reference_adapter(adapters) if adapters is not None else None
        if w.rank == 0:
            models.save_config(directory, core)
            if adapters is not None:  # the last checkpoint of LoRA training: the adapters on their staged base
                models.save_adapters(directory, core, adapters, base=base)
            save_training_state(directory, None, state)
    else:
        models.save(directory, core, base=base)
        payload = {"optimizer": w.optimizer.state_dict(), "scheduler": w.scheduler.state_dict()}
        save_training_state(directory, payload, state)
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, directory / layout.REFERENCE_FILE)
    if w.rank == 0:
        for file_name, content in w.encoding_files.items():
            (directory / file_name).write_bytes(content)
    checkpoints.write_manifest(directory, rank=w.rank, world=w.world if sharded else 1)
    # ASYNC: training goes on while the files upload; Ray deletes the temp dir afterwards
    ray.train.report(
        metrics,
        checkpoint=Checkpoint.from_directory(str(directory)),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
    )
    if w.rank == 0:
        w.known_checkpoints.add(name)
        checkpoints.prune_unregistered(*w.run_path, keep=w.known_checkpoints)
