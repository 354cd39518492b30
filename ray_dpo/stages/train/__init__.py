"""Ray Train (V2): the driver (`driver`: one TorchTrainer per run), the per-worker loop (`loop`) and what it
optimises (`tasks`: DPO, SFT)."""

from ray_dpo.stages.train.driver import TrainingDivergedError, TrainResult, train_dpo, train_sft
from ray_dpo.stages.train.loop import FAIL_ENV, all_reduce_sum, lr_factor
from ray_dpo.stages.train.spec import WorkerSpec

__all__ = [
    "FAIL_ENV",
    "TrainResult",
    "TrainingDivergedError",
    "WorkerSpec",
    "all_reduce_sum",
    "lr_factor",
    "train_dpo",
    "train_sft",
]
