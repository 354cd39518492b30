"""The recipe: the run lifecycle and the stage graph every pipeline composes."""

from ray_dpo.recipe.stages import AlignResult, Run, align, evaluate_checkpoints, open_run

__all__ = ["AlignResult", "Run", "align", "evaluate_checkpoints", "open_run"]
