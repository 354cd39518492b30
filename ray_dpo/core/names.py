"""Names the torch API and the config share, defined once. No torch import: the config reads them before anything
heavy is imported."""

from __future__ import annotations

import typing
from typing import Literal

LossType = Literal["sigmoid", "robust", "ipo", "hinge", "sppo_hard", "nca_pair"]
ReferenceMode = Literal["live", "precomputed", "none"]  # a frozen model; log-probs from a pass; reference-free
Reduction = Literal["sum", "mean"]  # sequence log-prob: the sum over response tokens (the DPO paper) or their mean

LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)
REFERENCE_MODES: tuple[str, ...] = typing.get_args(ReferenceMode)
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)
