"""Names the torch API and the config share, defined once. No torch import: the config reads them before anything
heavy is imported."""

from __future__ import annotations

import typing
from typing import Literal

# TRL 1.x's DPO loss types, in TRL's order
TrlLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
LossType = Literal[TrlLossType, "simpo", "orpo"]  # + the reference-free SimPO and ORPO (TRL has them in other trainers)
FDivergenceType = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
ReferenceMode = Literal["live", "precomputed", "none"]  # a frozen model; log-probs from a pass; reference-free
Reduction = Literal["sum", "mean"]  # sequence log-prob: the sum over response tokens (the DPO paper) or their mean

TRL_LOSS_TYPES: tuple[str, ...] = typing.get_args(TrlLossType)
LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)
F_DIVERGENCES: tuple[str, ...] = typing.get_args(FDivergenceType)
REFERENCE_MODES: tuple[str, ...] = typing.get_args(ReferenceMode)
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)
