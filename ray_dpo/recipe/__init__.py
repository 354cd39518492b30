"""The recipe: the run lifecycle (`run`), the checks before it (`checks`), the stage graph every pipeline composes
(`stages`), the sweep over it (`sweep`), and what the user sees (`console`)."""

from ray_dpo.recipe.checks import Checked, check
from ray_dpo.recipe.run import Run, open_run
from ray_dpo.recipe.stages import AlignResult, Data, Trained, align, evaluate_checkpoints, train_and_evaluate

__all__ = [
    "AlignResult",
    "Checked",
    "Data",
    "Run",
    "Trained",
    "align",
    "check",
    "evaluate_checkpoints",
    "open_run",
    "train_and_evaluate",
]
