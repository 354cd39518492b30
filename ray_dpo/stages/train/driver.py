"""Driver side of training: build and fit ONE `TorchTrainer` (N DDP workers) for DPO or the SFT warm start.

    result = train_dpo(config, train_ds, val_ds, name="my-run", init_checkpoint=ckpt, reference_checkpoint=ckpt,
                       pad_id=tok.pad_id, mlflow_run=(uri, run_id))   # -> TrainResult(checkpoint, steps, ...)

`RunConfig(name=<run name>, storage_path=train.storage_path)`: re-running the same name resumes from the latest
checkpoint (`ray_dpo.stages.train.checkpoints`: also one Ray had not registered yet); `FailureConfig(max_failures)`
restarts a failed worker group from it. Rows are dealt to ranks once, here (`ray_dpo.stages.train.shards`). Workers
report metrics; a `UserCallback` on the controller relays them to this process, which logs them to MLflow (never a
step twice) and shows progress: workers never talk to MLflow, so a SQLite store on the driver's disk works on a
cluster too.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint
from ray.util.queue import Empty, Queue

from ray_dpo.config import Config
from ray_dpo.errors import UserError
from ray_dpo.stages import storage, tracking
from ray_dpo.stages.train import checkpoints
from ray_dpo.stages.train.loop import FAIL_ENV, train_loop
from ray_dpo.stages.train.shards import deal
from ray_dpo.stages.train.spec import WorkerSpec

# Ray Train's controller takes one report per worker each time it polls them (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
# 2 s by default) and a worker's next report waits for that poll: steps faster than the interval would wait for it
# (the tiny configs' ~50 ms steps ran at one per 2 s). The controller reads the variable from this process's
# environment when `fit` starts it; a value the user set is kept.
POLL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"

if TYPE_CHECKING:
    from ray_dpo.stages.data.handoff import Handoff

Progress = Callable[[dict[str, Any]], None]  # called with each report of rank 0 (`step`, `total_steps`, metrics)


class TrainingDivergedError(UserError):
    """The loss or gradient norm became NaN/Inf; training stopped before that step changed weights."""


@dataclass
class TrainResult:
    checkpoint: Checkpoint  # final checkpoint (model.safetensors, optimizer.pt, state.json, ...) in storage
    steps: int  # optimizer steps done in total (including those before a resume)
    metrics: dict[str, float]  # last train/* and val/* metrics
    resumed_from: int = 0  # step of the checkpoint the last worker group started from (0 = fresh start)
    rows_read: int = 0  # training rows all ranks read in the last epoch (= rows used: each rank reads its own)

    @property
    def uri(self) -> str:
        return storage.checkpoint_uri(self.checkpoint)


def train_dpo(
    config: Config,
    train_ds: ray.data.Dataset | Handoff,
    val_ds: ray.data.Dataset | None,
    *,
    name: str,
    init_checkpoint: str | Checkpoint,
    reference_checkpoint: str | Checkpoint | None,
    pad_id: int,
    mlflow_run: tuple[str, str] | None = None,
    progress: Progress | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,  # e.g. Tune's TuneReportCallback in a sweep trial
) -> TrainResult:
    """DPO on `train.num_workers` DDP workers starting from `init_checkpoint`, against the reference of
    `dpo.reference`: loaded from `reference_checkpoint` on every rank (live), columns of the data (precomputed),
    or none (also for losses that use no reference). Ray run `name` in `train.storage_path`: re-running the same
    name resumes from its latest checkpoint. `train_ds` as a `Handoff`: its blocks are freed as they are dealt to the
    ranks (one copy of the rows while training runs, not the dataset's and the ranks')."""
    mode = config.dpo.reference if config.dpo.uses_reference else "none"
    if mode == "live" and not reference_checkpoint:
        raise UserError("train: dpo.reference=live needs a reference checkpoint")
    for split, ds in (("train", train_ds), ("val", val_ds)):
        if mode == "precomputed" and ds is not None and "ref_chosen_logp" not in ds.columns():
            raise UserError(f"train: dpo.reference=precomputed but the {split} data has no ref_chosen_logp column")
    t = config.train
    return _fit(
        "dpo",
        config,
        name=name,
        datasets={"train": train_ds, "val": val_ds},
        batch_size=t.batch_size,
        epochs=t.epochs,
        max_steps=t.max_steps,
        lr=t.lr,
        init_checkpoint=init_checkpoint,
        reference_checkpoint=reference_checkpoint if mode == "live" else None,
        pad_id=pad_id,
        mlflow_run=mlflow_run,
        progress=progress,
        callbacks=callbacks,
    )


def train_sft(
    config: Config,
    sft_ds: ray.data.Dataset | Handoff,
    *,
    name: str,
    init_checkpoint: str | Checkpoint,
    pad_id: int,
    mlflow_run: tuple[str, str] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """SFT for `sft.epochs` at `sft.lr`, global batch `sft.batch_size`; metrics `sft/*`. Ray run `name`
    (re-running resumes it like DPO). The loss is the mean NLL over every response token of the GLOBAL batch."""
    s = config.sft
    return _fit(
        "sft",
        config,
        name=name,
        datasets={"train": sft_ds},
        batch_size=s.batch_size,
        epochs=s.epochs,
        max_steps=None,
        lr=s.lr,
        init_checkpoint=init_checkpoint,
        reference_checkpoint=None,
        pad_id=pad_id,
        mlflow_run=mlflow_run,
        progress=progress,
    )


def _fit(
    task: Literal["dpo", "sft"],
    config: Config,
    *,
    name: str,
    datasets: dict[str, ray.data.Dataset | Handoff | None],
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    lr: float,
    init_checkpoint: str | Checkpoint,
    reference_checkpoint: str | Checkpoint | None,
    pad_id: int,
    mlflow_run: tuple[str, str] | None,
    progress: Progress | None,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> TrainResult:
    # ---- setup: batch arithmetic, the per-rank shards, the worker spec
    t = config.train
    workers, accum = t.num_workers, t.grad_accum
    if batch_size % (workers * accum):
        raise UserError(
            f"config: train.batch_size={batch_size} must be a multiple of train.num_workers * train.grad_accum "
            f"= {workers * accum} (equal micro-batches on every worker)"
        )
    rows = datasets["train"].count()
    steps_per_epoch = rows // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"config: batch size {batch_size} exceeds the {rows} training rows")
    micro = batch_size // (workers * accum)
    shards = {"train": deal(datasets["train"], world=workers, block=micro, limit=steps_per_epoch * batch_size)}
    if datasets.get("val") is not None:
        # FSDP runs collectives in every forward: every rank must score as many batches (a few rows may go unused)
        # capped (train.val_max_pairs): validation runs every eval_every steps, on the first rows of the split
        val_rows = min(datasets["val"].count(), t.val_max_pairs or math.inf)
        equal = val_rows - val_rows % workers if t.strategy == "fsdp" else val_rows
        shards["val"] = deal(datasets["val"], world=workers, block=1, limit=int(equal))
    prefix = "train" if task == "dpo" else task
    spec = WorkerSpec(
        task=task,
        config=config,
        init_checkpoint=storage.as_checkpoint(init_checkpoint),
        reference_checkpoint=None if reference_checkpoint is None else storage.as_checkpoint(reference_checkpoint),
        micro_batch=micro,
        steps_per_epoch=steps_per_epoch,
        total_steps=max_steps if max_steps is not None else epochs * steps_per_epoch,
        lr=lr,
        pad_id=pad_id,
        metric_prefix=prefix,
        val_prefix="val" if task == "dpo" else f"{task}_val",
        perf_key="perf/tokens_per_s" if task == "dpo" else f"perf/{task}_tokens_per_s",
        fail_at=os.environ.get(FAIL_ENV) if task == "dpo" else None,  # the recovery tests target DPO steps
    )
    relay = _Relay(mlflow_run, progress)
    os.environ.setdefault(POLL_ENV, POLL_INTERVAL_S)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "shards": shards},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
            accelerator_type=t.accelerator_type,
            placement_strategy=t.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=t.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=[_QueueWriter(relay.queue), *(callbacks or [])],
        ),
    )
    # ---- run: fit in a thread; this thread logs and shows what the workers report
    result = relay.run(trainer.fit)
    # ---- result: the newest complete checkpoint in storage (Ray's registry may lag behind a crash)
    out = result.return_value or {}
    if out.get("error"):
        raise TrainingDivergedError(out["error"])
    filesystem, root = storage.resolve(t.storage_path)
    run_path = f"{root.rstrip('/')}/{name}"
    final = checkpoints.newest_complete(filesystem, run_path)
    if final is None:
        raise RuntimeError(f"train: run {name!r} finished without a complete checkpoint")
    # what Ray keeps is Ray's to prune (num_to_keep); a crash leftover it never registered is ours
    registered = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints or []}
    checkpoints.prune_unregistered(filesystem, run_path, keep=registered)
    return TrainResult(
        checkpoint=Checkpoint(path=final.path, filesystem=filesystem),
        steps=out.get("steps", 0),
        metrics=out.get("metrics", {}),
        resumed_from=out.get("resumed_from", 0),
        rows_read=out.get("rows_read", 0),
    )


class _Relay:
    """Rank 0's reports, from the Train controller to this process through a queue actor (`_QueueWriter` puts them
    there): logged to MLflow here, each (metric, step) once, also across worker-group restarts and re-runs; and shown
    as progress."""

    def __init__(self, mlflow_run: tuple[str, str] | None, progress: Progress | None):
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.uri, self.run_id = mlflow_run or (None, None)
        self.progress = progress

    def run(self, fit: Callable[[], ray.train.Result]) -> ray.train.Result:
        logged = self._logged_steps()
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = fit()
            except BaseException as err:  # re-raised in this thread
                outcome["error"] = err

        thread = threading.Thread(target=target, name="ray-dpo-fit", daemon=True)
        thread.start()
        try:
            while thread.is_alive() or not self.queue.empty():
                try:
                    report = self.queue.get(timeout=0.2)
                except Empty:
                    continue
                self._handle(report, logged)
            thread.join()
        finally:
            self.queue.shutdown()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def _logged_steps(self) -> dict[str, int]:
        """The last step of each metric already in the MLflow run (a re-run or a restart must not log them again)."""
        if not (self.uri and self.run_id):
            return {}
        return tracking.last_steps(self.uri, self.run_id)

    def _handle(self, report: dict[str, Any], logged: dict[str, int]) -> None:
        step = int(report.get("step", 0))
        metrics = {
            k: v
            for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" in k and math.isfinite(float(v))
        }
        fresh = {k: v for k, v in metrics.items() if step > logged.get(k, -1)}
        if fresh and self.uri and self.run_id:
            tracking.log_metrics(self.uri, self.run_id, fresh, step=step)
        logged.update(dict.fromkeys(fresh, step))
        if self.progress is not None:
            self.progress(report)


class _QueueWriter(ray.train.UserCallback):
    """What the controller runs: put rank 0's metrics of every report on the queue."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        if metrics:
            self.queue.put(dict(metrics[0]))
