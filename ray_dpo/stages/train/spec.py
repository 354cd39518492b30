"""What a training worker is told, typed: built by the driver, pickled once into `train_loop_config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ray.train import Checkpoint

from ray_dpo.config import Config


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, typed: built by the driver, pickled once into `train_loop_config`."""

    task: Literal["dpo", "sft"]
    config: Config
    init_checkpoint: Checkpoint  # weights (and tokenizer) the run starts from, staged where every node reads
    reference_checkpoint: Checkpoint | None  # the frozen reference (dpo.reference=live)
    micro_batch: int  # rows per micro-batch on one rank
    steps_per_epoch: int
    total_steps: int
    lr: float
    pad_id: int
    metric_prefix: str  # "train" (DPO) or "sft": train metrics are `<prefix>/loss`, ...
    val_prefix: str  # "val" or "sft_val"
    perf_key: str  # tokens/s metric name
    fail_at: str | None = None  # failure injection (FAIL_ENV)
